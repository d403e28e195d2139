"""Meshes and parameter placement: the rules' specs per parameter kind, placement by shard_model on meshes with
Auto or Explicit axes, the boundary that moves arrays off an Explicit mesh, and the input errors. Runs on the 8
fake CPU devices of conftest.py; the sharded model's numerics and compile logs are in
tests/models/test_sharded_parity.py."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxmoe
from jaxmoe.nn.lora import LoRAConfig, apply_lora
from jaxmoe.sharding import (LOGICAL_RULES, MESH_AXES, auto_mesh, batch_spec, check_batch, check_mesh,
                             logical_axes, make_mesh, param_shardings, partition_spec, shard_model)

MESHES = {"expert8": dict(expert=8), "data2_expert4": dict(data=2, expert=4),
          "fsdp2_expert2_tensor2": dict(fsdp=2, expert=2, tensor=2)}

# Parameter kind -> expected spec on each mesh, written out by hand from the rule table.
_REPL1, _REPL2 = P(None), P(None, None)
EXPECTED = {
    "expert8": {"embedding": _REPL2, "qkv": _REPL2, "o": _REPL2, "gate_up": _REPL2, "down": _REPL2, "router": _REPL2,
                "w_gate_up": P("expert", None, None), "w_down": P("expert", None, None), "lm_head": _REPL2,
                "vector": _REPL1},
    "data2_expert4": {"embedding": _REPL2, "qkv": _REPL2, "o": _REPL2, "gate_up": _REPL2, "down": _REPL2,
                      "router": _REPL2, "w_gate_up": P("expert", None, None), "w_down": P("expert", None, None),
                      "lm_head": _REPL2, "vector": _REPL1},
    "fsdp2_expert2_tensor2": {"embedding": P(("tensor", "fsdp"), None), "qkv": P("fsdp", "tensor"),
                              "o": P("tensor", "fsdp"),
                              "gate_up": P("fsdp", "tensor"), "down": P("tensor", "fsdp"), "router": P("fsdp", None),
                              "w_gate_up": P("expert", "fsdp", "tensor"), "w_down": P("expert", "tensor", "fsdp"),
                              "lm_head": P("fsdp", "tensor"), "vector": _REPL1},
}


def _kind(path) -> str:
    """The test's own classification of a parameter path (biases and norms are all 'vector')."""
    names = [str(p) for p in path]
    if names[-1] in ("bias", "weight", "scale"):
        return "vector"
    return {"embed_tokens": "embedding", "qkv_proj": "qkv", "o_proj": "o", "gate_up_proj": "gate_up",
            "down_proj": "down", "router": "router", "lm_head": "lm_head", "mlp": names[-1]}[names[-2]]


def dense_model():
    return jaxmoe.Phi3ForCausalLM(jaxmoe.get_preset("tiny-untied"), rngs=nnx.Rngs(0))


def moe_model():
    config = jaxmoe.get_preset("tiny-moe").replace(moe=jaxmoe.MoEConfig(num_experts=8, top_k=2))
    model = jaxmoe.PhimoeForCausalLM(config, rngs=nnx.Rngs(0))
    model.eval()
    return model


