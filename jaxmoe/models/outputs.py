"""What a causal language model returns."""

from __future__ import annotations

import jax
from flax import struct

from jaxmoe.nn.attention import KVCache


@struct.dataclass
class CausalLMOutput:
    """`logits` float32 [b, t, vocab]; `cache` the updated KV cache when one was passed in. Called with
    `return_hidden=True`, a model returns `hidden_states` [b, t, d] (compute dtype: the final normed hidden
    states, which its `output_head()` maps to the logits) and `logits` None. Called with `return_hidden="pre_norm"`,
    it returns the logits as usual and, as `hidden_states` [b, t, d] (compute dtype), the last layer's output
    BEFORE the final norm (what kNN-LM and PEMA memories key on, jaxmoe.mt.pema).

    MoE models also return `aux_loss` (the load-balancing loss over all layers' routing, unscaled, as
    transformers' `aux_loss`), `router_z_loss` (mean squared log-sum-exp of the router logits) and
    `expert_load` float32 [layers, experts] (the fraction of token copies each expert received).
    """

    logits: jax.Array | None
    cache: KVCache | None = None
    aux_loss: jax.Array | None = None
    router_z_loss: jax.Array | None = None
    expert_load: jax.Array | None = None
    hidden_states: jax.Array | None = None
