"""PEMA's external memory: `build_memory` writes, for every target token of teacher-forced examples, the
pre-norm context representation f(c_i) float32 [d] (key) and the token y_i int32 (value) as safetensors shards;
`Memory` reads them back in batches, one shard at a time."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from jaxmoe.io.atomic import OVERWRITE_ADVICE, atomic_folder, refuse_nonempty

__all__ = ["EN_DE_PROMPT", "FORMALITY_PROMPT", "Memory", "MemoryInfo", "build_memory", "encode_examples",
           "model_fingerprint"]

# The paper's prompts (reference code), with the source as {source}.
EN_DE_PROMPT = "Translate this from English to German: \n{source}\nGerman: "
FORMALITY_PROMPT = "Convert the following informal sentence into a formal sentence: \nInformal: {source}\nFormal: "

_FORMAT = "jaxmoe-pema-memory"
_INFO_FILE = "memory.json"


def model_fingerprint(config) -> str:
    """A short hash of a model config's architecture fields (not `remat` / `attention_impl`, which only set how
    it runs): memories built by one model refuse another's head. Weights are not hashed."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("remat", "attention_impl")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_examples(tokenizer, sources: Sequence[str], targets: Sequence[str], prompt: str = EN_DE_PROMPT
                    ) -> list[tuple[list[int], list[int]]]:
    """(context ids, target ids) pairs for `build_memory`: the context is `prompt` formatted with the source
    (with the tokenizer's special tokens, e.g. BOS), the target the reference's tokens followed by EOS."""
    if len(sources) != len(targets):
        raise ValueError(f"{len(sources)} sources but {len(targets)} targets; expected one target per source")
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return [(tokenizer.encode(prompt.format(source=s)), tokenizer.encode(t, add_special_tokens=False) + eos)
            for s, t in zip(sources, targets)]


@dataclasses.dataclass(frozen=True)
class MemoryInfo:
    """What `memory.json` records: the model's hidden and vocabulary sizes, its `model_fingerprint`, the number
    of rows, and each shard's file name and row count."""

    hidden_size: int
    vocab_size: int
    fingerprint: str
    num_rows: int
    shards: tuple[tuple[str, int], ...]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prenorm_hidden(graphdef, state, ids_bt, mask_bt):
    # Only hidden_states is returned, so the compiled program drops the logits.
    out = nnx.merge(graphdef, state)(ids_bt, attention_mask=mask_bt, return_hidden="pre_norm")
    return out.hidden_states.astype(jnp.float32)


def _shard_name(i: int) -> str:
    return f"memory-{i:05d}.safetensors"


