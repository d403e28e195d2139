"""Mixture of LoRAs: PEFT adapter folders load into jaxmoe with PEFT's logits, a batch whose rows use different
adapters equals each row run alone with its own, adapters save back to folders PEFT loads, and adapter folders
that do not fit the model fail clearly."""

import copy
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxmoe
from conftest import hf_model
from jaxmoe.io.peft import load_peft_adapter, save_peft_adapter
from jaxmoe.nn.lora import LoRAConfig, apply_lora
from jaxmoe.nn.multi_lora import MultiLoRALinear, add_adapter, adapter_names, select_adapters, wrap_linear

peft = pytest.importorskip("peft")

TOL = 1e-4
NAME = "gqa_partial_longrope_tied"
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
# Two adapters of different ranks; "speech" uses rsLoRA scaling (alpha / sqrt(r)).
ADAPTERS = {"vision": dict(r=4, lora_alpha=8), "speech": dict(r=6, lora_alpha=5, use_rslora=True)}
IDS = np.random.default_rng(0).integers(3, 128, size=(3, 12))


@pytest.fixture(scope="module")
def peft_setup(tmp_path_factory):
    """(base checkpoint folder, adapter folders by name, PEFT logits for IDS by adapter name and None = base)."""
    root = tmp_path_factory.mktemp("multi_lora")
    base = copy.deepcopy(hf_model(NAME))  # PEFT injects its layers in place: keep the shared reference clean
    base.save_pretrained(root / "base")
    configs = {name: peft.LoraConfig(target_modules=TARGETS, **kw) for name, kw in ADAPTERS.items()}
    model = peft.get_peft_model(base, configs["vision"], adapter_name="vision")
    model.add_adapter("speech", configs["speech"])
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts lora_B at zero, which would make every adapter a no-op
                p.normal_(0.0, 0.3)
    model.eval()
    model.save_pretrained(root / "adapters")  # one subfolder per non-default adapter
    expected = {}
    ids = torch.tensor(IDS)
    with torch.no_grad():
        for name in ADAPTERS:
            model.set_adapter(name)
            expected[name] = model(ids).logits.numpy()
        with model.disable_adapter():
            expected[None] = model(ids).logits.numpy()
    return root / "base", {name: root / "adapters" / name for name in ADAPTERS}, expected


@pytest.fixture(scope="module")
def adapted(peft_setup):
    base, folders, _ = peft_setup
    model = jaxmoe.load_hf(base)
    for name, folder in folders.items():
        assert load_peft_adapter(model, folder, name) == 4 * 2  # 4 targets x 2 layers
    return model


@nnx.jit
def _selected_logits(model, ids, sel_b):
    with select_adapters(("vision", "speech"), sel_b):
        return model(ids).logits


def test_loaded_adapters_match_peft_logits(adapted, peft_setup):
    _, _, expected = peft_setup
    assert adapter_names(adapted) == ("vision", "speech")
    for index, name in enumerate(("vision", "speech")):
        got = np.asarray(_selected_logits(adapted, IDS, jnp.full((3,), index, jnp.int32)))
        assert np.abs(got - expected[name]).max() <= TOL
        assert np.abs(got - expected[None]).max() > 0.1  # the adapter does change the logits


def test_outside_a_selection_the_base_model_runs(adapted, peft_setup):
    _, _, expected = peft_setup
    got = np.asarray(nnx.jit(lambda model, ids: model(ids).logits)(adapted, IDS))
    assert np.abs(got - expected[None]).max() <= TOL


def test_rows_with_different_adapters_equal_each_row_alone(adapted, peft_setup):
    _, _, expected = peft_setup
    sel_b = jnp.asarray([1, -1, 0], jnp.int32)  # speech, no adapter, vision
    mixed = np.asarray(_selected_logits(adapted, IDS, sel_b))
    for row, name in enumerate(["speech", None, "vision"]):
        alone = np.asarray(_selected_logits(adapted, IDS[row:row + 1], sel_b[row:row + 1]))
        np.testing.assert_allclose(mixed[row], alone[0], rtol=0, atol=1e-5)
        assert np.abs(mixed[row] - expected[name][row]).max() <= TOL


def test_selection_made_outside_jit_is_refused(adapted):
    with select_adapters(("vision",), np.zeros(3, np.int32)):
        with pytest.raises(ValueError, match="inside the jitted function"):
            nnx.jit(lambda model, ids: model(ids).logits)(adapted, IDS)


