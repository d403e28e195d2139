"""A small training loop for causal language models: masked next-token loss, AdamW, one jitted step.

`make_optimizer` builds AdamW with linear warmup, cosine decay and global-norm clipping; `train_step` takes one
optimizer step on one `Batch` and returns its metrics; `evaluate` averages loss and token accuracy over batches.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxmoe.infer.generate import greedy_tokens

__all__ = ["Batch", "TrainConfig", "evaluate", "learning_rate_schedule", "make_optimizer", "next_token_loss",
           "train_step"]


class Batch(NamedTuple):
    """One batch of token sequences.

    input_ids: int32 [b, t]. loss_mask: [b, t], 1 where token t is a target: its prediction (the logits at
    t - 1) counts in the loss; position 0 never does. attention_mask: [b, t], 1 = real token, 0 = padding
    (None: no padding). Padding is never attended to, predicted, or predicted from, whatever loss_mask says.
    """

    input_ids: jax.Array
    loss_mask: jax.Array
    attention_mask: jax.Array | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class TrainConfig:
    """Optimizer settings: AdamW, linear warmup to `learning_rate`, cosine decay to `final_lr_fraction` of it."""

    learning_rate: float = 3e-3
    warmup_steps: int = 20
    total_steps: int = 300
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.98

    def __post_init__(self):
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"TrainConfig: warmup_steps={self.warmup_steps}, total_steps={self.total_steps}; "
                             "expected 0 <= warmup_steps < total_steps")
        for name in ("learning_rate", "clip_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig: {name}={getattr(self, name)!r}; expected a positive number")


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """0 -> learning_rate linearly over warmup_steps, then cosine down to learning_rate * final_lr_fraction."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
        decay_steps=config.total_steps, end_value=config.learning_rate * config.final_lr_fraction)


def _adamw_clipped(learning_rate, *, config: TrainConfig) -> optax.GradientTransformation:
    # Weight decay on matrices only: decaying norm gains towards 0 would fight their role as scales.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(learning_rate, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=decay_mask),
    )


def make_optimizer(model: nnx.Module, config: TrainConfig) -> nnx.Optimizer:
    """An `nnx.Optimizer` over the model's `nnx.Param`s; the current learning rate lives in its state."""
    # inject_hyperparams keeps the scheduled learning rate in the optimizer state, so train_step reports the
    # rate it actually used without being handed the schedule separately.
    tx = optax.inject_hyperparams(_adamw_clipped, static_args=("config",))(
        learning_rate=learning_rate_schedule(config), config=config)
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def next_token_loss(model: nnx.Module, batch: Batch, rngs: nnx.Rngs | None = None
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy of predicting each target token from the ones before it, plus, for MoE models, the
    config's `aux_loss_coef` x load-balancing loss and `z_loss_coef` x router z-loss. `rngs` feeds MoE routing
    in training mode.

    Returns (loss float32 [], {"loss_sum", "tokens", "correct"}: float32 [] sums over the batch's targets).
    """
    shape = tuple(batch.input_ids.shape)
    for name in ("loss_mask", "attention_mask"):
        mask = getattr(batch, name)
        if mask is not None and tuple(mask.shape) != shape:
            raise ValueError(f"Batch.{name} has shape {tuple(mask.shape)} but input_ids has shape {shape}; "
                             "expected the same [batch, time]")
    if len(shape) != 2 or shape[1] < 2:
        raise ValueError(f"Batch.input_ids has shape {shape}; expected [batch, time] with time >= 2")
    out = model(batch.input_ids, attention_mask=batch.attention_mask, rngs=rngs)
    logits_btv = out.logits[:, :-1]
    targets_bt = batch.input_ids[:, 1:]
    weight_bt = batch.loss_mask[:, 1:].astype(jnp.float32)
    if batch.attention_mask is not None:
        # Both ends must be real tokens: a padding position neither is a target nor predicts one.
        real_bt = batch.attention_mask.astype(jnp.float32)
        weight_bt = weight_bt * real_bt[:, 1:] * real_bt[:, :-1]
    nll_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, targets_bt)
    correct_bt = (greedy_tokens(logits_btv) == targets_bt) & (weight_bt > 0)
    stats = {"loss_sum": jnp.sum(nll_bt * weight_bt), "tokens": jnp.sum(weight_bt),
             "correct": jnp.sum(correct_bt.astype(jnp.float32))}
    loss = stats["loss_sum"] / jnp.maximum(stats["tokens"], 1.0)
    if out.aux_loss is not None:
        moe = model.config.moe
        loss = loss + moe.aux_loss_coef * out.aux_loss + moe.z_loss_coef * out.router_z_loss
    return loss, stats


@functools.partial(nnx.jit, donate_argnames=("model", "optimizer"))  # update parameters and moments in place
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch,
               rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    """One AdamW step on `batch`, in place. Returns float32 scalars: loss, grad_norm (before clipping),
    learning_rate (the rate this step used) and accuracy (next-token, on the batch's targets). MoE models in
    training mode (`model.train()`) need `rngs` for SparseMixer's sampling and the input jitter."""
    (loss, stats), grads = nnx.value_and_grad(next_token_loss, has_aux=True)(model, batch, rngs)
    optimizer.update(model, grads)
    return {"loss": loss, "grad_norm": optax.global_norm(grads),
            "learning_rate": optimizer.opt_state.hyperparams["learning_rate"][...],
            "accuracy": stats["correct"] / jnp.maximum(stats["tokens"], 1.0)}


@nnx.jit
def _eval_step(model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
    return next_token_loss(model, batch)[1]


def evaluate(model: nnx.Module, batches: Iterable[Batch]) -> dict[str, float]:
    """Token-weighted mean loss and next-token accuracy over all targets of all batches.

    Returns {"loss", "accuracy", "tokens"}; raises ValueError when the batches hold no target tokens.
    """
    totals = {"loss_sum": 0.0, "tokens": 0.0, "correct": 0.0}
    for batch in batches:
        for key, value in _eval_step(model, batch).items():
            totals[key] += float(value)
    if totals["tokens"] == 0:
        raise ValueError("evaluate: the batches hold no target tokens (every loss_mask entry is 0, or no batches)")
    return {"loss": totals["loss_sum"] / totals["tokens"], "accuracy": totals["correct"] / totals["tokens"],
            "tokens": int(totals["tokens"])}
