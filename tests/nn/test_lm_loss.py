"""The output head's cross-entropy: the fused op (chunks, gradient made in the forward pass) gives the plain
formula's sums and gradients, for both weight layouts, with and without bias, zero-weight rows and a token count
that no chunk size divides; a model's hidden states through its output head are its logits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxmoe
from jaxmoe.nn.lm_loss import OutputHead, default_chunk, fused_cross_entropy, logits_cross_entropy

N, D, V = 29, 12, 40  # 29 tokens: chunks of 8 leave 3 padding rows


def plain_stats(x, weight, bias, layout, targets, weights):
    """The formula written out: fp32 logits, optax's cross-entropy, jnp.argmax's first maximum."""
    logits = x @ (weight.T if layout == "vd" else weight)
    if bias is not None:
        logits = logits + bias
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    hits = (jnp.argmax(logits, axis=-1) == targets) & (weights > 0)
    return jnp.sum(nll * weights), (jnp.sum(hits.astype(jnp.float32)), jnp.sum(weights))


def inputs(rng, layout, with_bias):
    x = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(V, D) if layout == "vd" else (D, V)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(V,)), jnp.float32) if with_bias else None
    targets = rng.integers(0, V, size=N)
    logits = x[:6] @ (weight.T if layout == "vd" else weight) + (0.0 if bias is None else bias)
    targets[:6] = np.asarray(logits).argmax(-1)  # some greedy hits
    weights = (rng.random(N) > 0.25).astype(np.float32)
    weights[0] = 0.0  # a hit on a zero-weight row does not count
    return x, weight, bias, jnp.asarray(targets, jnp.int32), jnp.asarray(weights)


CASES = [("vd", False), ("dv", False), ("dv", True)]
CASE_IDS = ["tied_vd", "untied_dv", "untied_dv_bias"]


@pytest.mark.parametrize("layout, with_bias", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("op", ["fused_chunk8", "fused_one_chunk", "logits"])
def test_sums_and_gradients_equal_the_plain_formula(rng, layout, with_bias, op):
    x, weight, bias, targets, weights = inputs(rng, layout, with_bias)
    fn = {"fused_chunk8": lambda *a: fused_cross_entropy(*a, chunk=8),
          "fused_one_chunk": lambda *a: fused_cross_entropy(*a, chunk=64), "logits": logits_cross_entropy}[op]

    def loss(x, weight, bias):
        stats = fn(x, OutputHead(weight, bias, layout), targets, weights)
        return stats["loss_sum"], (stats["correct"], stats["tokens"])

    argnums = (0, 1, 2) if with_bias else (0, 1)
    (loss_sum, (correct, tokens)), grads = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(x, weight, bias)
    (want_sum, (want_correct, want_tokens)), want_grads = jax.value_and_grad(
        lambda x, w, b: plain_stats(x, w, b, layout, targets, weights), argnums, has_aux=True)(x, weight, bias)
    assert float(want_correct) >= 4  # the check covers hits
    assert float(correct) == float(want_correct) and float(tokens) == float(want_tokens)
    np.testing.assert_allclose(float(loss_sum), float(want_sum), rtol=1e-6)
    for got, want in zip(grads, want_grads):
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_the_forward_alone_equals_the_plain_formula(rng):
    """Outside differentiation the fused op runs its primal, which computes no gradients."""
    x, weight, bias, targets, weights = inputs(rng, "dv", True)
    stats = jax.jit(lambda *a: fused_cross_entropy(*a, chunk=8))(x, OutputHead(weight, bias, "dv"), targets, weights)
    want_sum, (want_correct, want_tokens) = plain_stats(x, weight, bias, "dv", targets, weights)
    np.testing.assert_allclose(float(stats["loss_sum"]), float(want_sum), rtol=1e-6)
    assert float(stats["correct"]) == float(want_correct) and float(stats["tokens"]) == float(want_tokens)


def test_a_frozen_head_costs_no_weight_gradient_matmul(rng):
    """Differentiated in x only (a head the optimizer does not train), the op runs two matmuls per chunk, not
    three, and x's gradient is the plain formula's."""
    x, weight, _, targets, weights = inputs(rng, "dv", False)
    head = OutputHead(weight, None, "dv")

    def loss(x, head):
        return fused_cross_entropy(x, head, targets, weights, chunk=8)["loss_sum"]

    def matmuls(fn, *args):
        return str(jax.make_jaxpr(fn)(*args)).count("dot_general")

    assert matmuls(jax.grad(loss), x, head) == 2
    assert matmuls(jax.grad(loss, argnums=(0, 1)), x, head) == 3
    want = jax.grad(lambda x: plain_stats(x, weight, None, "dv", targets, weights)[0])(x)
    np.testing.assert_allclose(np.asarray(jax.grad(loss)(x, head)), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_bf16_hidden_states_keep_each_gradient_in_its_arguments_dtype(rng):
    x, weight, bias, targets, weights = inputs(rng, "dv", True)
    x16 = x.astype(jnp.bfloat16)

    def loss(x, weight, bias):
        return fused_cross_entropy(x, OutputHead(weight, bias, "dv"), targets, weights)["loss_sum"]

    grads = jax.grad(loss, argnums=(0, 1, 2))(x16, weight, bias)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.float32, jnp.float32]
    want = jax.grad(lambda *a: plain_stats(*a, "dv", targets, weights)[0], argnums=(0, 1, 2))(
        x16.astype(jnp.float32), weight.astype(jnp.bfloat16).astype(jnp.float32), bias)
    for got, w in zip(grads, want):  # bf16 operands, fp32 accumulation: within bf16 rounding of the fp32 result
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(w), rtol=2e-2, atol=2e-2)


def test_the_default_chunk_holds_a_small_vocabularys_tokens_at_once_and_a_large_ones_in_parts():
    assert default_chunk(512) >= 2 * 1024
    assert 256 <= default_chunk(32064) <= 512


def test_mismatched_shapes_are_named(rng):
    x, weight, bias, targets, weights = inputs(rng, "dv", True)
    head = OutputHead(weight, bias, "dv")
    with pytest.raises(ValueError, match=r"x has shape \(29, 11\); expected \[tokens, 12\]"):
        fused_cross_entropy(x[:, :11], head, targets, weights)
    with pytest.raises(ValueError, match=r"weights has shape \(28,\); expected \[29\]"):
        fused_cross_entropy(x, head, targets, weights[:28])
    with pytest.raises(ValueError, match="chunk=0"):
        fused_cross_entropy(x, head, targets, weights, chunk=0)
    with pytest.raises(ValueError, match="layout='kv'"):
        OutputHead(weight, bias, "kv")


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])  # tied embeddings; untied head with bias
def test_a_models_hidden_states_through_its_output_head_are_its_logits(rng, preset):
    model = (jaxmoe.PhimoeForCausalLM if preset == "tiny-moe" else jaxmoe.Phi3ForCausalLM)(
        jaxmoe.get_preset(preset).replace(vocab_size=64, num_layers=1), rngs=nnx.Rngs(0))
    ids = jnp.asarray(rng.integers(3, 64, size=(2, 9)), jnp.int32)

    @nnx.jit
    def both(model, ids):
        out = model(ids, return_hidden=True)
        return model(ids).logits, out.logits, model.output_head().logits(out.hidden_states)

    logits, none, from_hidden = both(model, ids)
    assert none is None
    assert model.output_head().layout == ("vd" if preset == "tiny" else "dv")
    np.testing.assert_array_equal(np.asarray(from_hidden), np.asarray(logits))
