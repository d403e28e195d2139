"""The tiny MoE model sharded over 8 fake CPU devices (parameters by jaxmoe.sharding's rules, experts
expert-parallel in a shard_map) gives the single-device logits, aux loss, gradients and training step, on meshes
with Auto axes (jaxmoe.sharding.make_mesh) and with Explicit axes (plain jax.make_mesh, JAX's default), and XLA
compiles it without involuntary rematerialisation; load_hf(mesh=...) places parameters as they are read.

Explicit meshes are built with the same four axes and devices as their Auto twins, so after jaxmoe's conversion
(`sharding.auto_mesh`) a training step on either runs one compiled program.

The default tier checks every property on the meshes where it can go wrong differently; the slow tier
(`-m slow`) repeats the jitted forward, the Explicit logits and gradients and the training step on the other
meshes, and the eager forward on an Auto mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxmoe
from jaxmoe import sharding
from jaxmoe.train import Batch, TrainConfig, make_optimizer, train_step
from jaxmoe.train.loop import next_token_loss

# One layer: a program compiles the forward (and backward, and update) per layer, and a second layer adds compile
# time and nothing a mesh could get wrong differently (every layer's parameters and activations take the same
# shardings as the first's).
CONFIG = jaxmoe.get_preset("tiny-moe").replace(vocab_size=64, num_layers=1,
                                               moe=jaxmoe.MoEConfig(num_experts=8, top_k=2, aux_loss_coef=0.01))
MESHES = {"expert8": dict(expert=8), "data2_expert4": dict(data=2, expert=4),
          "fsdp2_expert2_tensor2": dict(fsdp=2, expert=2, tensor=2),
          "data2_expert2_tensor2": dict(data=2, expert=2, tensor=2)}
AXIS_TYPES = ("auto", "explicit")

# XLA's SPMD partitioner logs this (C++ logging, file descriptor 2) when a sharding annotation disagrees with its
# consumer and it falls back to replicating the whole tensor and partitioning it again.
INVOLUNTARY_REMAT = "Involuntary full rematerialization"


def mesh_of(name: str, axis_types: str) -> jax.sharding.Mesh:
    """MESHES[name] over all four axes: sharding.make_mesh's Auto mesh, or the mesh plain jax.make_mesh makes
    (Explicit axes by default; checked, so that a change of JAX's default shows)."""
    sizes = {axis: MESHES[name].get(axis, 1) for axis in sharding.MESH_AXES}
    if axis_types == "auto":
        return sharding.make_mesh(**sizes)
    mesh = jax.make_mesh(tuple(sizes.values()), sharding.MESH_AXES)
    assert mesh.explicit_axes == sharding.MESH_AXES
    return mesh


def model(seed=0, config=CONFIG):
    m = (jaxmoe.PhimoeForCausalLM if config.moe else jaxmoe.Phi3ForCausalLM)(config, rngs=nnx.Rngs(seed))
    # Larger weights than the default init, so routing and logits are far from uniform.
    nnx.update(m, jax.tree.map(lambda p: p * 5.0 if p.ndim > 1 else p, nnx.state(m, nnx.Param)))
    m.eval()
    return m


def batch(rng, b=8, t=12):
    return Batch(jnp.asarray(rng.integers(3, 64, size=(b, t)), jnp.int32), jnp.ones((b, t), jnp.int32))


def placed(data, mesh):
    """The batch split over `mesh`'s batch axes."""
    return jax.device_put(data, NamedSharding(mesh, sharding.batch_spec(mesh)))


def spec_of(spec) -> tuple:
    """A PartitionSpec without trailing Nones (P('expert', None) and P('expert') place an array alike)."""
    axes = list(spec)
    while axes and axes[-1] is None:
        axes.pop()
    return tuple(axes)


def assert_no_involuntary_remat(capfd):
    """Fails when XLA logged an involuntary full rematerialisation since the test started (or the last read)."""
    err = capfd.readouterr().err
    assert INVOLUNTARY_REMAT not in err, err[max(0, err.find(INVOLUNTARY_REMAT) - 200):][:1500]


def _loss(m, data):
    out = m(data.input_ids)
    return next_token_loss(m, data)[0], (out.logits, out.aux_loss)


# Module-level jitted functions: one compile per (graph, shardings), shared across tests (an eager call on a mesh
# runs op by op and costs seconds).
_loss_and_grads = nnx.jit(lambda m, data: nnx.value_and_grad(_loss, has_aux=True)(m, data))
_outputs = nnx.jit(lambda m, ids: m(ids))


def _forward(m, ids):
    return _outputs(m, ids).logits


SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def one_device():
    """The single-device loss, logits, aux loss and gradients on the test batch."""
    data = batch(np.random.default_rng(0))
    (loss, (logits, aux)), grads = _loss_and_grads(model(), data)
    return data, loss, logits, aux, grads


# An Explicit mesh is converted to its Auto twin by one function whatever the axes (sharding.auto_mesh); the
# default tier shows it through load_hf onto an Explicit mesh below, the slow tier repeats it here on every mesh.
@pytest.mark.parametrize("mesh_name, axis_types, strategy",
                         [(name, "auto", "auto") for name in ("data2_expert4", "fsdp2_expert2_tensor2")]
                         + [pytest.param(name, "explicit", "auto", marks=SLOW)
                            for name in ("expert8", "data2_expert4", "fsdp2_expert2_tensor2")]
                         + [pytest.param("expert8", "auto", "auto", marks=SLOW),
                            pytest.param("data2_expert4", "auto", "all_to_all", marks=SLOW)])
def test_sharded_logits_aux_loss_and_gradients_equal_one_device(mesh_name, axis_types, strategy, one_device, capfd):
    """Under the caller's own nnx.jit: the batch placed on an Auto mesh, or plain arrays with an Explicit one
    (JAX refuses arrays of an Explicit and an Auto mesh in one jit; see jaxmoe.sharding)."""
    data, loss, logits, aux, grads = one_device
    mesh = mesh_of(mesh_name, axis_types)
    sharded = model()
    for layer in sharded.layers:  # the strategy comes from the config (MoEConfig.expert_parallel)
        layer.mlp.moe = dataclasses.replace(layer.mlp.moe, expert_parallel=strategy)
    sharding.shard_model(sharded, mesh)
    (s_loss, (s_logits, s_aux)), s_grads = _loss_and_grads(sharded, data if axis_types == "explicit" else
                                                           placed(data, mesh))
    assert len(s_logits.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(s_logits), np.asarray(logits), rtol=0, atol=1e-5)
    np.testing.assert_allclose(float(s_aux), float(aux), rtol=1e-5)
    np.testing.assert_allclose(float(s_loss), float(loss), rtol=1e-5)
    for (path, g), (_, sg) in zip(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads)),
                                  jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(s_grads))):
        scale = max(float(np.abs(np.asarray(g)).max()), 1e-12)
        assert float(np.abs(np.asarray(sg) - np.asarray(g)).max()) <= 1e-5 * scale, jax.tree_util.keystr(path)
    assert_no_involuntary_remat(capfd)


