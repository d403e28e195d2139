"""The training job end to end: exact resume after SIGKILL, save-before-exit on SIGTERM, a corrupted latest
checkpoint, divergence, LoRA fine-tuning, data parallelism, and the errors for bad configs and data.

Compiling a train step costs far more than running these tiny ones, so the in-process tests share one run of
`base_config` (`finished_run`) and one on a mesh (`mesh_run`): they read or copy those folders, and the runs they
make themselves use the same model and optimizer settings, so they reuse the compiled steps."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from jaxmoe.demo import write_corpus
from jaxmoe.train import data as data_lib
from jaxmoe.train.checkpoint import CheckpointMismatchError
from jaxmoe.train.metrics import read_metrics
from jaxmoe.train.run_config import ConfigError, load_run_config, run_config_from_dict
from jaxmoe.train.trainer import TrainingDivergedError, train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Small English -> Zentish train / valid / test files."""
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(folder, seed=3, sizes=dict(train=400, valid=24, test=8))
    return folder


def base_config(corpus: Path, run_dir: Path, **sections) -> dict:
    config = {
        "run_dir": str(run_dir), "seed": 1, "log_every": 1, "progress": False,
        "model": {"preset": "tiny-moe", "overrides": {"hidden_size": 32, "intermediate_size": 48, "num_layers": 1,
                                                      "max_position_embeddings": 80}},
        "tokenizer": {"bpe_vocab_size": 300},
        "data": {"train": {"src": str(corpus / "train.en"), "tgt": str(corpus / "train.zt")},
                 "valid": {"src": str(corpus / "valid.en"), "tgt": str(corpus / "valid.zt")},
                 "test": {"src": str(corpus / "test.en"), "tgt": str(corpus / "test.zt")},
                 "src_lang": "en", "tgt_lang": "zt", "prompt": "{src} =>", "max_len": 64,
                 "data_dir": str(corpus / "tfds")},
        "optim": {"steps": 6, "batch_size": 4, "warmup_steps": 1, "learning_rate": 3e-3},
        "checkpoint": {"every": 2, "keep_last": 2, "keep_best": 1},
        "eval": {"every": 2, "translate": 4, "max_new_tokens": 8, "batch_size": 4},
    }
    for name, values in sections.items():
        config[name] = {**config[name], **values} if isinstance(config.get(name), dict) else values
    return config


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"}


# ------------------------------------------------------------------ crash, preemption, resume (subprocesses)


def start_cli(config: dict, folder: Path) -> subprocess.Popen:
    path = folder / f"{Path(config['run_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(config))
    # One device; machine code unoptimised as in tests/conftest.py (quicker compiles).
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    return subprocess.Popen([sys.executable, "-m", "jaxmoe.cli", "train", "--config", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(process: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(train_losses(run_dir), default=0) >= step:
            return
        if process.poll() is not None:
            raise AssertionError(f"training ended before step {step}: {process.stderr.read()[-2000:]}")
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"step {step} not reached in {timeout} s")


LONG = {"optim": {"steps": 300, "batch_size": 4, "warmup_steps": 10, "learning_rate": 3e-3},
        "checkpoint": {"every": 20, "keep_last": 2, "keep_best": 1}, "eval": {"every": 0, "translate": 0}}


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    process = start_cli(base_config(corpus, folder / "run", **LONG), folder)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return train_losses(folder / "run")


def resume_and_compare(config: dict, folder: Path, uninterrupted: dict[int, float], expected: str) -> None:
    """Runs `config` again to the end; every step's loss must equal the uninterrupted run's."""
    process = start_cli(config, folder)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert expected in out
    resumed = train_losses(Path(config["run_dir"]))
    assert sorted(resumed) == list(range(1, 301))
    np.testing.assert_allclose([resumed[s] for s in range(1, 301)], [uninterrupted[s] for s in range(1, 301)],
                               rtol=0, atol=1e-6)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_repeats_the_uninterrupted_losses(corpus, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    config = base_config(corpus, run_dir, **LONG)
    process = start_cli(config, tmp_path)
    wait_for_step(process, run_dir, 130)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(train_losses(run_dir))
    assert killed_at < 300, "the run finished before the kill; the test proves nothing"

    resume_and_compare(config, tmp_path, uninterrupted, "resumed from step")


@pytest.mark.slow
def test_sigterm_saves_the_current_step_before_exiting(corpus, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    config = base_config(corpus, run_dir, **LONG)
    process = start_cli(config, tmp_path)
    wait_for_step(process, run_dir, 50)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-3000:]
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    last_logged = max(train_losses(run_dir))
    assert saved[-1] == last_logged and last_logged % 20 != 0  # saved off the regular schedule, at the stop
    assert f"after saving step {last_logged}" in err

    resume_and_compare(config, tmp_path, uninterrupted, f"resumed from step {last_logged}")


# --------------------------------------------------------------------------------------- in-process runs

QUIET = {"every": 0, "translate": 0}  # validation at the last step only, no test translations


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory) -> Path:
    """The run folder of base_config trained to its end: 6 steps, validation every 2, checkpoints every 2 (the
    last 2 and the best kept), test translations, plots and the export."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train(base_config(corpus, run_dir), log=lambda _: None)
    return run_dir


@pytest.fixture(scope="module")
def mesh_run(corpus, tmp_path_factory) -> Path:
    """base_config's training on a data x expert mesh (the MoE blocks in a shard_map), run to its end."""
    run_dir = tmp_path_factory.mktemp("mesh") / "run"
    train(base_config(corpus, run_dir, eval=QUIET, mesh={"data": 2, "expert": 2}), log=lambda _: None)
    return run_dir


def test_a_run_trains_evaluates_exports_and_plots(finished_run):
    run_dir = finished_run
    summary = json.loads((run_dir / "summary.json").read_text())
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 7))
    assert np.isfinite(summary["valid_loss"]) and 0 <= summary["test_bleu"] <= 100
    for name in ("loss.png", "expert_load.png"):
        assert (run_dir / name).read_bytes()[:4] == b"\x89PNG"
    assert list((run_dir / "tb").iterdir())
    assert len((run_dir / "test.hyp.txt").read_text().splitlines()) == 4
    import jaxmoe
    model = jaxmoe.load_hf(run_dir / "model")
    assert model.config.moe is not None and (run_dir / "model" / "tokenizer.json").exists()
    valid = {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == "valid"}
    assert sorted(valid) == [2, 4, 6] and summary["valid_loss"] == valid[6]
    best = min(valid, key=valid.get)
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == sorted({4, 6, best})  # last 2 + best


