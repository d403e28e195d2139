"""PEMA's two training phases, from the memory (and for phase 2 the `Head`) alone, never the model:
`train_reconstruction` (phase 1) and `train_joint` (phase 2), validation with `memory_loss` and early stopping
(`exceeds_previous_two`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxmoe.mt.pema.memory import Memory
from jaxmoe.mt.pema.module import PEMA, Head, check_unit

__all__ = ["TrainResult", "exceeds_previous_two", "memory_loss", "pema_step", "train_joint", "train_reconstruction"]


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
def pema_step(pema, optimizer, head, f_nd, y_n, w_n, kappa):
    """One optimizer step on a padded memory batch (keys f [n, d], next tokens y [n], weights w [n], 0 on padding);
    head None: phase 1's reconstruction loss. Returns the mean loss (jitted; the training memory that
    experiments/mt/pema_deen.py reports is this step's compiled memory)."""
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
    check_unit("kappa", kappa, "the weight of the reconstruction loss; the paper uses 0.2")
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
            loss = float(pema_step(pema, optimizer, head, *_padded(keys, values, rows), kappa))
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
    check_unit("kappa", kappa, "the weight of the reconstruction loss; the paper uses 0.2")
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
