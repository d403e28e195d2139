"""Rotary position embeddings: partial rotary dims and LongRoPE's short/long factor switch.

Follows transformers' Phi3 rotary code (../shared/docs/phi_models.md §1.5-1.6): NeoX "rotate half" pairs
(d, d + rotary_dim/2) on the first `rotary_dim` channels of each head; the rest pass through unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """Returns (short inv_freq [rotary_dim/2], long inv_freq [rotary_dim/2], cos/sin scale), in fp32.

    Without LongRoPE both frequency sets are the plain RoPE ones and the scale is 1.
    """
    dim = config.rotary_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    base = np.float32(config.rope_theta) ** exponent
    if config.longrope is None:
        inv = (np.float32(1.0) / base).astype(np.float32)
        return inv, inv, 1.0
    short = np.asarray(config.longrope.short_factor, np.float32)
    long = np.asarray(config.longrope.long_factor, np.float32)
    return (
        (np.float32(1.0) / (short * base)).astype(np.float32),
        (np.float32(1.0) / (long * base)).astype(np.float32),
        config.longrope.attention_factor,
    )


def rope_cos_sin(config: ModelConfig, positions_bt: jax.Array, valid_bt: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin [b, t, rotary_dim] for integer positions, cast to `dtype`.

    LongRoPE picks the long factors for the whole call when the largest valid position + 1 exceeds
    `original_max_position_embeddings`, exactly as transformers decides per forward pass.
    """
    short, long, scale = inverse_frequencies(config)
    inv_freq = jnp.asarray(short)
    if config.longrope is not None:
        seq_len = jnp.max(jnp.where(valid_bt, positions_bt, -1)) + 1
        inv_freq = jnp.where(seq_len > config.longrope.original_max_position_embeddings, jnp.asarray(long), inv_freq)
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
