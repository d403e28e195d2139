"""Records -> token batches: translation prompts, loss masks, packing, deterministic resumable shuffling.

`encode_translation` / `encode_text` turn a record into (ids, loss_mask); `BatchStream` shuffles, packs and
batches them deterministically, with a JSON-able state to resume from; `eval_batches` pads every example once
into fixed-shape batches for evaluation.

Several processes (multi-host training): every process walks the same global batch order, and builds only the
rows its devices hold (`BatchStream(rows=...)`, `host_rows` says which), so the global batch and the stream's
state at each step are the same on every process and the same as a one-process run's.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxmoe.train.data import DataError

__all__ = ["ALMA_PROMPT", "LANGUAGE_NAMES", "BatchStream", "PromptFormat", "encode_text", "encode_translation",
           "eval_batches", "host_rows", "tokens_in"]

LANGUAGE_NAMES = {"cs": "Czech", "de": "German", "en": "English", "fr": "French", "ha": "Hausa", "is": "Icelandic",
                  "ja": "Japanese", "ru": "Russian", "uk": "Ukrainian", "zh": "Chinese"}
ALMA_PROMPT = "Translate this from {src_lang} to {tgt_lang}:\n{src_lang}: {src}\n{tgt_lang}:"

Example = tuple[Sequence[int], Sequence[int]]  # (token ids, loss mask), the same length


# --- Examples -> token ids -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class PromptFormat:
    """A translation prompt with {src}, {src_lang} and {tgt_lang} placeholders; languages are rendered by name
    (LANGUAGE_NAMES, unknown codes as they are). The default is ALMA's; the target follows after a space."""

    template: str = ALMA_PROMPT

    def __post_init__(self):
        try:
            self.template.format(src="", src_lang="", tgt_lang="")
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise ValueError(f"PromptFormat template {self.template!r} does not format ({e!r}); use only the "
                             "placeholders {src}, {src_lang}, {tgt_lang}") from None
        if "{src}" not in self.template:
            raise ValueError(f"PromptFormat template {self.template!r} has no {{src}} placeholder")

    def render(self, src: str, src_lang: str, tgt_lang: str) -> str:
        return self.template.format(src=src, src_lang=LANGUAGE_NAMES.get(src_lang, src_lang),
                                    tgt_lang=LANGUAGE_NAMES.get(tgt_lang, tgt_lang))


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; training examples end with it")
    return tokenizer.eos_token_id


