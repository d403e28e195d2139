"""Rotary position embeddings: partial rotary dims and LongRoPE's short/long factor switch.

Follows transformers' Phi3 rotary code (../shared/docs/phi_models.md §1.5-1.6): NeoX "rotate half" pairs
(d, d + rotary_dim/2) on the first `rotary_dim` channels of each head; the rest pass through unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(short inv_freq, long inv_freq) [rotary_dim/2] in fp32, and the cos/sin scales that go with each.

    Without LongRoPE both frequency sets are the plain RoPE ones and both scales are 1.
    """
    dim = config.rotary_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    base = np.float32(config.rope_theta) ** exponent
    if config.longrope is None:
        inv = (np.float32(1.0) / base).astype(np.float32)
        return inv, inv, 1.0, 1.0
    lr = config.longrope
    short = np.asarray(lr.short_factor, np.float32)
    long = np.asarray(lr.long_factor, np.float32)
    long_scale = lr.attention_factor if lr.long_attention_factor is None else lr.long_attention_factor
    return (
        (np.float32(1.0) / (short * base)).astype(np.float32),
        (np.float32(1.0) / (long * base)).astype(np.float32),
        lr.attention_factor,
        long_scale,
    )


def rope_cos_sin(config: ModelConfig, positions_bt: jax.Array, valid_bt: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin [b, t, rotary_dim] for integer positions, cast to `dtype`.

    LongRoPE picks the long factors (and their scale) for the whole call when the largest valid position + 1
    exceeds `original_max_position_embeddings`, exactly as transformers decides per forward pass.
    """
    short, long, short_scale, long_scale = inverse_frequencies(config)
    inv_freq, scale = jnp.asarray(short), jnp.float32(short_scale)
    if config.longrope is not None:
        seq_len = jnp.max(jnp.where(valid_bt, positions_bt, -1)) + 1
        use_long = seq_len > config.longrope.original_max_position_embeddings
        inv_freq = jnp.where(use_long, jnp.asarray(long), inv_freq)
        scale = jnp.where(use_long, jnp.float32(long_scale), scale)
    freqs = positions_bt.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def apply_rope(x_btnh: jax.Array, cos_btr: jax.Array, sin_btr: jax.Array) -> jax.Array:
    """Rotates the first rotary_dim channels of each head of x [b, t, heads, head_dim]."""
    rotary_dim = cos_btr.shape[-1]
    cos, sin = cos_btr[:, :, None, :], sin_btr[:, :, None, :]
    x_rot, x_pass = x_btnh[..., :rotary_dim], x_btnh[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)
