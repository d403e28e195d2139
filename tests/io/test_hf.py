"""Hugging Face checkpoint folders: save_hf / load_hf agree with transformers (the oracle), and bad input fails
with a message that names the problem.

Real-size presets are only ever built abstractly (nnx.eval_shape, torch's meta device); weights stay tiny.
"""

import copy
import json
import math
import os
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import jaxmoe
from conftest import hf_model
from jaxmoe import CheckpointError, Phi3ForCausalLM, get_preset, load_hf, save_hf
from jaxmoe.config import PRESETS
from jaxmoe.io.hf import config_from_hf, config_to_hf

TOL = 1e-4
TIED, UNTIED = "gqa_partial_longrope_tied", "gqa_full_longrope_untied"


@nnx.jit
def _forward(model, ids):
    return model(ids).logits


def _logits(model, ids) -> np.ndarray:
    # Jitted: one compile per model shape is several times faster than op-by-op dispatch at these sizes.
    return np.asarray(_forward(model, jnp.asarray(ids, jnp.int32)))


def _torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids, np.int64))).logits.float().numpy()


def _from_pretrained(folder):
    return transformers.Phi3ForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def _randomize(model, seed: int = 0):
    """Parameters large enough that a wrong layout or rotation would show in the logits (init is N(0, 0.02))."""
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    leaves, treedef = jax.tree.flatten(pure)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [0.3 * jax.random.normal(k, x.shape, x.dtype) if x.ndim > 1
              else jax.random.uniform(k, x.shape, x.dtype, 0.5, 1.5) for k, x in zip(keys, leaves)]
    nnx.replace_by_pure_dict(state, jax.tree.unflatten(treedef, leaves))
    nnx.update(model, state)
    return model


def _params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _ids(rng, vocab, length, batch=2):
    return rng.integers(0, vocab, size=(batch, length))


# ------------------------------------------------------------------------------------ save_hf -> transformers


@pytest.mark.parametrize("name", [pytest.param(TIED, marks=pytest.mark.slow), UNTIED])
def test_save_hf_loads_in_transformers_with_same_logits(name, hf_checkpoint, tmp_path, rng):
    model = load_hf(hf_checkpoint(name))
    save_hf(model, tmp_path / "out")
    reference = _from_pretrained(tmp_path / "out")
    assert config_from_hf(reference.config.to_dict()) == model.config
    for length in (12, 40):  # 40 > original_max_position_embeddings=16: LongRoPE long factors
        ids = _ids(rng, model.config.vocab_size, length)
        assert np.abs(_logits(model, ids) - _torch_logits(reference, ids)).max() <= TOL


@pytest.mark.parametrize("preset", ["tiny", pytest.param("tiny-untied", marks=pytest.mark.slow)])
def test_fresh_model_saves_to_transformers_with_same_logits(preset, tmp_path, rng):
    model = _randomize(Phi3ForCausalLM(get_preset(preset), rngs=nnx.Rngs(0)))
    save_hf(model, tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", framework="np") as f:
        assert ("lm_head.weight" in f.keys()) == (not model.config.tie_word_embeddings)
    reference = _from_pretrained(tmp_path / "out")
    for length in (12, 40):  # tiny: original_max_position_embeddings=32
        ids = _ids(rng, model.config.vocab_size, length)
        assert np.abs(_logits(model, ids) - _torch_logits(reference, ids)).max() <= TOL
    back = load_hf(tmp_path / "out")
    assert back.config == model.config
    jax.tree.map(np.testing.assert_array_equal, _params(back), _params(model))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_round_trips_through_config_json_and_transformers(name):
    config = get_preset(name)
    assert config_from_hf(config_to_hf(config)) == config
    assert config_from_hf(json.loads(json.dumps(config_to_hf(config)))) == config
    # transformers rewrites config.json in its own (v5 rope_parameters) format; that must read back too.
    hf_class = transformers.Phi3Config if config.moe is None else transformers.PhimoeConfig
    assert config_from_hf(hf_class(**config_to_hf(config)).to_dict()) == config


def test_non_default_longrope_attention_factor_reaches_transformers(tmp_path, rng):
    tiny = get_preset("tiny")
    config = tiny.replace(longrope=jaxmoe.LongRoPE(tiny.longrope.short_factor, tiny.longrope.long_factor,
                                                   tiny.longrope.original_max_position_embeddings, 1.3))
    assert config_from_hf(config_to_hf(config)) == config
    _, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](transformers.Phi3Config(**config_to_hf(config)), "cpu")
    assert attention_factor == pytest.approx(1.3)
    model = _randomize(Phi3ForCausalLM(config, rngs=nnx.Rngs(1)))
    save_hf(model, tmp_path / "out")
    ids = _ids(rng, config.vocab_size, 40)
    assert np.abs(_logits(model, ids) - _torch_logits(_from_pretrained(tmp_path / "out"), ids)).max() <= TOL


