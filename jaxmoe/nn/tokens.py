"""Token ids over a vocabulary: checking ids a model is given (`check_token_ids`) and picking the most likely id
from logits (`greedy_tokens`). Models, generation and training share these; this module imports no other part of
jaxmoe."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_token_ids", "greedy_tokens"]


def check_token_ids(input_ids, vocab_size: int) -> None:
    """Raises ValueError for ids outside [0, vocab_size) when the ids are concrete (skipped under tracing).

    input_ids: integer ids of any shape (NumPy or JAX).
    """
    if isinstance(input_ids, jax.core.Tracer):
        return
    ids = np.asarray(input_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids.max()) if ids.max() >= vocab_size else int(ids.min())
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size}); check that the tokenizer "
                         "matches this model's checkpoint")


def greedy_tokens(logits_bv: jax.Array) -> jax.Array:
    """argmax over the last axis: float [..., v] -> int32 [...] (first index among ties).

    Two plain reductions instead of jnp.argmax's (value, index) reduction, which XLA:CPU runs several times
    slower over a large vocabulary.
    """
    vocab = logits_bv.shape[-1]
    is_max = logits_bv == jnp.max(logits_bv, axis=-1, keepdims=True)
    return jnp.min(jnp.where(is_max, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)
