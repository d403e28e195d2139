"""Training checkpoints through orbax `CheckpointManager`: async saves, keep-last-N plus best, exact resume.

A checkpoint is one step folder with two items: `state` (the model's trained parameters and the optimizer
state, as orbax arrays) and `meta` (JSON: step, data position, RNG seed, metrics, a fingerprint of the
state). Orbax writes each step into a temporary folder and renames it when complete, so a crash mid-save
leaves the earlier steps untouched; `restore_latest` also checks what it reads against the fingerprint and
falls back to the previous step, with a warning, when the newest one is unreadable or corrupted (the bad step
is moved to `<directory>.corrupted/`, never deleted).

Several processes (multi-host): every process calls `save` and `restore_latest` with the same arguments (orbax
writes each process's shards; the directory must be on storage all of them share). The fingerprint is of the
whole arrays whatever their sharding, the processes agree on whether a step is readable, and only process 0
moves a bad step aside while the others wait (`jaxmoe.train.hosts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from jaxmoe.train.hosts import any_process, is_primary, sync_processes

__all__ = ["CheckpointMismatchError", "Checkpointer", "Restored"]


class CheckpointMismatchError(ValueError):
    """The checkpoint's arrays do not fit the model the config builds."""


class Restored(dict):
    """What `Checkpointer.restore_latest` found: the step and the saved meta dict (data position, RNG, ...)."""

    @property
    def step(self) -> int:
        return int(self["step"])


def _fingerprint(tree) -> list[float]:
    """Per-leaf sums of |x| in float64 over the whole jax.Array, however it is sharded over devices and processes:
    cheap, and a changed or garbled array changes them. Every process must call it (a collective with several)."""
    # One copy of each shard (replica 0) counts; each process adds up those it holds, then the processes add.
    sums_l = np.array([sum(float(np.abs(np.asarray(shard.data, np.float64)).sum())
                           for shard in x.addressable_shards if shard.replica_id == 0)
                       for x in jax.tree.leaves(tree)], np.float64)
    if jax.process_count() > 1:
        # process_allgather would move float64 as float32 (x64 is off): send the bits as uint32 pairs.
        bits_pl = np.asarray(multihost_utils.process_allgather(sums_l.view(np.uint32)))
        sums_l = np.ascontiguousarray(bits_pl).view(np.float64).sum(axis=0)
    return sums_l.tolist()


