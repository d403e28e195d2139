"""SwiGLU MLP with the fused `gate_up_proj` layout (gate first, then up)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class GatedMLP(nnx.Module):
    """down(silu(gate) * up), [gate | up] = gate_up_proj(x). `rngs` reaches projections that take it (LoRA
    adapters with dropout, jaxmoe.nn.lora)."""

    forwards_rngs = True  # apply_lora allows adapter dropout only on layers whose owner passes rngs down

    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.gate_up_proj = nnx.Linear(hidden_size, 2 * intermediate_size, use_bias=False, kernel_init=init,
                                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.down_proj = nnx.Linear(intermediate_size, hidden_size, use_bias=False, kernel_init=init,
                                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_btd: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        gate, up = jnp.split(_project(self.gate_up_proj, x_btd, rngs), 2, axis=-1)
        return _project(self.down_proj, jax.nn.silu(gate) * up, rngs)


def _project(layer, x, rngs):
    return layer(x, rngs=rngs) if getattr(layer, "takes_rngs", False) else layer(x)
