"""Logits processors for generation: a hook that rewrites each step's next-token logits inside the compiled
decode loops of `jaxmoe.generate` (greedy, sampled and beam search), given the step and the last position's
pre-norm hidden state (e.g. PEMA's Gradual Unrolling, `jaxmoe.mt.pema.gradual_unrolling`)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# (step int32 [], logits float32 [rows, v], hidden_prenorm [rows, d]) -> float32 [rows, v]; see `generate`.
LogitsProcessor = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def as_logits_processor(processor: LogitsProcessor):
    """The hook as a pytree for the compiled loop: a pytree callable (a `flax.struct.dataclass` with `__call__`,
    `jax.tree_util.Partial`) as is, so its arrays are arguments of the compiled program and a new processor of the
    same structure does not recompile; a plain function wrapped in `Partial` (it is then part of the compiled
    program's identity: the same function object reuses it, a new one compiles again)."""
    if not callable(processor):
        raise ValueError(f"logits_processor={processor!r}; expected a callable (step, logits [rows, vocab], "
                         "hidden_prenorm [rows, hidden]) -> logits [rows, vocab], or None")
    leaves = jax.tree.leaves(processor)
    return jax.tree_util.Partial(processor) if len(leaves) == 1 and leaves[0] is processor else processor


def processed_logits(processor, step, out, rows: int):
    """The next-token logits [rows, v] from the model output `out` of a step (its last position): as the model gave
    them, or through `processor` with the step and the last position's pre-norm hidden state. The model output's
    rows are repeated to `rows` (beam search's beams of one prefilled prompt)."""
    logits = out.logits[:, -1]
    if logits.shape[0] != rows:
        logits = jnp.repeat(logits, rows // logits.shape[0], axis=0)
    if processor is None:
        return logits
    hidden = out.hidden_states[:, -1]
    if hidden.shape[0] != rows:
        hidden = jnp.repeat(hidden, rows // hidden.shape[0], axis=0)
    new = processor(step, logits, hidden)
    if new.shape != logits.shape:
        raise ValueError(f"logits_processor returned shape {tuple(new.shape)}; expected the logits' "
                         f"{tuple(logits.shape)} [rows, vocab]")
    return new.astype(jnp.float32)


def hidden_mode(processor):
    """The models' `return_hidden` for generation: the pre-norm hidden states only when a processor needs them."""
    return False if processor is None else "pre_norm"
