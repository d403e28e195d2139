"""Training observability: metrics round-trip through JSONL and TensorBoard, resuming drops redone steps, plots
are PNGs, bad expert load is refused, and the progress bar shows loss and tokens per second."""

import io
import json
import math
import struct

import numpy as np
import pytest
from tensorboardX.crc32c import crc32c
from tensorboardX.proto.event_pb2 import Event

from jaxmoe.train.metrics import MetricsLogger, plot_expert_load, plot_losses, read_expert_load, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C (rotate right by 15, add a constant), as the TFRecord format specifies."""
    crc = crc32c(data) & 0xFFFFFFFF
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def read_tensorboard_scalars(tb_dir) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in every event file under tb_dir, parsing the TFRecord framing:
    uint64 length, masked crc of the length, data, masked crc of the data."""
    scalars = []
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            header = data[offset:offset + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
            payload = data[offset + 12:offset + 12 + length]
            (payload_crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
            assert header_crc == masked_crc(header) and payload_crc == masked_crc(payload), f"bad crc in {path}"
            offset += 16 + length
            event = Event.FromString(payload)
            scalars += [(value.tag, event.step, value.simple_value) for value in event.summary.value]
    return scalars


def without_time(records):
    return [{key: value for key, value in record.items() if key != "time"} for record in records]


def test_log_writes_strict_json_lines_that_read_back_equal_including_non_finite(tmp_path):
    with MetricsLogger(tmp_path, total_steps=10, progress=False) as logger:
        logger.log(1, {"loss": 2.5, "learning_rate": np.float32(1e-3)})
        logger.log(2, {"loss": float("nan"), "grad_norm": float("inf")})
        logger.log(2, {"loss": float("-inf"), "accuracy": 0.25}, split="valid")

    def refuse(constant):
        raise AssertionError(f"non-strict JSON constant {constant}")

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    raw = [json.loads(line, parse_constant=refuse) for line in lines]
    assert raw[1]["loss"] == "nan" and raw[1]["grad_norm"] == "inf" and raw[2]["loss"] == "-inf"
    records = read_metrics(tmp_path)
    assert all(isinstance(r["time"], float) and r["time"] > 1e9 for r in records)
    got = without_time(records)
    assert math.isnan(got[1].pop("loss"))
    assert got == [{"step": 1, "split": "train", "loss": 2.5, "learning_rate": float(np.float32(1e-3))},
                   {"step": 2, "split": "train", "grad_norm": math.inf},
                   {"step": 2, "split": "valid", "loss": -math.inf, "accuracy": 0.25}]


def test_log_writes_tensorboard_scalars_tagged_split_slash_name_at_each_step(tmp_path):
    load_le = np.array([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]])
    with MetricsLogger(tmp_path, total_steps=10, progress=False) as logger:
        logger.log(3, {"loss": 1.5, "grad_norm": 0.75})
        logger.log(4, {"loss": float("nan")})
        logger.log(4, {"loss": 1.25}, split="valid")
        logger.log_expert_load(4, load_le)
    scalars = read_tensorboard_scalars(tmp_path / "tb")
    nan_scalars = [(tag, step) for tag, step, value in scalars if math.isnan(value)]
    finite = sorted((tag, step, value) for tag, step, value in scalars if not math.isnan(value))
    assert nan_scalars == [("train/loss", 4)]
    assert finite == sorted([("train/loss", 3, 1.5), ("train/grad_norm", 3, 0.75), ("valid/loss", 4, 1.25),
                             ("expert_load/layer0/max_over_uniform", 4, 2.0),
                             ("expert_load/layer0/min_over_uniform", 4, 0.0),
                             ("expert_load/layer1/max_over_uniform", 4, 1.0),
                             ("expert_load/layer1/min_over_uniform", 4, 1.0)])


def test_log_rejects_metric_names_that_clash_with_record_keys_and_non_scalars(tmp_path):
    with MetricsLogger(tmp_path, total_steps=10, progress=False) as logger:
        with pytest.raises(ValueError, match="clash"):
            logger.log(1, {"step": 1.0})
        with pytest.raises(ValueError, match="'loss'.*real scalar"):
            logger.log(1, {"loss": "low"})
    assert read_metrics(tmp_path) == []


def test_expert_load_is_kept_in_memory_and_in_jsonl(tmp_path, rng):
    loads = [rng.dirichlet(np.ones(4), size=3) for _ in range(2)]
    with MetricsLogger(tmp_path, total_steps=10, progress=False) as logger:
        logger.log_expert_load(5, loads[0])
        logger.log_expert_load(10, loads[1])
        history = logger.expert_load_history
    for (step, load), (want_step, want_load) in zip(read_expert_load(tmp_path), zip((5, 10), loads), strict=True):
        assert step == want_step
        np.testing.assert_array_equal(load, want_load)
    assert [step for step, _ in history] == [5, 10]
    np.testing.assert_array_equal(history[1][1], loads[1])


def test_resuming_at_start_step_drops_later_records_and_keeps_earlier_ones(tmp_path):
    with MetricsLogger(tmp_path, total_steps=10, progress=False) as crashed:
        for step in range(1, 6):
            crashed.log(step, {"loss": 10.0 - step})
            crashed.log_expert_load(step, np.full((1, 2), 0.5))
        crashed.log(3, {"loss": 6.5}, split="valid")
    with MetricsLogger(tmp_path, total_steps=10, start_step=3, progress=False) as resumed:
        assert [(r["step"], r["split"]) for r in read_metrics(tmp_path)] == [
            (1, "train"), (2, "train"), (3, "train"), (3, "valid")]
        assert [step for step, _ in read_expert_load(tmp_path)] == [1, 2, 3]
        resumed.log(4, {"loss": 5.5})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path) if r["split"] == "train"] == [
        (1, 9.0), (2, 8.0), (3, 7.0), (4, 5.5)]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_torn_final_line_is_ignored_by_readers_and_removed_on_resume(tmp_path):
    with MetricsLogger(tmp_path, total_steps=10, progress=False) as crashed:
        crashed.log(1, {"loss": 3.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "split": "tra')  # the crash cut this write short
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    with MetricsLogger(tmp_path, total_steps=10, start_step=1, progress=False) as resumed:
        resumed.log(2, {"loss": 2.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 3.0), (2, 2.0)]


def test_constructor_rejects_start_step_outside_zero_to_total_steps(tmp_path):
    with pytest.raises(ValueError, match="start_step=11"):
        MetricsLogger(tmp_path, total_steps=10, start_step=11, progress=False)


def test_plot_losses_writes_a_png_with_train_valid_and_learning_rate(tmp_path):
    with MetricsLogger(tmp_path, total_steps=100, progress=False) as logger:
        for step in range(1, 101):
            logger.log(step, {"loss": 50.0 / step + 0.1, "learning_rate": 1e-3 * min(1.0, step / 10)})
            if step % 25 == 0:
                logger.log(step, {"loss": 60.0 / step + 0.2}, split="valid")
        logger.log(101, {"loss": float("nan")})  # a diverged step is skipped, not plotted
    path = plot_losses(tmp_path)
    assert path == tmp_path / "loss.png"
    assert path.read_bytes()[:8] == PNG_MAGIC
    other = plot_losses(tmp_path, tmp_path / "plots" / "other.png")
    assert other.read_bytes()[:8] == PNG_MAGIC


def test_plot_losses_raises_a_clear_error_without_train_loss(tmp_path):
    with MetricsLogger(tmp_path, total_steps=10, progress=False) as logger:
        logger.log(5, {"loss": 1.0}, split="valid")
    with pytest.raises(ValueError, match="no finite train 'loss'"):
        plot_losses(tmp_path)
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_losses(tmp_path / "missing")


@pytest.mark.parametrize("shape", [(2, 4), (24, 32)])  # annotated cells, and a grid too large to annotate
def test_plot_expert_load_writes_a_png(tmp_path, rng, shape):
    load_le = rng.dirichlet(np.ones(shape[1]), size=shape[0])
    path = plot_expert_load(load_le, tmp_path / "load.png", title="step 100")
    assert path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("load_le, message", [
    (np.array([[0.5, 0.75, -0.25]]), "negative"),
    (np.array([0.5, 0.5]), r"shape \(2,\)"),
    (np.array([[0.5, np.nan]]), "non-finite"),
    (np.zeros((0, 4)), "non-empty"),
])
def test_plot_expert_load_rejects_bad_input(tmp_path, load_le, message):
    with pytest.raises(ValueError, match=message):
        plot_expert_load(load_le, tmp_path / "load.png")
    assert not (tmp_path / "load.png").exists()


def test_progress_bar_shows_loss_tokens_per_second_lr_and_busiest_expert(tmp_path):
    stream = io.StringIO()
    with MetricsLogger(tmp_path, total_steps=20, start_step=10, file=stream) as logger:
        logger.progress_update(12, loss=1.23456, tokens_per_second=45678.9, learning_rate=3e-4,
                               expert_load_le=np.array([[0.5, 0.25, 0.125, 0.125]]))
    text = stream.getvalue()
    assert "12/20" in text
    assert "loss=1.2346" in text and "tok/s=45,679" in text and "lr=3.00e-04" in text and "busiest=2.00x" in text


def test_progress_update_without_a_bar_still_checks_the_step(tmp_path):
    stream = io.StringIO()
    with MetricsLogger(tmp_path, total_steps=20, progress=False, file=stream) as logger:
        logger.progress_update(5, loss=1.0, tokens_per_second=1.0, learning_rate=1.0)
        with pytest.raises(ValueError, match="step=21"):
            logger.progress_update(21, loss=1.0, tokens_per_second=1.0, learning_rate=1.0)
    assert stream.getvalue() == ""
