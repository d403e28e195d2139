"""PEMA: plug-in external memory adaptation (Kim, Kim, Bak, NAACL 2024, arXiv 2311.08590).

The data owner adapts a language model without its weights: it sees only context representations (the last
layer's output BEFORE the final norm, f(c_i)) and the output side of the model (final norm + LM head, W_hd).

1. `build_memory`: teacher-force prompt + source + target through the frozen model and store, for every target
   position i, the key f(c_i) [d] and the value y_i (the target token at i), as safetensors shards on disk;
   `Memory` streams them back in batches.
2. `PEMA`: A [r, d] (Kaiming-uniform), B_rct and B_pd [d, r] (zero), scale alpha / r, input dropout. Its output is
   only the low-rank path s * B_pd A f; P_PEMA = softmax(W_hd LN(s B_pd A f)).
3. `train_reconstruction` (phase 1: min MSE(s B_rct A f, f)) and `train_joint` (phase 2: B_rct frozen, A
   re-initialised as the reference code does, min kappa MSE + (1 - kappa) CE(W_hd LN(s B_pd A f), y)). Both take
   the memory and, for phase 2, a `Head` (final norm + LM head params, `lm_head_of(model)`), never the model.
4. `gradual_unrolling`: a logits processor for `jaxmoe.generate` (greedy, sampled or beam search) that mixes
   P = c_t P_PEMA + (1 - c_t) P_LM in probability space, c_t from Gradual Unrolling's decaying lambda.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy
from flax import nnx, struct

from jaxmoe.io.atomic import OVERWRITE_ADVICE, atomic_folder, refuse_nonempty
from jaxmoe.nn.lm_loss import OutputHead

__all__ = ["EN_DE_PROMPT", "FORMALITY_PROMPT", "GradualUnrolling", "Head", "Memory", "MemoryInfo", "PEMA",
           "TrainResult", "build_memory", "encode_examples", "exceeds_previous_two", "gradual_unrolling",
           "gu_coefficients", "lm_head_of", "memory_loss", "model_fingerprint", "train_joint",
           "train_reconstruction"]

# The paper's prompts (reference code), with the source as {source}.
EN_DE_PROMPT = "Translate this from English to German: \n{source}\nGerman: "
FORMALITY_PROMPT = "Convert the following informal sentence into a formal sentence: \nInformal: {source}\nFormal: "

_FORMAT = "jaxmoe-pema-memory"
_INFO_FILE = "memory.json"
_SCHEDULES = ("gradual", "constant")


def _check_unit(name: str, value, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not 0 <= value <= 1:
        raise ValueError(f"{name}={value!r}; expected a number in [0, 1] ({meaning})")


# ---------------------------------------------------------------------------------------------------- memory


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


# ------------------------------------------------------------------------------------------ head and module


@struct.dataclass
class Head:
    """What the data owner receives of the model: the final norm (its module structure and parameters) and the
    output head. With tied embeddings the output head is the embedding table [v, d]: W_hd IS the table. The
    `fingerprint` is the model's `model_fingerprint`, checked against memories. norm_params is a plain nested dict
    of arrays (`nnx.to_pure_dict`), so a Head is an ordinary pytree of arrays."""

    norm_def: nnx.GraphDef = struct.field(pytree_node=False)
    norm_params: dict
    output: OutputHead
    fingerprint: str = struct.field(pytree_node=False)

    @property
    def hidden_size(self) -> int:
        return self.output.weight.shape[1 if self.output.layout == "vd" else 0]

    @property
    def vocab_size(self) -> int:
        return self.output.vocab_size

    def logits(self, h_nd: jax.Array) -> jax.Array:
        """Pre-norm hidden states float [..., d] -> logits float32 [..., v] = W_hd LN(h)."""
        return self.output.logits(nnx.merge(self.norm_def, nnx.State(self.norm_params))(h_nd))


def lm_head_of(model) -> Head:
    """The `Head` (final norm + LM head, nothing else) of a Phi3ForCausalLM, PhimoeForCausalLM or multimodal
    model (its language model's)."""
    lm = getattr(model, "language_model", model)
    norm_def, norm_params = nnx.split(lm.norm)
    return Head(norm_def=norm_def, norm_params=nnx.to_pure_dict(norm_params), output=lm.output_head(),
                fingerprint=model_fingerprint(lm.config))


def _project(a_rd, b_dr, scale, f_nd):
    """s * B A f: float [n, d] -> float32 [n, d] (A [r, d], B [d, r])."""
    z = jnp.einsum("nd,rd->nr", f_nd.astype(jnp.float32), a_rd.astype(jnp.float32))
    return scale * jnp.einsum("nr,dr->nd", z, b_dr.astype(jnp.float32))


class PEMA(nnx.Module):
    """The PEMA adapter over context representations f float [n, d]: A [r, d] (Kaiming-uniform, bound
    1 / sqrt(d), torch's nn.Linear init), B_rct and B_pd [d, r] (zero), scale alpha / r, dropout on f."""

    def __init__(self, hidden_size: int, rank: int, *, alpha: float = 1.0, dropout: float = 0.2,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        for name, n in (("hidden_size", hidden_size), ("rank", rank)):
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise ValueError(f"PEMA: {name}={n!r}; expected an integer >= 1")
        self.a_rd = nnx.Param(self._a_init(rngs.params(), (rank, hidden_size), param_dtype))
        self.b_rct_dr = nnx.Param(jnp.zeros((hidden_size, rank), param_dtype))
        self.b_pd_dr = nnx.Param(jnp.zeros((hidden_size, rank), param_dtype))
        self.scale = float(alpha) / rank
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    _a_init = staticmethod(nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=-1, out_axis=-2))

    @property
    def hidden_size(self) -> int:
        return self.a_rd.shape[1]

    def reset_a(self, rngs: nnx.Rngs) -> None:
        """Draws A afresh (phase 2 starts from a new A, as the reference code does)."""
        self.a_rd[...] = self._a_init(rngs.params(), self.a_rd.shape, self.a_rd.dtype)

    def both(self, f_nd: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(reconstruction s B_rct A f', prediction s B_pd A f'), float32 [n, d] each, f' = dropout(f) drawn once."""
        f = self.dropout(f_nd.astype(jnp.float32))
        return (_project(self.a_rd[...], self.b_rct_dr[...], self.scale, f),
                _project(self.a_rd[...], self.b_pd_dr[...], self.scale, f))

    def __call__(self, f_nd: jax.Array) -> jax.Array:
        """PEMA's output, only the low-rank path: s B_pd A dropout(f), float32 [n, d] (no residual)."""
        return self.both(f_nd)[1]


# ------------------------------------------------------------------------------------------------ training


def _objective(pema: PEMA, head: Head | None, f_nd, y_n, w_n, kappa):
    """Weighted mean over rows: MSE (mean over d) of the reconstruction, or with a head kappa MSE + (1 - kappa)
    CE of head.logits(prediction) against y."""
    rct_nd, pd_nd = pema.both(f_nd)
    mse_n = jnp.mean(jnp.square(rct_nd - f_nd.astype(jnp.float32)), axis=-1)
    if head is None:
        per_row = mse_n
    else:
        logits_nv = head.logits(pd_nd)
        ce_n = jax.nn.logsumexp(logits_nv, axis=-1) - jnp.take_along_axis(logits_nv, y_n[:, None], -1)[:, 0]
        per_row = kappa * mse_n + (1 - kappa) * ce_n
    return jnp.sum(per_row * w_n), jnp.sum(w_n)


@nnx.jit
def _train_step(pema, optimizer, head, f_nd, y_n, w_n, kappa):
    def loss_fn(pema):
        total, count = _objective(pema, head, f_nd, y_n, w_n, kappa)
        return total / count

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, optimizer.wrt))(pema)
    optimizer.update(pema, grads)
    return loss


