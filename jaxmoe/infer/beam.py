"""Beam search: transformers' `_beam_search` step for step, as one compiled program over a KV cache.

The prompts are run once; the cache is then repeated per beam, and each step gathers it by the beam every new
running beam extends. Each step keeps transformers' arithmetic in float32, including its -1e9 masks: the top
`num_candidates` continuations over all beams, the best `num_beams` of them that did not just end as the next
running beams, and a per-prompt bank of the `num_beams` best finished hypotheses, scored as
sum_logprobs / generated_length ** length_penalty. Parity is tested token for token (tests/infer/test_beam_search.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxmoe.infer.processors import hidden_mode, processed_logits
from jaxmoe.moe.layer import split_experts_for_decode

__all__ = ["Beams", "beam_search", "beam_step", "check_beam_arguments", "init_beams"]

_NEG = -1.0e9  # transformers' "never pick this" score offset, added (not assigned) exactly as there


@struct.dataclass
class Beams:
    """The search state of b prompts with n beams each, over m = max_new_tokens generated columns.

    Running beams and the bank of finished hypotheses are both sorted best first. Token arrays hold the pad id
    after each hypothesis' last token. An empty bank slot scores -1e9 and has `done_bn` False.
    """

    step: jax.Array  # int32 []: tokens chosen so far
    tokens_bnm: jax.Array  # int32 [b, n, m]: the running beams' generated tokens
    scores_bn: jax.Array  # float32 [b, n]: their summed log-probabilities
    parents_bn: jax.Array  # int32 [b, n]: the beam of the previous step that each running beam extends
    done_tokens_bnm: jax.Array  # int32 [b, n, m]: the bank's hypotheses
    done_scores_bn: jax.Array  # float32 [b, n]: their length-penalised scores
    done_bn: jax.Array  # bool [b, n]: the slot holds a finished hypothesis
    improvable_b: jax.Array  # bool [b]: the running beams may still beat the bank (transformers' heuristic)
    running: jax.Array  # bool []: transformers' loop condition after this step


def init_beams(batch: int, num_beams: int, max_new_tokens: int, pad_id) -> Beams:
    """The state before the first step: only beam 0 is live (the others score -1e9, so the first step does not
    pick the same token once per beam), the bank is empty."""
    b, n, m = batch, num_beams, max_new_tokens
    tokens = jnp.full((b, n, m), pad_id, jnp.int32)
    return Beams(step=jnp.zeros((), jnp.int32), tokens_bnm=tokens,
                 scores_bn=jnp.zeros((b, n), jnp.float32).at[:, 1:].set(_NEG),
                 parents_bn=jnp.zeros((b, n), jnp.int32), done_tokens_bnm=tokens,
                 done_scores_bn=jnp.full((b, n), _NEG, jnp.float32), done_bn=jnp.zeros((b, n), bool),
                 improvable_b=jnp.ones((b,), bool), running=jnp.ones((), bool))


def _take(x_bk, index_bj):
    """x [b, k, ...] -> [b, j, ...]: row r's entries index_bj[r]."""
    index = index_bj.reshape(index_bj.shape + (1,) * (x_bk.ndim - 2))
    return jnp.take_along_axis(x_bk, index, axis=1)