# data2_expert2_tensor2 is the mesh the gradient test leaves out; expert8's compiled forward is shared with the
# dropless test below; the other two meshes' forwards are part of the gradient test's programs.
@pytest.mark.parametrize("mesh_name", ["data2_expert2_tensor2", "expert8"]
                         + [pytest.param(name, marks=SLOW) for name in ("data2_expert4", "fsdp2_expert2_tensor2")])
def test_a_jitted_forward_on_the_mesh_equals_one_device(mesh_name, one_device, capfd):
    data, _, logits, _, _ = one_device
    mesh = mesh_of(mesh_name, "auto")
    sharding.check_batch(data.input_ids.shape[0], mesh)
    s_logits = _forward(sharding.shard_model(model(), mesh), placed(data, mesh).input_ids)
    assert len(s_logits.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(s_logits), np.asarray(logits), rtol=0, atol=1e-5)
    assert_no_involuntary_remat(capfd)


def test_all_tokens_on_two_experts_stay_dropless_on_the_mesh(rng):
    """A zero router ties every expert: every token picks experts 0 and 1 (both on the first shards)."""
    m = model()
    for layer in m.layers:
        layer.mlp.router.kernel[...] = jnp.zeros_like(layer.mlp.router.kernel[...])
    data = batch(rng)
    expected = _outputs(m, data.input_ids)
    assert set(np.flatnonzero(np.asarray(expected.expert_load).sum(0))) == {0, 1}
    mesh = sharding.make_mesh(expert=8)
    sharding.shard_model(m, mesh)
    got = _outputs(m, jax.device_put(data.input_ids, NamedSharding(mesh, sharding.batch_spec(mesh))))
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(expected.logits), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got.expert_load), np.asarray(expected.expert_load))