@nnx.jit
def _eval_sums(pema, head, f_nd, y_n, w_n, kappa):
    return _objective(pema, head, f_nd, y_n, w_n, kappa)


def _padded(keys, values, rows: int):
    """keys, values and weights float32 [rows] (0 on the filler rows) padded to `rows`: one compiled shape."""
    n = len(values)
    w = np.zeros((rows,), np.float32)
    w[:n] = 1.0
    return (jnp.asarray(np.pad(keys, ((0, rows - n), (0, 0)))), jnp.asarray(np.pad(values, (0, rows - n))),
            jnp.asarray(w))


def memory_loss(pema: PEMA, memory: Memory, head: Head | None = None, *, kappa: float = 0.2,
                batch_size: int = 2048) -> float:
    """The training objective over a whole memory, without dropout: phase 1's reconstruction MSE when `head` is
    None, else phase 2's kappa MSE + (1 - kappa) CE. Leaves `pema` in eval mode."""
    _check_unit("kappa", kappa, "the weight of the reconstruction loss; the paper uses 0.2")
    if head is None:
        memory.check_matches(hidden_size=pema.hidden_size, vocab_size=memory.info.vocab_size, what="the PEMA")
    else:
        memory.check_matches(hidden_size=head.hidden_size, vocab_size=head.vocab_size, fingerprint=head.fingerprint)
    pema.eval()
    rows = min(batch_size, len(memory))
    total = count = 0.0
    for keys, values in memory.batches(rows):
        t, c = _eval_sums(pema, head, *_padded(keys, values, rows), jnp.float32(kappa))
        total, count = total + float(t), count + float(c)
    return total / count


