"""The integer decode path: `pallas_kernels.grouped.int8.int8_matmul` against a NumPy integer twin and within its
activation-rounding bound of the dequantized weight; "decode_int8" experts and a quantized model's decode within
that tolerance of the dequantized twin; "auto" picking the decode paths for a few rows on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pallas_kernels import quantize_weight
from pallas_kernels.grouped.int8 import activation_rounding_bound, int8_matmul, quantize_rows, signed_codes

import jaxmoe
from jaxmoe.moe.experts import dense_moe_reference, moe_ffn, resolve_implementation
from jaxmoe.quant.quantize import dequantize

# (bits, group size, symmetric, k). k = 96 packs in blocks of 32 rows, whose 16-row (4-bit) and 4-row (3-bit)
# planes a group of 24 rows cuts in the middle.
CASES = [(8, None, True, 64), (8, 16, False, 64), (4, 16, True, 64), (4, 32, False, 64), (3, 8, True, 64),
         (2, None, False, 64), (4, 24, False, 96), (3, 24, True, 96)]


def packed(rng, bits, group_size, symmetric, k=64, n=24):
    w = rng.normal(0, 0.3, (1, k, n)).astype(np.float32)
    return quantize_weight(jnp.asarray(w), bits=bits, group_size=group_size, symmetric=symmetric)


def numpy_int8_matmul(x, w):
    """The module docstring's formula in NumPy (int64 sums): two int8 limbs per activation, per row and group."""
    g, k, n = w.shape
    size = w.group_size
    codes = np.asarray(signed_codes(w)[0], np.int64)  # c - 2^(bits-1)
    scale = np.asarray(w.scale[0], np.float64)
    zero = (np.zeros_like(scale) if w.zero is None
            else np.asarray(w.zero[0], np.float64) - 2 ** (w.bits - 1))
    x = np.asarray(x, np.float32).reshape(x.shape[0], k // size, size)
    a = np.abs(x).max(axis=2) / np.float32(127)
    a = np.where(a == 0, np.float32(1), a).astype(np.float32)
    y = x / a[:, :, None]
    q1 = np.clip(np.round(y), -127, 127)
    q2 = np.clip(np.round((y - q1) * np.float32(254)), -127, 127)
    q1, q2 = q1.astype(np.int64), q2.astype(np.int64)
    out = np.zeros((x.shape[0], n))
    for j in range(k // size):
        rows = slice(j * size, (j + 1) * size)
        acc = q1[:, j] @ codes[rows] + (q2[:, j] @ codes[rows]) / 254
        acc -= zero[j][None, :] * (q1[:, j].sum(axis=1) + q2[:, j].sum(axis=1) / 254)[:, None]
        out += a[:, j:j + 1].astype(np.float64) * scale[j][None, :] * acc
    return out


@pytest.mark.parametrize("bits,group_size,symmetric,k", CASES)
def test_int8_matmul_equals_its_integer_formula_and_stays_within_the_rounding_bound(rng, bits, group_size,
                                                                                    symmetric, k):
    w = packed(rng, bits, group_size, symmetric, k=k)
    x = rng.normal(size=(5, k)).astype(np.float32)
    x[2, :16] = 0  # an all-zero activation group
    out = np.asarray(jax.jit(int8_matmul)(x, w))
    # XLA may divide by a as a multiplication by 1/a, which can move one second-limb tie by a unit (a / 254 · w)
    np.testing.assert_allclose(out, numpy_int8_matmul(x, w), rtol=1e-5, atol=1e-4)
    exact = x @ np.asarray(w.dequantize()[0])
    bound = np.asarray(activation_rounding_bound(x, w))
    assert (np.abs(out - exact) <= bound + 1e-6 * np.abs(exact).max()).all()
    assert bound.max() < 2e-4 * np.abs(exact).max()  # two limbs: about 16-bit activations


def test_int8_matmul_is_exact_when_the_activations_are_already_int8(rng):
    """Integers in [-127, 127] with 127 in every group round to themselves: only float rounding remains, so the
    zero-point algebra is checked exactly."""
    w = packed(rng, 4, 16, False)
    x = rng.integers(-126, 127, (3, 64)).astype(np.float32)
    x[:, ::16] = 127
    out = np.asarray(int8_matmul(x, w))
    np.testing.assert_allclose(out, x @ np.asarray(w.dequantize()[0]), rtol=1e-6, atol=1e-4)


def test_quantize_rows_splits_each_value_into_two_int8_limbs(rng):
    q1, q2, a = quantize_rows(jnp.asarray([[0.5, -1.0, 0.25, 0.0]]), 2)
    np.testing.assert_array_equal(np.asarray(q1), [[64, -127, 127, 0]])  # 0.5 * 127 = 63.5 -> 64 (ties to even)
    np.testing.assert_array_equal(np.asarray(q2), [[-127, 0, 0, 0]])  # 63.5 - 64 = -0.5 -> -127 / 254
    np.testing.assert_allclose(np.asarray(a), [[1 / 127, 0.25 / 127]])
    x = rng.normal(size=(3, 64)).astype(np.float32)
    q1, q2, a = (np.asarray(v, np.float64) for v in quantize_rows(jnp.asarray(x), 16))
    back = (q1 + q2 / 254).reshape(3, 4, 16) * a[:, :, None]
    assert np.abs(back.reshape(3, 64) - x).max() <= np.abs(x).max() / 127 / 508 * 1.01
    w = packed(rng, 8, None, True)
    np.testing.assert_array_equal(np.asarray(signed_codes(w)), np.asarray(w.codes, np.int64) - 128)


def test_int8_matmul_rejects_a_stack_of_matrices(rng):
    w = quantize_weight(jnp.ones((2, 64, 8)), bits=8, group_size=None)
    with pytest.raises(ValueError, match=r"one matrix w \(1, k, n\).*\(2, 64, 8\)"):
        int8_matmul(jnp.ones((3, 64)), w)


@pytest.mark.parametrize("bits", [8, 4])
def test_decode_int8_experts_stay_within_a_thousandth_of_the_dequantized_reference(rng, bits):
    e, d, f, t = 4, 32, 48, 6
    w_gate_up = quantize_weight(jnp.asarray(rng.normal(0, 0.3, (e, d, 2 * f)), jnp.float32), bits=bits,
                                group_size=16)
    w_down = quantize_weight(jnp.asarray(rng.normal(0, 0.3, (e, f, d)), jnp.float32), bits=bits, group_size=16)
    experts = np.stack([rng.choice(e, 2, replace=False) for _ in range(t)]).astype(np.int32)
    weights = rng.random((t, 2)).astype(np.float32)
    x = rng.normal(size=(t, d)).astype(np.float32)
    expected = np.asarray(dense_moe_reference(x, weights, experts, w_gate_up.dequantize(), w_down.dequantize()))
    out = np.asarray(jax.jit(moe_ffn, static_argnames="implementation")(x, weights, experts, w_gate_up, w_down,
                                                                        implementation="decode_int8"))
    err = np.abs(out - expected).max() / np.abs(expected).max()
    assert err < 1e-3, err
    assert resolve_implementation("auto", rows=t * 2, quantized=True) == "decode_int8"


def test_auto_takes_the_decode_paths_for_a_few_rows_on_cpu():
    assert resolve_implementation("auto", rows=16) == "decode"
    assert resolve_implementation("auto", rows=16, quantized=True) == "decode_int8"
    assert resolve_implementation("auto", rows=4096) == "blocked"
    assert resolve_implementation("auto", rows=4096, quantized=True) == "blocked"
    assert resolve_implementation("auto") == "blocked"


@pytest.mark.parametrize("bits", [8, pytest.param(4, marks=pytest.mark.slow)])
def test_quantized_model_decodes_within_tolerance_of_its_dequantized_twin(tiny_model, forward, bits):
    """Greedy decode of a tiny PhiMoE with packed experts (the int8 path at each decode step) against the same model
    with the packed weights dequantized to float: the same tokens, and the logits over the generated sequence (16
    tokens: 32 token copies, the int8 path again) within 0.1% of their scale. The weight quantization itself moves
    these logits by 2% (8 bits) and 34% (4 bits) from the float model's."""
    model = jaxmoe.quantize(tiny_model("tiny-moe", num_layers=2), bits=bits, group_size=32, target="experts")
    twin = dequantize(model)
    prompt = np.array([[5, 17, 260, 33, 81, 400, 2, 9]], np.int32)
    tokens = np.asarray(jaxmoe.generate(model, prompt, max_new_tokens=8, eos_token_id=()))
    np.testing.assert_array_equal(tokens, np.asarray(jaxmoe.generate(twin, prompt, max_new_tokens=8,
                                                                     eos_token_id=())))
    a, b = np.asarray(forward(model, tokens)), np.asarray(forward(twin, tokens))
    assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max()
