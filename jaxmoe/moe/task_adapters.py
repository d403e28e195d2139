"""Task information inside the MoE block (Pham et al. 2023, "Task-based MoE for multitask multilingual MT").

A task (e.g. a language pair) is one integer id per batch row. `MoEConfig.task_adapters` (a `TaskAdapterConfig`)
picks one of three granularities, each a module the MoE block owns as `task_adapter`:

  StaticTaskAdapters   "static":  one adapter per task, chosen by the task id, applied to the MoE output;
  DynamicTaskAdapters  "dynamic": a pool of M shared adapters; a router over a learned task embedding t picks the
                                  top-k of them per task (not per token) and the output adds their weighted sum;
  TaskAwareRouting     "token":   the expert router sees [x; t]: its kernel grows by task_embed_dim input rows,
                                  stored apart from the plain router's [d, e] kernel as `task_router`.

An adapter is a bottleneck: y + up(relu(down(y))), no biases. Every up-projection (and the token router's task
rows) starts at zero, so a freshly built block computes exactly what the block without task information does.

Parameters with one row per task along axis 0 are `TaskParam`s (the static adapters, the task embeddings). To
add a task to a trained model, build it with an id to spare and train that id's rows alone with
`new_task_optimizer`; everything else stays bit for bit as it was.

Task ids are checked (`check_task_ids`) where they enter: the model's `__call__` and the MoE block. Under `jit`
their values are tracers and cannot be checked; a row whose id is outside [0, num_tasks) then gathers NaN
(jnp.take's fill mode) instead of another task's parameters, so its outputs and loss are NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxmoe.config import TaskAdapterConfig
from jaxmoe.moe.router import topk_router

__all__ = ["DynamicTaskAdapters", "StaticTaskAdapters", "TaskAwareRouting", "TaskParam", "check_task_ids",
           "make_task_adapter", "new_task_optimizer", "only_task_rows"]


class TaskParam(nnx.Param):
    """A parameter whose axis 0 runs over the tasks (row i belongs to task id i); a filter for the per-task
    parameters, as `nnx.LoRAParam` is for LoRA adapters."""


def check_task_ids(task_ids, config: TaskAdapterConfig | None, batch: int) -> jax.Array | None:
    """Checks the task ids a model or MoE block is given -> int32 [batch], or None for a model without tasks.

    task_ids: int [batch], one id per row in [0, config.num_tasks); NumPy, JAX or a list. The values are checked
    when concrete; under tracing only the shape and dtype are (see the module docstring).
    """
    if config is None:
        if task_ids is not None:
            raise ValueError("task_ids were given, but this model has no task adapters (its MoEConfig has "
                             "task_adapters=None); drop task_ids, or build the model with moe.task_adapters set")
        return None
    if task_ids is None:
        raise ValueError(f"this model has {config.mode!r} task adapters for {config.num_tasks} tasks: pass "
                         "task_ids=int [batch], the task (e.g. language pair) of each row, ids in "
                         f"[0, {config.num_tasks})")
    if not isinstance(task_ids, jax.core.Tracer):
        task_ids = jnp.asarray(task_ids)
    if task_ids.shape != (batch,) or not jnp.issubdtype(task_ids.dtype, jnp.integer):
        raise ValueError(f"task_ids must be an integer array [batch] = [{batch}], one task id per row; got "
                         f"{task_ids.dtype} {list(task_ids.shape)}")
    if not isinstance(task_ids, jax.core.Tracer) and batch:
        ids = np.asarray(task_ids)
        bad = ids[(ids < 0) | (ids >= config.num_tasks)]
        if bad.size:
            raise ValueError(f"task id {int(bad[0])} is outside the configured tasks [0, {config.num_tasks}) "
                             f"(moe.task_adapters.num_tasks={config.num_tasks}); map each row's task to an id "
                             "below num_tasks, or build the model with more tasks")
    return task_ids.astype(jnp.int32)


def _rows(table: jax.Array, task_ids_b: jax.Array) -> jax.Array:
    """table [tasks, ...] -> its rows for task_ids [b]: [b, ...]; NaN rows for ids outside the table."""
    return jnp.take(table, task_ids_b, axis=0, mode="fill", fill_value=jnp.nan)


def _bottleneck(y_btd, down_bdr, up_brd):
    """up(relu(down(y))) with one adapter per row: y [b, t, d], down [b, d, r], up [b, r, d] -> [b, t, d]."""
    h_btr = jax.nn.relu(jnp.einsum("btd,bdr->btr", y_btd, down_bdr))
    return jnp.einsum("btr,brd->btd", h_btr, up_brd)


class StaticTaskAdapters(nnx.Module):
    """Mode "static": y + up_i(relu(down_i(y))) with i the row's task id. `w_down` [tasks, d, r] and `w_up`
    [tasks, r, d] are `TaskParam`s; `w_up` starts at zero, so a fresh adapter is the identity."""

    def __init__(self, hidden_size: int, config: TaskAdapterConfig, *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        n, d, r = config.num_tasks, hidden_size, config.bottleneck
        self.dtype = dtype
        self.w_down = TaskParam(nnx.initializers.normal(0.02)(rngs.params(), (n, d, r), param_dtype))
        self.w_up = TaskParam(jnp.zeros((n, r, d), param_dtype))

    def __call__(self, y_btd: jax.Array, task_ids_b: jax.Array) -> jax.Array:
        """y [b, t, d], task_ids int [b] -> [b, t, d] in y's dtype (computed in `dtype`, default y's)."""
        compute = self.dtype or y_btd.dtype
        y = y_btd.astype(compute)
        delta = _bottleneck(y, _rows(self.w_down[...], task_ids_b).astype(compute),
                            _rows(self.w_up[...], task_ids_b).astype(compute))
        return (y + delta).astype(y_btd.dtype)


class DynamicTaskAdapters(nnx.Module):
    """Mode "dynamic": y + Σ_k p_k · up_{a_k}(relu(down_{a_k}(y))) over the pool_top_k adapters a_k that the router
    picks for the row's task, with p_k their softmax probabilities over the whole pool (not renormalised, so
    top-1 still trains the router; with pool_top_k = pool_size the weights sum to 1).

    The router scores a learned task embedding: logits [tasks, M] = `task_embedding` [tasks, e] (a `TaskParam`)
    @ `gate` [e, M], fp32. The pool `w_down` [M, d, r], `w_up` [M, r, d] is shared by all tasks; `w_up` starts
    at zero, so a fresh pool is the identity.
    """

    def __init__(self, hidden_size: int, config: TaskAdapterConfig, *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        m, d, r, e = config.pool_size, hidden_size, config.bottleneck, config.task_embed_dim
        init = nnx.initializers.normal(0.02)
        self.top_k = config.pool_top_k
        self.dtype = dtype
        # Unit scale, like the normed hidden states the rest of the block sees.
        self.task_embedding = TaskParam(nnx.initializers.normal(1.0)(rngs.params(), (config.num_tasks, e),
                                                                     param_dtype))
        self.gate = nnx.Param(init(rngs.params(), (e, m), param_dtype))
        self.w_down = nnx.Param(init(rngs.params(), (m, d, r), param_dtype))
        self.w_up = nnx.Param(jnp.zeros((m, r, d), param_dtype))

    def routing(self, task_ids_b: jax.Array) -> tuple[jax.Array, jax.Array]:
        """task_ids int [b] -> (weights float32 [b, k], adapters int32 [b, k]): the pool adapters each row's task
        picks, largest probability first."""
        t_be = _rows(self.task_embedding[...], task_ids_b).astype(jnp.float32)
        logits_bm = t_be @ self.gate[...].astype(jnp.float32)
        return topk_router(logits_bm, k=self.top_k, renormalize=False)

    def __call__(self, y_btd: jax.Array, task_ids_b: jax.Array) -> jax.Array:
        """y [b, t, d], task_ids int [b] -> [b, t, d] in y's dtype (computed in `dtype`, default y's)."""
        compute = self.dtype or y_btd.dtype
        y = y_btd.astype(compute)
        weights_bk, adapters_bk = self.routing(task_ids_b)
        delta = jnp.zeros_like(y)
        for k in range(self.top_k):
            chosen = adapters_bk[:, k]
            one = _bottleneck(y, self.w_down[...][chosen].astype(compute), self.w_up[...][chosen].astype(compute))
            delta = delta + weights_bk[:, k, None, None].astype(compute) * one
        return (y + delta).astype(y_btd.dtype)


class TaskAwareRouting(nnx.Module):
    """Mode "token": the router's logits over [x; t] are x @ router + t @ `task_router`, with t the row's learned task
    embedding; `task_router` [e, experts] holds the task_embed_dim input rows the router gains (zero at first, so
    routing starts as the plain router's) and `task_embedding` [tasks, e] is a `TaskParam`."""

    def __init__(self, num_experts: int, config: TaskAdapterConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        e = config.task_embed_dim
        self.task_embedding = TaskParam(nnx.initializers.normal(1.0)(rngs.params(), (config.num_tasks, e),
                                                                     param_dtype))
        self.task_router = nnx.Param(jnp.zeros((e, num_experts), param_dtype))

    def __call__(self, task_ids_b: jax.Array, tokens_per_row: int) -> jax.Array:
        """task_ids int [b] -> the task's share of the router logits, float32 [b · tokens_per_row, experts], rows in
        the block's token order (row-major over [b, t])."""
        t_be = _rows(self.task_embedding[...], task_ids_b).astype(jnp.float32)
        logits_bx = t_be @ self.task_router[...].astype(jnp.float32)
        return jnp.repeat(logits_bx, tokens_per_row, axis=0)


def make_task_adapter(config: TaskAdapterConfig, hidden_size: int, num_experts: int, *, dtype=None,
                      param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Module:
    """The module `config.mode` names, for an MoE block of width `hidden_size` over `num_experts` experts."""
    if config.mode == "static":
        return StaticTaskAdapters(hidden_size, config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if config.mode == "dynamic":
        return DynamicTaskAdapters(hidden_size, config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    return TaskAwareRouting(num_experts, config, param_dtype=param_dtype, rngs=rngs)


def only_task_rows(task_id: int) -> optax.GradientTransformation:
    """Zeroes every row of axis 0 but `task_id` in each update leaf (the layout of `TaskParam`s)."""
    def update(updates, state, params=None):
        del params

        def keep(u):
            rows = jnp.arange(u.shape[0]).reshape((-1,) + (1,) * (u.ndim - 1))
            return jnp.where(rows == task_id, u, jnp.zeros_like(u))
        return jax.tree.map(keep, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def new_task_optimizer(model: nnx.Module, tx: optax.GradientTransformation, task_id: int) -> nnx.Optimizer:
    """An optimizer that trains only task `task_id`'s rows of the model's `TaskParam`s: its static adapter, or its
    task embedding (dynamic and token modes); every other parameter, and the other tasks' rows, stay exactly as
    they are. Works with any loop that follows `optimizer.wrt` (e.g. `jaxmoe.train.loop.train_step`).

    The rows are masked both before `tx` (clipping and moments see only the task's gradient) and after it (weight
    decay moves nothing else).
    """
    moe = getattr(getattr(model, "config", None), "moe", None)
    config = None if moe is None else moe.task_adapters
    if config is None:
        raise ValueError("new_task_optimizer: the model has no task adapters (config.moe.task_adapters is None); "
                         "build it with a TaskAdapterConfig")
    if isinstance(task_id, bool) or not isinstance(task_id, (int, np.integer)) or not 0 <= task_id < config.num_tasks:
        raise ValueError(f"new_task_optimizer: task_id={task_id!r} is not one of the configured tasks "
                         f"[0, {config.num_tasks}); reserve an id for the new task in num_tasks when building "
                         "the model")
    return nnx.Optimizer(model, _masked(tx, int(task_id)), wrt=TaskParam)


@functools.cache
def _masked(tx: optax.GradientTransformation, task_id: int) -> optax.GradientTransformation:
    """`tx` between two `only_task_rows(task_id)`, one object per (tx, task_id): a jitted step compares the
    optimizer's transformation by identity, so a new chain per optimizer would compile the step again."""
    return optax.chain(only_task_rows(task_id), tx, only_task_rows(task_id))