def exceeds_previous_two(losses: Sequence[float]) -> bool:
    """The early-stopping rule: the last validation loss is above both of the two checks before it."""
    return len(losses) >= 3 and losses[-1] > losses[-2] and losses[-1] > losses[-3]


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """steps taken, the last step's training loss, the validation loss at each check, whether training stopped
    early, and the best validation loss (whose parameters the PEMA holds; None without validation)."""

    steps: int
    train_loss: float
    valid_losses: tuple[float, ...]
    stopped_early: bool
    best_valid_loss: float | None


def _fit(pema: PEMA, head: Head | None, memory: Memory, valid: Memory | None, wrt, *, kappa, learning_rate,
         batch_size, max_epochs, max_steps, eval_every, seed) -> TrainResult:
    for name, n in (("batch_size", batch_size), ("max_epochs", max_epochs), ("eval_every", eval_every)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name}={n!r}; expected an integer >= 1")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer))
                                  or max_steps < 1):
        raise ValueError(f"max_steps={max_steps!r}; expected an integer >= 1, or None for no limit")
    if not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
        raise ValueError(f"learning_rate={learning_rate!r}; expected a positive number (the paper uses 1e-3)")
    optimizer = nnx.Optimizer(pema, optax.adam(learning_rate), wrt=wrt)
    rows = min(batch_size, len(memory))
    losses, best, best_params, step, loss, stopped = [], None, None, 0, math.nan, False
    kappa = jnp.float32(kappa)
    for epoch in range(max_epochs):
        for keys, values in memory.batches(rows, seed=seed + epoch):
            pema.train()
            loss = float(_train_step(pema, optimizer, head, *_padded(keys, values, rows), kappa))
            step += 1
            if valid is not None and step % eval_every == 0:
                losses.append(memory_loss(pema, valid, head, kappa=float(kappa), batch_size=batch_size))
                if best is None or losses[-1] < best:
                    best, best_params = losses[-1], jax.tree.map(jnp.copy, nnx.state(pema, nnx.Param))
                stopped = exceeds_previous_two(losses)
            if stopped or (max_steps is not None and step >= max_steps):
                break
        else:
            continue
        break
    if best_params is not None:
        nnx.update(pema, best_params)
    pema.eval()
    return TrainResult(steps=step, train_loss=loss, valid_losses=tuple(losses), stopped_early=stopped,
                       best_valid_loss=best)