# ---------------------------------------------------------------------------------------------- sharding


def test_sharded_transformers_checkpoint_loads_with_identical_logits(hf_checkpoint, tmp_path, rng):
    hf_model(TIED).save_pretrained(tmp_path, max_shard_size="20KB")
    with open(tmp_path / "model.safetensors.index.json") as f:
        shard_files = set(json.load(f)["weight_map"].values())
    assert len(shard_files) > 1 and not (tmp_path / "model.safetensors").exists()
    sharded, single = load_hf(tmp_path), load_hf(hf_checkpoint(TIED))
    jax.tree.map(np.testing.assert_array_equal, _params(sharded), _params(single))
    ids = _ids(rng, 128, 40)
    np.testing.assert_array_equal(_logits(sharded, ids), _logits(single, ids))
    assert np.abs(_logits(sharded, ids) - _torch_logits(hf_model(TIED), ids)).max() <= TOL


def test_save_hf_writes_shards_that_transformers_loads(hf_checkpoint, tmp_path, rng):
    model = load_hf(hf_checkpoint(UNTIED))
    limit = 16 * 1024
    save_hf(model, tmp_path / "out", max_shard_bytes=limit)
    folder = tmp_path / "out"
    with open(folder / "model.safetensors.index.json") as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (folder / "model.safetensors").exists()
    assert sorted(p.name for p in folder.glob("*.safetensors")) == files
    total = 0
    for file in files:
        tensors = load_file(folder / file)
        assert set(tensors) == {n for n, f in index["weight_map"].items() if f == file}
        size = sum(t.nbytes for t in tensors.values())
        assert size <= limit or len(tensors) == 1  # one tensor larger than the limit gets a shard of its own
        total += size
    assert index["metadata"]["total_size"] == total
    ids = _ids(rng, 128, 40)
    assert np.abs(_logits(model, ids) - _torch_logits(_from_pretrained(folder), ids)).max() <= TOL
    jax.tree.map(np.testing.assert_array_equal, _params(load_hf(folder)), _params(model))


# -------------------------------------------------------------------------------------------- bfloat16


def _assert_bf16_close(logits_bf16, logits_fp32, torch_bf16):
    """As close to the fp32 logits as transformers' own bfloat16 forward is."""
    ours, theirs = np.abs(logits_bf16 - logits_fp32), np.abs(torch_bf16 - logits_fp32)
    assert ours.mean() <= 2 * theirs.mean() and ours.max() <= 2 * theirs.max()


def test_load_hf_bfloat16_from_fp32_checkpoint(hf_checkpoint, rng):
    model = load_hf(hf_checkpoint(TIED), dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(_params(model))} == {jnp.dtype(jnp.bfloat16)}
    expected = hf_model(TIED).model.layers[0].self_attn.qkv_proj.weight.detach().to(torch.bfloat16)
    got = np.asarray(model.layers[0].self_attn.qkv_proj.kernel[...]).T
    np.testing.assert_array_equal(got.view(np.uint16), expected.view(torch.int16).numpy().view(np.uint16))
    ids = _ids(rng, 128, 40)
    reference_bf16 = copy.deepcopy(hf_model(TIED)).to(torch.bfloat16)
    _assert_bf16_close(_logits(model, ids), _torch_logits(hf_model(TIED), ids), _torch_logits(reference_bf16, ids))


