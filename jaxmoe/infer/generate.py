"""Batched text generation: prefill into a preallocated KV cache, then one jit-compiled decode loop (greedy or
sampled here; beam search in jaxmoe.infer.beam).

The loop follows transformers' `generate` step for step (greedy parity is tested token for token), including
Phi-3's LongRoPE switch: the first time the sequence reaches `original_max_position_embeddings + 1` tokens,
the whole buffer is run through the model again so that every cached key uses the long factors.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from jaxmoe.infer.beam import beam_search, check_beam_arguments
from jaxmoe.infer.processors import LogitsProcessor, as_logits_processor, hidden_mode, processed_logits
from jaxmoe.moe.layer import split_experts_for_decode
from jaxmoe.moe.task_adapters import check_task_ids
from jaxmoe.nn.tokens import check_token_ids, greedy_tokens
from jaxmoe.sharding import on_auto_axes

__all__ = ["LogitsProcessor", "as_logits_processor", "filter_logits", "generate", "sample_logits"]


def filter_logits(logits_bv: jax.Array, top_k: int | None = None, top_p=None) -> jax.Array:
    """float [b, v] -> float32 [b, v] with tokens outside the top-k, then outside the nucleus, set to -inf.

    The nucleus is the smallest set of most probable tokens whose probabilities sum to at least `top_p`
    (always at least one token); ties at the k-th logit are kept, as in transformers' logits warpers.
    """
    logits = logits_bv.astype(jnp.float32)
    if top_k is not None:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = (mass_before < top_p).at[..., 0].set(True)
        keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def sample_logits(logits_bv: jax.Array, key: jax.Array, temperature=0.0, top_k: int | None = None,
                  top_p=None) -> jax.Array:
    """Next tokens int32 [b] from logits float [b, v].

    A Python `temperature` of 0 is greedy (argmax; `key`, `top_k`, `top_p` unused). Otherwise: logits /
    temperature, then the top-k filter, then the top-p filter, then a categorical draw with `key`.
    """
    if isinstance(temperature, (int, float)) and temperature == 0:
        return greedy_tokens(logits_bv)
    logits = filter_logits(logits_bv.astype(jnp.float32) / temperature, top_k, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# The stream callback lives outside the compiled program, so a new callback object does not recompile it.
_stream_lock = threading.Lock()
_stream_target: list[Callable | None] = [None]


def _emit(step, tokens_b):
    _stream_target[0](int(step), np.asarray(tokens_b))


def _row_tokens(logits_bv, key, step, row_ids_b, temperature, top_k, top_p):
    """Next tokens int32 [b]. Greedy for a Python temperature of 0; otherwise row r draws with the key
    fold_in(fold_in(key, step), row_ids_b[r]), so a prompt's draws do not depend on which other rows share its
    batch or where it sits in it (batch pruning moves rows)."""
    if isinstance(temperature, (int, float)) and temperature == 0:
        return greedy_tokens(logits_bv)
    step_key = jax.random.fold_in(key, step)
    keys_b = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(row_ids_b)
    return jax.vmap(lambda logits_v, k: sample_logits(logits_v[None], k, temperature, top_k, top_p)[0])(
        logits_bv, keys_b)


def _decoder(model, rows, key, temperature, top_p, eos_ids, pad_id, processor, *, t, greedy, top_k, use_top_p,
             stream):
    """The step functions of a decode program, traced inside jit: (advance, run_until).

    rows: the per-row constants {"n_real": int32 [b] real prompt tokens, "row_ids": int32 [b] each row's index in
    the caller's batch, "mask": int32 [b, t] the prompt mask, "task_ids": int32 [b] or None}. The carry is
    (step, cache, buf int32 [b, t + max_new_tokens], done bool [b]); step s picks new token s."""
    tasks = _row_kwargs(rows)
    hidden = hidden_mode(processor)
    b = rows["n_real"].shape[0]

    def advance(step, out, cache, buf, done):
        """Picks token `step` from the model output's last position, writes it at column t + step, returns the new
        carry."""
        logits_bv = processed_logits(processor, step, out, b)
        new_b = _row_tokens(logits_bv, key, step, rows["row_ids"], 0.0 if greedy else temperature, top_k,
                            top_p if use_top_p else None)
        new_b = jnp.where(done, pad_id, new_b)
        done = done | jnp.any(new_b[:, None] == eos_ids[None, :], axis=-1)
        buf = jax.lax.dynamic_update_slice(buf, new_b[:, None], (0, t + step))
        if stream:
            io_callback(_emit, None, step, new_b, ordered=True)
        return step + 1, cache, buf, done

    def decode_step(carry):
        """Runs the newest token (column t + step - 1) through the model with its cache."""
        step, cache, buf, done = carry
        token_b1 = jax.lax.dynamic_slice_in_dim(buf, t + step - 1, 1, axis=1)
        positions_b1 = (rows["n_real"] + step - 1)[:, None]
        out = model(token_b1, positions=positions_b1, cache=cache, logits_to_keep=1, return_hidden=hidden, **tasks)
        return advance(step, out, out.cache, buf, done)

    def rebuild_step(carry, slot):
        """Runs the whole buffer up to `slot` again into an emptied cache (transformers' LongRoPE recompute)."""
        step, cache, buf, done = carry
        valid = jnp.ones((b, slot + 1), jnp.int32).at[:, :t].set(rows["mask"])
        emptied = cache.replace(index=jnp.zeros_like(cache.index))
        out = model(buf[:, :slot + 1], attention_mask=valid, cache=emptied, logits_to_keep=1, return_hidden=hidden,
                    **tasks)
        return advance(step, out, out.cache, buf, done)

    def decode_until(carry, stop):
        return jax.lax.while_loop(lambda c: (c[0] < stop) & ~jnp.all(c[3]), decode_step, carry)

    def run_until(carry, stop):
        """Decodes while step < stop (traced) and a row is running. Like transformers, the step that first runs
        column original_max_position_embeddings (unless the prompt covered it) recomputes the cache instead."""
        rope = _text_config(model).longrope
        width = carry[2].shape[1]
        if rope is not None and t <= rope.original_max_position_embeddings <= width - 2:
            slot = rope.original_max_position_embeddings
            step_at = slot - t + 1
            carry = decode_until(carry, jnp.minimum(stop, step_at))
            carry = jax.lax.cond((carry[0] == step_at) & (carry[0] < stop) & ~jnp.all(carry[3]),
                                 functools.partial(rebuild_step, slot=slot), lambda c: c, carry)
        return decode_until(carry, stop)

    return advance, run_until


def _row_kwargs(rows) -> dict:
    """The per-row model keywords: task ids (MoE task adapters) and input modes (Phi-4-multimodal's adapters), each
    only when given (a model without them takes none)."""
    return {name: rows[name] for name in ("task_ids", "input_mode") if rows.get(name) is not None}


def _prefill(model, ids_bt, mask_bt, key, temperature, top_p, eos_ids, pad_id, processor, task_ids_b, *,
             max_new_tokens, cache_len, greedy, top_k, use_top_p, stream, prefilled=None, input_mode_b=None):
    """Runs the prompts into a new cache (or takes `prefilled`, the output of that call made outside jit with
    images or audio) and picks the first new token -> (carry, rows, run_until)."""
    b, t = ids_bt.shape
    rows = {"n_real": jnp.sum(mask_bt, axis=1, dtype=jnp.int32), "row_ids": jnp.arange(b, dtype=jnp.int32),
            "mask": mask_bt, "task_ids": task_ids_b, "input_mode": input_mode_b}
    advance, run_until = _decoder(model, rows, key, temperature, top_p, eos_ids, pad_id, processor, t=t,
                                  greedy=greedy, top_k=top_k, use_top_p=use_top_p, stream=stream)
    buf_bw = jnp.full((b, t + max_new_tokens), pad_id, jnp.int32).at[:, :t].set(ids_bt)
    if prefilled is None:
        prefilled = model(ids_bt, attention_mask=mask_bt, cache=model.init_cache(b, cache_len), logits_to_keep=1,
                          return_hidden=hidden_mode(processor), **_row_kwargs(rows))
    carry = advance(0, prefilled, prefilled.cache, buf_bw, jnp.zeros((b,), bool))
    return carry, rows, run_until


_STATIC = ("graphdef", "max_new_tokens", "cache_len", "greedy", "top_k", "use_top_p", "stream")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_compiled(graphdef, state, ids_bt, mask_bt, key, temperature, top_p, eos_ids, pad_id, processor,
                       task_ids_b, prefilled=None, input_mode_b=None, *, max_new_tokens, cache_len, greedy, top_k,
                       use_top_p, stream):
    """The pure decode program (`processor`: None or a pytree logits processor; `task_ids_b`: None or int32 [b];
    `prefilled`: None, or the prompts' forward output with its cache when images or audio made it run outside jit;
    `input_mode_b`: None or each row's Phi-4-multimodal InputMode). Returns tokens int32 [b, t + max_new_tokens]."""
    model = nnx.merge(graphdef, state)
    carry, _, run_until = _prefill(model, ids_bt, mask_bt, key, temperature, top_p, eos_ids, pad_id, processor,
                                   task_ids_b, max_new_tokens=max_new_tokens, cache_len=cache_len, greedy=greedy,
                                   top_k=top_k, use_top_p=use_top_p, stream=stream, prefilled=prefilled,
                                   input_mode_b=input_mode_b)
    split_experts_for_decode(model, ids_bt.shape[0])  # traced by run_until below: its decode loop reads the split
    return run_until(carry, max_new_tokens)[2]


@functools.partial(jax.jit, static_argnames=_STATIC)
def _prefill_compiled(graphdef, state, ids_bt, mask_bt, key, temperature, top_p, eos_ids, pad_id, processor,
                      task_ids_b, *, max_new_tokens, cache_len, greedy, top_k, use_top_p, stream):
    """Batch pruning's first program: the prompts and the first new token -> (carry, rows)."""
    carry, rows, _ = _prefill(nnx.merge(graphdef, state), ids_bt, mask_bt, key, temperature, top_p, eos_ids,
                              pad_id, processor, task_ids_b, max_new_tokens=max_new_tokens, cache_len=cache_len,
                              greedy=greedy, top_k=top_k, use_top_p=use_top_p, stream=stream)
    return carry, rows


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy", "top_k", "use_top_p"))
def _decode_chunk_compiled(graphdef, state, carry, rows, key, temperature, top_p, eos_ids, pad_id, stop, *,
                           greedy, top_k, use_top_p):
    """Batch pruning's loop program: decodes the carry's rows until step `stop` (traced) or until all are done.
    One compilation per batch size."""
    model = nnx.merge(graphdef, state)
    split_experts_for_decode(model, carry[2].shape[0])
    t = rows["mask"].shape[1]
    _, run_until = _decoder(model, rows, key, temperature, top_p, eos_ids, pad_id, None, t=t, greedy=greedy,
                            top_k=top_k, use_top_p=use_top_p, stream=False)
    return run_until(carry, stop)


@jax.jit
def _take_rows(carry, rows, index_r, real_r):
    """The carry and per-row constants of rows index_r [r] of the batch; rows where real_r [r] is False are
    padding, marked done."""
    step, cache, buf, done = carry
    rows = {name: None if value is None else value[index_r] for name, value in rows.items()}
    return (step, cache.take_rows(index_r), buf[index_r], done[index_r] | ~real_r), rows


def _generate_pruned(graphdef, state, prefill_args, *, prune_every: int, max_new_tokens: int, longrope: bool,
                     **static):
    """Generation with batch pruning: the decode loop runs `prune_every` steps at a time, and between runs the
    rows still going move into the smallest power-of-two batch that holds them (one compiled loop per size, about
    log2(b) of them). Finished rows' tokens are already final; every row's tokens equal unpruned generation's.

    LongRoPE picks its factors per forward pass from the batch's largest position, finished rows included (as in
    transformers), so for a LongRoPE model the row with the longest prompt stays in the batch (finished, as a
    padding row if need be): the largest position, and with it every row's factors, stay those of the whole
    batch."""
    ids_bt, mask_bt, key, temperature, top_p, eos_ids, pad_id, processor, task_ids_b = prefill_args
    carry, rows = _prefill_compiled(graphdef, state, *prefill_args, max_new_tokens=max_new_tokens, **static)
    chunk = functools.partial(_decode_chunk_compiled, graphdef, state, key=key, temperature=temperature,
                              top_p=top_p, eos_ids=eos_ids, pad_id=pad_id, greedy=static["greedy"],
                              top_k=static["top_k"], use_top_p=static["use_top_p"])
    anchor = int(np.argmax(np.asarray(mask_bt).sum(axis=1))) if longrope else None
    result = None
    origin = np.arange(ids_bt.shape[0])  # the caller's row each batch row holds (padding rows repeat one)
    real = np.ones(ids_bt.shape[0], bool)  # False for padding rows
    while True:
        step, done = int(carry[0]), np.asarray(carry[3])
        live = np.flatnonzero(~done)
        if step >= max_new_tokens or live.size == 0:
            break
        need = live.size + int(anchor is not None and anchor not in origin[live])
        size = 1 << (need - 1).bit_length()  # the smallest power of two that holds them
        if size < done.shape[0]:
            result = _collect(result, np.asarray(carry[2]), origin, real)
            fill = live[0] if anchor is None else int(np.flatnonzero(origin == anchor)[0])
            index = np.concatenate([live, np.full(size - live.size, fill)])
            real = np.arange(size) < live.size
            carry, rows = _take_rows(carry, rows, jnp.asarray(index, jnp.int32), jnp.asarray(real))
            origin = origin[index]
        carry = chunk(carry=carry, rows=rows, stop=jnp.int32(min(step + prune_every, max_new_tokens)))
    return jnp.asarray(_collect(result, np.asarray(carry[2]), origin, real))


def _collect(result, buf_bw: np.ndarray, origin: np.ndarray, real: np.ndarray) -> np.ndarray:
    """The caller's [b, w] tokens with the batch's real rows written in at their caller rows."""
    if result is None:
        return buf_bw.copy()
    result[origin[real]] = buf_bw[real]
    return result


def _text_config(model):
    """The language model's ModelConfig (Phi-4-multimodal's config holds it as `.text`)."""
    return getattr(model.config, "text", model.config)


IMAGE_KEYS = ("image_pixel_values", "image_sizes", "image_attention_mask")
AUDIO_KEYS = ("audio_input_features", "audio_embed_sizes", "audio_attention_mask")


def _media_inputs(model, ids, images, audio, *, num_beams, prune_every, width) -> dict:
    """The model keywords of `images` and `audio` (the processor's dicts; other keys such as num_img_tokens are
    dropped), checked: a model with the encoder, known keys, no beam search or pruning, no LongRoPE recompute."""
    if images is None and audio is None:
        return {}
    out = {}
    for what, given, keys, encoder in (("images", images, IMAGE_KEYS, "image_embed"),
                                       ("audio", audio, AUDIO_KEYS, "audio_embed")):
        if given is None:
            continue
        if not hasattr(model, encoder):
            raise ValueError(f"{what}= given to a {type(model).__name__}, which has no {what} encoder; pass "
                             f"{what} to a Phi4MultimodalForCausalLM (text-only models take input_ids alone)")
        if not isinstance(given, dict) or keys[0] not in given:
            raise ValueError(f"{what}= must be the processor's output dict with {keys[0]!r} (keys {list(keys)}); got "
                             f"{type(given).__name__}{'' if not isinstance(given, dict) else ' with ' + str(list(given))}")
        out.update({key: given[key] for key in keys if given.get(key) is not None})
    if num_beams > 1 or prune_every is not None:
        raise ValueError("images / audio with num_beams > 1 or prune_every: multimodal generation is greedy or "
                         "sampled over the whole batch for now; pass num_beams=1 and prune_every=None")
    rope = _text_config(model).longrope
    t = ids.shape[1]
    if rope is not None and t <= rope.original_max_position_embeddings <= width - 2:
        raise ValueError(f"a prompt of {t} tokens plus the new ones crosses LongRoPE's switch at "
                         f"{rope.original_max_position_embeddings} positions, where generation recomputes the cache "
                         "from the token ids alone (the images and audio would be lost); generate fewer tokens")
    return out


def _checked_mask(attention_mask, shape) -> np.ndarray:
    """The attention mask as int32 [b, t], or ValueError unless it is 0/1, left-padded, with a token per row."""
    mask = np.asarray(attention_mask)
    if mask.shape != shape:
        raise ValueError(f"attention_mask has shape {mask.shape} but input_ids has shape {shape}; expected the "
                         "same shape")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError(f"attention_mask holds values {sorted(set(np.unique(mask).tolist()) - {0, 1})[:5]}; "
                         "expected 1 for tokens and 0 for padding")
    mask = mask.astype(np.int32)
    empty = np.flatnonzero(mask.sum(axis=1) == 0)
    if empty.size:
        raise ValueError(f"attention_mask row {int(empty[0])} has no tokens (all zeros); every prompt needs at "
                         "least one")
    right_padded = np.flatnonzero((np.diff(mask, axis=1) < 0).any(axis=1))
    if right_padded.size:
        raise ValueError(f"attention_mask row {int(right_padded[0])} has padding after a token; generation "
                         "expects LEFT-padded prompts (padding first, then the tokens)")
    return mask


@on_auto_axes  # a mesh with Explicit axes: see jaxmoe.sharding
def generate(model, input_ids, *, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None, rngs: nnx.Rngs | None = None,
             attention_mask=None, pad_token_id: int | None = None, max_length: int | None = None,
             stream_callback: Callable[[int, np.ndarray], None] | None = None, num_beams: int = 1,
             length_penalty: float = 1.0, early_stopping: bool | str = False,
             num_return_sequences: int = 1, logits_processor: LogitsProcessor | None = None,
             task_ids=None, prune_every: int | None = None, images: dict | None = None,
             audio: dict | None = None) -> jax.Array:
    """Batched generation with a KV cache. input_ids int [b, t] -> int32 [b * num_return_sequences,
    t + max_new_tokens].

    Prompts of different lengths are left-padded: `attention_mask` int/bool [b, t] (1 = token, 0 = padding)
    and `pad_token_id` (default: the model config's, else 0). The result is the prompt followed by the new
    tokens; after a row emits an id in `eos_token_id` (an int or a sequence, default the config's, `()` for
    none) its later columns hold the pad id, and the loop stops early once every row is done.
    `temperature=0.0` is greedy; otherwise tokens are drawn from softmax(logits / temperature) after the
    `top_k` and `top_p` filters, with keys from `rngs` (default nnx.Rngs(0)). `max_length` sets the cache
    size (default t + max_new_tokens). `stream_callback(step, tokens int32 [b])` is called for every
    generated step, in order, from inside the compiled loop. Row r's draws use the key fold_in(fold_in(key, step),
    r): they do not depend on the other rows.

    MoE models on CPU: where a decode step's batch takes the "decode" expert paths, the decode loop reads each
    expert's weights from a buffer of its own (`jaxmoe.moe.layer.split_experts_for_decode`), copied once per call,
    so the experts' weights take twice their memory while `generate` runs (fp32 decode 1.28x / 1.65x faster at
    batch 1 / 8: BENCHMARKS.md, issue 19). `MoEConfig.expert_implementation="blocked"` keeps them stacked.

    `images` / `audio` (Phi-4-multimodal): the processor's outputs, `Phi4MMProcessor.images(...)` (image_pixel_values,
    image_sizes, image_attention_mask) and `.audio(...)` (audio_input_features, audio_embed_sizes and, for several
    clips, audio_attention_mask), for the placeholders in input_ids. The prompts then run through the model outside
    jit (their token counts must be concrete), and every decode step keeps each row's InputMode from its prompt, so
    a row generates with the LoRA adapter its media chose, as the model's forward does. Greedy or sampled (not beam
    search or batch pruning yet).

    `prune_every=k` (batch pruning, "Who Says Elephants Can't Run"): the decode loop runs k steps at a time and
    between runs the rows that are still going move into the smallest power-of-two batch that holds them, so
    finished rows stop costing compute; the tokens are those of unpruned generation. One loop program is compiled
    per batch size reached (about log2(b)), and each k steps wait on the device once. Not with beam search, a
    stream_callback or a logits_processor (whose arrays may be per row). None (default): one compiled loop over
    the whole batch, which is faster when the rows finish together.

    `num_beams > 1` is beam search (jaxmoe.infer.beam), token for token transformers' `generate(...,
    num_beams=..., do_sample=False)`: rows num_return_sequences * i ... of the result are prompt i's best
    `num_return_sequences` (<= num_beams) finished hypotheses, best first, scored as sum of log-probabilities /
    generated_length ** `length_penalty` (> 0 favours longer ones). `early_stopping` has transformers' meanings:
    True ends a prompt's search once num_beams hypotheses have finished; False stops once the best running beam,
    scored at its current length, cannot beat the worst finished one; "never" scores it at max_new_tokens when
    length_penalty > 0. Beam search needs temperature 0 and takes no stream_callback; with num_beams=1,
    length_penalty and early_stopping have no effect. Phi-3's LongRoPE switch recomputes every beam's cache, as
    greedy generation does.

    `logits_processor(step, logits, hidden_prenorm) -> logits` rewrites each step's next-token logits before
    they are sampled, argmaxed or (after log_softmax) scored by beam search, inside the compiled loop: step int32 []
    the index of the token being chosen (0 for the first new one), logits float32 [rows, vocab], hidden_prenorm
    [rows, hidden] (compute dtype) the last layer's output at the newest position BEFORE the final norm; it
    returns float [rows, vocab] (log-probabilities work: softmax, argmax and log_softmax do not see the
    difference). Rows are the b prompts, or with beam search prompt i's beams at rows i * num_beams ...
    (i + 1) * num_beams - 1. It must be a pure JAX function; a pytree callable (e.g. a `flax.struct.dataclass`
    with `__call__`, as jaxmoe.mt.pema.GradualUnrolling) carries its arrays as arguments, so new values do not
    recompile. The model must accept `return_hidden="pre_norm"` (Phi3ForCausalLM and its subclasses). Without a
    processor, nothing of the above is traced.

    `task_ids` int [b]: each prompt's task, for a model with MoE task adapters (`MoEConfig.task_adapters`; required
    exactly then); a row generates as it would alone with its task id. Beam search gives every beam of prompt i
    its task id. A model trained with data.tasks has its ids in tasks.json beside it (`jaxmoe.train.tasks.TaskMap`).
    """
    config = _text_config(model)
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.shape[1] == 0:
        raise ValueError(f"input_ids has dtype {ids.dtype} and shape {ids.shape}; expected integer token ids "
                         "[batch, time] with time >= 1; pass e.g. np.asarray(ids, np.int32)[None] for one prompt")
    check_token_ids(ids, config.vocab_size)
    b, t = ids.shape
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}; expected an integer >= 1")
    width = t + int(max_new_tokens)
    if max_length is not None and width > max_length:
        raise ValueError(f"prompt of {t} tokens plus max_new_tokens={max_new_tokens} needs {width} cache slots "
                         f"but max_length={max_length}; raise max_length or shorten the prompt / max_new_tokens")
    if width > config.max_position_embeddings:
        raise ValueError(f"prompt of {t} tokens plus max_new_tokens={max_new_tokens} is {width} tokens, more than "
                         f"the model's max_position_embeddings={config.max_position_embeddings}; shorten either")
    if not isinstance(temperature, (int, float, np.floating)) or not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r}; expected a finite number >= 0 (0 means greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}; expected an integer >= 1, or None for no top-k filter")
    if top_p is not None and not (isinstance(top_p, (int, float, np.floating)) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r}; expected a number in (0, 1], or None for no nucleus filter")
    processor = None if logits_processor is None else as_logits_processor(logits_processor)
    check_beam_arguments(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                         num_return_sequences=num_return_sequences, temperature=temperature,
                         vocab_size=config.vocab_size)
    if prune_every is not None:
        if isinstance(prune_every, bool) or not isinstance(prune_every, (int, np.integer)) or prune_every < 1:
            raise ValueError(f"prune_every={prune_every!r}; expected an integer >= 1 (decode steps between batch "
                             "compactions), or None for no batch pruning")
        clash = [name for name, given in (("num_beams > 1", num_beams > 1),
                                          ("stream_callback", stream_callback is not None),
                                          ("logits_processor", logits_processor is not None)) if given]
        if clash:
            raise ValueError(f"prune_every={prune_every} with {', '.join(clash)}: batch pruning moves rows between "
                             "batches, which these cannot follow; pass prune_every=None")
    if num_beams > 1 and stream_callback is not None:
        raise ValueError(f"stream_callback with num_beams={num_beams}; beam search cannot stream (a step's running "
                         "beams are not the final tokens): pass num_beams=1 to stream")
    media = _media_inputs(model, ids, images, audio, num_beams=num_beams, prune_every=prune_every, width=width)
    mask = np.ones((b, t), np.int32) if attention_mask is None else _checked_mask(attention_mask, (b, t))
    moe = getattr(config, "moe", None)
    task_ids = check_task_ids(task_ids, None if moe is None else moe.task_adapters, b)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    if not 0 <= pad_token_id < config.vocab_size:
        raise ValueError(f"pad_token_id={pad_token_id} is outside the vocabulary [0, {config.vocab_size})")
    if eos_token_id is None:
        eos_token_id = config.eos_token_id
    eos = np.asarray([eos_token_id] if np.isscalar(eos_token_id) else list(eos_token_id), np.int32).reshape(-1)
    num_eos = eos.size
    # -1 (never a token) pads the ids to a multiple of 8, so a different number of EOS ids rarely recompiles.
    eos = np.pad(eos, (0, 8 * max(1, -(-eos.size // 8)) - eos.size), constant_values=-1)
    cache_len = width if max_length is None else int(max_length)
    if num_beams > 1:
        return beam_search(model, ids, mask, eos, num_eos, int(pad_token_id), max_new_tokens=int(max_new_tokens),
                           cache_len=cache_len, num_beams=int(num_beams), length_penalty=float(length_penalty),
                           early_stopping=early_stopping, num_return_sequences=int(num_return_sequences),
                           processor=processor, task_ids=task_ids)

    greedy = temperature == 0
    key = jax.random.key(0) if greedy else (rngs if rngs is not None else nnx.Rngs(0))()
    prefilled = input_mode = None
    if media:
        input_mode = model.input_modes(ids)
        prefilled = model(ids, attention_mask=mask, cache=model.init_cache(b, cache_len), logits_to_keep=1,
                          return_hidden=hidden_mode(processor), **media)
    graphdef, state = nnx.split(model)
    args = (jnp.asarray(ids, jnp.int32), jnp.asarray(mask), key, jnp.float32(temperature),
            jnp.float32(1.0 if top_p is None else top_p), jnp.asarray(eos), jnp.int32(pad_token_id), processor,
            task_ids)
    static = dict(cache_len=cache_len, greedy=bool(greedy), top_k=None if top_k is None else int(top_k),
                  use_top_p=top_p is not None, stream=stream_callback is not None)
    if prune_every is not None:
        return _generate_pruned(graphdef, state, args, prune_every=prune_every, max_new_tokens=int(max_new_tokens),
                                longrope=config.longrope is not None, **static)
    run = functools.partial(_generate_compiled, graphdef, state, *args, prefilled, input_mode,
                            max_new_tokens=int(max_new_tokens), **static)
    if stream_callback is None:
        return run()
    with _stream_lock:
        _stream_target[0] = stream_callback
        try:
            out = jax.block_until_ready(run())
            jax.effects_barrier()
        finally:
            _stream_target[0] = None
    return out
