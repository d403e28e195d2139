"""SwiGLU MLP with the fused `gate_up_proj` layout (gate first, then up)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class GatedMLP(nnx.Module):
    """down(silu(gate) * up), [gate | up] = gate_up_proj(x)."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.gate_up_proj = nnx.Linear(hidden_size, 2 * intermediate_size, use_bias=False, kernel_init=init,
                                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.down_proj = nnx.Linear(intermediate_size, hidden_size, use_bias=False, kernel_init=init,
                                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        gate, up = jnp.split(self.gate_up_proj(x_btd), 2, axis=-1)
        return self.down_proj(jax.nn.silu(gate) * up)
