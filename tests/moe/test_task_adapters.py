"""Task information in the MoE block (jaxmoe.moe.task_adapters; paper_methods.md §h) against NumPy references:
per-row adapter and routing selection, identity at initialisation, where gradients go, training one new task
alone, and the errors for bad task ids. Tiny fp32 shapes on CPU; each computation jitted once per shape (eager
dispatch would compile every op on its own)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxmoe
from jaxmoe.config import MoEConfig, TaskAdapterConfig
from jaxmoe.moe.experts import dense_moe_reference
from jaxmoe.moe.layer import SparseMoeBlock
from jaxmoe.moe.task_adapters import TaskParam, check_task_ids, new_task_optimizer

D, F, E, TASKS, EMBED = 16, 16, 4, 3, 4
TOL = 1e-5


def _tasks(mode: str) -> TaskAdapterConfig:
    return TaskAdapterConfig(mode, num_tasks=TASKS, bottleneck=4, task_embed_dim=EMBED, pool_size=4, pool_top_k=2)


def _moe(mode: str | None) -> MoEConfig:
    return MoEConfig(num_experts=E, top_k=2, router="topk", task_adapters=None if mode is None else _tasks(mode))


def _tiny_config(mode: str | None, **changes):
    """One decoder layer: compiling is most of these tests' time, and every layer runs the same code."""
    return jaxmoe.get_preset("tiny-moe").replace(vocab_size=64, hidden_size=D, intermediate_size=F, num_layers=1,
                                                  num_heads=2, num_kv_heads=1, head_dim=8, moe=_moe(mode), **changes)


def _randomize(module: nnx.Module, seed: int) -> None:
    """Every parameter set to NumPy normal draws, so the zero-initialised up-projections and task router rows take
    part (an all-zero weight would pass most tests for the wrong reason)."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(nnx.state(module, nnx.Param))
    nnx.update(module, jax.tree.unflatten(treedef, [jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype)
                                                    for x in leaves]))


def _random(make, seed: int = 0):
    """The module `make()` builds, with `_randomize`d parameters (its initialisers never run)."""
    module = nnx.eval_shape(make)
    _randomize(module, seed)
    return module


def _block(mode: str | None, seed: int = 0) -> SparseMoeBlock:
    return _random(lambda: SparseMoeBlock(D, F, _moe(mode), rngs=nnx.Rngs(0)), seed)


def _model(mode: str | None, seed: int = 0, **changes) -> jaxmoe.PhimoeForCausalLM:
    return _random(lambda: jaxmoe.PhimoeForCausalLM(_tiny_config(mode, **changes), rngs=nnx.Rngs(0)), seed)


@nnx.jit
def _run(block, x_btd, task_ids):
    return block(x_btd, task_ids=task_ids)


@nnx.jit
def _logits(model, ids, task_ids):
    return model(ids, task_ids=task_ids).logits


def _x(b: int = 4, t: int = 5, seed: int = 1) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, t, D)), jnp.float32)


def _plain_moe_output(block: SparseMoeBlock, x_btd) -> np.ndarray:
    """The block's experts without task information: the same router and expert weights, no adapters."""
    plain = nnx.eval_shape(lambda: SparseMoeBlock(D, F, _moe(None), rngs=nnx.Rngs(0)))
    nnx.update(plain, nnx.state(block, nnx.Not(nnx.PathContains("task_adapter"))))
    return np.asarray(_run(plain, x_btd, None)[0])


def _np_bottleneck(y_td, down_dr, up_rd):
    return np.maximum(y_td @ down_dr, 0.0) @ up_rd


def _np_softmax(z):
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _np_pool_routing(embedding_ne, gate_em, k):
    """Per task: the k pool adapters of largest softmax probability (largest first) and those probabilities."""
    probs = _np_softmax(np.asarray(embedding_ne, np.float64) @ np.asarray(gate_em, np.float64))
    chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(probs, chosen, -1), chosen


# --------------------------------------------------------------------------------------------- per-row selection