@pytest.mark.slow  # 8-12 s: kept out of the default tier's 8-minute budget
def test_a_model_transformers_has_no_class_for_is_exported_in_jaxmoe_format(corpus, tmp_path):
    """A dense model with LayerNorm and biases (the MoQE dense twin) has no Phi3ForCausalLM form."""
    import jaxmoe
    from jaxmoe.quant.checkpoint import is_jaxmoe_checkpoint
    logs = []
    overrides = {"hidden_size": 32, "intermediate_size": 48, "max_position_embeddings": 80, "moe": None}
    train(base_config(corpus, tmp_path / "run", model={"overrides": overrides},
                      optim={"steps": 2, "warmup_steps": 1},
                      eval=QUIET), log=logs.append)
    export = tmp_path / "run" / "model"
    assert is_jaxmoe_checkpoint(export) and (export / "tokenizer.json").exists()
    assert any("jaxmoe's format: norm='layer'" in line for line in logs)
    model = jaxmoe.load_model(export)
    assert model.config.moe is None and model.config.norm == "layer" and model.config.attention_bias
    assert np.isfinite(np.asarray(model(np.array([[1, 2, 3]], np.int32)).logits)).all()
    with pytest.raises(ValueError, match=r"norm='layer'.*no counterpart in Phi3ForCausalLM.*save_quantized"):
        jaxmoe.save_hf(model, tmp_path / "hf")


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # orbax's abandoned reads closed
def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(corpus, finished_run, tmp_path):
    run_dir = shutil.copytree(finished_run, tmp_path / "run")
    uninterrupted = train_losses(run_dir)
    latest = run_dir / "checkpoints" / "6" / "state"
    data_files = [p for p in latest.rglob("*") if p.is_file() and p.parent.name == "d"]
    biggest = max(data_files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])  # half-written array data
    # A save that died mid-way leaves orbax's temporary folder, which must be ignored.
    shutil.copytree(run_dir / "checkpoints" / "4", run_dir / "checkpoints" / "8.orbax-checkpoint-tmp-1")
    logs = []
    with pytest.warns(RuntimeWarning, match=r"(?s)checkpoint step 6 .* unreadable or corrupted .* moved it to .* falling back to step 4"):
        train(base_config(corpus, run_dir, eval=QUIET), log=logs.append)
    assert any("resumed from step 4" in line for line in logs)
    resumed = train_losses(run_dir)
    assert sorted(resumed) == list(range(1, 7))
    # Steps 5 and 6 again, from step 4's parameters, optimizer moments and data position: the same losses.
    np.testing.assert_allclose([resumed[s] for s in (5, 6)], [uninterrupted[s] for s in (5, 6)], rtol=0, atol=1e-6)


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    run_dir = tmp_path / "run"
    config = base_config(corpus, run_dir, optim={"steps": 8, "learning_rate": 1e30, "warmup_steps": 0},
                         checkpoint={"every": 1})
    with pytest.raises(TrainingDivergedError, match=r"training diverged at step (\d+).*last good checkpoint is step"):
        train(config, log=lambda _: None)
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps, "at least one good step was saved before the divergence"
    from jaxmoe.train.checkpoint import Checkpointer
    from jaxmoe.train.loop import TrainConfig, make_optimizer
    from jaxmoe.train.trainer import build_model
    from jaxmoe.io.tokenizer import Tokenizer

    rc = run_config_from_dict(config)
    model = build_model(rc, Tokenizer.from_folder(run_dir / "tokenizer"))
    optimizer = make_optimizer(model, TrainConfig(total_steps=8, warmup_steps=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # intact: restores without falling back
        restored = Checkpointer(run_dir / "checkpoints").restore_latest(model, optimizer)
    assert restored.step == steps[-1]
    from flax import nnx
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    losses = train_losses(run_dir)
    assert all(np.isfinite(losses[s]) for s in steps)


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_lora_fine_tuning_trains_only_adapters_and_exports_a_merged_model(corpus, finished_run, tmp_path):
    config = base_config(corpus, tmp_path / "lora", optim={"steps": 4, "warmup_steps": 0}, eval=QUIET)
    config["model"] = {"init_from": str(finished_run / "model"), "lora": {"rank": 4, "alpha": 8.0,
                                                                           "targets": ["qkv_proj", "o_proj"]}}
    config["tokenizer"] = {}
    logs = []
    train(config, log=logs.append)
    assert any("parameters (" in line and "trained)" in line for line in logs)
    line = next(line for line in logs if "trained)" in line)
    total, trained = (int(x.replace(",", "")) for x in
                      line.split(": ", 1)[1].split(" parameters (")[0:1] + [line.split("(")[1].split(" trained")[0]])
    assert 0 < trained < total / 5
    import jaxmoe
    base = jaxmoe.load_hf(finished_run / "model")
    tuned = jaxmoe.load_hf(tmp_path / "lora" / "model")
    np.testing.assert_array_equal(np.asarray(base.lm_head.kernel[...]), np.asarray(tuned.lm_head.kernel[...]))
    assert not np.array_equal(np.asarray(base.layers[0].self_attn.qkv_proj.kernel[...]),
                              np.asarray(tuned.layers[0].self_attn.qkv_proj.kernel[...]))


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_a_mesh_gives_the_single_device_losses(finished_run, mesh_run):
    """Data x expert parallel (the batch split over both axes, the MoE blocks in a shard_map): the same losses
    step by step."""
    single, sharded = train_losses(finished_run), train_losses(mesh_run)
    np.testing.assert_allclose([sharded[s] for s in range(1, 7)], [single[s] for s in range(1, 7)], rtol=1e-5)


@pytest.mark.slow  # a compile of its own for a case the data x expert mesh above contains (its data axis)
def test_a_data_parallel_mesh_gives_the_single_device_losses(corpus, finished_run, tmp_path):
    train(base_config(corpus, tmp_path / "data", eval=QUIET, mesh={"data": 2}), log=lambda _: None)
    single, sharded = train_losses(finished_run), train_losses(tmp_path / "data")
    np.testing.assert_allclose([sharded[s] for s in range(1, 7)], [single[s] for s in range(1, 7)], rtol=1e-5)


# -------------------------------------------------------------------------------------------- bad input


def test_unknown_config_key_lists_the_valid_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.stepz'; valid keys in optim: steps, batch_size"):
        load_run_config(path)
    with pytest.raises(ConfigError, match=r"unknown config key 'modle'; valid keys: run_dir, seed"):
        load_run_config(None, ["modle.preset=tiny"])
    with pytest.raises(ConfigError, match=r"'model.overrides.hidden_sise'.*hidden_size"):
        load_run_config(None, ["model.overrides.hidden_sise=3", "data.train.text=x", "tokenizer.bpe_vocab_size=300"])


def test_missing_data_file_is_named(corpus, tmp_path):
    config = base_config(corpus, tmp_path / "run")
    config["data"]["train"] = {"src": str(tmp_path / "nope.en"), "tgt": str(corpus / "train.zt")}
    with pytest.raises(FileNotFoundError, match="nope.en"):
        train(config, log=lambda _: None)


def test_misaligned_parallel_files_name_both_line_counts(corpus, tmp_path):
    short = tmp_path / "short.zt"
    short.write_text("".join((corpus / "train.zt").read_text().splitlines(keepends=True)[:399]))
    config = base_config(corpus, tmp_path / "run")
    config["data"]["train"] = {"src": str(corpus / "train.en"), "tgt": str(short)}
    with pytest.raises(data_lib.DataError, match=r"has 400 lines but .*short.zt' has 399"):
        train(config, log=lambda _: None)


def test_empty_parallel_file_is_an_error(corpus, tmp_path):
    empty = tmp_path / "empty.en"
    empty.write_text("")
    config = base_config(corpus, tmp_path / "run")
    config["data"]["train"] = {"src": str(empty), "tgt": str(corpus / "train.zt")}
    with pytest.raises(data_lib.DataError, match="empty"):
        train(config, log=lambda _: None)


def test_a_model_that_does_not_fit_the_checkpoint_is_refused(corpus, finished_run, tmp_path):
    run_dir = shutil.copytree(finished_run, tmp_path / "run")
    bigger = base_config(corpus, run_dir, eval=QUIET)
    bigger["model"]["overrides"]["num_layers"] = 2
    with pytest.raises(ConfigError, match=r"was started with another model.*num_layers"):
        train(bigger, log=lambda _: None)
    (run_dir / "run_config.yaml").unlink()  # without the record, the checkpoint's own shapes still tell
    with pytest.raises(CheckpointMismatchError, match=r"does not fit the model.*not in the checkpoint"):
        train(bigger, log=lambda _: None)


@pytest.mark.slow  # 8-12 s: kept out of the default tier's 8-minute budget
def test_bf16_compute_with_accumulation_keeps_fp32_master_weights(corpus, tmp_path):
    config = base_config(corpus, tmp_path / "run", optim={"steps": 3, "warmup_steps": 0, "grad_accum": 2},
                         eval=QUIET)
    config["model"]["compute_dtype"] = "bfloat16"
    train(config, log=lambda _: None)
    losses = train_losses(tmp_path / "run")
    assert sorted(losses) == [1, 2, 3] and all(np.isfinite(v) for v in losses.values())
    header = (tmp_path / "run" / "model" / "model.safetensors").read_bytes()
    size = int.from_bytes(header[:8], "little")
    dtypes = {v["dtype"] for k, v in json.loads(header[8:8 + size]).items() if k != "__metadata__"}
    assert dtypes == {"F32"}


def test_a_tfds_name_that_is_not_prepared_says_what_is_needed(corpus, tmp_path):
    config = base_config(corpus, tmp_path / "run")
    config["data"]["train"] = {"tfds": "wmt19_translate/de-en", "split": "train"}
    config["data"]["data_dir"] = str(tmp_path / "empty_tfds")
    with pytest.raises(FileNotFoundError, match=r"(?s)'wmt19_translate/de-en' is not prepared in .*needs a machine "
                                                r"with internet.*TensorFlow"):
        train(config, log=lambda _: None)


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_a_run_on_a_mesh_resumes_exactly(corpus, mesh_run, tmp_path):
    """Sharded parameters and optimizer state go back onto the mesh from the checkpoint."""
    part = shutil.copytree(mesh_run, tmp_path / "part")
    shutil.rmtree(part / "checkpoints" / "6")  # as if the run had stopped after step 4's save
    logs = []
    train(base_config(corpus, part, eval=QUIET, mesh={"data": 2, "expert": 2}), log=logs.append)
    assert any("resumed from step 4" in line for line in logs)
    full, resumed = train_losses(mesh_run), train_losses(part)
    assert sorted(resumed) == list(range(1, 7))
    np.testing.assert_allclose([resumed[s] for s in range(1, 7)], [full[s] for s in range(1, 7)], rtol=0, atol=1e-6)


def test_build_model_on_a_mesh_creates_the_parameters_in_their_shardings(corpus, tmp_path):
    from jaxmoe import sharding
    from jaxmoe.io.bpe import train_bpe
    from jaxmoe.train.trainer import build_model

    tokenizer = train_bpe((corpus / "train.en").read_text().splitlines(), vocab_size=300)
    config = run_config_from_dict(base_config(corpus, tmp_path / "run"))
    mesh = sharding.make_mesh(data=2, expert=4)
    model = build_model(config, tokenizer, mesh)
    w = model.layers[0].mlp.w_gate_up[...]
    assert w.sharding.spec[0] == "expert" and len(w.sharding.device_set) == 8
    assert model.layers[0].mlp.mesh is mesh
    plain = build_model(config, tokenizer)  # the same draws as the one-device model (compiled: last-bit rounding)
    np.testing.assert_allclose(np.asarray(w), np.asarray(plain.layers[0].mlp.w_gate_up[...]), rtol=1e-6, atol=1e-8)