def _one_step(m, data):
    """(metrics, gradients) of one train_step of `m` (training mode) on `data`. The gradients are AdamW's first
    moments after that step from zero, (1 - b1) x the clipped gradient, keyed by parameter path: compared like
    gradients. The updated parameters are not compared: Adam's first step, g / (|g| + eps) x learning rate,
    magnifies the rounding of near-zero gradients up to the learning rate."""
    m.train()
    optimizer = make_optimizer(m, TrainConfig(learning_rate=1e-3, warmup_steps=0, total_steps=4))
    metrics = train_step(m, optimizer, data, nnx.Rngs(0))
    moments = {}
    for path, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(optimizer))):
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        if "mu" in keys:
            moments[tuple(keys[keys.index("mu") + 1:])] = np.asarray(x)
    assert moments, "no first moments found in the optimizer state"
    return metrics, moments


TIED = jaxmoe.get_preset("tiny").replace(vocab_size=64, num_layers=1)  # the embedding table is the output head


@pytest.fixture(scope="module")
def one_device_step():
    """config -> (batch, metrics, gradients) of one single-device training step, computed once per config."""
    steps = {}

    def get(config):
        if config not in steps:
            data = batch(np.random.default_rng(1))
            steps[config] = (data, *_one_step(model(config=config), data))
        return steps[config]

    return get


# The default tier steps on the fsdp x expert x tensor mesh with both axis types (an Explicit case reuses its Auto
# twin's compiled step). The slow tier adds the batch-axis and expert-only meshes and the tied head.
@pytest.mark.parametrize("mesh_name, axis_types, config",
                         [("fsdp2_expert2_tensor2", kind, CONFIG) for kind in AXIS_TYPES]
                         + [pytest.param("fsdp2_expert2_tensor2", "auto", TIED, marks=SLOW)]
                         + [pytest.param(name, kind, CONFIG, marks=SLOW)
                            for name in ("data2_expert2_tensor2", "data2_expert4", "expert8") for kind in AXIS_TYPES],
                         ids=lambda v: {id(CONFIG): "moe", id(TIED): "tied"}.get(id(v)))
def test_a_training_step_on_the_mesh_equals_one_device_and_keeps_the_declared_shardings(
        mesh_name, axis_types, config, one_device_step, capfd):
    """The batch placed on the mesh as given: train_step moves arrays of an Explicit mesh onto its Auto twin, so
    both kinds of mesh run one compiled step."""
    data, metrics, grads = one_device_step(config)
    mesh = mesh_of(mesh_name, axis_types)
    m = sharding.shard_model(model(config=config), mesh)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(m, nnx.Param)))
    declared = {jax.tree_util.keystr(p): spec_of(s.spec) for p, s in
                jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(sharding.param_shardings(m, mesh)))}
    s_metrics, s_grads = _one_step(m, placed(data, mesh))
    for name in ("loss", "grad_norm", "accuracy"):
        np.testing.assert_allclose(float(s_metrics[name]), float(metrics[name]), rtol=1e-5, err_msg=name)
    assert s_grads.keys() == grads.keys()
    for path, g in grads.items():
        scale = max(float(np.abs(g).max()), 1e-12)
        assert float(np.abs(s_grads[path] - g).max()) <= 1e-5 * scale, path
    after = nnx.state(m, nnx.Param)
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    actual = {jax.tree_util.keystr(p): spec_of(x.sharding.spec) for p, x in
              jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(after))}
    assert actual == declared
    assert any(declared.values())  # the check covers sharded arrays, not only replicated ones
    assert {x.sharding.mesh for x in jax.tree.leaves(after)} == {sharding.auto_mesh(mesh)}
    assert_no_involuntary_remat(capfd)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved MoE checkpoint and its single-device logits and greedy continuation of the test ids."""
    m = model()
    path = jaxmoe.save_hf(m, tmp_path_factory.mktemp("sharded") / "ckpt")
    ids = np.asarray(batch(np.random.default_rng(2)).input_ids)
    return path, ids, np.asarray(_forward(m, ids)), np.asarray(jaxmoe.generate(m, ids, max_new_tokens=3))


def loaded_on_make_mesh(path, axis_types):
    """The new user's path: load_hf(path, mesh=jax.make_mesh((8,), ("expert",))) -> (model, mesh)."""
    mesh = jax.make_mesh((8,), ("expert",), axis_types=(axis_types,))
    loaded = jaxmoe.load_hf(path, mesh=mesh)
    assert spec_of(loaded.layers[0].mlp.w_down[...].sharding.spec) == ("expert",)
    assert loaded.layers[0].mlp.mesh == sharding.auto_mesh(mesh)
    return loaded, mesh