def test_static_rows_use_their_own_tasks_adapter():
    block, x = _block("static"), _x()
    task_ids = np.array([2, 0, 1, 2])
    got = np.asarray(_run(block, x, jnp.asarray(task_ids))[0])
    y = _plain_moe_output(block, x)
    down, up = np.asarray(block.task_adapter.w_down[...]), np.asarray(block.task_adapter.w_up[...])
    for row, task in enumerate(task_ids):
        np.testing.assert_allclose(got[row], y[row] + _np_bottleneck(y[row], down[task], up[task]), atol=TOL,
                                   rtol=TOL)


def test_dynamic_rows_add_their_tasks_weighted_pool_adapters():
    block, x = _block("dynamic"), _x()
    adapter = block.task_adapter
    task_ids = np.array([1, 2, 0, 1])
    got = np.asarray(_run(block, x, jnp.asarray(task_ids))[0])
    y = _plain_moe_output(block, x)
    weights, chosen = _np_pool_routing(adapter.task_embedding[...], adapter.gate[...], k=2)
    down, up = np.asarray(adapter.w_down[...]), np.asarray(adapter.w_up[...])
    for row, task in enumerate(task_ids):
        want = y[row] + sum(w * _np_bottleneck(y[row], down[a], up[a]) for w, a in zip(weights[task], chosen[task]))
        np.testing.assert_allclose(got[row], want, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("top_k", [1, 3])
def test_dynamic_routing_picks_per_task_the_top_k_of_numpy(top_k):
    tasks = TaskAdapterConfig("dynamic", num_tasks=5, task_embed_dim=EMBED, pool_size=6, pool_top_k=top_k)
    block = _random(lambda: SparseMoeBlock(D, F, MoEConfig(num_experts=E, task_adapters=tasks), rngs=nnx.Rngs(0)),
                    seed=3)
    adapter = block.task_adapter
    want_weights, want_adapters = _np_pool_routing(adapter.task_embedding[...], adapter.gate[...], k=top_k)
    task_ids = np.array([4, 0, 3, 1, 2, 4, 0])  # repeated tasks: the choice depends on the task id only
    weights, adapters = adapter.routing(jnp.asarray(task_ids))
    np.testing.assert_array_equal(np.asarray(adapters), want_adapters[task_ids])
    np.testing.assert_allclose(np.asarray(weights), want_weights[task_ids], atol=1e-6)


def test_token_mode_routes_each_token_over_itself_and_its_rows_task_embedding():
    block, x = _block("token"), _x()
    task_ids = np.array([0, 2, 2, 1])
    got_y, got_routing = _run(block, x, jnp.asarray(task_ids))
    routing = block.task_adapter
    # The router over [x; t]: the plain router's kernel [d, e] with the task rows [task_embed_dim, e] below it.
    kernel = np.concatenate([np.asarray(block.router.kernel[...]), np.asarray(routing.task_router[...])])
    x_td = np.asarray(x).reshape(-1, D)
    t_td = np.repeat(np.asarray(routing.task_embedding[...])[task_ids], x.shape[1], axis=0)
    logits = np.concatenate([x_td, t_td], axis=1) @ kernel
    probs = _np_softmax(logits)
    experts = np.argsort(-probs, axis=-1, kind="stable")[:, :2]
    weights = np.take_along_axis(probs, experts, -1)
    weights /= weights.sum(-1, keepdims=True)
    want = dense_moe_reference(jnp.asarray(x_td), jnp.asarray(weights, jnp.float32), jnp.asarray(experts),
                               block.w_gate_up[...], block.w_down[...])
    np.testing.assert_allclose(np.asarray(got_routing.router_logits), logits, atol=TOL, rtol=TOL)
    np.testing.assert_array_equal(np.asarray(got_routing.experts), experts)
    np.testing.assert_allclose(np.asarray(got_y).reshape(-1, D), np.asarray(want), atol=TOL, rtol=TOL)


# --------------------------------------------------------------------------------------- identity at initialisation


@pytest.mark.parametrize("mode", ["static", "dynamic", pytest.param("token", marks=pytest.mark.slow)])
def test_fresh_task_adapters_leave_the_model_output_unchanged(mode):
    plain = _model(None)
    adapted = nnx.eval_shape(lambda: jaxmoe.PhimoeForCausalLM(_tiny_config(mode), rngs=nnx.Rngs(0)))
    nnx.update(adapted, nnx.state(plain, nnx.Param))  # the same weights everywhere but the task adapters,
    fresh = SparseMoeBlock(D, F, _moe(mode), rngs=nnx.Rngs(1))  # which come from the real initialisers
    nnx.update(adapted.layers[0].mlp.task_adapter, nnx.state(fresh.task_adapter))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(3, 6)))
    want = np.asarray(_logits(plain, ids, None))
    np.testing.assert_array_equal(np.asarray(_logits(adapted, ids, jnp.asarray([0, 2, 1]))), want)


