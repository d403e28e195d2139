"""blocked_attention (online softmax over key blocks, its own backward) equals dot_product_attention on the dense
mask, which tests/models/test_phi3_parity.py holds equal to transformers: outputs and q, k, v gradients, fp32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmoe
from jaxmoe.models.phimoe import PhimoeForCausalLM
from jaxmoe.nn.attention import (BLOCKED_FROM_LENGTH, AttentionMask, attend, blocked_attention,
                                 dot_product_attention)

TOL = 1e-5


def _inputs(rng, b, t, s, n, kv, h):
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, kv, h, s)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, kv, s, h)), jnp.float32)
    return q, k, v


def _output_and_grads(attention, q, k, v, cotangent):
    """attention(q, k, v) and the q, k, v gradients of sum(output * cotangent), in one compiled program."""
    def run(q, k, v, cotangent):
        out, backward = jax.vjp(attention, q, k, v)
        return out, backward(cotangent)
    return jax.jit(run)(q, k, v, cotangent)


def _assert_blocked_equals_dense(q, k, v, mask, rng, **blocks):
    cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    dense = lambda *qkv: dot_product_attention(*qkv, mask.dense())  # noqa: E731
    blocked = lambda *qkv: blocked_attention(*qkv, mask, **blocks)  # noqa: E731
    (want_out, want), (got_out, got) = (_output_and_grads(f, q, k, v, cotangent) for f in (dense, blocked))
    np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), rtol=0, atol=TOL)
    for name, g, w in zip("qkv", got, want):
        assert np.abs(np.asarray(g) - np.asarray(w)).max() <= TOL, name


@pytest.mark.parametrize("causal_columns", [False, True])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("packed", [False, True])
def test_blocked_equals_dense_with_padding_windows_and_segments(window, packed, causal_columns, rng):
    """GQA (6 heads on 2 KV heads), left padding (rows that see no key at all), 37 tokens in blocks of 8 x 16
    (both tails padded), with and without a sliding window and packed segments, and with the tiles above the
    diagonal skipped (causal_columns: these positions rise with the column in each segment)."""
    b, t, n, kv, h = 2, 37, 6, 2, 8
    q, k, v = _inputs(rng, b, t, t, n, kv, h)
    valid = np.ones((b, t), bool)
    valid[1, :5] = False
    positions = np.where(valid, np.cumsum(valid, axis=1) - 1, -1)
    segments = None
    if packed:
        segments = np.zeros((b, t), np.int32)
        segments[0, 20:] = 1
        segments[1, 30:] = 1
        positions[0, 20:] -= 20
        positions[1, 30:] -= positions[1, 30]
        segments = jnp.asarray(segments)
    positions = jnp.asarray(positions, jnp.int32)
    mask = AttentionMask(positions, positions, segments, window, causal_columns=causal_columns)
    _assert_blocked_equals_dense(q, k, v, mask, rng, block_q=8, block_k=16)


def test_causal_columns_skips_the_tiles_above_the_diagonal(rng):
    """Positions that fall with the column break the causal_columns promise: every query then sees only later
    columns, so with the promise the blocked path skips exactly those tiles and the answer changes (it differs
    from dense), while without it the blocked path still equals dense. A cache (s != t) is refused."""
    b, t, n, kv, h = 1, 32, 2, 1, 8
    q, k, v = _inputs(rng, b, t, t, n, kv, h)
    falling = jnp.asarray(np.arange(t)[::-1].copy(), jnp.int32)[None]
    dense = dot_product_attention(q, k, v, AttentionMask(falling, falling).dense())
    blocked = lambda promise: blocked_attention(q, k, v, AttentionMask(falling, falling, causal_columns=promise),  # noqa: E731
                                                block_q=8, block_k=8)
    np.testing.assert_allclose(np.asarray(blocked(False)), np.asarray(dense), rtol=0, atol=TOL)
    assert np.abs(np.asarray(blocked(True)) - np.asarray(dense)).max() > 0.1
    q_pos = jnp.arange(4, dtype=jnp.int32)[None]
    with pytest.raises(ValueError, match="causal_columns with 4 queries and 32 keys"):
        blocked_attention(q[:, :4], k, v, AttentionMask(q_pos, falling, causal_columns=True), block_q=8, block_k=8)


def test_blocked_equals_dense_over_a_kv_cache(rng):
    """Prefill into a cache: 12 queries over 40 slots, of which only the first 12 hold keys (the rest -1)."""
    b, t, s, n, kv, h = 2, 12, 40, 4, 1, 8
    q, k, v = _inputs(rng, b, t, s, n, kv, h)
    q_positions = jnp.asarray(np.broadcast_to(np.arange(t), (b, t)), jnp.int32)
    k_positions = jnp.concatenate([q_positions, jnp.full((b, s - t), -1, jnp.int32)], axis=1)
    mask = AttentionMask(q_positions, k_positions, None, None)
    _assert_blocked_equals_dense(q, k, v, mask, rng, block_q=5, block_k=8)


def _largest_intermediate(fn, *args) -> int:
    """Elements of the largest value any equation (scan and cond bodies included) of fn's jaxpr produces."""
    def walk(jaxpr):
        sizes = [0]
        for eqn in jaxpr.eqns:
            sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape")]
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        sizes.append(walk(sub.jaxpr))
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        sizes.append(walk(sub))
        return max(sizes)

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def test_neither_pass_holds_a_heads_by_t_by_s_tensor(rng):
    """The forward and backward of the blocked path never build anything of [b, heads, t, s] size; the dense
    path does (so the check can fail)."""
    b, t, n, kv, h = 1, 256, 4, 2, 8
    q, k, v = _inputs(rng, b, t, t, n, kv, h)
    positions = jnp.arange(t, dtype=jnp.int32)[None]
    mask = AttentionMask(positions, positions, None, None)
    scores = b * n * t * t

    def loss(attention):
        return lambda q, k, v: jnp.sum(attention(q, k, v) ** 2)

    dense = jax.grad(loss(lambda *qkv: dot_product_attention(*qkv, mask.dense())), argnums=(0, 1, 2))
    blocked = jax.grad(loss(lambda *qkv: blocked_attention(*qkv, mask, block_q=32, block_k=32)), argnums=(0, 1, 2))
    assert _largest_intermediate(dense, q, k, v) >= scores
    assert _largest_intermediate(blocked, q, k, v) <= scores // 8