# An eager call runs op by op on the mesh (seconds per call): the default tier makes it on jax.make_mesh's own
# default (Explicit axes), the slow tier on Auto axes too.
@pytest.mark.parametrize("axis_types", [jax.sharding.AxisType.Explicit,
                                        pytest.param(jax.sharding.AxisType.Auto, marks=SLOW)], ids=["explicit", "auto"])
@pytest.mark.slow  # 8-12 s: kept out of the default tier's 8-minute budget
def test_load_hf_with_a_jax_make_mesh_runs_eagerly_on_plain_ids(axis_types, checkpoint):
    """The issue's path as a new user takes it: load_hf onto jax.make_mesh((8,), ("expert",)), then m(ids) with
    plain int32 ids, no jit."""
    path, ids, expected, _ = checkpoint
    loaded, _ = loaded_on_make_mesh(path, axis_types)
    logits = loaded(ids).logits
    assert len(logits.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("axis_types", [jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto],
                         ids=["explicit", "auto"])
def test_load_hf_with_a_jax_make_mesh_runs_jitted_and_generating(axis_types, checkpoint):
    path, ids, expected, expected_tokens = checkpoint
    loaded, mesh = loaded_on_make_mesh(path, axis_types)
    logits = _forward(loaded, ids)
    assert len(logits.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-5)
    with jax.set_mesh(mesh):
        np.testing.assert_allclose(np.asarray(_forward(loaded, ids)), expected, rtol=0, atol=1e-5)
    on_mesh = jax.device_put(ids, NamedSharding(mesh, P("expert")))  # placed on the user's own mesh
    np.testing.assert_array_equal(np.asarray(jaxmoe.generate(loaded, on_mesh, max_new_tokens=3)), expected_tokens)


def test_an_embedding_table_split_along_d_rematerialises_involuntarily(capfd):
    """The layout jaxmoe.sharding.LOGICAL_RULES avoids, placed by hand, does make XLA log the warning: the
    captures above would see it."""
    mesh = sharding.make_mesh(fsdp=2, expert=2, tensor=2)
    m = sharding.shard_model(model(), mesh)
    table = m.embed_tokens.embedding
    table.set_value(jax.device_put(table[...], NamedSharding(mesh, P("tensor", "fsdp"))))
    capfd.readouterr()
    nnx.jit(lambda m, ids: m(ids).logits)(m, placed(batch(np.random.default_rng(3)), mesh).input_ids)
    assert INVOLUNTARY_REMAT in capfd.readouterr().err


def test_an_expert_count_that_does_not_divide_the_expert_axis_is_refused(tmp_path):
    jaxmoe.save_hf(model(), tmp_path / "ckpt")
    mesh = jax.make_mesh((1, 1, 3, 1), sharding.MESH_AXES, devices=jax.devices()[:3],
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)
    with pytest.raises(ValueError, match="8 experts do not divide over the expert axis of size 3"):
        jaxmoe.load_hf(tmp_path / "ckpt", mesh=mesh)