def beam_step(beams: Beams, logprobs_bnv: jax.Array, eos_ids: jax.Array, denominators: jax.Array, *,
              num_candidates: int, stop_when_full, optimistic_length) -> Beams:
    """One step of transformers' beam search from the running beams' next-token log-probabilities float32
    [b, n, v]. Pure.

    eos_ids int32 [e] (-1 entries never match); denominators float32 [m + 1], entry L = float32(L **
    length_penalty) rounded from float64 as torch rounds the Python float. num_candidates (static): transformers'
    max(2, 1 + number of EOS ids) * n, enough that n candidates remain that did not just end. stop_when_full:
    bool, early_stopping is True (a full bank takes no more hypotheses, and the search ends once every bank is
    full). optimistic_length: bool, early_stopping == "never" with length_penalty > 0 (the heuristic assumes the
    running beams reach m tokens; otherwise their current length).
    """
    b, n, v = logprobs_bnv.shape
    m = beams.tokens_bnm.shape[-1]
    step = beams.step
    total_bx = (logprobs_bnv + beams.scores_bn[:, :, None]).reshape(b, n * v)
    cand_scores_bk, flat_bk = jax.lax.top_k(total_bx, num_candidates)
    parents_bk, token_bk = flat_bk // v, flat_bk % v
    cand_tokens_bkm = jnp.where(jnp.arange(m) == step, token_bk[:, :, None], _take(beams.tokens_bnm, parents_bk))
    ends_bk = jnp.any(token_bk[:, :, None] == eos_ids, axis=-1) | (step + 1 >= m)

    # The next running beams: the best n candidates that did not just end.
    open_scores_bk = cand_scores_bk + ends_bk.astype(jnp.float32) * _NEG
    keep_bn = jax.lax.top_k(open_scores_bk, n)[1]
    scores_bn = _take(open_scores_bk, keep_bn)

    # The bank: only the first n candidates may enter it, scored by their length, and only while it can improve.
    just_done_bk = ends_bk & (jnp.arange(num_candidates) < n)
    final_bk = cand_scores_bk / denominators[step + 1]
    full_b1 = jnp.all(beams.done_bn, axis=1, keepdims=True) & stop_when_full
    final_bk = final_bk + full_b1.astype(jnp.float32) * _NEG
    final_bk = final_bk + (~beams.improvable_b[:, None]).astype(jnp.float32) * _NEG
    final_bk = final_bk + (~just_done_bk).astype(jnp.float32) * _NEG
    merged_scores = jnp.concatenate([beams.done_scores_bn, final_bk], axis=1)
    best_bn = jax.lax.top_k(merged_scores, n)[1]
    done_scores_bn = _take(merged_scores, best_bn)
    done_bn = _take(jnp.concatenate([beams.done_bn, just_done_bk], axis=1), best_bn)
    done_tokens_bnm = _take(jnp.concatenate([beams.done_tokens_bnm, cand_tokens_bkm], axis=1), best_bn)

    # Can the best running beam still beat the worst finished one? (Sticky: once no, the bank is final.)
    length = jnp.where(optimistic_length, m, step + 1)
    best_running_b1 = scores_bn[:, :1] / denominators[length]
    worst_done_bn = jnp.where(done_bn, jnp.min(done_scores_bn, axis=1, keepdims=True), _NEG)
    improvable_b = beams.improvable_b & jnp.any(best_running_b1 > worst_done_bn, axis=1)
    running = jnp.any(improvable_b) & ~(jnp.all(done_bn) & stop_when_full) & ~jnp.all(ends_bk)
    return Beams(step=step + 1, tokens_bnm=_take(cand_tokens_bkm, keep_bn), scores_bn=scores_bn,
                 parents_bn=_take(parents_bk, keep_bn), done_tokens_bnm=done_tokens_bnm,
                 done_scores_bn=done_scores_bn, done_bn=done_bn, improvable_b=improvable_b, running=running)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "cache_len", "num_beams",
                                             "num_candidates"))
def _beam_search_compiled(graphdef, state, ids_bt, mask_bt, eos_ids, pad_id, denominators, stop_when_full,
                          optimistic_length, processor, task_ids_b, *, max_new_tokens, cache_len, num_beams,
                          num_candidates):
    """The pure search program (`task_ids_b`: None or int32 [b]). Returns the banks' tokens int32
    [b, num_beams, max_new_tokens], best first."""
    model = nnx.merge(graphdef, state)
    # Prompt i's beams are rows i * n ... i * n + n - 1: each takes the prompt's task id. A model without task
    # adapters takes no task_ids keyword.
    prompt_tasks = {} if task_ids_b is None else {"task_ids": task_ids_b}
    beam_tasks = {} if task_ids_b is None else {"task_ids": jnp.repeat(task_ids_b, num_beams)}
    hidden = hidden_mode(processor)
    b, t = ids_bt.shape
    n, width = num_beams, t + max_new_tokens
    n_real_x = jnp.repeat(jnp.sum(mask_bt, axis=1, dtype=jnp.int32), n)  # x: the b * n beam rows
    step_fn = functools.partial(beam_step, eos_ids=eos_ids, denominators=denominators,
                                num_candidates=num_candidates, stop_when_full=stop_when_full,
                                optimistic_length=optimistic_length)

    def advance(beams, out, cache):
        logits_xv = processed_logits(processor, beams.step, out, b * n)
        logprobs_bnv = jax.nn.log_softmax(logits_xv.astype(jnp.float32), axis=-1).reshape(b, n, -1)
        return step_fn(beams, logprobs_bnv), cache

    def decode_step(carry):
        """Gathers the cache by parent beam, then runs each running beam's newest token through the model."""
        beams, cache = carry
        cache = cache.take_rows((jnp.arange(b)[:, None] * n + beams.parents_bn).reshape(-1))
        token_x1 = jax.lax.dynamic_index_in_dim(beams.tokens_bnm, beams.step - 1, axis=2).reshape(b * n, 1)
        positions_x1 = (n_real_x + beams.step - 1)[:, None]
        out = model(token_x1, positions=positions_x1, cache=cache, logits_to_keep=1, return_hidden=hidden,
                    **beam_tasks)
        return advance(beams, out, out.cache)

    def rebuild_step(carry, slot):
        """Runs every running beam's whole sequence up to column `slot` again into an emptied cache
        (transformers' LongRoPE recompute; the beams' own tokens, so no gather)."""
        beams, cache = carry
        generated_xg = beams.tokens_bnm[:, :, :slot + 1 - t].reshape(b * n, -1)
        buf = jnp.concatenate([jnp.repeat(ids_bt, n, axis=0), generated_xg], axis=1)
        valid = jnp.concatenate([jnp.repeat(mask_bt, n, axis=0), jnp.ones_like(generated_xg)], axis=1)
        emptied = cache.replace(index=jnp.zeros_like(cache.index))
        out = model(buf, attention_mask=valid, cache=emptied, logits_to_keep=1, return_hidden=hidden, **beam_tasks)
        return advance(beams, out, out.cache)

    def decode_until(carry, stop):
        return jax.lax.while_loop(lambda c: (c[0].step < stop) & c[0].running, decode_step, carry)

    prefill = model(ids_bt, attention_mask=mask_bt, cache=model.init_cache(b, cache_len), logits_to_keep=1,
                    return_hidden=hidden, **prompt_tasks)
    split_experts_for_decode(model, b * n)  # the decode steps traced below read one buffer per expert
    # The n beams of a prompt start as copies of its one prefilled row (processed_logits repeats its outputs).
    carry = advance(init_beams(b, n, max_new_tokens, pad_id), prefill,
                    prefill.cache.take_rows(jnp.repeat(jnp.arange(b), n)))
    rope = getattr(model.config, "text", model.config).longrope  # Phi-4-multimodal: .text
    if rope is not None and t <= rope.original_max_position_embeddings <= width - 2:
        slot = rope.original_max_position_embeddings
        step_at = slot - t + 1
        carry = decode_until(carry, step_at)
        carry = jax.lax.cond((carry[0].step == step_at) & carry[0].running,
                             functools.partial(rebuild_step, slot=slot), lambda c: c, carry)
    beams, _ = decode_until(carry, max_new_tokens)
    return beams.done_tokens_bnm