def build_memory(model, examples: Sequence[tuple[Sequence[int], Sequence[int]]], path, *, batch_size: int = 8,
                 rows_per_shard: int = 1 << 16, overwrite: bool = False) -> MemoryInfo:
    """Writes the external memory of `examples` (context ids, target ids; `encode_examples`) to folder `path`.

    Each example's context + target runs through `model` (frozen, teacher-forced, `batch_size` examples a call,
    right-padded to a multiple of 16 tokens); the key of target token i is the hidden state BEFORE the final
    norm at the position that predicts it (the last context token for i = 0), float32 [d], its value the token
    (int32). Only real target positions are stored, in example order, in shards of `rows_per_shard` rows
    (safetensors: "keys" [n, d], "values" [n]) plus `memory.json` (MemoryInfo); the folder appears whole or not
    at all. Call `model.eval()` first for an MoE model (routing must not sample).
    """
    config = getattr(model, "config", None)
    config = getattr(config, "text", config)  # a multimodal model's language config
    vocab, limit = config.vocab_size, config.max_position_embeddings
    for name, n in (("batch_size", batch_size), ("rows_per_shard", rows_per_shard)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name}={n!r}; expected an integer >= 1")
    examples = [(np.asarray(c, np.int64).reshape(-1), np.asarray(t, np.int64).reshape(-1)) for c, t in examples]
    if not examples:
        raise ValueError("examples is empty; expected (context ids, target ids) pairs (see encode_examples)")
    for i, (context, target) in enumerate(examples):
        if context.size == 0 or target.size == 0:
            raise ValueError(f"example {i} has {context.size} context and {target.size} target tokens; both need at "
                             "least one (the first target token is predicted from the last context token)")
        both = np.concatenate([context, target])
        if both.min() < 0 or both.max() >= vocab:
            raise ValueError(f"example {i} holds token id {int(both.max() if both.max() >= vocab else both.min())}, "
                             f"outside the model's vocabulary [0, {vocab}); check the tokenizer")
        if both.size > limit:
            raise ValueError(f"example {i} has {both.size} tokens, more than the model's max_position_embeddings="
                             f"{limit}; shorten or drop it")
    path = Path(path)
    if not overwrite:
        refuse_nonempty(path, OVERWRITE_ADVICE)
    graphdef, state = nnx.split(model)
    shards, pending_k, pending_v, pending, num_rows = [], [], [], 0, 0
    hidden_size = None
    with atomic_folder(path) as tmp:
        def flush(final: bool):
            nonlocal pending_k, pending_v, pending
            keys, values = np.concatenate(pending_k), np.concatenate(pending_v)
            while len(values) >= rows_per_shard or (final and len(values)):
                name = _shard_name(len(shards))
                safetensors.numpy.save_file({"keys": np.ascontiguousarray(keys[:rows_per_shard]),
                                             "values": np.ascontiguousarray(values[:rows_per_shard])}, tmp / name)
                shards.append((name, int(min(rows_per_shard, len(values)))))
                keys, values = keys[rows_per_shard:], values[rows_per_shard:]
            pending_k, pending_v, pending = [keys], [values], len(values)

        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            width = -(-max(c.size + t.size for c, t in chunk) // 16) * 16
            ids = np.zeros((batch_size, width), np.int32)
            mask = np.zeros((batch_size, width), np.int32)
            mask[len(chunk):, 0] = 1  # filler rows of one token keep every row's attention non-empty
            for row, (context, target) in enumerate(chunk):
                n = context.size + target.size
                ids[row, :n], mask[row, :n] = np.concatenate([context, target]), 1
            hidden = np.asarray(_prenorm_hidden(graphdef, state, jnp.asarray(ids), jnp.asarray(mask)))
            hidden_size = hidden.shape[-1]
            for row, (context, target) in enumerate(chunk):
                c = context.size
                pending_k.append(hidden[row, c - 1:c - 1 + target.size])
                pending_v.append(target.astype(np.int32))
                pending += target.size
                num_rows += target.size
            if pending >= rows_per_shard:
                flush(final=False)
        flush(final=True)
        info = MemoryInfo(hidden_size=int(hidden_size), vocab_size=int(vocab),
                          fingerprint=model_fingerprint(config), num_rows=num_rows, shards=tuple(shards))
        record = {"format": _FORMAT, "version": 1, **dataclasses.asdict(info)}
        (tmp / _INFO_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return info


class Memory:
    """An external memory on disk (`build_memory`), read one shard at a time. `Memory(path)`."""

    def __init__(self, path):
        self.path = Path(path)
        info_path = self.path / _INFO_FILE
        if not info_path.is_file():
            raise FileNotFoundError(f"{str(self.path)!r} holds no {_INFO_FILE}; expected a folder written by "
                                    "jaxmoe.mt.pema.build_memory")
        record = json.loads(info_path.read_text(encoding="utf-8"))
        if record.get("format") != _FORMAT or record.get("version") != 1:
            raise ValueError(f"{str(info_path)!r} has format {record.get('format')!r} version "
                             f"{record.get('version')!r}; expected {_FORMAT!r} version 1 (rebuild the memory)")
        self.info = MemoryInfo(hidden_size=record["hidden_size"], vocab_size=record["vocab_size"],
                               fingerprint=record["fingerprint"], num_rows=record["num_rows"],
                               shards=tuple((name, rows) for name, rows in record["shards"]))

    def __len__(self) -> int:
        return self.info.num_rows

    def check_matches(self, *, hidden_size: int, vocab_size: int, fingerprint: str | None = None,
                      what: str = "the head") -> None:
        """Raises ValueError unless this memory was built by a model with these sizes (and fingerprint)."""
        advice = "build the memory with the model whose head you use (jaxmoe.mt.pema.build_memory)"
        if hidden_size != self.info.hidden_size:
            raise ValueError(f"memory {str(self.path)!r} holds hidden states of size {self.info.hidden_size} but "
                             f"{what} has hidden size {hidden_size}; it comes from a different model: {advice}")
        if vocab_size != self.info.vocab_size:
            raise ValueError(f"memory {str(self.path)!r} was built with a vocabulary of {self.info.vocab_size} "
                             f"tokens but {what} has {vocab_size}; it comes from a different model: {advice}")
        if fingerprint is not None and fingerprint != self.info.fingerprint:
            raise ValueError(f"memory {str(self.path)!r} has model fingerprint {self.info.fingerprint!r} but {what} "
                             f"has {fingerprint!r} (another architecture of the same sizes): {advice}")

    def read_shard(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard i's keys float32 [n, d] and values int32 [n]."""
        name, rows = self.info.shards[i]
        tensors = safetensors.numpy.load_file(self.path / name)
        keys, values = tensors["keys"], tensors["values"]
        if keys.shape != (rows, self.info.hidden_size) or values.shape != (rows,):
            raise ValueError(f"{str(self.path / name)!r} holds keys {keys.shape} and values {values.shape}; "
                             f"{_INFO_FILE} expects ({rows}, {self.info.hidden_size}) and ({rows},): the folder is "
                             "damaged, rebuild it")
        return keys, values

    def batches(self, batch_size: int, *, seed: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields (keys float32 [n, d], values int32 [n]) with n = batch_size (the last batch may be smaller),
        holding one shard (plus the rows carried over from the last) in memory at a time. With `seed`, the shard
        order and the rows within each shard are shuffled; without, rows come in build order."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}; expected an integer >= 1")
        rng = None if seed is None else np.random.default_rng(seed)
        order = range(len(self.info.shards)) if rng is None else rng.permutation(len(self.info.shards))
        carry_k = np.zeros((0, self.info.hidden_size), np.float32)
        carry_v = np.zeros((0,), np.int32)
        for i in order:
            keys, values = self.read_shard(int(i))
            if rng is not None:
                perm = rng.permutation(len(values))
                keys, values = keys[perm], values[perm]
            keys, values = np.concatenate([carry_k, keys]), np.concatenate([carry_v, values])
            full = len(values) // batch_size * batch_size
            for s in range(0, full, batch_size):
                yield keys[s:s + batch_size], values[s:s + batch_size]
            carry_k, carry_v = keys[full:], values[full:]
        if len(carry_v):
            yield carry_k, carry_v