def train_reconstruction(pema: PEMA, memory: Memory, *, valid: Memory | None = None, learning_rate: float = 1e-3,
                         batch_size: int = 20480, max_epochs: int = 200, max_steps: int | None = None,
                         eval_every: int = 100, seed: int = 0) -> TrainResult:
    """Phase 1, in place: trains A and B_rct with Adam to minimise MSE(s B_rct A dropout(f), f) over `memory`'s
    keys (shuffled per epoch from `seed`). Every `eval_every` steps the MSE over `valid` (no dropout) is
    checked; training stops once it exceeds both previous checks, and `pema` keeps the parameters of the best
    check. Needs no model and no head."""
    memory.check_matches(hidden_size=pema.hidden_size, vocab_size=memory.info.vocab_size, what="the PEMA")
    wrt = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("a_rd"), nnx.PathContains("b_rct_dr")))
    return _fit(pema, None, memory, valid, wrt, kappa=1.0, learning_rate=learning_rate, batch_size=batch_size,
                max_epochs=max_epochs, max_steps=max_steps, eval_every=eval_every, seed=seed)


def train_joint(pema: PEMA, head: Head, memory: Memory, *, valid: Memory | None = None, kappa: float = 0.2,
                learning_rate: float = 1e-3, batch_size: int = 2048, max_epochs: int = 200,
                max_steps: int | None = None, eval_every: int = 100, seed: int = 0) -> TrainResult:
    """Phase 2, in place: draws A afresh (as the reference code does; only B_rct comes from phase 1), freezes
    B_rct, and trains A and B_pd with Adam on kappa MSE(s B_rct A f', f) + (1 - kappa) CE(W_hd LN(s B_pd A f'),
    y), f' = dropout(f), through the frozen final norm and LM head in `head` (`lm_head_of(model)`: the only part
    of the model this needs). Validation and early stopping as in `train_reconstruction`."""
    _check_unit("kappa", kappa, "the weight of the reconstruction loss; the paper uses 0.2")
    if not isinstance(head, Head):
        raise TypeError(f"head is a {type(head).__name__}; expected a Head (jaxmoe.mt.pema.lm_head_of(model))")
    memory.check_matches(hidden_size=head.hidden_size, vocab_size=head.vocab_size, fingerprint=head.fingerprint)
    if pema.hidden_size != head.hidden_size:
        raise ValueError(f"the PEMA has hidden size {pema.hidden_size} but the head {head.hidden_size}; build the "
                         "PEMA with the model's hidden size")
    pema.reset_a(nnx.Rngs(seed))
    wrt = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("a_rd"), nnx.PathContains("b_pd_dr")))
    return _fit(pema, head, memory, valid, wrt, kappa=float(kappa), learning_rate=learning_rate,
                batch_size=batch_size, max_epochs=max_epochs, max_steps=max_steps, eval_every=eval_every, seed=seed)


# -------------------------------------------------------------------------------------- Gradual Unrolling


def gu_coefficients(step, lambda_max, length_r, schedule: str = "gradual") -> jax.Array:
    """PEMA's weight in the mixture at generation step `step` (0 for the first new token), float32 [rows].

    "gradual" (Gradual Unrolling): lambda_0 = lambda_max and lambda drops by lambda_max / L per step, so
    lambda_s = lambda_max (1 - s / L); the weight applied is lambda_s ** 2 while lambda_s > 0, then 0.
    "constant": lambda_max at every step (the paper's no-GU ablation). length_r float [rows]: L per row.
    """
    lam = jnp.float32(lambda_max) * (1.0 - jnp.asarray(step, jnp.float32) / jnp.asarray(length_r, jnp.float32))
    if schedule == "constant":
        return jnp.broadcast_to(jnp.float32(lambda_max), lam.shape)
    return jnp.where(lam > 0, lam * lam, 0.0)


