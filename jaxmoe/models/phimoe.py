"""Phi-3.5-MoE and GRIN-MoE (`PhimoeForCausalLM`, model_type `phimoe`).

The Phi-3 decoder of `phi3.py` with the options PhiMoE sets: LayerNorm with bias, biased attention and output
head, and a sparse MoE block (SparseMixer-v2 top-2 over 16 experts, dropless) in place of the MLP. Its outputs add
the load-balancing `aux_loss`, `router_z_loss` and per-layer `expert_load` to the logits.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxmoe.config import ModelConfig
from jaxmoe.models.phi3 import Phi3ForCausalLM


class PhimoeForCausalLM(Phi3ForCausalLM):
    """Token ids -> logits and routing losses. Call `model.train()` (and pass `rngs`) for SparseMixer sampling.
    With `config.moe.task_adapters` set, every call takes `task_ids` int [b] (jaxmoe.moe.task_adapters)."""

    def __init__(self, config: ModelConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if config.moe is None:
            raise ValueError("PhimoeForCausalLM needs a config with `moe` set (e.g. get_preset('grin-moe')); use "
                             "Phi3ForCausalLM for a dense model")
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