def test_saved_adapter_loads_in_peft_and_back(adapted, peft_setup, tmp_path):
    base, _, expected = peft_setup
    folder = save_peft_adapter(adapted, "speech", tmp_path / "speech")
    torch_model = type(hf_model(NAME)).from_pretrained(base, attn_implementation="eager")
    reloaded = peft.PeftModel.from_pretrained(torch_model, folder).eval()
    with torch.no_grad():
        got = reloaded(torch.tensor(IDS)).logits.numpy()
    assert np.abs(got - expected["speech"]).max() <= TOL
    model = jaxmoe.load_hf(base)
    load_peft_adapter(model, folder, "speech")
    got = np.asarray(_selected_logits(model, IDS, jnp.ones((3,), jnp.int32)))
    assert np.abs(got - expected["speech"]).max() <= TOL


def test_a_fresh_adapter_is_a_no_op_and_names_must_be_new(adapted, peft_setup):
    base, _, expected = peft_setup
    model = jaxmoe.load_hf(base)
    assert add_adapter(model, "vision", LoRAConfig(rank=3, targets=("qkv_proj", "down_proj")), rngs=nnx.Rngs(0)) == 4
    assert isinstance(model.layers[0].self_attn.qkv_proj, MultiLoRALinear)
    assert isinstance(model.layers[0].self_attn.o_proj, nnx.Linear)
    got = np.asarray(_selected_logits(model, IDS, jnp.zeros((3,), jnp.int32)))
    assert np.abs(got - expected[None]).max() <= TOL
    with pytest.raises(ValueError, match="already has an adapter named 'vision'"):
        add_adapter(model, "vision", LoRAConfig(rank=3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"targets \['q_proj'\] match no linear layer"):
        add_adapter(model, "other", LoRAConfig(targets=("q_proj",)), rngs=nnx.Rngs(0))


def _edited(folder, tmp_path, **changes):
    """A copy of the adapter folder with adapter_config.json keys changed."""
    copy_ = tmp_path / "edited"
    shutil.copytree(folder, copy_)
    path = copy_ / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **changes}))
    return copy_


@pytest.mark.parametrize("changes, words", [
    (dict(r=5), r"lora_A.weight has shape \[4, \d+\]; with r=5 .* needs \[5, \d+\]"),
    (dict(target_modules=["qkv_proj", "q_proj", "o_proj", "gate_up_proj", "down_proj"]),
     r"target_modules \['q_proj'\] name no linear layer"),
    (dict(target_modules=["qkv_proj", "o_proj"]), "unexpected tensor .*mlp.*target_modules does not name"),
    (dict(use_dora=True), "use_dora=True is a PEFT option jaxmoe does not implement"),
    (dict(bias="all"), "bias='all'"),
    (dict(layers_to_transform=[0]), "layers_to_transform=\\[0\\]"),
])
def test_adapters_that_do_not_fit_are_refused(peft_setup, tmp_path, changes, words):
    base, folders, _ = peft_setup
    model = jaxmoe.load_hf(base)
    with pytest.raises(ValueError, match=words):
        load_peft_adapter(model, _edited(folders["vision"], tmp_path, **changes), "vision")
    assert adapter_names(model) == ()  # nothing half-loaded


def test_missing_tensors_are_refused(peft_setup, tmp_path):
    from safetensors.numpy import load_file, save_file

    base, folders, _ = peft_setup
    folder = _edited(folders["vision"], tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    dropped = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    del tensors[dropped]
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"tensor '{dropped}' is missing"):
        load_peft_adapter(jaxmoe.load_hf(base), folder, "vision")


@pytest.mark.parametrize("how", ["add_adapter", "load_peft_adapter"])
def test_both_ways_of_adding_refuse_unusable_and_taken_names_and_single_lora_models(peft_setup, how):
    base, folders, _ = peft_setup

    def adding(model, name):
        if how == "add_adapter":
            return add_adapter(model, name, LoRAConfig(rank=2), rngs=nnx.Rngs(0))
        return load_peft_adapter(model, folders["vision"], name)

    model = jaxmoe.load_hf(base)
    with pytest.raises(ValueError, match=f"{how}: adapter name 'a b' is not usable"):
        adding(model, "a b")
    assert adding(model, "first") == 8
    with pytest.raises(ValueError, match=f"{how}: the model already has an adapter named 'first'"):
        adding(model, "first")
    single = jaxmoe.load_hf(base)
    apply_lora(single, LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=f"{how}: this model has single LoRA adapters"):
        adding(single, "first")
    assert adapter_names(model) == ("first",) and adapter_names(single) == ()


def test_wrap_linear_wraps_once_and_refuses_other_layers(peft_setup):
    model = jaxmoe.load_hf(peft_setup[0])
    attention = model.layers[0].self_attn
    base = attention.o_proj
    layer = wrap_linear(attention, "o_proj")
    assert attention.o_proj is layer and layer.base is base and wrap_linear(attention, "o_proj") is layer
    norm = type(model.layers[0].input_layernorm).__name__
    with pytest.raises(TypeError, match=f"layer 'input_layernorm' is a {norm}; adapters wrap nnx.Linear layers"):
        wrap_linear(model.layers[0], "input_layernorm")
