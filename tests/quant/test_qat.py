"""Quantization-aware training: fake_quantize against the NumPy quantizer with an identity gradient, the QAT model
equal to its quantized version, its gradients equal to the float model's at the fake-quantized weights, and
training updating the float weights."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxmoe.quant import FakeQuantParam, apply_qat, fake_quantize, quantization_report, quantize

RTOL = 1e-5  # fp32 rounding between two orderings of the same computation, relative to the largest value


def assert_close(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
    assert err <= rtol * scale, f"max |diff| {err:.3g} > {rtol} x max |expected| {scale:.3g}"


@pytest.mark.parametrize("shape,bits,group_size,symmetric", [
    ((64, 24), 2, 16, True), ((3, 32, 8), 2, None, False), ((64, 24), 4, 32, False), ((3, 32, 8), 8, 8, True)])
def test_fake_quantize_is_the_numpy_round_trip_with_an_identity_gradient(rng, np_dequantize, shape, bits, group_size,
                                                                         symmetric):
    w = rng.normal(size=shape).astype(np.float32)
    w_gkn = w[None] if w.ndim == 2 else w
    expected = np_dequantize(w_gkn, bits, group_size, symmetric).reshape(shape)
    np.testing.assert_array_equal(fake_quantize(jnp.asarray(w), bits, group_size, symmetric), expected)
    r = rng.normal(size=shape).astype(np.float32)
    grad = jax.grad(lambda w: jnp.sum(fake_quantize(w, bits, group_size, symmetric) * r))(jnp.asarray(w))
    np.testing.assert_array_equal(grad, r)


@pytest.mark.parametrize("preset,target,group_size", [pytest.param("tiny-moe", "linear", 32, marks=pytest.mark.slow),
                                                      ("tiny", "linear", None)])
def test_quantizing_the_qat_model_gives_the_logits_its_forward_computed(tiny_model, forward, ids, preset, target,
                                                                        group_size):
    # The weight-only expert path: CPU's default for a few tokens, "decode_int8", also rounds activations.
    qat = apply_qat(tiny_model(preset, expert_implementation="decode"), bits=2, group_size=group_size, target=target)
    quantized = quantize(qat, bits=2, group_size=group_size, target=target)
    assert quantization_report(quantized)
    assert not any(isinstance(v, FakeQuantParam) for _, v in nnx.iter_graph(quantized))
    assert_close(forward(quantized, ids), forward(qat, ids))


def loss_fn(model, ids):
    logits = model(ids).logits
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])


grad_fn = nnx.jit(nnx.grad(loss_fn))


def float_grads(model, ids):
    return nnx.to_pure_dict(grad_fn(model, ids))


def test_qat_gradients_are_the_float_models_gradients_at_the_fake_quantized_weights(tiny_model, ids):
    model = tiny_model("tiny-moe")
    qat = apply_qat(model, bits=2, group_size=32, target="linear")
    # The twin: a plain float model holding the fake-quantized values (no STE involved).
    twin = nnx.clone(model)
    fake = {path: variable for path, variable in nnx.iter_graph(qat) if isinstance(variable, FakeQuantParam)}
    twin_vars = dict(nnx.iter_graph(twin))
    for path, variable in fake.items():
        twin_vars[path][...] = variable[...]
    assert len(fake) == 5  # qkv_proj, o_proj, lm_head kernels and both expert stacks
    qat_grads, twin_grads = float_grads(qat, ids), float_grads(twin, ids)
    jax.tree.map(assert_close, qat_grads, twin_grads)
    # The STE changes the gradients of the quantized weights only through where they are evaluated.
    plain = float_grads(model, ids)
    assert np.abs(np.asarray(plain["layers"][0]["mlp"]["w_down"]) -
                  np.asarray(qat_grads["layers"][0]["mlp"]["w_down"])).max() > 1e-4


def test_qat_parameters_stay_trainable_float_params_and_an_optimizer_updates_them(tiny_model, ids):
    qat = apply_qat(tiny_model("tiny-moe"), bits=2, group_size=32, target="linear")  # grad_fn compiled above
    block = qat.layers[0].mlp
    assert isinstance(block.w_down, FakeQuantParam) and isinstance(block.w_down, nnx.Param)
    before = np.asarray(block.w_down.get_value())
    optimizer = nnx.Optimizer(qat, optax.sgd(0.5), wrt=nnx.Param)
    optimizer.update(qat, grad_fn(qat, ids))
    after = np.asarray(block.w_down.get_value())
    assert not np.array_equal(after, before)
    # The master weights move by the raw gradient step, not snapped to the 2-bit grid.
    assert len(np.unique(after[0])) > 4 and isinstance(qat.layers[0].mlp.w_down, FakeQuantParam)


def test_qat_errors_name_the_problem(tiny_model):
    model = tiny_model("tiny-moe")
    with pytest.raises(ValueError, match=r"group_size 'adaptive' for 'layers/0/mlp/w_gate_up'.*fixed group size"):
        apply_qat(model, bits=2, group_size="adaptive", target="experts")
    qat = apply_qat(model, bits=2, group_size=32, target="experts")
    with pytest.raises(ValueError, match=r"already prepared for QAT"):
        apply_qat(qat, bits=2, group_size=32, target="experts")
    with pytest.raises(ValueError, match=r"'layers/0/mlp/w_gate_up' was trained with apply_qat\(\{'bits': 2, "
                                         r"'group_size': 32, 'symmetric': True\}\) but would be quantized with "
                                         r"\{'bits': 4"):
        quantize(qat, bits=4, group_size=32, target="experts")
    with pytest.raises(ValueError, match=r"'layers/0/mlp/w_down' was trained with .* but would be left float"):
        quantize(qat, bits=2, group_size=32, target="experts", rules=[(r"w_down", {"bits": None})])
    with pytest.raises(ValueError, match=r"bits=5 for fake_quantize"):
        fake_quantize(jnp.ones((8, 4)), 5, None)
