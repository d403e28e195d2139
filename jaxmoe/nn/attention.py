"""Grouped-query attention with the fused `qkv_proj` layout and a preallocated KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxmoe.nn.rope import apply_rope

_MASKED = float(jnp.finfo(jnp.float32).min)  # finite, so fully masked rows (padding) stay NaN-free


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


class Attention(nnx.Module):
    """Phi3Attention: one fused projection to [q | k | v] (each head-major), RoPE on q and k, GQA, `o_proj`.

    PhiMoE's separate q/k/v projections (with biases) load into the same fused layout.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *, use_bias: bool = False,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        init = nnx.initializers.normal(0.02)
        self.qkv_proj = nnx.Linear(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, use_bias=use_bias,
                                   kernel_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.o_proj = nnx.Linear(num_heads * head_dim, hidden_size, use_bias=use_bias,
                                 kernel_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_btd, cos_btr, sin_btr, *, mask_bts, kv=None, index=None):
        """x [b, t, d] -> ([b, t, d], updated (k, v) cache or None).

        Without `kv` the keys are this call's tokens; with `kv = (k [b, kv, h, S], v [b, kv, S, h])` this
        call's keys and values are written at slot `index` and attention runs over all S slots (`mask_bts` is
        [b, t, S]).
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
        out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask_bts)
        return self.o_proj(out.reshape(b, t, n * h)), kv