def test_load_hf_reads_bfloat16_checkpoint_as_stored(tmp_path, rng):
    reference_bf16 = copy.deepcopy(hf_model(UNTIED)).to(torch.bfloat16)
    reference_bf16.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    model = load_hf(tmp_path, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(_params(model))} == {jnp.dtype(jnp.bfloat16)}
    stored = reference_bf16.lm_head.weight.detach().view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(np.asarray(model.lm_head.kernel[...]).T.view(np.uint16), stored)
    ids = _ids(rng, 128, 40)
    _assert_bf16_close(_logits(model, ids), _torch_logits(hf_model(UNTIED), ids), _torch_logits(reference_bf16, ids))
    upcast = load_hf(tmp_path)  # float32 parameters holding exactly the stored bfloat16 values
    assert np.asarray(upcast.lm_head.kernel[...]).dtype == np.float32
    np.testing.assert_array_equal(np.asarray(upcast.lm_head.kernel[...]),
                                  np.asarray(model.lm_head.kernel[...]).astype(np.float32))


# ------------------------------------------------------------------------------------- real-size presets


def _jax_param_count(config) -> int:
    abstract = nnx.eval_shape(lambda: Phi3ForCausalLM(config, rngs=nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def _torch_param_count(config) -> int:
    with torch.device("meta"):
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**config_to_hf(config)))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["phi4-mini", "phi3.5-mini"])
def test_real_preset_parameter_count_matches_transformers(name):
    config = get_preset(name)
    assert _jax_param_count(config) == _torch_param_count(config)


def test_phi4_mini_has_its_published_parameter_count():
    assert _jax_param_count(get_preset("phi4-mini")) == 3_836_021_760


# microsoft/Phi-4-mini-instruct config.json (legacy format, as published; transformers 4.45).
_PHI4_MINI_LONG_FACTOR = [
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649, 2.446418898,
    2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845, 5.351743533, 5.984965424,
    6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651, 14.64173252,
    16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23,
    32.6, 32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
]
PHI4_MINI_CONFIG_JSON = {
    "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config", "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM",
                 "AutoTokenizer": "Xenova/gpt-4o"},
    "bos_token_id": 199999, "embd_pdrop": 0.0, "eos_token_id": 199999, "full_attn_mod": 1, "hidden_act": "silu",
    "hidden_size": 3072, "initializer_range": 0.02, "intermediate_size": 8192, "interpolate_factor": 1,
    "lm_head_bias": False, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "phi3",
    "num_attention_heads": 24, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "original_max_position_embeddings": 4096, "pad_token_id": 199999, "partial_rotary_factor": 0.75,
    "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
    "rope_scaling": {"long_factor": _PHI4_MINI_LONG_FACTOR, "short_factor": [1.0] * 48, "type": "longrope"},
    "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0", "use_cache": True, "vocab_size": 200064,
}


@pytest.mark.parametrize("eos", [199999, 200020])  # first release: <|endoftext|>; later revision: <|end|>
def test_phi4_mini_config_json_reads_as_the_preset(eos):
    """The preset's eos ids are the union of both revisions' (the generation stop set); the rest is identical."""
    preset = get_preset("phi4-mini")
    config = config_from_hf({**PHI4_MINI_CONFIG_JSON, "eos_token_id": eos})
    assert config.eos_token_id == (eos,) and eos in preset.eos_token_id
    assert config == preset.replace(eos_token_id=(eos,))


@pytest.mark.parametrize("name", ["phi4-mini", "phi3.5-mini"])
def test_longrope_attention_factor_matches_transformers(name):
    config = get_preset(name)
    hf_config = transformers.Phi3Config(**config_to_hf(config))
    assert hf_config.rope_parameters["rope_type"] == "longrope"
    assert hf_config.rope_parameters["partial_rotary_factor"] == config.partial_rotary_factor
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](hf_config, "cpu")
    assert inv_freq.shape == (config.rotary_dim // 2,)
    assert attention_factor == pytest.approx(config.longrope.attention_factor, abs=1e-12)
    assert config.longrope.attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)), abs=1e-12)
    assert config.longrope.attention_factor == pytest.approx(1.1902380714, abs=1e-10)


# ------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def checkpoint_copy(hf_checkpoint, tmp_path):
    """A writable copy of the tiny untied checkpoint."""
    return shutil.copytree(hf_checkpoint(UNTIED), tmp_path / "ckpt")