@contextlib.contextmanager
def _abandoned_reads_contained() -> Iterator[None]:
    """Keeps the reads that a failed orbax restore abandons from failing later, somewhere else.

    orbax runs a restore on an event loop of its own and closes that loop as soon as the first read fails, while
    the step's other reads are still in flight. Each of them then fails twice, outside any caller: tensorstore's
    thread finds the loop closed when the read completes ("Event loop is closed", from `call_soon_threadsafe`),
    and the suspended coroutine, whenever Python collects it, turns the GeneratorExit it receives into orbax's
    read error. Both surface as unraisable exceptions in an unrelated place (pytest reports them against
    whatever test runs then). Within this block both kinds are dropped (anything else goes to the hook in place
    before), and on leaving it the abandoned coroutines still alive are closed. Only tasks whose loop is already
    closed are touched, so a save running in the background is never interrupted."""
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if not _is_abandoned_read(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        # type(), not isinstance(): some objects on the heap (torch's deprecated reduce_op) warn on __class__.
        for task in [obj for obj in gc.get_objects() if issubclass(type(obj), asyncio.Task)]:
            if not task.done() and task.get_loop().is_closed():
                with contextlib.suppress(Exception):  # the read's own failure, re-raised by orbax on close
                    task.get_coro().close()
        sys.unraisablehook = previous


def _is_abandoned_read(unraisable) -> bool:
    """Whether `unraisable` comes from a read that orbax abandoned: the read completing into an event loop that
    orbax already closed, or its coroutine failing as it is collected."""
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
        return any(frame.name == "call_soon_threadsafe" for frame in traceback.extract_tb(unraisable.exc_traceback))
    code = getattr(unraisable.object, "cr_code", None)
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _path_name(path) -> str:
    """'model/layers/0/mlp/w_down': orbax's metadata stores list indices as strings, so compare names."""
    return "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)


def _training_state(model: nnx.Module, optimizer: nnx.Optimizer) -> dict:
    return {"model": nnx.state(model, optimizer.wrt).to_pure_dict(), "optimizer": nnx.state(optimizer).to_pure_dict()}


class Checkpointer:
    """Saves and restores (model, optimizer, meta) under `directory` / <step>.

    keep_last: the newest this many steps stay; keep_best: additionally the steps with the lowest
    `best_metric` in their saved metrics (e.g. validation loss) stay. async_save: `save` returns once the
    arrays are copied and writes in the background (`wait` blocks until written).
    """

    def __init__(self, directory: Path | str, *, keep_last: int = 3, keep_best: int = 1,
                 best_metric: str = "valid_loss", async_save: bool = True):
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}; expected at least 1 (the newest checkpoint is needed to resume)")
        if keep_best < 0:
            raise ValueError(f"keep_best={keep_best}; expected 0 or more")
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        policies = [ocp.checkpoint_managers.LatestN(n=keep_last)]
        if keep_best:
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[best_metric], reverse=True, n=keep_best,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def steps(self) -> list[int]:
        """Saved steps, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer, meta: dict[str, Any], *,
             metrics: dict[str, float] | None = None) -> None:
        """Saves `step`. meta: JSON-able (data position, seeds, ...); metrics: scalars for keep-best (only
        finite values are kept, so a diverged evaluation never ranks as best)."""
        # Own copies: the next train_step donates (overwrites) the model's buffers while the save may still read.
        state = jax.tree.map(lambda x: jnp.array(x, copy=True), _training_state(model, optimizer))
        clean = {k: float(v) for k, v in (metrics or {}).items() if math.isfinite(float(v))}
        if self.best_metric not in clean:
            clean = None
        meta = {**meta, "step": int(step), "fingerprint": _fingerprint(state), "metrics": clean or {}}
        self._manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                 meta=ocp.args.JsonSave(meta)),
                           metrics=clean, force=True)

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def restore_latest(self, model: nnx.Module, optimizer: nnx.Optimizer) -> Restored | None:
        """Loads the newest readable checkpoint into `model` and `optimizer` in place and returns its meta;
        None when there is none. An unreadable or corrupted step is skipped with a warning naming it.
        Raises CheckpointMismatchError when the saved arrays do not fit the model (a different config)."""
        with _abandoned_reads_contained():
            return self._restore_latest(model, optimizer)

    def best_step(self) -> int | None:
        """The saved step lowest in `best_metric` (as saved with it), or None when no saved step has it."""
        self._manager.reload()
        ranked = []
        for step in self.steps():
            try:
                value = self._read_meta(step).get("metrics", {}).get(self.best_metric)
            except Exception:  # noqa: BLE001 - an unreadable step cannot be the one to restore
                continue
            if value is not None:
                ranked.append((value, step))
        return min(ranked)[1] if ranked else None

    def restore_best(self, model: nnx.Module, optimizer: nnx.Optimizer) -> Restored | None:
        """Loads `best_step()` into `model` and `optimizer` in place (as `restore_latest` does the newest) and
        returns its meta; None when no saved step has the metric or it cannot be read."""
        best = self.best_step()
        if best is None:
            return None
        with _abandoned_reads_contained():
            return self._restore_latest(model, optimizer, steps=[best])

    def _restore_latest(self, model: nnx.Module, optimizer: nnx.Optimizer, steps=None) -> Restored | None:
        self._manager.reload()
        target = _training_state(model, optimizer)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        for step in reversed(self.steps()) if steps is None else steps:
            error = None
            try:
                meta = self._read_meta(step)
                self._check_fits(step, target)
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))["state"]
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read a step means: use an older one
                error = e
            # Each process reads its own shards: all must agree before the collectives below, or they would hang.
            if any_process(error is not None):
                error = error or RuntimeError("another process could not read it")
            if error is None and not np.allclose(_fingerprint(restored), meta["fingerprint"], rtol=1e-6, atol=0):
                error = ValueError("its arrays do not match the fingerprint saved with them")
            if error is not None:
                self._set_aside(step, error)
                continue
            for node, values, which in ((model, restored["model"], optimizer.wrt),
                                        (optimizer, restored["optimizer"], ...)):
                state = nnx.state(node, which)
                nnx.replace_by_pure_dict(state, values)
                nnx.update(node, state)
            return Restored(meta)
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        """Moves a bad step out of orbax's folder (so training can save that step again) without deleting it, and
        warns naming `error`; process 0 moves and warns while the others wait."""
        if is_primary():
            older = [s for s in self.steps() if s < step]
            fallback = f"falling back to step {older[-1]}" if older else "no older checkpoint to fall back to"
            aside = (self.directory.parent / f"{self.directory.name}.corrupted" /
                     f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.directory / str(step), aside)
            first_line = (str(error).splitlines() or [""])[0][:200]
            warnings.warn(f"checkpoint step {step} in {self.directory} is unreadable or corrupted "
                          f"({type(error).__name__}: {first_line}); moved it to {aside}; {fallback}",
                          RuntimeWarning, stacklevel=3)
        sync_processes(f"jaxmoe checkpoint step {step} set aside")
        self._manager.reload()

    def _read_meta(self, step: int) -> dict:
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict) or meta.get("step") != step or "fingerprint" not in meta:
            raise ValueError(f"its meta item is incomplete: {meta!r:.200}")
        return meta

    def _check_fits(self, step: int, target: dict) -> None:
        """Compares the saved array shapes with the model's, so a config mismatch is named, not a deep error."""
        saved = self._manager.item_metadata(step)["state"]
        if saved is None:
            raise ValueError("its state item has no metadata")
        saved_shapes = {_path_name(path): tuple(leaf.shape)
                        for path, leaf in jax.tree_util.tree_leaves_with_path(saved)}
        wanted = {_path_name(path): tuple(np.shape(leaf))
                  for path, leaf in jax.tree_util.tree_leaves_with_path(target)}
        if saved_shapes == wanted:
            return
        missing = sorted(set(wanted) - set(saved_shapes))
        extra = sorted(set(saved_shapes) - set(wanted))
        differ = [(k, saved_shapes[k], wanted[k]) for k in sorted(set(wanted) & set(saved_shapes))
                  if saved_shapes[k] != wanted[k]]
        parts = []
        if differ:
            k, have, want = differ[0]
            parts.append(f"{len(differ)} arrays differ in shape, e.g. {k} is {have} in the checkpoint but "
                         f"{want} in the model")
        if missing:
            parts.append(f"{len(missing)} model arrays are not in the checkpoint, e.g. {missing[0]}")
        if extra:
            parts.append(f"{len(extra)} checkpoint arrays are not in the model, e.g. {extra[0]}")
        raise CheckpointMismatchError(
            f"the checkpoint at {self.directory} (step {step}) does not fit the model this config builds: "
            + "; ".join(parts) + ". Resume with the config the run was started with, or start a new run folder")
