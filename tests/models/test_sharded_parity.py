"""The tiny MoE model sharded over 8 fake CPU devices (parameters by jaxmoe.sharding's rules, experts
expert-parallel in a shard_map) gives the single-device logits, aux loss and gradients; a training step keeps the
declared shardings; load_hf(mesh=...) places parameters as they are read."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmoe
from jaxmoe import sharding
from jaxmoe.train import Batch, TrainConfig, make_optimizer, train_step
from jaxmoe.train.loop import next_token_loss

CONFIG = jaxmoe.get_preset("tiny-moe").replace(vocab_size=64, moe=jaxmoe.MoEConfig(num_experts=8, top_k=2,
                                                                                     aux_loss_coef=0.01))
MESHES = {"expert8": dict(expert=8), "data2_expert4": dict(data=2, expert=4),
          "fsdp2_expert2_tensor2": dict(fsdp=2, expert=2, tensor=2)}


def model(seed=0):
    m = jaxmoe.PhimoeForCausalLM(CONFIG, rngs=nnx.Rngs(seed))
    # Larger weights than the default init, so routing and logits are far from uniform.
    nnx.update(m, jax.tree.map(lambda p: p * 5.0 if p.ndim > 1 else p, nnx.state(m, nnx.Param)))
    m.eval()
    return m


def batch(rng, b=8, t=12):
    return Batch(jnp.asarray(rng.integers(3, 64, size=(b, t)), jnp.int32), jnp.ones((b, t), jnp.int32))


def spec_of(spec) -> tuple:
    """A PartitionSpec without trailing Nones (P('expert', None) and P('expert') place an array alike)."""
    axes = list(spec)
    while axes and axes[-1] is None:
        axes.pop()
    return tuple(axes)


def loss_and_grads(m, data):
    def loss(m):
        out = m(data.input_ids)
        return next_token_loss(m, data)[0], (out.logits, out.aux_loss)
    return nnx.jit(lambda m: nnx.value_and_grad(loss, has_aux=True)(m))(m)


@pytest.mark.parametrize("mesh_name, strategy", [(name, "auto") for name in sorted(MESHES)]
                         + [("data2_expert4", "all_to_all")])
def test_sharded_logits_aux_loss_and_gradients_equal_one_device(mesh_name, strategy, rng):
    data = batch(rng)
    (loss, (logits, aux)), grads = loss_and_grads(model(), data)
    mesh = sharding.make_mesh(**MESHES[mesh_name])
    sharded = model()
    for layer in sharded.layers:  # the strategy comes from the config (MoEConfig.expert_parallel)
        layer.mlp.moe = dataclasses.replace(layer.mlp.moe, expert_parallel=strategy)
    sharding.shard_model(sharded, mesh)
    placed = jax.device_put(data, jax.sharding.NamedSharding(mesh, sharding.batch_spec(mesh)))
    (s_loss, (s_logits, s_aux)), s_grads = loss_and_grads(sharded, placed)
    np.testing.assert_allclose(np.asarray(s_logits), np.asarray(logits), rtol=0, atol=1e-5)
    np.testing.assert_allclose(float(s_aux), float(aux), rtol=1e-5)
    np.testing.assert_allclose(float(s_loss), float(loss), rtol=1e-5)
    for (path, g), (_, sg) in zip(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads)),
                                  jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(s_grads))):
        scale = max(float(np.abs(np.asarray(g)).max()), 1e-12)
        assert float(np.abs(np.asarray(sg) - np.asarray(g)).max()) <= 1e-5 * scale, jax.tree_util.keystr(path)


def test_all_tokens_on_two_experts_stay_dropless_on_the_mesh(rng):
    """A zero router ties every expert: every token picks experts 0 and 1 (both on the first shards)."""
    m = model()
    for layer in m.layers:
        layer.mlp.router.kernel[...] = jnp.zeros_like(layer.mlp.router.kernel[...])
    data = batch(rng)
    expected = np.asarray(nnx.jit(lambda m, x: m(x).logits)(m, data.input_ids))
    out = m(data.input_ids)
    assert set(np.flatnonzero(np.asarray(out.expert_load).sum(0))) == {0, 1}
    mesh = sharding.make_mesh(expert=8)
    sharding.shard_model(m, mesh)
    got = nnx.jit(lambda m, x: m(x).logits)(m, jax.device_put(data.input_ids, jax.sharding.NamedSharding(
        mesh, sharding.batch_spec(mesh))))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-5)


def test_a_training_step_on_the_mesh_keeps_the_declared_shardings(rng):
    mesh = sharding.make_mesh(data=2, expert=2, tensor=2)
    m = sharding.shard_model(model(), mesh)
    m.train()
    optimizer = make_optimizer(m, TrainConfig(learning_rate=1e-3, warmup_steps=0, total_steps=4))
    declared = {jax.tree_util.keystr(p): spec_of(s.spec) for p, s in
                jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(sharding.param_shardings(m, mesh)))}
    data = jax.device_put(batch(rng), jax.sharding.NamedSharding(mesh, sharding.batch_spec(mesh)))
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(m, nnx.Param)))
    metrics = train_step(m, optimizer, data, nnx.Rngs(0))
    assert np.isfinite(float(metrics["loss"]))
    after = nnx.state(m, nnx.Param)
    actual = {jax.tree_util.keystr(p): spec_of(x.sharding.spec) for p, x in
              jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(after))}
    assert actual == declared
    assert any(declared.values())  # the check covers sharded arrays, not only replicated ones
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in
               zip(jax.tree.leaves(before), jax.tree.leaves(nnx.to_pure_dict(after))))
    assert dict(m.layers[0].mlp.w_gate_up[...].sharding.mesh.shape) == dict(mesh.shape)


def test_load_hf_with_a_mesh_places_parameters_and_runs_expert_parallel(tmp_path, rng):
    m = model()
    jaxmoe.save_hf(m, tmp_path / "ckpt")
    mesh = sharding.make_mesh(data=2, expert=4)
    loaded = jaxmoe.load_hf(tmp_path / "ckpt", mesh=mesh)
    assert spec_of(loaded.layers[0].mlp.w_down[...].sharding.spec) == ("expert",)
    assert loaded.layers[0].mlp.mesh is mesh
    data = batch(rng)
    expected = np.asarray(nnx.jit(lambda m, x: m(x).logits)(m, data.input_ids))
    got = nnx.jit(lambda m, x: m(x).logits)(loaded, jax.device_put(data.input_ids, jax.sharding.NamedSharding(
        mesh, sharding.batch_spec(mesh))))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-5)


def test_an_expert_count_that_does_not_divide_the_expert_axis_is_refused(tmp_path):
    jaxmoe.save_hf(model(), tmp_path / "ckpt")
    mesh = jax.make_mesh((1, 1, 3, 1), sharding.MESH_AXES, devices=jax.devices()[:3],
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)
    with pytest.raises(ValueError, match="8 experts do not divide over the expert axis of size 3"):
        jaxmoe.load_hf(tmp_path / "ckpt", mesh=mesh)
