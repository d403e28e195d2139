"""Multi-host training, for real on one machine: two OS processes with two fake CPU devices each, joined by
`jax.distributed` (coordinator on localhost, gloo collectives) into one 4-device mesh, run
experiments/tpu_pod/launch.py; their losses, validation and export equal a one-process run on 4 devices, and so
does a resume from a checkpoint they both had to skip. Plus the per-process row selection (`host_rows`,
`BatchStream(rows=...)`) and the sharding-independent checkpoint fingerprint, on this process's 8 devices."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file

from jaxmoe import sharding
from jaxmoe.demo import write_corpus
from jaxmoe.train.batches import BatchStream, host_rows
from jaxmoe.train.checkpoint import _fingerprint
from jaxmoe.train.metrics import read_metrics
from jaxmoe.train.trainer import train

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------- which rows each process builds


def held_rows(sharding_, shape, devices, axis=0) -> list[int]:
    """Reference: the row numbers the devices hold once an array of row numbers is placed with `sharding_`."""
    numbers = np.arange(shape[axis]).reshape([-1 if a == axis else 1 for a in range(len(shape))])
    placed = jax.device_put(np.broadcast_to(numbers, shape).copy(), sharding_)
    rows = set()
    for shard in placed.addressable_shards:
        if shard.device in devices:
            rows.update(np.moveaxis(np.asarray(shard.data), axis, 0).reshape(shard.data.shape[axis], -1)[:, 0])
    return sorted(int(r) for r in rows)


@pytest.mark.parametrize("sizes, shuffled", [({"data": 8}, False), ({"data": 8}, True),
                                             ({"data": 2, "expert": 2, "tensor": 2}, False),
                                             ({"fsdp": 2, "tensor": 4}, True)])
def test_host_rows_are_the_rows_that_a_group_of_devices_holds(sizes, shuffled):
    devices = list(jax.devices()[:8])
    if shuffled:  # a mesh whose devices are not in process order: a process's rows are not one block
        devices = [devices[i] for i in np.random.default_rng(1).permutation(8)]
    mesh = sharding.make_mesh(**sizes, devices=devices)
    where = NamedSharding(mesh, sharding.batch_spec(mesh))
    processes = [jax.devices()[i:i + 2] for i in range(0, 8, 2)]  # 4 simulated processes of 2 devices each
    covered = set()
    for group in processes:
        rows = host_rows(where, (16, 5), devices=group)
        assert list(rows) == held_rows(where, (16, 5), group)
        covered.update(rows)
    assert covered == set(range(16))
    # grad accumulation: [micro, b, t], the rows along axis 1
    accum = NamedSharding(mesh, P(None, *sharding.batch_spec(mesh)))
    for group in processes:
        assert host_rows(accum, (3, 16, 5), axis=1, devices=group) == host_rows(where, (16, 5), devices=group)


def test_host_rows_errors_name_the_problem():
    mesh = sharding.make_mesh(data=4, devices=jax.devices()[:4])
    where = NamedSharding(mesh, sharding.batch_spec(mesh))
    with pytest.raises(ValueError, match=r"none of the devices \[7\] holds part"):
        host_rows(where, (8, 3), devices=[jax.devices()[7]])
    with pytest.raises(ValueError, match=r"axis=2 for a shape \(8, 3\)"):
        host_rows(where, (8, 3), axis=2)


def random_examples(rng, n=60, longest=9):
    """(ids, loss_mask) pairs of random lengths 1..longest+2 (some longer than max_len=longest: skipped)."""
    examples = []
    for _ in range(n):
        length = int(rng.integers(1, longest + 3))
        examples.append((rng.integers(3, 50, length).tolist(), rng.integers(0, 2, length).tolist()))
    return examples


@pytest.mark.parametrize("pack", [False, True])
def test_a_stream_of_some_rows_gives_those_rows_of_the_full_stream_and_the_same_state(rng, pack):
    examples = random_examples(rng)
    settings = dict(batch_size=4, max_len=9, pad_id=0, seed=5, pack=pack)
    with pytest.warns(UserWarning, match="skipped"):  # the over-long examples
        full = BatchStream(examples, **settings)
        expected, states = [], []
        for _ in range(30):  # several epochs
            expected.append(next(full))
            states.append(full.state())
        for rows in [(0, 1), (2, 3), (1, 3), (0, 1, 2, 3)]:
            part = BatchStream(examples, **settings, rows=rows)
            for batch, state in zip(expected[:12], states[:12]):
                got = next(part)
                for key, value in batch.items():
                    np.testing.assert_array_equal(got[key], value[list(rows)], err_msg=f"{key} rows {rows}")
                assert part.state() == state
            resumed = BatchStream(examples, **settings, rows=rows)
            resumed.restore(states[19])
            for batch in expected[20:]:
                got = next(resumed)
                for key, value in batch.items():
                    np.testing.assert_array_equal(got[key], value[list(rows)])


@pytest.mark.parametrize("rows", [(1, 0), (0, 0), (0, 4), (-1, 2), (), (0.0, 1)])
def test_bad_rows_are_refused_naming_them(rows):
    with pytest.raises(ValueError, match=r"BatchStream: rows=.*expected distinct ascending ints in \[0, 4\)"):
        BatchStream([([1, 2], [0, 1])], batch_size=4, max_len=8, pad_id=0, rows=rows)


def test_the_checkpoint_fingerprint_is_the_whole_arrays_whatever_their_sharding(rng):
    """Sums of |x| in float64 over each whole array: replicated shards count once."""
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    values = [rng.normal(size=(8, 6)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32),
              rng.normal(size=(2, 4, 6)).astype(np.float32)]
    specs = [P("fsdp", "tensor"), P(), P(None, ("data", "fsdp"), None)]
    placed = [jax.device_put(v, NamedSharding(mesh, s)) for v, s in zip(values, specs)]
    expected = [float(np.abs(v.astype(np.float64)).sum()) for v in values]
    np.testing.assert_allclose(_fingerprint({"a": placed}), expected, rtol=1e-13)
    np.testing.assert_allclose(_fingerprint({"a": [jax.numpy.asarray(v) for v in values]}), expected, rtol=1e-13)


# --------------------------------------------------------------------------- two processes, one mesh


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_config(corpus: Path, run_dir: Path, **sections) -> dict:
    config = {
        "run_dir": str(run_dir), "seed": 1, "log_every": 1, "progress": False,
        "model": {"preset": "tiny-moe", "overrides": {"hidden_size": 32, "intermediate_size": 48, "num_layers": 1,
                                                      "max_position_embeddings": 80}},
        "tokenizer": {"bpe_vocab_size": 300},
        "data": {"train": {"src": str(corpus / "train.en"), "tgt": str(corpus / "train.zt")},
                 "valid": {"src": str(corpus / "valid.en"), "tgt": str(corpus / "valid.zt")},
                 "test": {"src": str(corpus / "test.en"), "tgt": str(corpus / "test.zt")},
                 "src_lang": "en", "tgt_lang": "zt", "prompt": "{src} =>", "max_len": 64},
        "optim": {"steps": 4, "batch_size": 8, "warmup_steps": 1, "learning_rate": 3e-3},
        "checkpoint": {"every": 2, "keep_last": 2, "keep_best": 0},
        "eval": {"every": 2, "translate": 2, "max_new_tokens": 4, "batch_size": 2},
        "mesh": {"data": 4},
    }
    config.update(sections)
    return config


def start_processes(config: dict, folder: Path) -> list[subprocess.Popen]:
    """experiments/tpu_pod/launch.py as processes 0 and 1 of 2, two CPU devices each."""
    path = folder / f"{Path(config['run_dir']).name}-{len(list(folder.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"}
    address = f"localhost:{free_port()}"
    return [subprocess.Popen([sys.executable, "experiments/tpu_pod/launch.py", "--config", str(path),
                              "--coordinator-address", address, "--num-processes", "2", "--process-id", str(i)],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]


def finish(processes: list[subprocess.Popen], timeout: float = 540) -> list[tuple[str, str]]:
    """(stdout, stderr) of each process once both have exited 0; kills both if either fails or hangs."""
    try:
        outputs = [p.communicate(timeout=timeout) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, (out, err)) in enumerate(zip(processes, outputs)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-2000:]}\n{err[-4000:]}"
    return outputs


def losses(run_dir: Path, split: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == split}


@pytest.mark.slow
def test_two_processes_train_validate_export_and_resume_like_one_process(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_corpus(corpus, seed=3, sizes=dict(train=200, valid=12, test=4))
    multi, single = tmp_path / "multi", tmp_path / "single"
    processes = start_processes(run_config(corpus, multi), tmp_path)
    try:  # the reference, meanwhile: one process, the same 4-device mesh (of this process's 8 devices)
        reference = train(run_config(corpus, single), log=lambda _: None)
    finally:
        outputs = finish(processes)

    (out0, _), (out1, _) = outputs
    assert "process 0 of 2" in out0 and "process 1 of 2" in out1
    assert "done:" in out0 and "done:" not in out1 and "resumed" not in out0  # only process 0 logs
    for split in ("train", "valid"):
        expected = losses(single, split)
        assert sorted(expected) == ([1, 2, 3, 4] if split == "train" else [2, 4])
        got = losses(multi, split)
        assert sorted(got) == sorted(expected)
        np.testing.assert_allclose([got[s] for s in expected], list(expected.values()), rtol=0, atol=1e-5)
    summary = json.loads((multi / "summary.json").read_text())
    assert summary["valid_loss"] == pytest.approx(reference["valid_loss"], abs=1e-5)
    assert len((multi / "test.hyp.txt").read_text().splitlines()) == 2
    exported = load_file(multi / "model" / "model.safetensors")
    expected = load_file(single / "model" / "model.safetensors")
    assert sorted(exported) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(exported[name], value, rtol=0, atol=1e-5, err_msg=name)

    # Stop-and-resume: step 4's checkpoint is half-written, as by a crash; both processes must skip it together.
    state = multi / "checkpoints" / "4" / "state"
    data_files = [p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"]
    biggest = max(data_files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    shutil.copytree(multi / "checkpoints" / "2", multi / "checkpoints" / "6.orbax-checkpoint-tmp-1")
    before = losses(multi, "train")
    resumed = finish(start_processes(run_config(corpus, multi, eval={"every": 2, "translate": 0}), tmp_path))
    (out0, err0), (out1, err1) = resumed
    assert "resumed from step 2" in out0 and "checkpoint step 4" in err0 and "checkpoint step 4" not in err1
    after = losses(multi, "train")
    assert sorted(after) == [1, 2, 3, 4] and all(after[s] == before[s] for s in (1, 2))
    np.testing.assert_allclose([after[s] for s in range(1, 5)], [losses(single, "train")[s] for s in range(1, 5)],
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(losses(multi, "valid")[4], losses(single, "valid")[4], rtol=0, atol=1e-5)
