"""RMSNorm with fp32 statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    """Phi3RMSNorm: normalise in fp32, cast back to the input dtype, then scale by the weight.

    The order matters for bf16 parity with transformers: the weight multiplies the already-cast activations.
    """

    def __init__(self, features: int, *, eps: float = 1e-5, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs  # the scale starts at ones; kept for the shapes-then-rngs constructor convention
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., features] in any float dtype; returns the same shape and dtype."""
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


def make_norm(kind: str, features: int, *, eps: float, param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Module:
    """"rms": RMSNorm (Phi-3 / Phi-4); "layer": LayerNorm with scale and bias (PhiMoE / GRIN)."""
    if kind == "rms":
        return RMSNorm(features, eps=eps, param_dtype=param_dtype)
    if kind == "layer":
        return nnx.LayerNorm(features, epsilon=eps, param_dtype=param_dtype, rngs=rngs)
    raise ValueError(f"unknown norm kind {kind!r}; expected 'rms' or 'layer'")
