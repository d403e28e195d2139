"""experiments/mt/dry_run.py: trainable counts against the hand formula, and a compiled step's memory."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from jaxmoe.config import get_preset
from jaxmoe.train.run_config import run_config_from_dict

SCRIPT = Path(__file__).parents[2] / "experiments" / "mt" / "dry_run.py"
LORA = {"rank": 16, "alpha": 32, "targets": ["down_proj"]}


@pytest.fixture(scope="module")
def dry_run():
    """The script as a module. Importing it sets JAX_PLATFORMS and XLA_FLAGS for the process it starts in; jax is
    already running here, and the suite's environment is put back for whatever the tests start later."""
    saved = dict(os.environ)
    try:
        spec = importlib.util.spec_from_file_location("mt_dry_run", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return module


def lora_config(max_len: int = 64, batch_size: int = 2):
    return run_config_from_dict({
        "model": {"preset": "tiny", "compute_dtype": "bfloat16", "lora": LORA},
        "tokenizer": {"bpe_vocab_size": 512},
        "data": {"train": {"text": "train.txt"}, "max_len": max_len},
        "optim": {"batch_size": batch_size, "steps": 10, "warmup_steps": 1},
    })


def phi3_parameters(c) -> int:
    """A dense Phi-3 decoder's parameters by hand: per layer the fused qkv, o, fused gate_up and down projections
    and two RMSNorm gains; the embedding table, the final norm, an untied lm_head."""
    qkv = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    attention = qkv + c.num_heads * c.head_dim * c.hidden_size
    mlp = 3 * c.hidden_size * c.intermediate_size
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    return c.num_layers * (attention + mlp + 2 * c.hidden_size) + c.vocab_size * c.hidden_size + c.hidden_size + head


def down_proj_adapters(c, rank: int) -> int:
    """lora_a [f, r] and lora_b [r, d] on every layer's down_proj."""
    return c.num_layers * rank * (c.intermediate_size + c.hidden_size)


@pytest.mark.parametrize("preset", ["phi4-mini", "phi3.5-mini"])
def test_real_size_trainable_count_is_the_hand_formula(dry_run, preset):
    config = lora_config(max_len=512)
    model, _ = dry_run.abstract_training_state(dry_run.real_size_config(config, preset), config, lora=True,
                                               base_dtype="float32")
    total, trainable = dry_run.count_parameters(model, lora=True)
    c = get_preset(preset)
    assert trainable == down_proj_adapters(c, 16) == 32 * 16 * (8192 + 3072) == 5_767_168
    assert total == phi3_parameters(c) + trainable
    if preset == "phi4-mini":  # ALMA's LLaMA-2-7B: 7.7M of 6.7B ("0.1%"); phi4-mini's 3.8B give 0.15%
        assert total == 3_841_788_928
        assert round(100 * trainable / total, 3) == 0.150


def test_tiny_dry_run_counts_and_memory(dry_run, tmp_path, capsys):
    path = tmp_path / "lora.yaml"
    path.write_text(lora_config().to_yaml())
    out = tmp_path / "rows.jsonl"
    rows = dry_run.main(["--config", str(path), "--preset", "tiny", "--full", "--out", str(out)])

    c = get_preset("tiny")
    lora, full = rows
    assert (lora["tuning"], full["tuning"]) == ("lora r16 a32 down_proj", "full")
    assert lora["params_trainable"] == down_proj_adapters(c, 16)
    assert lora["params_total"] == phi3_parameters(c) + down_proj_adapters(c, 16)
    assert full["params_trainable"] == full["params_total"] == phi3_parameters(c)
    for row in rows:
        assert (row["batch"], row["seq"]) == (2, 64)
        assert min(row[k] for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes")) > 0
        # The step's arguments are the parameters, the optimizer state and the batch; donation aliases them.
        assert row["argument_bytes"] >= row["params_bytes"] + row["opt_state_bytes"]
        assert row["alias_bytes"] <= row["output_bytes"]
        assert row["peak_bytes"] == (row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"]
                                     + row["temp_bytes"])
        assert (row["h100"], row["v5p"]) == ("fits", "fits")
    assert lora["opt_state_bytes"] < full["opt_state_bytes"]
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert "| lora r16 a32 down_proj | float32 | 2 x 64 |" in capsys.readouterr().out


def test_max_len_beyond_the_preset_is_refused(dry_run):
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        dry_run.real_size_config(lora_config(max_len=512), "tiny")


@pytest.mark.slow
def test_phi4_mini_lora_step_at_one_by_512_fits_one_h100(dry_run):
    """The real-size compile (about 15 s on 2 CPU cores)."""
    (row,) = dry_run.dry_run(lora_config(max_len=512, batch_size=1), "phi4-mini")
    assert row["params_trainable"] == 5_767_168
    assert row["params_bytes"] == 4 * row["params_total"]
    assert row["params_bytes"] < row["peak_bytes"] < dry_run.CHIPS["h100"]
    assert row["h100"] == "fits"
