"""Run configs: YAML plus dotted overrides, typed, every key checked against the schema."""

import pytest

from jaxmoe.train.run_config import ConfigError, load_run_config, parse_overrides, run_config_from_dict

MINIMAL = {"data": {"train": {"text": "corpus.txt"}}, "tokenizer": {"bpe_vocab_size": 300}}


def test_overrides_parse_as_yaml_scalars_into_nested_keys():
    assert parse_overrides(["optim.steps=20", "data.pack=false", "model.overrides.rope_theta=1e4", "run_dir=x"]) == {
        "optim": {"steps": 20}, "data": {"pack": False}, "model": {"overrides": {"rope_theta": 1e4}}, "run_dir": "x"}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["optim.steps"])


def test_yaml_paths_are_relative_to_the_file_and_overrides_win(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  train: {src: a.de, tgt: a.en}\n  src_lang: de\n  tgt_lang: en\n"
                                     "tokenizer: {bpe_vocab_size: 300}\noptim: {steps: 10, warmup_steps: 1}\n")
    config = load_run_config(tmp_path / "c.yaml", ["optim.steps=30", "optim.learning_rate=1e-2"])
    assert config.data.train == {"src": str(tmp_path / "a.de"), "tgt": str(tmp_path / "a.en")}
    assert config.optim.steps == 30 and config.optim.learning_rate == 0.01 and config.optim.warmup_steps == 1
    assert run_config_from_dict(config.to_dict()) == config  # the dict form (run_config.yaml) round-trips


@pytest.mark.parametrize("values, message", [
    ({"optim": {"steps": "ten"}}, r"optim.steps: expected an integer, got 'ten'"),
    ({"optim": {"schedule": "step"}}, r"optim.schedule='step'; expected cosine, linear or inverse_sqrt"),
    ({"optim": {"steps": 10, "warmup_steps": 10}}, r"expected 0 <= warmup_steps < steps"),
    ({"model": {"preset": "huge"}}, r"model.preset='huge'; expected one of"),
    ({"model": {"compute_dtype": "float16"}}, r"expected float32 or bfloat16"),
    ({"model": {"init_from": "ckpt", "overrides": {"num_layers": 2}}}, r"the checkpoint fixes the architecture"),
    ({"mesh": {"data": 3}}, r"mesh.data x mesh.fsdp x mesh.expert = 3 with optim.batch_size=16"),
    ({"data": {"train": {}}}, r"data.train is empty"),
    ({"tokenizer": {"bpe_vocab_size": None}}, r"no tokenizer"),
    ({"eval": {"max_new_tokens": 0}}, r"eval.max_new_tokens=0; expected an integer >= 1"),
    ({"checkpoint": {"keep": 3}}, r"unknown config key 'checkpoint.keep'; valid keys in checkpoint: every, keep_last"),
])
def test_bad_values_are_named_with_what_is_expected(values, message):
    merged = {**MINIMAL, **{k: {**MINIMAL.get(k, {}), **v} for k, v in values.items()}}
    with pytest.raises(ConfigError, match=message):
        run_config_from_dict(merged)


def test_missing_config_file_points_to_the_presets(tmp_path):
    with pytest.raises(FileNotFoundError, match="experiments/configs"):
        load_run_config(tmp_path / "nope.yaml")