def test_without_task_adapters_the_block_has_only_its_moe_parameters():
    block = nnx.eval_shape(lambda: SparseMoeBlock(D, F, _moe(None), rngs=nnx.Rngs(0)))
    names = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(block))}
    assert names == {"router/kernel", "w_gate_up", "w_down"}


def test_task_ids_reach_the_layers_under_remat():
    model = _model("static")
    remat = nnx.eval_shape(lambda: jaxmoe.PhimoeForCausalLM(_tiny_config("static", remat="layer"), rngs=nnx.Rngs(0)))
    nnx.update(remat, nnx.state(model, nnx.Param))
    ids, task_ids = jnp.asarray([[3, 9, 4, 1], [7, 7, 2, 5]]), jnp.asarray([2, 0])
    np.testing.assert_allclose(np.asarray(_logits(remat, ids, task_ids)), np.asarray(_logits(model, ids, task_ids)),
                               atol=TOL, rtol=TOL)


# ---------------------------------------------------------------------------------------------------- gradients


@nnx.jit
def _grads_on_rows(block, x_btd, task_ids, keep_b):
    """Gradients of every parameter of `block` for a loss over the rows where keep_b is 1."""
    def loss(block):
        return jnp.sum(keep_b[:, None, None] * block(x_btd, task_ids=task_ids)[0] ** 2)
    return nnx.grad(loss)(block)


def _grads_for_task(block, task_ids, trained_task):
    return _grads_on_rows(block, _x(), jnp.asarray(task_ids), jnp.asarray(np.asarray(task_ids) == trained_task,
                                                                           jnp.float32))


def test_static_gradients_reach_only_the_rows_tasks_adapter():
    grads = _grads_for_task(_block("static"), [0, 1, 0, 2], trained_task=0).task_adapter
    for name in ("w_down", "w_up"):
        g = np.asarray(getattr(grads, name)[...])
        assert np.abs(g[0]).max() > 0 and not g[1:].any(), name


def test_dynamic_gradients_reach_the_tasks_embedding_the_gate_and_its_chosen_pool_adapters():
    block = _block("dynamic")
    grads = _grads_for_task(block, [1, 2, 1, 2], trained_task=1).task_adapter
    embedding = np.asarray(grads.task_embedding[...])
    assert np.abs(embedding[1]).max() > 0 and not embedding[[0, 2]].any()
    assert np.abs(np.asarray(grads.gate[...])).max() > 0
    _, chosen = _np_pool_routing(block.task_adapter.task_embedding[...], block.task_adapter.gate[...], k=2)
    w_up = np.asarray(grads.w_up[...])
    assert [bool(np.abs(w_up[a]).max() > 0) for a in range(4)] == [a in chosen[1] for a in range(4)]


def test_token_mode_gradients_reach_the_routers_task_rows_and_the_rows_task_embedding():
    grads = _grads_for_task(_block("token"), [2, 0, 2, 0], trained_task=2)
    assert np.abs(np.asarray(grads.task_adapter.task_router[...])).max() > 0
    embedding = np.asarray(grads.task_adapter.task_embedding[...])
    assert np.abs(embedding[2]).max() > 0 and not embedding[[0, 1]].any()