def encode_translation(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """(ids, loss_mask): the prompt with the tokenizer's special tokens (e.g. BOS), " " + target, and EOS; the loss
    mask is 1 on the target and EOS tokens only."""
    eos = _eos_id(tokenizer)
    prompt_ids = tokenizer.encode(prompt)
    target_ids = tokenizer.encode(" " + target, add_special_tokens=False) + [eos]
    return prompt_ids + target_ids, [0] * len(prompt_ids) + [1] * len(target_ids)


def encode_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """(ids, loss_mask): the text with the tokenizer's special tokens (e.g. BOS) and EOS; loss on every token but the
    first."""
    ids = tokenizer.encode(text) + [_eos_id(tokenizer)]
    return ids, [0] + [1] * (len(ids) - 1)


# --- Batches -----------------------------------------------------------------------------------------------------

class BatchStream:
    """An endless iterator of batches, each a dict of int32 numpy arrays [batch_size, max_len]:

    input_ids (pad_id on padding), loss_mask, attention_mask (1 = real token), segment_ids (1, 2, ... per example
    within a row, 0 on padding) and positions (0, 1, ... restarting in each example, 0 on padding).

    Epoch e visits the examples in the order `np.random.default_rng([seed, e]).permutation(n)` (identity without
    shuffle). A batch takes examples from the current (epoch, index) on: without packing one per row; with packing
    each goes to the first row with room for it (first fit), and the batch ends at the first example that fits no
    row once all rows are open. That example is not consumed: it starts the next batch. Sequences are never split,
    batches are never short (an epoch's tail continues into the next epoch), and so a batch depends only on
    (epoch, index): `state()` / `restore()` resume exactly. Examples longer than max_len are skipped, and counted in
    a warning at the end of each epoch.

    examples: encoded (ids, loss_mask) pairs, or, with `encode`, records that `encode` turns into them when read.
    rows: the rows of each batch to return, ascending (default all): arrays are then [len(rows), max_len], those
    rows of the same batches. For one process of several (see `host_rows`); the layout of a batch depends on
    the lengths of all its examples, so every example is still read and encoded, only the arrays are smaller.
    task: the task id (an int >= 0, for MoE task adapters, `jaxmoe.moe.task_adapters`) of a record (what `encode`
    is given, or the example itself without `encode`). Batches then also hold task_ids int32 [batch_size], one
    per row, and a row holds examples of one task only: packing puts an example in the first row of its task
    with room for it (the model takes one task per row). None: no task ids, batches exactly as without them.
    """

    def __init__(self, examples: Sequence, *, batch_size: int, max_len: int, pad_id: int, seed: int = 0,
                 pack: bool = False, shuffle: bool = True, encode: Callable[[Any], Example] | None = None,
                 rows: Sequence[int] | None = None, task: Callable[[Any], int] | None = None):
        for name, value, least in (("batch_size", batch_size, 1), ("max_len", max_len, 1), ("seed", seed, 0),
                                   ("pad_id", pad_id, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
                raise ValueError(f"BatchStream: {name}={value!r}; expected an int >= {least}")
        if not len(examples):
            raise DataError("BatchStream: no examples")
        self.rows = tuple(range(batch_size)) if rows is None else _check_rows(rows, batch_size)
        self.batch_size, self.max_len, self.pad_id, self.seed = int(batch_size), int(max_len), int(pad_id), int(seed)
        self.pack, self.shuffle = pack, shuffle
        self._examples, self._encode, self._task, self._n = examples, encode, task, len(examples)
        self._epoch = self._index = self._batches = 0
        self._order = (-1, None)  # (epoch, permutation) of the epoch last visited
        self._reset_drop_counts()

    def state(self) -> dict[str, int]:
        """{"epoch", "index" (next position in the epoch's order), "batches" (served so far)}: JSON-able."""
        return {"epoch": self._epoch, "index": self._index, "batches": self._batches}

    def restore(self, state: Mapping[str, int]) -> None:
        """Continues from `state()` of a stream over the same examples and settings."""
        if not isinstance(state, Mapping) or set(state) != {"epoch", "index", "batches"}:
            raise ValueError(f"BatchStream.restore: got {state!r}; expected a dict from BatchStream.state() with "
                             "keys epoch, index, batches")
        for key, value in state.items():
            limit = self._n if key == "index" else None
            if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (limit and value >= limit):
                raise ValueError(f"BatchStream.restore: {key}={value!r}; expected an int >= 0"
                                 + (f" and < {limit} (the number of examples)" if limit else ""))
        self._epoch, self._index, self._batches = state["epoch"], state["index"], state["batches"]
        self._reset_drop_counts()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows: list[list[Example]] = []
        room: list[int] = []
        row_tasks: list[int | None] = []  # all None without `task`
        while len(rows) < self.batch_size or (self.pack and max(room) > 0):
            ids, mask, task = self._next_fitting()
            fits = [r for r, free in enumerate(room) if self.pack and len(ids) <= free and row_tasks[r] == task]
            if fits:
                row = fits[0]
            elif len(rows) < self.batch_size:
                rows.append([])
                room.append(self.max_len)
                row_tasks.append(task)
                row = len(rows) - 1
            else:
                break
            rows[row].append((ids, mask))
            room[row] -= len(ids)
            self._advance()
        self._batches += 1
        return self._assemble(rows, row_tasks)

    def _reset_drop_counts(self) -> None:
        """Over-long examples skipped this epoch (for its warning) and in a row (n in a row: none fits max_len)."""
        self._dropped, self._dropped_longest = 0, 0
        self._dropped_run, self._dropped_shortest = 0, None

    def _example(self, i: int) -> tuple[Sequence[int], Sequence[int], int | None]:
        """(ids, loss_mask, task id or None) of example i."""
        record = self._examples[i]
        ids, mask = record if self._encode is None else self._encode(record)
        if len(ids) != len(mask) or not len(ids):
            raise DataError(f"example {i} has {len(ids)} ids and {len(mask)} loss_mask values; expected the same "
                            "non-zero number")
        if self._task is None:
            return ids, mask, None
        task = self._task(record)
        if isinstance(task, bool) or not isinstance(task, (int, np.integer)) or task < 0:
            raise DataError(f"example {i} has task id {task!r}; expected an int >= 0 from BatchStream's task")
        return ids, mask, int(task)

    def _next_fitting(self) -> tuple[Sequence[int], Sequence[int], int | None]:
        """The example at (epoch, index) with its task, after skipping (consuming) those longer than max_len."""
        while True:
            if self._order[0] != self._epoch:
                order = (np.random.default_rng([self.seed, self._epoch]).permutation(self._n) if self.shuffle
                         else np.arange(self._n))
                self._order = (self._epoch, order)
            ids, mask, task = self._example(int(self._order[1][self._index]))
            if len(ids) <= self.max_len:
                self._dropped_run, self._dropped_shortest = 0, None
                return ids, mask, task
            self._dropped += 1
            self._dropped_longest = max(self._dropped_longest, len(ids))
            self._dropped_run += 1
            self._dropped_shortest = min(len(ids), self._dropped_shortest or len(ids))
            if self._dropped_run >= self._n:
                raise DataError(f"all {self._n} examples are longer than max_len={self.max_len} tokens (the "
                                f"shortest has {self._dropped_shortest}); raise max_len")
            self._advance()

    def _advance(self) -> None:
        self._index += 1
        if self._index == self._n:
            if self._dropped:
                warnings.warn(f"BatchStream epoch {self._epoch}: skipped {self._dropped} examples longer than "
                              f"max_len={self.max_len} tokens (the longest has {self._dropped_longest}); raise "
                              "max_len to train on them")
            self._epoch, self._index = self._epoch + 1, 0
            self._dropped, self._dropped_longest = 0, 0

    def _assemble(self, rows: list[list[Example]], row_tasks: list[int | None]) -> dict[str, np.ndarray]:
        """The arrays of `self.rows` of the batch whose rows hold `rows` (a batch's layout: examples per row), of
        tasks `row_tasks`."""
        shape = (len(self.rows), self.max_len)
        batch = {"input_ids": np.full(shape, self.pad_id, np.int32)}
        for key in ("loss_mask", "attention_mask", "segment_ids", "positions"):
            batch[key] = np.zeros(shape, np.int32)
        for r, row in enumerate(rows[i] for i in self.rows):
            start = 0
            for segment, (ids, mask) in enumerate(row, 1):
                end = start + len(ids)
                batch["input_ids"][r, start:end] = ids
                batch["loss_mask"][r, start:end] = mask
                batch["attention_mask"][r, start:end] = 1
                batch["segment_ids"][r, start:end] = segment
                batch["positions"][r, start:end] = np.arange(len(ids))
                start = end
        if self._task is not None:
            batch["task_ids"] = np.asarray([row_tasks[i] for i in self.rows], np.int32)
        return batch


def _check_rows(rows: Sequence[int], batch_size: int) -> tuple[int, ...]:
    rows = tuple(rows)
    ints = all(isinstance(r, (int, np.integer)) and not isinstance(r, bool) for r in rows)
    if not rows or not ints or list(rows) != sorted(set(rows)) or rows[0] < 0 or rows[-1] >= batch_size:
        raise ValueError(f"BatchStream: rows={rows!r:.200}; expected distinct ascending ints in [0, {batch_size}) "
                         "(batch_size), e.g. from host_rows")
    return tuple(int(r) for r in rows)


def host_rows(sharding, shape: Sequence[int], *, axis: int = 0, devices=None) -> tuple[int, ...]:
    """The indices along `axis` of a global array of `shape` laid out by `sharding` (a jax.sharding.Sharding)
    that `devices` hold, ascending; default devices: this process's (`sharding.addressable_devices`).

    This process's share of a global batch: these rows, in this order, are what
    `jax.make_array_from_process_local_data(sharding, local, shape)` expects as `local` along `axis`.
    """
    shape = tuple(int(n) for n in shape)
    if not 0 <= axis < len(shape):
        raise ValueError(f"host_rows: axis={axis} for a shape {shape}; expected 0 <= axis < {len(shape)}")
    devices = set(sharding.addressable_devices if devices is None else devices)
    held = set()
    for device, index in sharding.devices_indices_map(shape).items():
        if device in devices:
            held.update(range(*index[axis].indices(shape[axis])))
    if not held:
        raise ValueError(f"host_rows: none of the devices {sorted(d.id for d in devices)} holds part of an array "
                         f"laid out by {sharding}; pass devices of the sharding's mesh")
    return tuple(sorted(held))


def tokens_in(batch: Mapping[str, np.ndarray]) -> int:
    """Real (non-padding) tokens in a batch, for tokens/s."""
    return int(np.asarray(batch["attention_mask"]).sum())


def eval_batches(examples: Sequence[Example], *, batch_size: int, max_len: int, pad_id: int,
                 task_ids: Sequence[int] | None = None) -> list[dict[str, np.ndarray]]:
    """Every example once, in order (those over max_len skipped), right-padded to int32 [batch_size, max_len]
    arrays input_ids, loss_mask and attention_mask; the last batch is filled with empty rows, so one compiled
    shape serves all. task_ids: one per example (MoE task adapters): batches then hold task_ids int32
    [batch_size] too, 0 for the empty rows (which have no targets)."""
    if task_ids is not None and len(task_ids) != len(examples):
        raise ValueError(f"eval_batches: {len(task_ids)} task_ids for {len(examples)} examples; expected one each")
    keep = [i for i, e in enumerate(examples) if len(e[0]) <= max_len]
    fitting = [examples[i] for i in keep]
    batches = []
    for start in range(0, len(fitting), batch_size):
        ids = np.full((batch_size, max_len), pad_id, np.int32)
        loss_mask = np.zeros((batch_size, max_len), np.int32)
        attention = np.zeros((batch_size, max_len), np.int32)
        for row, (tokens, mask) in enumerate(fitting[start:start + batch_size]):
            ids[row, :len(tokens)], loss_mask[row, :len(tokens)], attention[row, :len(tokens)] = tokens, mask, 1
        batches.append({"input_ids": ids, "loss_mask": loss_mask, "attention_mask": attention})
        if task_ids is not None:
            tasks = np.zeros((batch_size,), np.int32)
            chosen = [task_ids[i] for i in keep[start:start + batch_size]]
            tasks[:len(chosen)] = chosen
            batches[-1]["task_ids"] = tasks
    return batches
