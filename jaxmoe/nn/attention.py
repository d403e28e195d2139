"""Grouped-query attention with the fused `qkv_proj` layout and a preallocated KV cache.

Two implementations of the same softmax attention: `dot_product_attention` (the reference: the whole
[b, heads, t, s] score tensor in fp32) and `blocked_attention` (online softmax over key blocks with its own
backward pass, so neither direction holds more than one [heads, block_q, block_k] tile of scores). `attend` picks
one; both take the mask as an `AttentionMask` (positions and segments), from which the blocked path builds only
the tiles it visits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxmoe.nn.rope import apply_rope

_MASKED = float(jnp.finfo(jnp.float32).min)  # finite, so fully masked rows (padding) stay NaN-free
IMPLEMENTATIONS = ("auto", "dense", "blocked")
BLOCKED_FROM_LENGTH = 1024  # "auto" takes the blocked path from this many queries: dense scores are then >= 4 MiB/head


@struct.dataclass
class KVCache:
    """Keys and values of every layer, preallocated to `max_len` slots.

    Slot s of row b holds the token at buffer column s; `positions_bs` is its position id, or -1 for a slot
    that is empty or padding (never attended to). `index` is the next slot to write. Keys are stored with
    the slots as the minor axis and values with the head dim as the minor axis: a decode step's two
    multiply-and-reduce passes then each run along contiguous memory, and nothing transposes the cache.
    """

    k: tuple[jax.Array, ...]  # per layer [b, kv_heads, head_dim, S]
    v: tuple[jax.Array, ...]  # per layer [b, kv_heads, S, head_dim]
    positions_bs: jax.Array  # int32 [b, S]
    index: jax.Array  # int32 []

    @classmethod
    def create(cls, *, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype) -> "KVCache":
        zeros = lambda *shape: jnp.zeros((batch, num_kv_heads, *shape), dtype)  # noqa: E731
        return cls(
            k=tuple(zeros(head_dim, max_len) for _ in range(num_layers)),
            v=tuple(zeros(max_len, head_dim) for _ in range(num_layers)),
            positions_bs=jnp.full((batch, max_len), -1, jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    def take_rows(self, rows: jax.Array) -> "KVCache":
        """The cache of batch rows `rows` int [B] (each layer's keys and values, and the slot positions)."""
        return self.replace(k=tuple(k[rows] for k in self.k), v=tuple(v[rows] for v in self.v),
                            positions_bs=self.positions_bs[rows])

    @property
    def max_len(self) -> int:
        return self.positions_bs.shape[1]


def causal_mask(q_positions_bt: jax.Array, k_positions_bs: jax.Array, sliding_window: int | None,
                segment_ids_bt: jax.Array | None = None) -> jax.Array:
    """bool [b, t, s]: query i sees key j iff 0 <= pos_j <= pos_i (and pos_i - pos_j < window).

    Position -1 marks padding or an empty cache slot on either side. With `segment_ids_bt` (packed sequences,
    no cache: s == t), a query sees only keys of its own segment.
    """
    q = q_positions_bt[:, :, None]
    k = k_positions_bs[:, None, :]
    mask = (k >= 0) & (q >= 0) & (k <= q)
    if sliding_window is not None:
        mask &= q - k < sliding_window
    if segment_ids_bt is not None:
        mask &= segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    return mask


def dot_product_attention(q_btnh, k_bkhs, v_bksh, mask_bts) -> jax.Array:
    """Softmax(q k^T / sqrt(h)) v with grouped KV heads; scores and softmax in fp32. Returns [b, t, n, h].

    Keys come as [b, kv, h, s] and values as [b, kv, s, h] (the KV cache layouts).
    """
    b, t, n, h = q_btnh.shape
    kv = k_bkhs.shape[1]
    q = q_btnh.reshape(b, t, kv, n // kv, h)
    if t == 1:
        # One query per row (a decode step): multiply-and-reduce over the cache, vectorised along its minor axis.
        q = q[:, 0, :, :, :, None].astype(jnp.float32)  # [b, kv, g, h, 1]
        scores = jnp.sum(q * k_bkhs[:, :, None].astype(jnp.float32), axis=3)[:, :, :, None, :]  # [b, kv, g, 1, s]
    else:
        # fp32 operands: XLA:CPU has no bf16 x bf16 -> f32 batched dot for this layout.
        scores = jnp.einsum("btkgh,bkhs->bkgts", q.astype(jnp.float32), k_bkhs.astype(jnp.float32))
    scores = jnp.where(mask_bts[:, None, None, :, :], scores * (h ** -0.5), _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    if t == 1:
        weighted = probs[:, :, :, 0, :, None] * v_bksh[:, :, None].astype(jnp.float32)  # [b, kv, g, s, h]
        out = jnp.sum(weighted, axis=3)[:, None].astype(v_bksh.dtype)  # [b, 1, kv, g, h]
    else:
        out = jnp.einsum("bkgts,bksh->btkgh", probs.astype(v_bksh.dtype), v_bksh)
    return out.reshape(b, t, n, h)


@struct.dataclass
class AttentionMask:
    """Who attends to whom, as positions rather than a [b, t, s] tensor (see `causal_mask`).

    q_positions_bt int32 [b, t], k_positions_bs int32 [b, s] (-1: padding or an empty cache slot),
    segment_ids_bt optional int [b, t] (packed rows; then s == t), sliding_window a static int or None.

    causal_columns (static) promises that a key in a later column than its query is hidden: queries and keys
    are the same t tokens (s == t, no cache) and positions rise with the column within each segment, as the
    positions a model counts itself do. `blocked_attention` then skips the tiles above the diagonal.
    """

    q_positions_bt: jax.Array
    k_positions_bs: jax.Array
    segment_ids_bt: jax.Array | None = None
    sliding_window: int | None = struct.field(pytree_node=False, default=None)
    causal_columns: bool = struct.field(pytree_node=False, default=False)

    def dense(self) -> jax.Array:
        """bool [b, t, s], the whole mask."""
        return causal_mask(self.q_positions_bt, self.k_positions_bs, self.sliding_window, self.segment_ids_bt)


def attend(q_btnh, k_bkhs, v_bksh, mask: AttentionMask, *, implementation: str = "auto") -> jax.Array:
    """Attention by `implementation`: "dense" (`dot_product_attention`), "blocked" (`blocked_attention`) or
    "auto" (blocked from BLOCKED_FROM_LENGTH queries on). One query per row (a decode step) is always dense.
    Shapes as `dot_product_attention`; returns [b, t, n, h]."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
    t = q_btnh.shape[1]
    blocked = implementation == "blocked" or (implementation == "auto" and t >= BLOCKED_FROM_LENGTH)
    if blocked and t > 1:
        return blocked_attention(q_btnh, k_bkhs, v_bksh, mask)
    return dot_product_attention(q_btnh, k_bkhs, v_bksh, mask.dense())


def blocked_attention(q_btnh, k_bkhs, v_bksh, mask: AttentionMask, *, block_q: int = 256,
                      block_k: int = 256) -> jax.Array:
    """`dot_product_attention(q, k, v, mask.dense())` without the [b, heads, t, s] scores: a scan over query
    blocks, inside it a scan over key blocks with an online softmax (running max and sum per query). A custom VJP
    recomputes each tile's probabilities from the saved row max and sum (flash-attention's backward), so the
    gradient needs no [t, s] tensor either. With `mask.causal_columns` the tiles above the diagonal (key block
    starting after the query block's last column) are skipped, a predicate of the block indices alone; other
    tiles are all computed, hidden ones included: skipping them by the mask would need a predicate reduced over
    the batch, which under a sharded batch is an all-reduce per tile.

    q [b, t, n, h], k [b, kv, h, s], v [b, kv, s, h] (the KV cache layouts); returns [b, t, n, h] in v's dtype.
    Scores, softmax statistics and accumulators are fp32. t and s need not be multiples of the blocks: the
    tails are padded with position -1 (never attended to). Blocks of 256 (the default): forward + backward at
    b=2, t=1,024, 8 heads / 4 KV heads, head_dim 64 took 121 ms on the 2-core benchmark CPU, against 152 ms with
    512 and 226 ms with 1,024 (BENCHMARKS.md, issue 15). A query that sees no key at all (padding) gets, as in
    the dense path, the mean of all s values.
    """
    b, t, n, h = q_btnh.shape
    kv, s = k_bkhs.shape[1], k_bkhs.shape[3]
    if n % kv or k_bkhs.shape != (b, kv, h, s) or v_bksh.shape != (b, kv, s, h):
        raise ValueError(f"blocked_attention: q {q_btnh.shape}, k {k_bkhs.shape}, v {v_bksh.shape}; expected "
                         "q [b, t, n, h], k [b, kv, h, s], v [b, kv, s, h] with kv dividing n")
    if mask.segment_ids_bt is not None and s != t:
        raise ValueError(f"blocked_attention: segment_ids with {t} queries and {s} keys; packed rows need s == t")
    if mask.causal_columns and s != t:
        raise ValueError(f"blocked_attention: causal_columns with {t} queries and {s} keys; it holds only for a "
                         "row's own tokens (s == t, no KV cache)")
    bq, bk = min(block_q, t), min(block_k, s)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    q_pos = jnp.pad(mask.q_positions_bt.astype(jnp.int32), ((0, 0), (0, tp - t)), constant_values=-1)
    k_pos = jnp.pad(mask.k_positions_bs.astype(jnp.int32), ((0, 0), (0, sp - s)), constant_values=-1)
    if mask.segment_ids_bt is None:
        q_seg, k_seg = jnp.zeros((b, tp), jnp.int32), jnp.zeros((b, sp), jnp.int32)
    else:
        q_seg = jnp.pad(mask.segment_ids_bt.astype(jnp.int32), ((0, 0), (0, tp - t)))
        k_seg = jnp.pad(mask.segment_ids_bt.astype(jnp.int32), ((0, 0), (0, sp - s)))
    q = jnp.pad(q_btnh, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    k = jnp.pad(k_bkhs, ((0, 0), (0, 0), (0, 0), (0, sp - s)))
    v = jnp.pad(v_bksh, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    cfg = _Blocking(bq, bk, s, mask.sliding_window, mask.causal_columns)
    out = _blocked(q, k, v, q_pos, k_pos, q_seg, k_seg, cfg)
    return out[:, :t]


@struct.dataclass
class _Blocking:
    """Static settings of one blocked attention call: block sizes, the real key count, the sliding window."""

    block_q: int = struct.field(pytree_node=False)
    block_k: int = struct.field(pytree_node=False)
    num_keys: int = struct.field(pytree_node=False)
    sliding_window: int | None = struct.field(pytree_node=False)
    causal_columns: bool = struct.field(pytree_node=False)

    def visible(self, q_block, k_block) -> jax.Array:
        """bool []: whether tile (q_block, k_block) can hold a visible pair (always, unless causal_columns)."""
        if not self.causal_columns:
            return jnp.bool_(True)
        return k_block * self.block_k <= q_block * self.block_q + self.block_q - 1


def _tile_mask(q_pos_bq, q_seg_bq, k_pos_bk, k_seg_bk, window) -> jax.Array:
    """bool [b, bq, bk]: `causal_mask` of one tile, with segments."""
    return causal_mask(q_pos_bq, k_pos_bk, window) & (q_seg_bq[:, :, None] == k_seg_bk[:, None, :])


def _blocks(q, k, v, k_pos, k_seg, cfg: _Blocking):
    """Stacks along a leading block axis, dtypes kept (each tile is cast to fp32 where it is used):
    q [nq, b, kv, g, bq, h]; and the keys' scan inputs: k [nk, b, kv, h, bk], v [nk, b, kv, bk, h], key positions
    and segments [nk, b, bk]."""
    b, nk = q.shape[0], k.shape[3] // cfg.block_k
    k_blocks = k.reshape(*k.shape[:3], nk, cfg.block_k).transpose(3, 0, 1, 2, 4)
    v_blocks = v.reshape(v.shape[0], v.shape[1], nk, cfg.block_k, v.shape[3]).transpose(2, 0, 1, 3, 4)
    by_k = lambda x: x.reshape(b, nk, cfg.block_k).transpose(1, 0, 2)  # noqa: E731
    return _block_q(q, k.shape[1], cfg), (k_blocks, v_blocks, by_k(k_pos), by_k(k_seg))


def _block_q(x, kv: int, cfg: _Blocking):
    """[b, tp, n, h] -> [nq, b, kv, g, bq, h]."""
    b, tp, n, h = x.shape
    return x.reshape(b, tp // cfg.block_q, cfg.block_q, kv, n // kv, h).transpose(1, 0, 3, 4, 2, 5)


def _block_rows(x, cfg: _Blocking):
    """[b, tp] -> [nq, b, bq]."""
    return x.reshape(x.shape[0], -1, cfg.block_q).transpose(1, 0, 2)


def _unblock_q(x, shape):
    """[nq, b, kv, g, bq, h] -> [b, nq * bq, kv * g, h] (= `shape`)."""
    return x.transpose(1, 0, 4, 2, 3, 5).reshape(shape)


def _mean_values(v, cfg: _Blocking):
    """fp32 [b, kv, h]: what a query that sees no key gets (uniform weights over the s real keys, as dense)."""
    return jnp.mean(v[:, :, : cfg.num_keys].astype(jnp.float32), axis=2)


def _forward(q, k, v, q_pos, k_pos, q_seg, k_seg, cfg: _Blocking):
    """(out [b, tp, n, h] in v's dtype, residuals for the backward)."""
    q_blocks, keys = _blocks(q, k, v, k_pos, k_seg, cfg)
    scale = q.shape[-1] ** -0.5
    mean_v = _mean_values(v, cfg)[:, :, None, None, :]  # [b, kv, 1, 1, h]

    def query_block(_, q_xs):
        qi, q_blk, q_pos_blk, q_seg_blk = q_xs
        q_blk = q_blk.astype(jnp.float32)  # [b, kv, g, bq, h]

        def tile_update(carry, k_xs):
            m, l, acc = carry
            k_blk, v_blk, k_pos_blk, k_seg_blk = k_xs
            tile = _tile_mask(q_pos_blk, q_seg_blk, k_pos_blk, k_seg_blk, cfg.sliding_window)[:, None, None]
            scores = jnp.einsum("bkgqh,bkhs->bkgqs", q_blk, k_blk.astype(jnp.float32)) * scale
            scores = jnp.where(tile, scores, -jnp.inf)
            m_new = jnp.maximum(m, scores.max(axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # -inf while every key so far is hidden
            p = jnp.exp(scores - m_safe[..., None])
            rescale = jnp.exp(m - m_safe)
            l = l * rescale + p.sum(axis=-1)
            pv = jnp.einsum("bkgqs,bksh->bkgqh", p, v_blk.astype(jnp.float32))
            return m_new, l, acc * rescale[..., None] + pv

        def key_block(carry, k_xs):
            ki, *tile_xs = k_xs
            return jax.lax.cond(cfg.visible(qi, ki), tile_update, lambda c, _: c, carry, tile_xs), None

        stats = jnp.full(q_blk.shape[:-1], -jnp.inf, jnp.float32)
        init = (stats, jnp.zeros_like(stats), jnp.zeros_like(q_blk))
        (m, l, acc), _ = jax.lax.scan(key_block, init, (jnp.arange(len(keys[0])), *keys))
        seen = l > 0
        out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], mean_v)
        return None, (out.astype(v.dtype), jnp.where(seen, m, 0.0), l)

    q_xs = (jnp.arange(len(q_blocks)), q_blocks, _block_rows(q_pos, cfg), _block_rows(q_seg, cfg))
    _, (out_blocks, m_blocks, l_blocks) = jax.lax.scan(query_block, None, q_xs)
    out = _unblock_q(out_blocks, q.shape)
    # The backward keeps the output itself (no copy beyond the one returned) and the row statistics.
    return out, (q, k, v, q_pos, k_pos, q_seg, k_seg, out, m_blocks, l_blocks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _blocked(q, k, v, q_pos, k_pos, q_seg, k_seg, cfg: _Blocking):
    return _forward(q, k, v, q_pos, k_pos, q_seg, k_seg, cfg)[0]


def _blocked_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, cfg: _Blocking):
    return _forward(q, k, v, q_pos, k_pos, q_seg, k_seg, cfg)


def _blocked_bwd(cfg: _Blocking, residuals, d_out):
    """Gradients of q, k, v tile by tile: p = exp(scores - m) / l recomputed, dv += p^T do,
    ds = p (do v^T - rowsum(do * out)), dq += ds k, dk += ds^T q. Queries that see no key took the mean of the
    values: their gradient reaches v only, do / num_keys to each real key."""
    q, k, v, q_pos, k_pos, q_seg, k_seg, out, m_blocks, l_blocks = residuals
    q_blocks, keys = _blocks(q, k, v, k_pos, k_seg, cfg)
    kv = k.shape[1]
    scale = q.shape[-1] ** -0.5
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [b, tp, n]
    delta_blocks = _block_q(delta[..., None], kv, cfg)[..., 0]  # [nq, b, kv, g, bq]

    def query_block(carry, q_xs):
        dk_acc, dv_acc = carry
        qi, q_blk, q_pos_blk, q_seg_blk, do_blk, m_blk, l_blk, delta_blk = q_xs
        q_blk, do_blk = q_blk.astype(jnp.float32), do_blk.astype(jnp.float32)
        inv_l = jnp.where(l_blk > 0, 1.0 / jnp.where(l_blk > 0, l_blk, 1.0), 0.0)

        def tile_grads(dq, k_xs):
            k_blk, v_blk, k_pos_blk, k_seg_blk = k_xs
            tile = _tile_mask(q_pos_blk, q_seg_blk, k_pos_blk, k_seg_blk, cfg.sliding_window)[:, None, None]
            k32, v32 = k_blk.astype(jnp.float32), v_blk.astype(jnp.float32)
            scores = jnp.einsum("bkgqh,bkhs->bkgqs", q_blk, k32) * scale
            p = jnp.where(tile, jnp.exp(scores - m_blk[..., None]), 0.0) * inv_l[..., None]
            dv = jnp.einsum("bkgqs,bkgqh->bksh", p, do_blk)
            ds = p * (jnp.einsum("bkgqh,bksh->bkgqs", do_blk, v32) - delta_blk[..., None]) * scale
            dk = jnp.einsum("bkgqs,bkgqh->bkhs", ds, q_blk)
            return dq + jnp.einsum("bkgqs,bkhs->bkgqh", ds, k32), (dk, dv)

        def hidden_tile(dq, k_xs):
            k_blk, v_blk = k_xs[:2]
            return dq, (jnp.zeros(k_blk.shape, jnp.float32), jnp.zeros(v_blk.shape, jnp.float32))

        def key_block(dq, k_xs):
            ki, *tile_xs = k_xs
            return jax.lax.cond(cfg.visible(qi, ki), tile_grads, hidden_tile, dq, tile_xs)

        dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros_like(q_blk), (jnp.arange(len(keys[0])), *keys))
        # Queries that saw no key: out = mean of the real values.
        unseen = (l_blk == 0).astype(jnp.float32)[..., None]
        dv_mean = jnp.sum(unseen * do_blk, axis=(2, 3)) / cfg.num_keys  # [b, kv, h]
        return (dk_acc + dk, dv_acc + dv), (dq.astype(q.dtype), dv_mean)

    zeros_k, zeros_v = (jnp.zeros(x.shape, jnp.float32) for x in keys[:2])
    q_xs = (jnp.arange(len(q_blocks)), q_blocks, _block_rows(q_pos, cfg), _block_rows(q_seg, cfg),
            _block_q(d_out, kv, cfg), m_blocks, l_blocks, delta_blocks)
    (dk_blocks, dv_blocks), (dq_blocks, dv_mean) = jax.lax.scan(query_block, (zeros_k, zeros_v), q_xs)
    nk = dk_blocks.shape[0]
    dq = _unblock_q(dq_blocks, q.shape)
    dk = dk_blocks.transpose(1, 2, 3, 0, 4).reshape(k.shape)
    dv = dv_blocks.transpose(1, 2, 0, 3, 4).reshape(v.shape)
    real_keys = (jnp.arange(nk * cfg.block_k) < cfg.num_keys).astype(jnp.float32)[:, None]
    dv = dv + dv_mean.sum(axis=0)[:, :, None, :] * real_keys
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


class Attention(nnx.Module):
    """Phi3Attention: one fused projection to [q | k | v] (each head-major), RoPE on q and k, GQA, `o_proj`.

    PhiMoE's separate q/k/v projections (with biases) load into the same fused layout.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *, use_bias: bool = False,
                 implementation: str = "auto", dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"Attention: implementation={implementation!r}; expected one of {IMPLEMENTATIONS}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.implementation = implementation
        init = nnx.initializers.normal(0.02)
        self.qkv_proj = nnx.Linear(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, use_bias=use_bias,
                                   kernel_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.o_proj = nnx.Linear(num_heads * head_dim, hidden_size, use_bias=use_bias,
                                 kernel_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_btd, cos_btr, sin_btr, *, mask: AttentionMask, kv=None, index=None):
        """x [b, t, d] -> ([b, t, d], updated (k, v) cache or None).

        Without `kv` the keys are this call's tokens; with `kv = (k [b, kv, h, S], v [b, kv, S, h])` this
        call's keys and values are written at slot `index` and attention runs over all S slots (`mask` has
        key positions [b, S]).
        """
        b, t, _ = x_btd.shape
        n, kvh, h = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x_btd)
        q = qkv[..., : n * h].reshape(b, t, n, h)
        k = qkv[..., n * h : (n + kvh) * h].reshape(b, t, kvh, h)
        v = qkv[..., (n + kvh) * h :].reshape(b, t, kvh, h)
        q, k = apply_rope(q, cos_btr, sin_btr), apply_rope(k, cos_btr, sin_btr)
        k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # [b, kv, h, t], [b, kv, t, h]
        if kv is not None:
            k_cache, v_cache = kv
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, 0, index))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, index, 0))
            kv = (k, v)
        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask, implementation=self.implementation)
        return self.o_proj(out.reshape(b, t, n * h)), kv
