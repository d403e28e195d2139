"""Training observability: a JSONL + TensorBoard metrics log, a tqdm progress bar, loss and expert-load plots.

`MetricsLogger` writes every metric twice: one JSON line per `log` call in `run_dir/metrics.jsonl` (the record
that `read_metrics` and `plot_losses` read back) and one TensorBoard scalar per value under `run_dir/tb`.
Per-layer expert load goes to `run_dir/expert_load.jsonl` (read back by `read_expert_load`); `plot_expert_load`
draws one such [layers, experts] array as a heatmap.

Non-finite values: strict JSON has no NaN or infinity, so a metric that is nan, inf or -inf is written as the
string "nan", "inf" or "-inf"; `read_metrics` turns those strings back into floats.

Resuming: a crashed run may have logged steps after its last checkpoint, which the resumed run does again. So a
logger that starts at `start_step` first drops every line with step > start_step from both JSONL files (rewriting
each atomically: temporary file, then os.replace), and tells TensorBoard to hide events from step start_step + 1
on (tensorboardX's `purge_step`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import tqdm
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from tensorboardX import SummaryWriter

__all__ = ["MetricsLogger", "plot_expert_load", "plot_losses", "read_expert_load", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
EXPERT_LOAD_FILE = "expert_load.jsonl"
_RESERVED_KEYS = ("step", "split", "time")
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _json_number(value: float) -> float | str:
    """value itself when finite, else its name ("nan", "inf", "-inf"), which strict JSON can hold."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _read_jsonl(path: Path, text: str | None = None) -> list[dict[str, Any]]:
    """The records of a JSONL file (or of its `text`), skipping a final line without its newline (a write cut
    off by a crash)."""
    text = path.read_text(encoding="utf-8") if text is None else text
    lines = text.split("\n")[:-1]  # the piece after the last newline is empty or a torn line
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number} is not valid JSON ({error}); fix or remove that line") from None
    return records


def _keep_steps_up_to(path: Path, last_step: int) -> None:
    """Rewrite `path` atomically without the records whose step is past `last_step` (and without a torn line)."""
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8")
    records = _read_jsonl(path, text)
    kept = [record for record in records if record["step"] <= last_step]
    if len(kept) == len(records) and (not text or text.endswith("\n")):
        return
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, allow_nan=False) + "\n" for record in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _check_load(load_le: np.ndarray, where: str) -> np.ndarray:
    """load_le as float64 [layers, experts], or ValueError saying what is wrong with it."""
    load = np.asarray(load_le, dtype=np.float64)
    if load.ndim != 2 or load.size == 0:
        raise ValueError(f"{where}: load_le has shape {load.shape}; expected a non-empty [layers, experts] array "
                         "(stack one row per MoE layer)")
    if not np.all(np.isfinite(load)):
        raise ValueError(f"{where}: load_le holds non-finite values at {np.argwhere(~np.isfinite(load)).tolist()}; "
                         "expected finite per-expert token shares")
    if np.any(load < 0):
        raise ValueError(f"{where}: load_le holds negative values (min {load.min()}); expected token shares >= 0")
    return load


def _busiest_over_uniform(load: np.ndarray) -> float:
    """The largest expert share in any layer, over the uniform share 1/experts (1.0 = perfectly balanced)."""
    return float(load.max() * load.shape[1])