def test_missing_config_json_is_named(checkpoint_copy):
    (checkpoint_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json in"):
        load_hf(checkpoint_copy)


def test_missing_folder_is_named(tmp_path):
    folder = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=r"nowhere'? does not exist"):
        load_hf(folder)


def test_unknown_model_type_is_named(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    (checkpoint_copy / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="unknown model_type 'llama'"):
        load_hf(checkpoint_copy)


def test_config_json_without_required_key_is_named(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    del config["hidden_size"]
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json lacks hidden_size"):
        load_hf(checkpoint_copy)


def test_missing_shard_is_named(hf_checkpoint, tmp_path):
    folder = tmp_path / "sharded"
    hf_model(UNTIED).save_pretrained(folder, max_shard_size="20KB")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names shard '{shard.name}', which is not in the folder"):
        load_hf(folder)


def test_saved_folder_has_the_usual_permissions(tmp_path):
    model = Phi3ForCausalLM(get_preset("tiny"), rngs=nnx.Rngs(0))
    folder = save_hf(model, tmp_path / "saved")
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask


def test_generation_config_eos_ids_reach_the_model_config(checkpoint_copy):
    """transformers' generate stops on generation_config.json's eos ids; so does a loaded model."""
    (checkpoint_copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert load_hf(checkpoint_copy).config.eos_token_id == (2, 7)


def test_missing_tensor_is_named(checkpoint_copy):
    tensors = load_file(checkpoint_copy / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, checkpoint_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight'.*missing"):
        load_hf(checkpoint_copy)


def test_misshaped_tensor_names_tensor_and_both_shapes(checkpoint_copy):
    tensors = load_file(checkpoint_copy / "model.safetensors")
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (48, 64)
    tensors["model.layers.0.mlp.down_proj.weight"] = np.zeros((48, 63), np.float32)
    save_file(tensors, checkpoint_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as error:
        load_hf(checkpoint_copy)
    message = str(error.value)
    assert "'model.layers.0.mlp.down_proj.weight'" in message
    assert "[48, 63]" in message and "[48, 64]" in message


def test_extra_layer_in_checkpoint_is_named(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    (checkpoint_copy / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.1\."):
        load_hf(checkpoint_copy)


class _Canary:
    """Unpickling this creates the file `path`: proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickle_only_checkpoint_is_refused_without_unpickling(checkpoint_copy, tmp_path):
    (checkpoint_copy / "model.safetensors").unlink()
    canary = tmp_path / "unpickled"
    (checkpoint_copy / "pytorch_model.bin").write_bytes(pickle.dumps(_Canary(canary)))
    with pytest.raises(CheckpointError) as error:
        load_hf(checkpoint_copy)
    message = str(error.value)
    assert "pytorch_model.bin" in message and "pickle" in message and "safetensors" in message
    assert not canary.exists()


def test_save_hf_refuses_non_empty_folder_and_leaves_it_untouched(hf_checkpoint, tmp_path):
    model = load_hf(hf_checkpoint(TIED))
    target = tmp_path / "existing"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_hf(model, target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]


def test_save_hf_overwrite_replaces_folder_and_leaves_no_temporaries(hf_checkpoint, tmp_path, rng):
    model = load_hf(hf_checkpoint(TIED))
    target = tmp_path / "existing"
    target.mkdir()
    (target / "notes.txt").write_text("old")
    save_hf(model, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]
    ids = _ids(rng, 128, 12)
    np.testing.assert_array_equal(_logits(load_hf(target), ids), _logits(model, ids))


def test_save_hf_failure_keeps_old_folder_and_leaves_no_temporaries(hf_checkpoint, tmp_path, monkeypatch):
    model = load_hf(hf_checkpoint(TIED))
    target = tmp_path / "existing"
    target.mkdir()
    (target / "notes.txt").write_text("old")

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("jaxmoe.io.hf.save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_hf(model, target, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["notes.txt"] and (target / "notes.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]


@pytest.mark.parametrize("bad", [128, 1000, -1])
def test_token_id_outside_vocabulary_is_named(hf_checkpoint, bad):
    model = load_hf(hf_checkpoint(TIED))
    with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
        model(jnp.asarray([[3, bad, 5]], jnp.int32))
