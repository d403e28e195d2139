"""What a causal language model returns."""

from __future__ import annotations

import jax
from flax import struct

from jaxmoe.nn.attention import KVCache


@struct.dataclass
class CausalLMOutput:
    """`logits` float32 [b, t, vocab]; `cache` the updated KV cache when one was passed in."""

    logits: jax.Array
    cache: KVCache | None = None