def check_beam_arguments(*, num_beams, length_penalty, early_stopping, num_return_sequences, temperature,
                         vocab_size: int) -> None:
    """Raises ValueError naming the value unless the beam search arguments are valid for a vocabulary of
    `vocab_size` (beam search is deterministic: num_beams > 1 needs temperature 0)."""
    if isinstance(num_beams, bool) or not isinstance(num_beams, (int, np.integer)) or not 1 <= num_beams <= vocab_size:
        raise ValueError(f"num_beams={num_beams!r}; expected an integer from 1 (greedy) to the vocabulary size "
                         f"{vocab_size}")
    if (isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, (int, np.integer))
            or not 1 <= num_return_sequences <= num_beams):
        raise ValueError(f"num_return_sequences={num_return_sequences!r} with num_beams={num_beams}; expected an "
                         "integer from 1 to num_beams: raise num_beams to return more hypotheses per prompt")
    if num_beams > 1 and temperature != 0:
        raise ValueError(f"num_beams={num_beams} with temperature={temperature!r}; sampling with beams is not "
                         "supported: pass temperature=0.0 for beam search, or num_beams=1 to sample")
    if (isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float, np.integer, np.floating))
            or not math.isfinite(length_penalty)):
        raise ValueError(f"length_penalty={length_penalty!r}; expected a finite number (1.0 divides a hypothesis' "
                         "summed log-probabilities by its length, 0.0 not at all)")
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        raise ValueError(f"early_stopping={early_stopping!r}; expected True, False or 'never' (transformers' "
                         "meanings)")


def beam_search(model, ids_bt: np.ndarray, mask_bt: np.ndarray, eos_ids: np.ndarray, num_eos: int, pad_id: int,
                *, max_new_tokens: int, cache_len: int, num_beams: int, length_penalty: float,
                early_stopping: bool | str, num_return_sequences: int, processor=None, task_ids=None) -> jax.Array:
    """Beam search from left-padded prompts int [b, t] with mask int [b, t] (arguments already checked, see
    `jaxmoe.generate`). eos_ids int32 [e]: the `num_eos` EOS ids given, then -1 entries. Returns int32
    [b * num_return_sequences, t + max_new_tokens]: each prompt's best hypotheses, best first, each after its
    prompt and padded with `pad_id` after its end. `processor`: None or a pytree logits processor
    (jaxmoe.infer.processors.as_logits_processor), applied to each step's logits of the b * num_beams beam rows.
    `task_ids`: None or int32 [b] (checked), each prompt's task for a model with MoE task adapters; all of a
    prompt's beams take it."""
    b, t = ids_bt.shape
    lengths = range(1, max_new_tokens + 1)
    # Python float powers rounded to float32, as torch divides a float32 tensor by a Python float.
    denominators = np.asarray([1.0, *(length ** length_penalty for length in lengths)], np.float64)
    graphdef, state = nnx.split(model)
    banks_bnm = _beam_search_compiled(
        graphdef, state, jnp.asarray(ids_bt, jnp.int32), jnp.asarray(mask_bt, jnp.int32),
        jnp.asarray(eos_ids, jnp.int32), jnp.int32(pad_id), jnp.asarray(denominators.astype(np.float32)),
        jnp.asarray(early_stopping is True), jnp.asarray(early_stopping == "never" and length_penalty > 0),
        processor, task_ids, max_new_tokens=max_new_tokens,
        cache_len=cache_len, num_beams=num_beams, num_candidates=max(2, 1 + num_eos) * num_beams)
    tokens = banks_bnm[:, :num_return_sequences].reshape(b * num_return_sequences, max_new_tokens)
    prompts = jnp.repeat(jnp.asarray(ids_bt, jnp.int32), num_return_sequences, axis=0)
    return jnp.concatenate([prompts, tokens], axis=1)
