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

from jaxmoe.moe.task_adapters import new_task_optimizer
from jaxmoe.nn.lm_loss import OutputHead, fused_cross_entropy
from jaxmoe.nn.tokens import greedy_tokens
from jaxmoe.sharding import on_auto_axes

__all__ = ["Batch", "TrainConfig", "clip_by_global_norm", "current_learning_rate", "evaluate", "learning_rate_schedule",
           "make_optimizer", "next_token_loss", "next_token_stats", "next_token_stats_from_hidden", "train_step"]


class Batch(NamedTuple):
    """One batch of token sequences.

    input_ids: int32 [b, t]. loss_mask: [b, t], 1 where token t is a target: its prediction (the logits at
    t - 1) counts in the loss; position 0 never does. attention_mask: [b, t], 1 = real token, 0 = padding
    (None: no padding). Padding is never attended to, predicted, or predicted from, whatever loss_mask says.
    segment_ids, positions: optional int32 [b, t] for packed rows (several sequences per row): tokens attend
    within their segment only, and no token is predicted from another segment's last token.
    task_ids: optional int32 [b], each row's task for a model with MoE task adapters (`MoEConfig.task_adapters`;
    a packed row holds examples of one task); None for models without them.

    For gradient accumulation every field gains a leading micro-batch axis: [micro, b, t] ([micro, b] task_ids).
    """

    input_ids: jax.Array
    loss_mask: jax.Array
    attention_mask: jax.Array | None = None
    segment_ids: jax.Array | None = None
    positions: jax.Array | None = None
    task_ids: jax.Array | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class TrainConfig:
    """Optimizer settings: AdamW, linear warmup to `learning_rate`, then cosine or linear decay to
    `final_lr_fraction` of it at `total_steps`, or "inverse_sqrt": learning_rate x sqrt(warmup_steps / step)
    after the warmup (transformers' `get_inverse_sqrt_schedule`, ALMA's; `final_lr_fraction` unused)."""

    learning_rate: float = 3e-3
    warmup_steps: int = 20
    total_steps: int = 300
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.98
    schedule: str = "cosine"

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "inverse_sqrt"):
            raise ValueError(f"TrainConfig: schedule={self.schedule!r}; expected 'cosine', 'linear' or "
                             "'inverse_sqrt'")
        if self.schedule == "inverse_sqrt" and self.warmup_steps < 1:
            raise ValueError("TrainConfig: schedule='inverse_sqrt' needs warmup_steps >= 1 (the decay is "
                             "sqrt(warmup_steps / step))")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"TrainConfig: warmup_steps={self.warmup_steps}, total_steps={self.total_steps}; "
                             "expected 0 <= warmup_steps < total_steps")
        for name in ("learning_rate", "clip_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig: {name}={getattr(self, name)!r}; expected a positive number")


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """0 -> learning_rate linearly over warmup_steps, then cosine (or linear) down to
    learning_rate * final_lr_fraction at total_steps, or inverse_sqrt (see TrainConfig)."""
    end = config.learning_rate * config.final_lr_fraction
    if config.schedule == "inverse_sqrt":
        peak, warmup = config.learning_rate, config.warmup_steps

        def inverse_sqrt(count):
            step = jnp.asarray(count, jnp.float32)
            return jnp.where(step < warmup, peak * step / warmup, peak * jnp.sqrt(warmup / jnp.maximum(step, 1.0)))
        return inverse_sqrt
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=config.learning_rate,
                                                  warmup_steps=config.warmup_steps, decay_steps=config.total_steps,
                                                  end_value=end)
    return optax.join_schedules([
        optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps),
        optax.linear_schedule(config.learning_rate, end, config.total_steps - config.warmup_steps)],
        boundaries=[config.warmup_steps])


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` as one scalar factor, min(1, max_norm / norm), times every gradient: the same
    values (exactly the gradients below the threshold, within an ulp above), but a multiply by a scalar that XLA
    fuses into AdamW's moment updates, where optax's per-element select makes a clipped copy of every gradient.
    An AdamW step over 52 M fp32 parameters on the 2-core benchmark CPU: 136 ms against 216 ms (BENCHMARKS.md,
    issue 15). Its state is optax's (EmptyState), so checkpoints load either way."""
    def update(updates, state, params=None):
        del params
        norm = optax.global_norm(updates)
        scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _adamw_clipped(learning_rate, *, config: TrainConfig) -> optax.GradientTransformation:
    # Weight decay on matrices only: decaying norm gains towards 0 would fight their role as scales.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    return optax.chain(
        clip_by_global_norm(config.clip_norm),
        optax.adamw(learning_rate, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=decay_mask),
    )


def make_optimizer(model: nnx.Module, config: TrainConfig, *, wrt=nnx.Param, only_task: int | None = None
                   ) -> nnx.Optimizer:
    """An `nnx.Optimizer` over the model's `wrt` variables (all `nnx.Param`s, or `nnx.LoRAParam` to train only
    LoRA adapters); the current learning rate lives in its state.

    only_task: a task id of a model with MoE task adapters: train that task's rows of the `TaskParam`s alone
    (its adapter or task embedding), everything else frozen (`jaxmoe.moe.task_adapters.new_task_optimizer`;
    `wrt` must then be left at its default)."""
    if only_task is None:
        return nnx.Optimizer(model, _transformation(config), wrt=wrt)
    if wrt is not nnx.Param:
        raise ValueError(f"make_optimizer: only_task={only_task!r} with wrt={wrt!r}; training one task's rows "
                         "chooses the parameters itself: pass one or the other")
    return new_task_optimizer(model, _transformation(config), only_task)


@functools.cache
def _transformation(config: TrainConfig) -> optax.GradientTransformation:
    """One optax transformation per TrainConfig. The optimizer's transformation is a static part of its graph,
    compared by identity: a new one per optimizer would make train_step compile again for every optimizer built
    (each `train` call, each resume in the same process)."""
    # inject_hyperparams keeps the scheduled learning rate in the optimizer state, so train_step reports the
    # rate it actually used without being handed the schedule separately.
    return optax.inject_hyperparams(_adamw_clipped, static_args=("config",))(
        learning_rate=learning_rate_schedule(config), config=config)


def target_weights(batch: Batch) -> jax.Array:
    """float32 [b, t - 1]: 1 where logits t predict token t + 1 and both count (see Batch)."""
    weight_bt = batch.loss_mask[:, 1:].astype(jnp.float32)
    if batch.attention_mask is not None:
        # Both ends must be real tokens: a padding position neither is a target nor predicts one.
        real_bt = batch.attention_mask.astype(jnp.float32)
        weight_bt = weight_bt * real_bt[:, 1:] * real_bt[:, :-1]
    if batch.segment_ids is not None:
        weight_bt = weight_bt * (batch.segment_ids[:, 1:] == batch.segment_ids[:, :-1])
    return weight_bt


def check_batch(batch: Batch, rank: int) -> None:
    shape = tuple(batch.input_ids.shape)
    for name in ("loss_mask", "attention_mask", "segment_ids", "positions"):
        field = getattr(batch, name)
        if field is not None and tuple(field.shape) != shape:
            raise ValueError(f"Batch.{name} has shape {tuple(field.shape)} but input_ids has shape {shape}; "
                             "expected the same shape")
    if batch.task_ids is not None and tuple(batch.task_ids.shape) != shape[:-1]:
        raise ValueError(f"Batch.task_ids has shape {tuple(batch.task_ids.shape)} but input_ids has shape {shape}; "
                         f"expected one task id per row, shape {shape[:-1]}")
    if len(shape) != rank or shape[-1] < 2:
        what = "[batch, time]" if rank == 2 else "[micro_batches, batch, time]"
        raise ValueError(f"Batch.input_ids has shape {shape}; expected {what} with time >= 2")


def next_token_stats(logits_btv: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """How well the logits at t predict token t + 1, summed over the batch's targets (see Batch).

    logits_btv: float [b, t, v], a model's logits for batch.input_ids int [b, t]. Returns float32 []:
    "loss_sum" (cross-entropy), "tokens" (targets) and "correct" (targets equal to the greedy token).
    """
    if tuple(logits_btv.shape[:2]) != tuple(batch.input_ids.shape) or logits_btv.ndim != 3:
        raise ValueError(f"next_token_stats: logits have shape {tuple(logits_btv.shape)} but input_ids have "
                         f"{tuple(batch.input_ids.shape)}; expected the model's logits [batch, time, vocab] for "
                         "those ids")
    logits_btv = logits_btv[:, :-1]
    targets_bt = batch.input_ids[:, 1:]
    weight_bt = target_weights(batch)
    nll_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, targets_bt)
    correct_bt = (greedy_tokens(logits_btv) == targets_bt) & (weight_bt > 0)
    return {"loss_sum": jnp.sum(nll_bt * weight_bt), "tokens": jnp.sum(weight_bt),
            "correct": jnp.sum(correct_bt.astype(jnp.float32))}


def next_token_stats_from_hidden(hidden_btd: jax.Array, head: OutputHead, batch: Batch) -> dict[str, jax.Array]:
    """next_token_stats of the logits head.logits(hidden_btd), computed without them (jaxmoe.nn.lm_loss: over a
    large vocabulary, chunk by chunk, the gradient made in the forward pass).

    hidden_btd: float [b, t, d], a model's final normed hidden states (`return_hidden=True`) for
    batch.input_ids int [b, t]; head: the model's `output_head()`. Returns what next_token_stats returns.
    """
    b, t, d = hidden_btd.shape
    if (b, t) != tuple(batch.input_ids.shape):
        raise ValueError(f"next_token_stats_from_hidden: hidden states have shape {tuple(hidden_btd.shape)} but "
                         f"input_ids have {tuple(batch.input_ids.shape)}; expected the model's hidden states "
                         "[batch, time, d] for those ids")
    # Every position goes in, the last one with weight 0 (it predicts nothing): hidden_btd[:, :-1] would copy the
    # hidden states, and t - 1 rows split into chunks less evenly.
    targets_bt = jnp.pad(batch.input_ids[:, 1:], ((0, 0), (0, 1)))
    weights_bt = jnp.pad(target_weights(batch), ((0, 0), (0, 1)))
    return fused_cross_entropy(hidden_btd.reshape(b * t, d), head, targets_bt.reshape(-1), weights_bt.reshape(-1))


def _objective(model: nnx.Module, batch: Batch, rngs: nnx.Rngs | None, *, token_total, micro_batches: int
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed cross-entropy / token_total + the MoE losses / micro_batches: summed over the micro-batches of a
    step this is exactly the whole batch's loss. Returns (objective, stats)."""
    # task_ids only when there are some: models without task adapters need not know the keyword.
    tasks = {} if batch.task_ids is None else {"task_ids": batch.task_ids}
    out = model(batch.input_ids, attention_mask=batch.attention_mask, segment_ids=batch.segment_ids,
                positions=batch.positions, return_hidden=True, rngs=rngs, **tasks)
    stats = next_token_stats_from_hidden(out.hidden_states, model.output_head(), batch)
    objective = stats["loss_sum"] / jnp.maximum(token_total, 1.0)
    if out.aux_loss is not None:
        moe = model.config.moe
        stats["aux_loss"], stats["router_z_loss"] = out.aux_loss, out.router_z_loss
        stats["expert_load"] = out.expert_load
        objective = objective + (moe.aux_loss_coef * out.aux_loss + moe.z_loss_coef * out.router_z_loss) / micro_batches
    return objective, stats


def next_token_loss(model: nnx.Module, batch: Batch, rngs: nnx.Rngs | None = None
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy of predicting each target token from the ones before it, plus, for MoE models, the
    config's `aux_loss_coef` x load-balancing loss and `z_loss_coef` x router z-loss. `rngs` feeds MoE routing
    in training mode.

    Returns (loss float32 [], stats: float32 [] sums over the batch's targets "loss_sum", "tokens", "correct";
    MoE models add "aux_loss", "router_z_loss" and "expert_load" [layers, experts]).
    """
    check_batch(batch, rank=2)
    return _objective(model, batch, rngs, token_total=jnp.sum(target_weights(batch)), micro_batches=1)


@on_auto_axes  # a mesh with Explicit axes: see jaxmoe.sharding
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch,
               rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    """One AdamW step on `batch`, in place, on the parameters the optimizer was built for (`optimizer.wrt`:
    all `nnx.Param`s, or only `nnx.LoRAParam` adapters). A batch with a leading micro-batch axis
    [micro, b, t] accumulates the gradients of its micro-batches (a scan, one at a time in memory) and takes
    one step with exactly the whole batch's gradient.

    Returns float32 scalars: loss, grad_norm (before clipping), learning_rate (the rate this step used),
    accuracy (next-token, on the batch's targets) and tokens (targets); MoE models add aux_loss, router_z_loss
    and expert_load [layers, experts]. MoE models in training mode (`model.train()`) need `rngs` for
    SparseMixer's sampling and the input jitter. Parameters and optimizer state placed on a mesh keep their
    shardings through the update.
    """
    return _train_step(model, optimizer, batch, rngs, param_layout(model, optimizer))


def param_layout(model: nnx.Module, optimizer: nnx.Optimizer) -> tuple | None:
    """The NamedSharding of every trained parameter and optimizer-state leaf, or None when nothing is on a mesh.
    Leaves off the mesh (e.g. a fresh optimizer's step count) are first placed on it, replicated: the step
    returns them that way, and the same input layout on every step means one compile."""
    state = (nnx.state(model, optimizer.wrt), nnx.state(optimizer))
    leaves, treedef = jax.tree.flatten(state)
    on_mesh = [isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding) for x in leaves]
    if not any(on_mesh):
        return None
    if not all(on_mesh):
        replicated = jax.sharding.NamedSharding(leaves[on_mesh.index(True)].sharding.mesh,
                                                jax.sharding.PartitionSpec())
        leaves = [x if placed else jax.device_put(x, replicated) for x, placed in zip(leaves, on_mesh)]
        model_state, optimizer_state = jax.tree.unflatten(treedef, leaves)
        nnx.update(model, model_state)
        nnx.update(optimizer, optimizer_state)
    return tuple(_canonical(x.sharding) for x in leaves)


def _canonical(s: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
    """The sharding with trailing None axes dropped from its spec: P(None, None) and P() lay out the same, but
    as a static argument they differ, and the step's outputs come back as P() -> a second compile."""
    spec = list(s.spec)
    while spec and spec[-1] is None:
        spec.pop()
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*spec), memory_kind=s.memory_kind)


def keep_param_layout(model: nnx.Module, optimizer: nnx.Optimizer, layout: tuple) -> None:
    # Without the constraint GSPMD may choose other output shardings for updated values (e.g. a replicated bias
    # comes back split over `tensor`), and the next step would reshard them.
    state = (nnx.state(model, optimizer.wrt), nnx.state(optimizer))
    leaves, treedef = jax.tree.flatten(state)
    leaves = [x if s is None else jax.lax.with_sharding_constraint(x, s) for x, s in zip(leaves, layout)]
    model_state, optimizer_state = jax.tree.unflatten(treedef, leaves)
    nnx.update(model, model_state)
    nnx.update(optimizer, optimizer_state)


@functools.partial(nnx.jit, donate_argnames=("model", "optimizer"),  # update parameters and moments in place
                   static_argnames=("layout",))
def _train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch, rngs: nnx.Rngs | None,
                layout: tuple | None) -> dict[str, jax.Array]:
    micro = batch.input_ids.ndim == 3
    check_batch(batch, rank=3 if micro else 2)
    if not micro:
        batch = jax.tree.map(lambda x: x[None], batch)
    micro_batches = batch.input_ids.shape[0]
    token_total = jnp.sum(jax.vmap(target_weights)(batch))
    # One key per stream for this step; micro-batch i folds in i, so each draws fresh, reproducible noise.
    keys = None if rngs is None else {name: stream() for name, stream in rngs.items()}
    graphdef, trained, rest = nnx.split(model, optimizer.wrt, ...)

    def micro_step(grads, inputs):
        index, mb = inputs
        def objective(trained):
            step_rngs = None if keys is None else nnx.Rngs(
                **{name: jax.random.fold_in(key, index) for name, key in keys.items()})
            return _objective(nnx.merge(graphdef, trained, rest), mb, step_rngs, token_total=token_total,
                              micro_batches=micro_batches)
        (_, stats), g = jax.value_and_grad(objective, has_aux=True)(trained)
        return (g if grads is None else jax.tree.map(jnp.add, grads, g)), stats

    if micro_batches == 1:
        # No accumulator: zero-filling one and adding the gradients to it are two passes over every parameter.
        grads, stats = micro_step(None, (jnp.zeros((), jnp.int32), jax.tree.map(lambda x: x[0], batch)))
        stats = jax.tree.map(lambda x: x[None], stats)
    else:
        zeros = jax.tree.map(jnp.zeros_like, trained)
        grads, stats = jax.lax.scan(micro_step, zeros, (jnp.arange(micro_batches), batch))
    optimizer.update(model, grads)
    if layout is not None:
        keep_param_layout(model, optimizer, layout)
    tokens = jnp.sum(stats["tokens"])
    metrics = {"loss": jnp.sum(stats["loss_sum"]) / jnp.maximum(tokens, 1.0),
               "grad_norm": optax.global_norm(grads),
               "learning_rate": current_learning_rate(optimizer),
               "accuracy": jnp.sum(stats["correct"]) / jnp.maximum(tokens, 1.0), "tokens": tokens}
    if "aux_loss" in stats:
        metrics.update(aux_loss=jnp.mean(stats["aux_loss"]), router_z_loss=jnp.mean(stats["router_z_loss"]),
                       expert_load=jnp.mean(stats["expert_load"], axis=0))
    return metrics


def current_learning_rate(optimizer: nnx.Optimizer) -> jax.Array:
    """float32 []: the learning rate of the optimizer's latest update (before any, the schedule's first value).
    The optimizer must come from make_optimizer, which keeps the scheduled rate in its state."""
    state = optimizer.opt_state
    # A chain's state is a tuple (make_optimizer(only_task=...) wraps the schedule's transformation in masks).
    states = state if isinstance(state, tuple) and not hasattr(state, "hyperparams") else (state,)
    hyperparams = next((s.hyperparams for s in states if isinstance(getattr(s, "hyperparams", None), dict)), None)
    if not isinstance(hyperparams, dict) or "learning_rate" not in hyperparams:
        raise ValueError("current_learning_rate: the optimizer's state holds no scheduled learning rate; build the "
                         "optimizer with jaxmoe.train.make_optimizer")
    return hyperparams["learning_rate"][...]


@nnx.jit
def _eval_step(model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
    stats = next_token_loss(model, batch)[1]
    return {key: stats[key] for key in ("loss_sum", "tokens", "correct")}


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
