"""save_quantized / load_quantized: exact round trips in both formats, the files' layout, and clear errors for a
tampered, mismatched or foreign folder."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from pallas_kernels import MixedQuantizedWeight
from safetensors import safe_open
from safetensors.flax import save_file

import jaxmoe
from jaxmoe.quant import apply_qat, load_quantized, quantization_report, quantize, save_quantized
from jaxmoe.quant.checkpoint import config_from_dict, config_to_dict
from jaxmoe.quant.quantize import apply_plan


def stored(model):
    """{path: numpy array} of every stored leaf (quantized weights as codes / scale / zero)."""
    state = nnx.to_pure_dict(nnx.state(model))
    return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


@pytest.mark.parametrize("format", ["safetensors", "orbax"])
@pytest.mark.parametrize("preset,kwargs", [  # the MoE case to the slow tier: the default tier's budget
    pytest.param("tiny-moe", dict(bits=3, group_size=32, target="linear", symmetric=False), marks=pytest.mark.slow),
    ("tiny", dict(bits=4, group_size=None, target="linear", rules=[(r"down_proj", {"bits": 8})]))])
def test_round_trip_rebuilds_the_quantized_model_exactly(tmp_path, tiny_model, forward, ids, format, preset, kwargs):
    quantized = quantize(tiny_model(preset), **kwargs)
    save_quantized(quantized, tmp_path / "q", format=format)
    back = load_quantized(tmp_path / "q")
    assert type(back) is type(quantized) and back.config == quantized.config
    assert quantization_report(back) == quantization_report(quantized)
    before, after = stored(quantized), stored(back)
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
        assert after[name].dtype == before[name].dtype
    np.testing.assert_array_equal(forward(back, ids), forward(quantized, ids))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temporary folder left behind


@pytest.mark.parametrize("format", ["safetensors", "orbax"])
def test_per_expert_group_sizes_round_trip_as_a_list_in_the_plan(tmp_path, tiny_model, forward, ids, format):
    plan = {"layers/0/mlp/w_gate_up": {"bits": 3, "group_size": 32, "symmetric": True},
            "layers/0/mlp/w_down": {"bits": 4, "group_size": [96, 48, 24, 96], "symmetric": False}}
    quantized = apply_plan(tiny_model("tiny-moe"), plan)
    assert {m.path: m.group_size for m in quantization_report(quantized)} == {
        "layers/0/mlp/w_gate_up": 32, "layers/0/mlp/w_down": (96, 48, 24, 96)}
    save_quantized(quantized, tmp_path / "q", format=format)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"] == plan
    back = load_quantized(tmp_path / "q")
    assert quantization_report(back) == quantization_report(quantized)
    assert isinstance(back.layers[0].mlp.w_down.get_value(), MixedQuantizedWeight)
    before, after = stored(quantized), stored(back)
    assert before.keys() == after.keys()
    assert before["layers/0/mlp/w_down/scale"].shape == (1 + 2 + 4 + 1, 64)  # each expert's scale rows, once
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    np.testing.assert_array_equal(forward(back, ids), forward(quantized, ids))


def test_safetensors_holds_packed_codes_scales_zeros_and_the_settings(tmp_path, tiny_model):
    quantized = quantize(tiny_model("tiny-moe"), bits=4, group_size=32, target="experts", symmetric=False)
    save_quantized(quantized, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="numpy") as f:
        names, metadata = set(f.keys()), f.metadata()
        codes = f.get_tensor("layers.0.mlp.w_gate_up.codes")
    assert {"layers.0.mlp.w_gate_up.codes", "layers.0.mlp.w_gate_up.scale", "layers.0.mlp.w_gate_up.zero",
            "layers.0.mlp.w_down.codes", "embed_tokens.embedding", "lm_head.kernel"} <= names
    assert codes.dtype == np.uint8 and codes.shape == (4, 64 * 4 // 8, 192)  # two 4-bit codes per byte
    plan = json.loads(metadata["quantization"])
    assert plan["layers/0/mlp/w_down"] == {"bits": 4, "group_size": 32, "symmetric": False}
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == plan and config["architecture"] == "PhimoeForCausalLM"
    assert config_from_dict(config["config"]) == quantized.config


def test_every_model_config_round_trips_through_json():
    for name in jaxmoe.PRESETS:
        config = jaxmoe.get_preset(name)
        assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config


@pytest.fixture
def saved(tmp_path, tiny_model):
    quantized = quantize(tiny_model("tiny-moe"), bits=4, group_size=32, target="experts")
    return save_quantized(quantized, tmp_path / "q")


def edit_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_settings_edited_in_config_json_no_longer_match_the_file(saved):
    edit_config(saved, lambda c: c["quantization"]["layers/0/mlp/w_down"].update(bits=2))
    with pytest.raises(jaxmoe.CheckpointError, match=r"quantization settings in model.safetensors's metadata differ "
                                                     r"from config.json's"):
        load_quantized(saved)


def test_tensors_that_do_not_fit_the_config_are_named(saved, tmp_path):
    edit_config(saved, lambda c: c["config"].update(num_layers=2))
    with pytest.raises(jaxmoe.CheckpointError, match=r"tensor 'layers\.1\..*' .* is missing from model\.safetensors"):
        load_quantized(saved)
    edit_config(saved, lambda c: c["config"].update(num_layers=1))
    # Same names and metadata, but the codes of a 2-bit matrix where config.json says 4 bits.
    with safe_open(str(saved / "model.safetensors"), framework="flax") as f:
        tensors, metadata = {name: f.get_tensor(name) for name in f.keys()}, f.metadata()
    tensors["layers.0.mlp.w_down.codes"] = tensors["layers.0.mlp.w_down.codes"][:, :24]
    save_file(tensors, str(saved / "model.safetensors"), metadata=metadata)
    with pytest.raises(jaxmoe.CheckpointError, match=r"tensor 'layers\.0\.mlp\.w_down\.codes' in model\.safetensors "
                                                     r"is uint8 \[4, 24, 64\]; config\.json .* expects uint8 "
                                                     r"\[4, 48, 64\]"):
        load_quantized(saved)


def test_foreign_or_broken_folders_are_refused(saved, tmp_path, tiny_model):
    hf = tmp_path / "hf"
    jaxmoe.save_hf(tiny_model("tiny"), hf)
    with pytest.raises(jaxmoe.CheckpointError, match=r"not a jaxmoe checkpoint config.*load it with jaxmoe\.load_hf"):
        load_quantized(hf)
    with pytest.raises(jaxmoe.CheckpointError, match=r"does not exist"):
        load_quantized(tmp_path / "nowhere")
    (saved / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(jaxmoe.CheckpointError, match=r"not a readable safetensors file"):
        load_quantized(saved)


def test_saving_refuses_to_overwrite_and_refuses_a_qat_model(saved, tiny_model):
    quantized = load_quantized(saved)
    with pytest.raises(FileExistsError, match=r"already exists and is not empty; pass overwrite=True"):
        save_quantized(quantized, saved)
    save_quantized(quantized, saved, overwrite=True, format="orbax")
    assert (saved / "state").is_dir() and not (saved / "model.safetensors").exists()
    qat = apply_qat(tiny_model("tiny-moe"), bits=2, group_size=32, target="experts")
    with pytest.raises(ValueError, match=r"prepared for QAT .*quantize it with its QAT settings first"):
        save_quantized(qat, saved.parent / "qat")
    with pytest.raises(ValueError, match=r"format='zarr'"):
        save_quantized(quantized, saved.parent / "z", format="zarr")