def _flat_params(model):
    return nnx.to_flat_state(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("build", [dense_model, moe_model], ids=["dense", "moe"])
def test_rules_give_the_expected_spec_for_every_parameter_kind(mesh_name, build):
    mesh = make_mesh(**MESHES[mesh_name])
    model = build()
    kinds_seen = set()
    for path, sharding in nnx.to_flat_state(param_shardings(model, mesh)):
        kind = _kind(path)
        kinds_seen.add(kind)
        assert sharding.get_value().spec == EXPECTED[mesh_name][kind], path
        assert sharding.get_value().mesh is mesh
    assert ({"w_gate_up", "w_down", "router"} <= kinds_seen) == (build is moe_model)


def test_lora_adapters_follow_their_kernels_axes():
    mesh = make_mesh(fsdp=2, expert=2, tensor=2)
    model = dense_model()
    apply_lora(model, LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    shard_model(model, mesh)
    specs = {tuple(str(p) for p in path): v.get_value().sharding.spec for path, v in _flat_params(model)}
    layer = ("layers", "0")
    assert specs[(*layer, "self_attn", "qkv_proj", "base", "kernel")] == P("fsdp", "tensor")
    assert specs[(*layer, "self_attn", "qkv_proj", "lora_a")] == P("fsdp", None)
    assert specs[(*layer, "self_attn", "qkv_proj", "lora_b")] == P(None, "tensor")
    assert specs[(*layer, "mlp", "down_proj", "lora_a")] == P("tensor", None)
    assert specs[(*layer, "mlp", "down_proj", "lora_b")] == P(None, "fsdp")


def test_make_mesh_has_all_axes_with_auto_types():
    mesh = make_mesh(data=2, tensor=4)
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 1, "tensor": 4}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert make_mesh(expert=2, devices=jax.devices()[:2]).devices.size == 2


def test_batch_spec_splits_batch_over_the_batch_axes_larger_than_one():
    assert batch_spec(make_mesh(data=2, expert=4)) == P(("data", "expert"), None)
    assert batch_spec(make_mesh(tensor=8)) == P(None, None)
    check_batch(16, make_mesh(fsdp=2, expert=2, tensor=2))


def test_a_dimension_the_mesh_axis_does_not_divide_is_replicated():
    mesh = make_mesh(data=2, tensor=4)
    assert partition_spec(("vocab", "embed"), (50, 64), mesh) == P(None, None)
    assert partition_spec(("vocab", "embed"), (52, 64), mesh) == P("tensor", None)


def test_a_mesh_axis_is_never_used_twice_in_one_spec():
    rules = {**LOGICAL_RULES, "embed": ("tensor",)}
    assert partition_spec(("embed", "mlp"), (64, 128), make_mesh(tensor=8), rules) == P("tensor", None)


def test_a_mesh_may_omit_axes():
    mesh = jax.make_mesh((2, 4), ("expert", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    check_mesh(mesh)
    assert partition_spec(logical_axes(("layers", 0, "mlp", "w_gate_up"), (8, 64, 192)), (8, 64, 192), mesh) == \
        P("expert", None, "tensor")
    assert batch_spec(mesh) == P(("expert",), None)


def test_unknown_mesh_axis_name_is_an_error():
    mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(ValueError, match="'model'.*data.*fsdp.*expert.*tensor"):
        check_mesh(mesh)
    with pytest.raises(ValueError, match="'model'"):
        param_shardings(dense_model(), mesh)


def test_expert_count_not_divisible_by_the_expert_axis_is_an_error():
    mesh = make_mesh(expert=3, devices=jax.devices()[:3])
    with pytest.raises(ValueError, match="16 experts do not divide over the expert axis of size 3"):
        partition_spec(("experts", "embed", "mlp"), (16, 64, 128), mesh)
    with pytest.raises(ValueError, match="4 experts do not divide over the expert axis of size 8"):
        param_shardings(jaxmoe.PhimoeForCausalLM(jaxmoe.get_preset("tiny-moe"), rngs=nnx.Rngs(0)),
                        make_mesh(expert=8))


def test_batch_not_divisible_by_the_batch_axes_is_an_error():
    with pytest.raises(ValueError, match="batch size 6 .* 8"):
        check_batch(6, make_mesh(data=2, expert=4))


@pytest.mark.parametrize("sizes, message", [(dict(data=3), "3.*8 devices"), (dict(data=2, tensor=2), "4.*8 devices"),
                                            (dict(data=0, expert=8), "data=0")])
def test_bad_mesh_sizes_are_errors(sizes, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(**sizes)


def test_unknown_parameter_path_is_an_error():
    with pytest.raises(ValueError, match="layers.0.mlp.new_gate.kernel"):
        logical_axes(("layers", 0, "mlp", "new_gate", "kernel"), (64, 64))
    model = dense_model()
    model.extra = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="extra.(kernel|bias)"):
        param_shardings(model, make_mesh(expert=8))


# ------------------------------------------------------------------------ meshes with Explicit axes (jax.make_mesh)


def explicit_mesh(sizes: dict) -> jax.sharding.Mesh:
    """A mesh as `jax.make_mesh` makes it by default: Explicit axes (checked, so a change of JAX's default shows)."""
    mesh = jax.make_mesh(tuple(sizes.values()), tuple(sizes))
    assert mesh.explicit_axes == tuple(sizes)
    return mesh


def test_auto_mesh_keeps_the_devices_and_names_and_makes_explicit_axes_auto():
    mesh = explicit_mesh(dict(fsdp=2, expert=2, tensor=2))
    auto = auto_mesh(mesh)
    assert auto.axis_names == mesh.axis_names and auto.axis_sizes == mesh.axis_sizes
    assert auto.devices.tolist() == mesh.devices.tolist()
    assert auto.axis_types == (jax.sharding.AxisType.Auto,) * 3
    assert auto == jax.make_mesh((2, 2, 2), ("fsdp", "expert", "tensor"), axis_types=auto.axis_types)
    already = make_mesh(expert=8)
    assert auto_mesh(already) is already


@pytest.mark.parametrize("axis_types", ["auto", "explicit"])
@pytest.mark.parametrize("mesh_name", ["data2_expert4", "fsdp2_expert2_tensor2"])
def test_shard_model_places_each_array_as_the_rules_say(mesh_name, axis_types):
    sizes = MESHES[mesh_name]
    mesh = make_mesh(**sizes) if axis_types == "auto" else explicit_mesh(sizes)
    model = moe_model()
    before = {path: np.asarray(v.get_value()) for path, v in _flat_params(model)}
    assert shard_model(model, mesh) is model
    for path, variable in _flat_params(model):
        array = variable.get_value()
        assert array.sharding.spec == EXPECTED[mesh_name][_kind(path)], path
        assert array.sharding.mesh == auto_mesh(mesh)
        np.testing.assert_array_equal(np.asarray(array), before[path])
    assert model.layers[0].mlp.mesh == auto_mesh(mesh)


def test_on_auto_axes_moves_arrays_off_an_explicit_mesh_without_copying():
    mesh = explicit_mesh(dict(data=2, expert=4))
    auto = auto_mesh(mesh)
    placed = jax.device_put(np.arange(32, dtype=np.int32).reshape(8, 4), NamedSharding(mesh, P(("data", "expert"))))
    holder = nnx.Rngs(params=jax.device_put(jax.random.key(3), NamedSharding(mesh, P())))
    seen = {}

    @jaxmoe.sharding.on_auto_axes
    def entry(rngs, batch, *, host):
        seen.update(rngs=rngs, batch=batch, host=host, context=jax.sharding.get_abstract_mesh())
        return batch[0]

    host = np.ones(3)
    out = entry(holder, (placed, placed), host=host)
    for x in seen["batch"]:
        assert x.sharding == NamedSharding(auto, P(("data", "expert")))
        assert [s.data.unsafe_buffer_pointer() for s in x.addressable_shards] == \
            [s.data.unsafe_buffer_pointer() for s in placed.addressable_shards]
        np.testing.assert_array_equal(np.asarray(x), np.asarray(placed))
    assert out.sharding.mesh == auto
    assert seen["rngs"] is holder and holder.params.key[...].sharding.mesh == auto  # updated in place
    assert seen["host"] is host
    assert seen["context"].empty  # no mesh context set: none entered
    with jax.set_mesh(mesh):
        entry(holder, (placed,), host=host)
    assert seen["context"] == auto.abstract_mesh


@pytest.mark.parametrize("mode", ["static", "dynamic", "token"])
def test_a_model_with_task_adapters_shards_them_replicated_and_gives_the_same_logits(mode):
    """The task adapters' parameters (jaxmoe.moe.task_adapters) have a rule: replicated on every mesh axis; the
    MoE block then runs expert-parallel with them, and the logits equal the one-device model's."""
    tasks = jaxmoe.TaskAdapterConfig(mode, num_tasks=3, bottleneck=4, task_embed_dim=4, pool_size=2)
    config = jaxmoe.get_preset("tiny-moe").replace(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
        moe=jaxmoe.MoEConfig(num_experts=4, top_k=2, router="topk", task_adapters=tasks))
    model = nnx.eval_shape(lambda: jaxmoe.PhimoeForCausalLM(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)  # random up-projections and task router rows: the adapters change the output
    nnx.update(model, jax.tree.map(lambda x: jax.numpy.asarray(0.3 * rng.normal(size=x.shape), x.dtype),
                                   nnx.state(model, nnx.Param)))
    model.eval()
    ids = np.random.default_rng(2).integers(0, 64, size=(8, 6)).astype(np.int32)
    task_ids = np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int32)
    logits = nnx.jit(lambda m, x, t: m(x, task_ids=t).logits)
    single = np.asarray(logits(model, ids, task_ids))
    mesh = make_mesh(data=2, expert=4)
    shard_model(model, mesh)
    adapter_paths = [path for path, _ in _flat_params(model) if "task_adapter" in map(str, path)]
    assert adapter_paths
    for path, variable in _flat_params(model):
        if path in adapter_paths:
            assert variable.get_value().sharding.spec == P(*(None,) * variable.get_value().ndim), path
    np.testing.assert_allclose(np.asarray(logits(model, ids, task_ids)), single, rtol=1e-5, atol=1e-5)