@struct.dataclass
class GradualUnrolling:
    """A `jaxmoe.generate` logits processor: next-token log-probabilities log(c P_PEMA + (1 - c) P_LM), mixed by
    logsumexp of the log-probabilities, c from `gu_coefficients`; rows where c = 0 keep the model's logits
    unchanged. Built by `gradual_unrolling`."""

    a_rd: jax.Array
    b_pd_dr: jax.Array
    scale: jax.Array
    head: Head
    lambda_max: jax.Array
    length_b: jax.Array  # float32 [b]: L per prompt
    schedule: str = struct.field(pytree_node=False)

    def coefficients(self, step, rows: int) -> jax.Array:
        """c float32 [rows] at `step`; rows a multiple of the prompts (beam search: prompt i's beams adjacent)."""
        b = self.length_b.shape[0]
        if rows % b:
            raise ValueError(f"GradualUnrolling holds {b} lengths but generation runs {rows} rows; pass one "
                             "source length per prompt")
        return gu_coefficients(step, self.lambda_max, jnp.repeat(self.length_b, rows // b), self.schedule)

    def __call__(self, step, logits_rv, hidden_rd):
        c_r = self.coefficients(step, logits_rv.shape[0])[:, None]
        logp_lm = jax.nn.log_softmax(logits_rv.astype(jnp.float32), axis=-1)
        logp_pema = jax.nn.log_softmax(self.head.logits(_project(self.a_rd, self.b_pd_dr, self.scale, hidden_rd)),
                                       axis=-1)
        mixed = jax.nn.logsumexp(jnp.stack([jnp.log(c_r) + logp_pema, jnp.log1p(-c_r) + logp_lm]), axis=0)
        return jnp.where(c_r > 0, mixed, logits_rv.astype(jnp.float32))


def gradual_unrolling(pema: PEMA, head: Head, *, lambda_max: float = 0.9, length: str | int = "source",
                      source_lengths=None, length_ratio: float = 1.0, schedule: str = "gradual"
                      ) -> GradualUnrolling:
    """The PEMA mixture for `jaxmoe.generate(..., logits_processor=...)`.

    lambda_max in [0, 1] (the paper's example uses 0.9; 0 is plain generation). L, the number of steps over which
    lambda decays to 0, never uses the reference: length="source" takes L = max(1, length_ratio x the source's
    token count) per prompt, from `source_lengths` int [b] (one per prompt, in the batch's order); an int
    length is L for every prompt (e.g. max_new_tokens). NOTE: the paper's released code sets L to the REFERENCE
    target length, oracle information a real system does not have; its figures are not reproduced by either
    choice here. schedule="constant" applies lambda_max at every step (no Gradual Unrolling, the paper's ablation;
    `length` is then not used).
    """
    _check_unit("lambda_max", lambda_max, "PEMA's weight at the first step; 0.9 in the paper, 0 turns PEMA off")
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule={schedule!r}; expected one of {_SCHEDULES}")
    if not isinstance(head, Head):
        raise TypeError(f"head is a {type(head).__name__}; expected a Head (jaxmoe.mt.pema.lm_head_of(model))")
    if pema.hidden_size != head.hidden_size:
        raise ValueError(f"the PEMA has hidden size {pema.hidden_size} but the head {head.hidden_size}; they must "
                         "come from the same model")
    if schedule == "constant":
        length_b = np.ones((1,))
    elif length == "source":
        if source_lengths is None:
            raise ValueError('length="source" needs source_lengths: int [b], each prompt\'s source token count')
        lengths = np.asarray(source_lengths)
        if lengths.ndim != 1 or lengths.size == 0 or not np.issubdtype(lengths.dtype, np.number) or (lengths < 0).any():
            raise ValueError(f"source_lengths={source_lengths!r}; expected non-negative counts [b], one per prompt")
        if not (isinstance(length_ratio, (int, float)) and length_ratio > 0):
            raise ValueError(f"length_ratio={length_ratio!r}; expected a positive number (target / source length)")
        length_b = np.maximum(1.0, length_ratio * lengths.astype(np.float64))
    elif isinstance(length, (int, np.integer)) and not isinstance(length, bool) and length >= 1:
        length_b = np.full((1,), float(length))
    else:
        raise ValueError(f"length={length!r}; expected 'source' (with source_lengths) or an integer >= 1 (a maximum "
                         "length); the reference length is oracle information and is not offered")
    return GradualUnrolling(a_rd=pema.a_rd[...], b_pd_dr=pema.b_pd_dr[...], scale=jnp.float32(pema.scale),
                            head=head, lambda_max=jnp.float32(lambda_max),
                            length_b=jnp.asarray(length_b, jnp.float32), schedule=schedule)
