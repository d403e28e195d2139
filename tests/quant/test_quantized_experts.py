"""Quantized weights in the forward paths: moe_ffn with packed expert weights (every implementation) against
dense_moe_reference on the dequantized weights, its gradient in x, and QuantizedLinear / quantized_matmul against
the float layer. fp32 on CPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from pallas_kernels import quantize_weight

from jaxmoe.moe.experts import IMPLEMENTATIONS, dense_moe_reference, moe_ffn
from jaxmoe.quant import QuantizedLinear, quantized_matmul

D, F, E, T = 32, 48, 4, 40
RTOL = 1e-5  # fp32 accumulation-order differences, relative to the largest output
# "decode_int8" rounds the activations to int8 as well (tests/quant/test_int8_decode.py holds it to its bound).
WEIGHT_ONLY = sorted(set(IMPLEMENTATIONS) - {"decode_int8"})


def assert_close(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
    assert err <= rtol * scale, f"max |diff| {err:.3g} > {rtol} x max |expected| {scale:.3g}"


def expert_setup(rng, bits, group_size, symmetric):
    """Random routing (expert 2 left empty) and packed expert weights."""
    w_gate_up = rng.normal(0, 0.3, (E, D, 2 * F)).astype(np.float32)
    w_down = rng.normal(0, 0.3, (E, F, D)).astype(np.float32)
    experts = np.stack([rng.choice([0, 1, 3], 2, replace=False) for _ in range(T)]).astype(np.int32)
    weights = rng.random((T, 2)).astype(np.float32)
    x = rng.normal(size=(T, D)).astype(np.float32)
    packed = [quantize_weight(jnp.asarray(w), bits=bits, group_size=group_size, symmetric=symmetric)
              for w in (w_gate_up, w_down)]
    return x, weights, experts, packed


# The default tier: every implementation at 4 bits, every width through "blocked"; the slow tier: the whole grid.
@pytest.mark.parametrize("bits,group_size,symmetric,impl", [
    pytest.param(*case, impl, marks=[] if case[0] == 4 or impl == "blocked" else [pytest.mark.slow])
    for case in [(4, 16, True), (2, None, False), (3, 8, True)] for impl in WEIGHT_ONLY])
def test_moe_ffn_with_quantized_experts_equals_the_dense_reference_on_dequantized_weights(rng, impl, bits,
                                                                                           group_size, symmetric):
    x, weights, experts, (q_gate_up, q_down) = expert_setup(rng, bits, group_size, symmetric)
    ffn = jax.jit(functools.partial(moe_ffn, implementation=impl))
    expected = dense_moe_reference(x, weights, experts, q_gate_up.dequantize(), q_down.dequantize())
    assert_close(ffn(x, weights, experts, q_gate_up, q_down), expected)
    assert_close(dense_moe_reference(x, weights, experts, q_gate_up, q_down), expected, rtol=0)


@pytest.mark.parametrize("impl", [  # the slow tier: every implementation
    impl if impl in ("blocked", "decode_int8") else pytest.param(impl, marks=pytest.mark.slow)
    for impl in sorted(IMPLEMENTATIONS)])
def test_gradient_in_x_through_quantized_experts_equals_the_float_path_at_the_dequantized_weights(rng, impl):
    x, weights, experts, (q_gate_up, q_down) = expert_setup(rng, 4, 16, True)
    w_gate_up, w_down = q_gate_up.dequantize(), q_down.dequantize()
    r = rng.normal(size=(T, D)).astype(np.float32)

    def loss(x, w_gate_up, w_down):
        return jnp.sum(moe_ffn(x, weights, experts, w_gate_up, w_down, implementation=impl) * r)

    quantized = jax.jit(jax.grad(loss))(x, q_gate_up, q_down)
    reference = jax.jit(jax.grad(lambda x: jnp.sum(dense_moe_reference(x, weights, experts, w_gate_up, w_down) * r)))(x)
    assert_close(quantized, reference)
    # A mix of one packed and one float weight also works; the float one gets its gradient.
    dx, dw_down = jax.jit(jax.grad(loss, argnums=(0, 2)))(x, q_gate_up, w_down)
    ref_dx, ref_dw_down = jax.grad(
        lambda x, wd: jnp.sum(dense_moe_reference(x, weights, experts, w_gate_up, wd) * r), argnums=(0, 1))(x, w_down)
    assert_close(dx, ref_dx)
    assert_close(dw_down, ref_dw_down)


@pytest.mark.parametrize("implementation", ["dequantize", "gmm"])
@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (4, 16, False), (2, 32, True)])
def test_quantized_linear_equals_nnx_linear_holding_the_dequantized_kernel(rng, implementation, bits, group_size,
                                                                           symmetric):
    kernel = rng.normal(0, 0.3, (64, 24)).astype(np.float32)
    bias = rng.normal(size=24).astype(np.float32)
    packed = quantize_weight(jnp.asarray(kernel)[None], bits=bits, group_size=group_size, symmetric=symmetric)
    float_layer = nnx.Linear(64, 24, rngs=nnx.Rngs(0))
    float_layer.kernel[...] = packed.dequantize()[0]
    float_layer.bias[...] = bias
    x = rng.normal(size=(3, 5, 64)).astype(np.float32)
    layer = QuantizedLinear(packed, jnp.asarray(bias))
    expected = float_layer(x)
    assert_close(layer(x), expected)
    assert_close(quantized_matmul(x, packed, dtype=jnp.float32, implementation=implementation) + bias, expected)
    np.testing.assert_array_equal(layer.kernel[...], packed.dequantize()[0])  # `[...]` reads the float kernel


def test_quantized_linear_and_matmul_reject_bad_inputs(rng):
    packed = quantize_weight(jnp.ones((2, 16, 8)), bits=4, group_size=8)
    with pytest.raises(ValueError, match=r"QuantizedWeight of shape \(1, k, n\); got QuantizedWeight \(2, 16, 8\)"):
        QuantizedLinear(packed, None)
    one = quantize_weight(jnp.ones((1, 16, 8)), bits=4, group_size=8)
    with pytest.raises(ValueError, match=r"bias has shape \(9,\); expected \(8,\)"):
        QuantizedLinear(one, jnp.zeros(9))
    with pytest.raises(ValueError, match=r"implementation='triton'"):
        quantized_matmul(jnp.ones((2, 16)), one, dtype=jnp.float32, implementation="triton")