class MetricsLogger:
    """Logs training metrics to `run_dir/metrics.jsonl` and TensorBoard, and shows a progress bar.

    Use as a context manager or call `close()`. `start_step` is the last step already done (0 for a new run):
    records from earlier attempts with a later step are dropped (see the module docstring). The bar covers
    [start_step, total_steps] and is written to `file` (default sys.stderr); progress=False shows no bar.
    """

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int = 0, progress: bool = True,
                 file: TextIO | None = None):
        if not 0 <= start_step <= total_steps or total_steps < 1:
            raise ValueError(f"MetricsLogger: start_step={start_step}, total_steps={total_steps}; expected "
                             "0 <= start_step <= total_steps and total_steps >= 1")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.start_step = start_step
        for name in (METRICS_FILE, EXPERT_LOAD_FILE):
            _keep_steps_up_to(self.run_dir / name, start_step)
        self._metrics_file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self._expert_load_file = open(self.run_dir / EXPERT_LOAD_FILE, "a", encoding="utf-8")
        self._writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1)
        self._bar = (tqdm.tqdm(total=total_steps, initial=start_step, file=sys.stderr if file is None else file,
                               unit="step", dynamic_ncols=True) if progress else None)
        self._expert_load_history: list[tuple[int, np.ndarray]] = []

    def log(self, step: int, metrics: dict[str, float], *, split: str = "train") -> None:
        """Append {"step", "split", "time" (seconds since the epoch), **metrics} to metrics.jsonl and write each
        value to TensorBoard as f"{split}/{name}" at `step`. Values: Python, numpy or 0-d JAX scalars."""
        if not isinstance(split, str) or not split:
            raise ValueError(f"MetricsLogger.log: split={split!r}; expected a non-empty string such as 'train'")
        clashes = [name for name in metrics if name in _RESERVED_KEYS]
        if clashes:
            raise ValueError(f"MetricsLogger.log: metric names {clashes} clash with the record's own keys "
                             f"{_RESERVED_KEYS}; rename them")
        values = {}
        for name, value in metrics.items():
            try:
                values[name] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"MetricsLogger.log: metric {name!r} = {value!r}; expected a real scalar") from None
        record = {"step": int(step), "split": split, "time": time.time(),
                  **{name: _json_number(value) for name, value in values.items()}}
        self._metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
        self._metrics_file.flush()
        for name, value in values.items():
            self._writer.add_scalar(f"{split}/{name}", value, int(step), walltime=record["time"])

    def log_expert_load(self, step: int, load_le: np.ndarray) -> None:
        """Record per-layer expert load, float [layers, experts] (each expert's share of its layer's routed
        token-slots): kept in `expert_load_history`, appended to expert_load.jsonl, and written to TensorBoard
        as expert_load/layer{l}/max_over_uniform and .../min_over_uniform (1.0 = balanced)."""
        load = _check_load(load_le, "MetricsLogger.log_expert_load")
        self._expert_load_history.append((int(step), load))
        self._expert_load_file.write(json.dumps({"step": int(step), "load": load.tolist()}) + "\n")
        self._expert_load_file.flush()
        num_experts = load.shape[1]
        for layer, row in enumerate(load):
            self._writer.add_scalar(f"expert_load/layer{layer}/max_over_uniform", row.max() * num_experts, step)
            self._writer.add_scalar(f"expert_load/layer{layer}/min_over_uniform", row.min() * num_experts, step)

    @property
    def expert_load_history(self) -> tuple[tuple[int, np.ndarray], ...]:
        """(step, load [layers, experts]) for each `log_expert_load` call of this logger, oldest first."""
        return tuple(self._expert_load_history)

    def progress_update(self, step: int, *, loss: float, tokens_per_second: float, learning_rate: float,
                        expert_load_le: np.ndarray | None = None) -> None:
        """Move the bar to `step` and show loss, tok/s, lr and, given expert load [layers, experts], the busiest
        expert's share over the uniform share (1.00x = balanced). Does nothing with progress=False."""
        if not self.start_step <= step <= self.total_steps:
            raise ValueError(f"MetricsLogger.progress_update: step={step}; expected {self.start_step} <= step <= "
                             f"total_steps={self.total_steps}")
        if self._bar is None:
            return
        postfix = {"loss": f"{float(loss):.4f}", "tok/s": f"{float(tokens_per_second):,.0f}",
                   "lr": f"{float(learning_rate):.2e}"}
        if expert_load_le is not None:
            load = _check_load(expert_load_le, "MetricsLogger.progress_update")
            postfix["busiest"] = f"{_busiest_over_uniform(load):.2f}x"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        """Flush and close the files, the TensorBoard writer and the bar."""
        if self._bar is not None:
            self._bar.close()
        self._writer.close()
        self._metrics_file.close()
        self._expert_load_file.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of run_dir/metrics.jsonl in file order, with "nan"/"inf"/"-inf" metric values as floats."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"read_metrics: {path} does not exist; log metrics with MetricsLogger first")
    return [{key: _NON_FINITE.get(value, value) if key != "split" and isinstance(value, str) else value
             for key, value in record.items()} for record in _read_jsonl(path)]


def read_expert_load(run_dir: Path) -> list[tuple[int, np.ndarray]]:
    """(step, load float64 [layers, experts]) for each line of run_dir/expert_load.jsonl, in file order."""
    path = Path(run_dir) / EXPERT_LOAD_FILE
    if not path.exists():
        raise FileNotFoundError(f"read_expert_load: {path} does not exist; call MetricsLogger.log_expert_load first")
    return [(record["step"], np.asarray(record["load"], np.float64)) for record in _read_jsonl(path)]