def _flat_params(model) -> dict:
    return {path: np.array(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@nnx.jit
def _new_task_step(model, optimizer, ids, task_ids):
    def loss(model):
        return jnp.mean(model(ids, task_ids=task_ids).logits ** 2)
    optimizer.update(model, nnx.grad(loss, argnums=nnx.DiffState(0, optimizer.wrt))(model))


@pytest.mark.parametrize("mode", ["static", pytest.param("token", marks=pytest.mark.slow)])
def test_new_task_optimizer_changes_only_the_new_tasks_rows(mode):
    model, new_task = _model(mode, seed=2), 1
    before = _flat_params(model)
    optimizer = new_task_optimizer(model, optax.adamw(1e-2, weight_decay=0.1), new_task)
    # One row of another task: its gradient must not move that task's rows.
    _new_task_step(model, optimizer, jnp.asarray([[5, 9, 3, 8], [2, 6, 6, 1]]), jnp.asarray([new_task, 0]))
    after = _flat_params(model)
    task_params = {path for path, _ in nnx.to_flat_state(nnx.state(model, TaskParam))}
    assert len(task_params) == (2 if mode == "static" else 1)  # w_down and w_up / task_embedding
    for path, old in before.items():
        new = after[path]
        if path in task_params:
            assert not np.array_equal(new[new_task], old[new_task]), path
            np.testing.assert_array_equal(np.delete(new, new_task, 0), np.delete(old, new_task, 0),
                                          err_msg=str(path))
        else:
            np.testing.assert_array_equal(new, old, err_msg=str(path))


# ---------------------------------------------------------------------------------------------------- bad input

IDS = jnp.asarray([[1, 2, 3], [4, 5, 6]])


@pytest.mark.parametrize("bad", [3, -1])
def test_task_id_outside_the_configured_tasks_is_named(bad):
    with pytest.raises(ValueError, match=re.escape(f"task id {bad} is outside the configured tasks [0, 3)")):
        _model("static")(IDS, task_ids=np.array([0, bad]))


def test_missing_task_ids_say_what_to_pass():
    with pytest.raises(ValueError, match=re.escape("pass task_ids=int [batch]")):
        _model("token")(IDS)


@pytest.mark.parametrize("task_ids", [np.zeros((2, 1), np.int32), np.zeros(3, np.int32), np.zeros(2, np.float32)])
def test_task_ids_of_the_wrong_shape_or_dtype_are_refused(task_ids):
    with pytest.raises(ValueError, match=re.escape("task_ids must be an integer array [batch] = [2]")):
        _model("dynamic")(IDS, task_ids=task_ids)


def test_task_ids_for_a_model_without_task_adapters_are_refused():
    with pytest.raises(ValueError, match="this model has no task adapters"):
        _model(None)(IDS, task_ids=np.array([0, 1]))


def test_under_jit_an_unknown_task_id_makes_its_row_nan_not_another_tasks():
    y = np.asarray(_run(_block("static"), _x(), jnp.asarray([1, 7, 0, 2]))[0])
    assert np.isfinite(y[[0, 2, 3]]).all() and np.isnan(y[1]).all()


def test_new_task_optimizer_refuses_an_unconfigured_task():
    with pytest.raises(ValueError, match=re.escape("task_id=3 is not one of the configured tasks [0, 3)")):
        new_task_optimizer(_model("static"), optax.sgd(0.1), 3)


def test_check_task_ids_accepts_lists_and_returns_int32():
    got = check_task_ids([2, 0], _tasks("static"), 2)
    assert got.dtype == jnp.int32 and got.tolist() == [2, 0]


def test_a_model_with_task_adapters_is_not_written_as_a_transformers_checkpoint():
    """transformers' PhimoeForCausalLM has no task adapters: save_hf would drop them, so it refuses and the
    trainer's export writes jaxmoe's own format instead."""
    from jaxmoe.io.hf import hf_problems

    plain = jaxmoe.get_preset("tiny-moe")
    assert hf_problems(plain) is None
    adapted = plain.replace(moe=MoEConfig(num_experts=4, task_adapters=_tasks("static")))
    assert hf_problems(adapted).startswith(f"moe.task_adapters={_tasks('static')!r} has no counterpart in "
                                           "PhimoeForCausalLM")
