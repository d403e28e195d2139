"""LoRA adapters: a fresh adapter is a no-op, an adapted model equals a model with hand-merged kernels, training
touches only the adapters, merging restores the original structure, and bad configurations fail clearly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxmoe
from jaxmoe.nn.lora import LoRAConfig, LoRALinear, apply_lora, merge_lora

IDS = np.array([[1, 5, 9, 42, 7, 300, 11, 3], [1, 8, 2, 99, 256, 17, 4, 60]], np.int32)
BASE_ONLY = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
ATTENTION = ("qkv_proj", "o_proj")


def _dense():
    return jaxmoe.Phi3ForCausalLM(jaxmoe.get_preset("tiny"), rngs=nnx.Rngs(0))


def _moe():
    return jaxmoe.PhimoeForCausalLM(jaxmoe.get_preset("tiny-moe"), rngs=nnx.Rngs(0))


@nnx.jit
def _forward(model, ids):
    return model(ids).logits


def _logits(model) -> np.ndarray:
    return np.asarray(_forward(model, IDS))


def _adapters(model) -> dict:
    return {path: node for path, node in nnx.iter_graph(model) if isinstance(node, LoRALinear)}


def _randomize_b(model, seed: int = 1) -> None:
    """Nonzero lora_b everywhere, large enough to move the logits visibly."""
    key = jax.random.key(seed)
    for lora in _adapters(model).values():
        key, sub = jax.random.split(key)
        lora.lora_b[...] = 0.5 * jax.random.normal(sub, lora.lora_b.shape)


def _flat(state) -> dict:
    return {path: np.asarray(value) for path, value in nnx.to_flat_state(state)}


def _loss(model):
    return jnp.mean(model(IDS).logits ** 2)


def test_config_rejects_bad_values_naming_them():
    for kwargs, words in [(dict(rank=0), "rank is 0"), (dict(alpha=0.0), "alpha is 0.0"),
                          (dict(targets=()), "targets is ()"), (dict(targets="qkv_proj"), "non-empty tuple")]:
        with pytest.raises(ValueError, match=words):
            LoRAConfig(**kwargs)


@pytest.mark.parametrize("name", ["lm_head", "router"])
def test_lm_head_and_router_are_refused_as_targets(name):
    with pytest.raises(ValueError, match=f"{name!r}.*cannot be adapted.*reads {name}.kernel"):
        LoRAConfig(targets=("qkv_proj", name))


def test_fresh_adapters_leave_logits_unchanged_and_wrap_every_target():
    model = _dense()
    before = _logits(model)
    config = jaxmoe.get_preset("tiny")
    assert apply_lora(model, LoRAConfig(rank=4), rngs=nnx.Rngs(1)) == 4 * config.num_layers
    assert isinstance(model.layers, nnx.List)
    assert all(isinstance(layer.self_attn.qkv_proj, LoRALinear) and isinstance(layer.mlp.down_proj, LoRALinear)
               for layer in model.layers)
    a = model.layers[0].self_attn.qkv_proj.lora_a[...]
    assert np.abs(np.asarray(a)).max() > 0, "lora_a must start random, or lora_b gets no gradient signal"
    np.testing.assert_array_equal(_logits(model), before)


def test_adapted_logits_equal_a_model_with_hand_merged_kernels():
    model = _dense()
    lora_config = LoRAConfig(rank=4, alpha=12.0, targets=("qkv_proj", "gate_up_proj", "down_proj"))
    apply_lora(model, lora_config, rngs=nnx.Rngs(1))
    _randomize_b(model)
    reference = _dense()  # same seed, so the same base weights; merged by hand in float64 below
    nodes = dict(nnx.iter_graph(reference))
    for path, lora in _adapters(model).items():
        a, b = np.asarray(lora.lora_a[...], np.float64), np.asarray(lora.lora_b[...], np.float64)
        kernel = np.asarray(nodes[path].kernel[...], np.float64)
        nodes[path].kernel[...] = jnp.asarray(kernel + a @ b * (12.0 / 4), jnp.float32)
    adapted, expected = _logits(model), _logits(reference)
    assert np.abs(expected - _logits(_dense())).max() > 1e-2, "the adapters must change the logits"
    np.testing.assert_allclose(adapted, expected, atol=1e-5, rtol=1e-5)


def test_lora_gradients_reach_only_the_adapters():
    model = _dense()
    apply_lora(model, LoRAConfig(), rngs=nnx.Rngs(1))
    lora_paths = set(_flat(nnx.state(model, nnx.LoRAParam)))
    grad_fn = nnx.jit(nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))

    fresh = _flat(grad_fn(model))
    assert set(fresh) == lora_paths and all(path[-1] in ("lora_a", "lora_b") for path in fresh)
    assert all(np.abs(g).max() > 0 for path, g in fresh.items() if path[-1] == "lora_b")
    assert all(np.abs(g).max() == 0 for path, g in fresh.items() if path[-1] == "lora_a"), "B = 0 blocks A's grad"

    _randomize_b(model)
    trained = _flat(grad_fn(model))
    assert all(np.abs(g).max() > 0 for g in trained.values())


def test_optimizer_over_lora_params_changes_only_the_adapters():
    model = _dense()
    apply_lora(model, LoRAConfig(), rngs=nnx.Rngs(1))
    _randomize_b(model)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        optimizer.update(model, nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model))

    base_before, lora_before = _flat(nnx.state(model, BASE_ONLY)), _flat(nnx.state(model, nnx.LoRAParam))
    step(model, optimizer)
    base_after, lora_after = _flat(nnx.state(model, BASE_ONLY)), _flat(nnx.state(model, nnx.LoRAParam))
    assert base_after.keys() == base_before.keys()
    for path, value in base_before.items():
        np.testing.assert_array_equal(base_after[path], value, err_msg=str(path))
    assert all(not np.array_equal(lora_after[path], value) for path, value in lora_before.items())


def test_merge_restores_plain_linears_with_the_same_logits_and_saves(tmp_path):
    model = _dense()
    count = apply_lora(model, LoRAConfig(rank=2, alpha=3.0), rngs=nnx.Rngs(1))
    _randomize_b(model)
    adapted = _logits(model)
    paths = list(_adapters(model))

    assert merge_lora(model) == count
    nodes = dict(nnx.iter_graph(model))
    assert all(type(nodes[path]) is nnx.Linear for path in paths)
    assert not _flat(nnx.state(model, nnx.LoRAParam))
    merged = _logits(model)
    np.testing.assert_allclose(merged, adapted, atol=1e-5, rtol=1e-5)
    assert merge_lora(model) == 0

    jaxmoe.save_hf(model, tmp_path / "merged")
    np.testing.assert_allclose(_logits(jaxmoe.load_hf(tmp_path / "merged")), merged, atol=1e-5, rtol=1e-5)


def test_moe_model_adapts_attention_only_and_merges():
    model = _moe()
    model.eval()
    before = _logits(model)
    router, experts = model.layers[0].mlp.router, _flat(nnx.state(model.layers[0].mlp, nnx.Param))

    assert apply_lora(model, LoRAConfig(targets=ATTENTION), rngs=nnx.Rngs(1)) == 2 * len(model.layers)
    assert {path[-1] for path in _adapters(model)} == set(ATTENTION)
    assert model.layers[0].mlp.router is router and type(router) is nnx.Linear and type(model.lm_head) is nnx.Linear
    assert model.layers[0].self_attn.qkv_proj.base.bias is not None  # PhiMoE's biased projections stay biased
    np.testing.assert_array_equal(_logits(model), before)

    _randomize_b(model)
    adapted = _logits(model)
    assert np.abs(adapted - before).max() > 1e-2
    assert merge_lora(model) == 2 * len(model.layers)
    np.testing.assert_allclose(_logits(model), adapted, atol=1e-5, rtol=1e-5)
    after = _flat(nnx.state(model.layers[0].mlp, nnx.Param))
    assert after.keys() == experts.keys()
    for path, value in experts.items():  # router and expert weights never moved
        np.testing.assert_array_equal(after[path], value, err_msg=str(path))


def test_moe_default_targets_fail_listing_the_linear_layers():
    model = _moe()
    with pytest.raises(ValueError, match=r"\['gate_up_proj', 'down_proj'\] match no nnx.Linear.*"
                                         r"\['lm_head', 'o_proj', 'qkv_proj', 'router'\]"):
        apply_lora(model, LoRAConfig(), rngs=nnx.Rngs(1))
    assert not _adapters(model), "a failed apply_lora must leave the model untouched"


def test_unknown_target_names_the_existing_layers():
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no nnx.Linear.*'gate_up_proj'"):
        apply_lora(_dense(), LoRAConfig(targets=("q_proj", "o_proj")), rngs=nnx.Rngs(1))


def test_applying_twice_is_refused():
    model = _dense()
    apply_lora(model, LoRAConfig(targets=("o_proj",)), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="already has LoRA adapters.*merge_lora"):
        apply_lora(model, LoRAConfig(targets=("qkv_proj",)), rngs=nnx.Rngs(2))


def test_adapter_matmul_runs_in_the_base_compute_dtype():
    base = nnx.Linear(8, 6, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    lora = LoRALinear(base, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    assert lora.lora_a[...].dtype == jnp.float32  # stored in fp32, computed in the base's dtype
    x = jnp.ones((3, 8), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda x: lora(x))(x)
    dots = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "dot_general"]
    assert len(dots) == 3 and all(v.aval.dtype == jnp.bfloat16 for eqn in dots for v in eqn.invars)
    assert lora(x).dtype == jnp.bfloat16