def test_auto_takes_the_blocked_path_from_the_threshold_length(rng):
    n, kv, h = 2, 1, 4
    for t, blocked in ((BLOCKED_FROM_LENGTH - 1, False), (BLOCKED_FROM_LENGTH, True)):
        q, k, v = _inputs(rng, 1, t, t, n, kv, h)
        positions = jnp.arange(t, dtype=jnp.int32)[None]
        mask = AttentionMask(positions, positions, None, None)
        largest = _largest_intermediate(lambda *qkv: attend(*qkv, mask, implementation="auto"), q, k, v)
        assert (largest < n * t * t) == blocked, t


def test_unknown_implementation_is_named(rng):
    q, k, v = _inputs(rng, 1, 4, 4, 2, 1, 4)
    positions = jnp.arange(4, dtype=jnp.int32)[None]
    with pytest.raises(ValueError, match=r"'flash'.*expected one of"):
        attend(q, k, v, AttentionMask(positions, positions), implementation="flash")
    with pytest.raises(ValueError, match=r"attention_impl='flash'; expected 'auto', 'dense' or 'blocked'"):
        jaxmoe.get_preset("tiny").replace(attention_impl="flash")


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_a_model_with_blocked_attention_matches_dense_logits_and_gradients(rng):
    """The tiny MoE model (left padding, packed segments, its sliding window of 64 over 80 tokens): logits and
    the gradient of every parameter agree between attention_impl='blocked' and 'dense'. One layer: every layer
    calls the same attention."""
    ids = jnp.asarray(rng.integers(3, 512, size=(2, 80)), jnp.int32)
    attention_mask = jnp.asarray(np.arange(80)[None] >= np.array([[0], [9]]), jnp.int32)
    segments = jnp.asarray(np.where(np.arange(80) < 50, 0, 1)[None].repeat(2, 0), jnp.int32)

    def run(impl):
        model = PhimoeForCausalLM(jaxmoe.get_preset("tiny-moe").replace(attention_impl=impl, num_layers=1),
                                  rngs=nnx.Rngs(0))

        @nnx.jit
        def logits_and_grads(model):
            def loss(model):
                logits = model(ids, attention_mask=attention_mask, segment_ids=segments).logits
                return jnp.mean(jnp.tanh(logits)), logits
            return nnx.grad(loss, has_aux=True)(model)

        grads, logits = logits_and_grads(model)
        return logits, jax.tree.leaves(nnx.to_pure_dict(grads))

    (dense_logits, dense_grads), (blocked_logits, blocked_grads) = run("dense"), run("blocked")
    assert np.abs(np.asarray(blocked_logits) - np.asarray(dense_logits)).max() <= TOL
    assert len(dense_grads) == len(blocked_grads)
    for got, want in zip(blocked_grads, dense_grads):
        assert np.abs(np.asarray(got) - np.asarray(want)).max() <= TOL * max(1.0, float(np.abs(want).max()))