def _debiased_ema(values: np.ndarray, beta: float) -> np.ndarray:
    """Exponential moving average with the start-up bias removed (as TensorBoard's smoothing)."""
    smoothed = np.empty_like(values)
    average = 0.0
    for i, value in enumerate(values):
        average = beta * average + (1 - beta) * value
        smoothed[i] = average / (1 - beta ** (i + 1))
    return smoothed


def _series(records: list[dict[str, Any]], split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and finite values of metric `name` in `split`, sorted by step."""
    pairs = sorted((r["step"], float(r[name])) for r in records if r["split"] == split and name in r)
    steps_values = np.asarray([(s, v) for s, v in pairs if math.isfinite(v)], np.float64).reshape(-1, 2)
    return steps_values[:, 0], steps_values[:, 1]


def plot_losses(run_dir: Path, out_path: Path | None = None) -> Path:
    """Plot train loss (raw and smoothed), valid loss points and, when logged, the learning rate to a PNG.

    Reads run_dir/metrics.jsonl; writes `out_path` (default run_dir/"loss.png") and returns it. Raises ValueError
    when there is no finite train loss to plot.
    """
    run_dir = Path(run_dir)
    out_path = run_dir / "loss.png" if out_path is None else Path(out_path)
    records = read_metrics(run_dir)
    train_steps, train_loss = _series(records, "train", "loss")
    if train_loss.size == 0:
        raise ValueError(f"plot_losses: {run_dir / METRICS_FILE} holds no finite train 'loss'; log "
                         "{'loss': ...} with split='train' before plotting")
    valid_steps, valid_loss = _series(records, "valid", "loss")
    lr_steps, lr = _series(records, "train", "learning_rate")

    fig = Figure(figsize=(9, 6.5 if lr.size else 4.5), layout="constrained")
    axes = fig.subplots(2 if lr.size else 1, 1, sharex=True, squeeze=False,
                        height_ratios=[3, 1] if lr.size else [1])[:, 0]
    loss_ax = axes[0]
    window = int(np.clip(train_loss.size // 20, 1, 200))  # about 20 independent points across the run
    loss_ax.plot(train_steps, train_loss, lw=0.6, alpha=0.4, color="tab:blue", label="train loss")
    loss_ax.plot(train_steps, _debiased_ema(train_loss, 1 - 1 / window), lw=1.8, color="tab:blue",
                 label=f"train loss (EMA, ~{window} steps)")
    if valid_loss.size:
        loss_ax.plot(valid_steps, valid_loss, "o", color="tab:orange", ms=5, label="valid loss")
    shown = np.concatenate([train_loss, valid_loss])
    if shown.min() > 0 and shown.max() / shown.min() > 10:
        loss_ax.set_yscale("log")
    loss_ax.set_title(f"Training loss ({run_dir.name})")
    loss_ax.set_ylabel("loss (nats/token)")
    loss_ax.grid(True, which="both", alpha=0.3)
    loss_ax.legend()
    if lr.size:
        lr_ax = axes[1]
        lr_ax.plot(lr_steps, lr, color="tab:green", label="learning rate")
        lr_ax.set_ylabel("learning rate")
        lr_ax.grid(True, alpha=0.3)
        lr_ax.legend()
    axes[-1].set_xlabel("step")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    return out_path


def plot_expert_load(load_le: np.ndarray, out_path: Path, *, title: str = "Expert load per layer") -> Path:
    """Heatmap of expert load float [layers, experts] (shares of routed token-slots) to a PNG; returns out_path.

    Colours diverge around the uniform share 1/experts (red: busier, blue: idler); grids up to 16 x 16 carry
    each cell's share in percent. Raises ValueError unless load_le is 2-D, finite and non-negative.
    """
    load = _check_load(load_le, "plot_expert_load")
    num_layers, num_experts = load.shape
    uniform = 1.0 / num_experts
    norm = TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=max(load.max(), 2 * uniform))
    fig = Figure(figsize=(max(4.0, 0.6 * num_experts + 2), max(3.0, 0.45 * num_layers + 1.5)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(load, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="share of routed token-slots")
    if num_layers <= 16 and num_experts <= 16:
        for layer in range(num_layers):
            for expert in range(num_experts):
                shade = norm(load[layer, expert])
                ax.text(expert, layer, f"{100 * load[layer, expert]:.1f}%", ha="center", va="center", fontsize=8,
                        color="white" if shade < 0.15 or shade > 0.85 else "black")
        ax.set_xticks(range(num_experts))
        ax.set_yticks(range(num_layers))
    ax.set_title(f"{title}\n(uniform = 1/{num_experts} = {100 * uniform:.1f}% per expert; "
                 f"busiest {_busiest_over_uniform(load):.2f}x uniform)")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    return out_path
