"""What several processes (multi-host training) agree on: who writes, when all have arrived, what any of them saw.

Every helper here is safe with one process (no collective is run) and, with several, must be called by every
process in the same order: they are collectives.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

__all__ = ["any_process", "gather_to_host", "is_primary", "sync_processes"]


def is_primary() -> bool:
    """True on process 0: the one process that writes the run's own files and logs."""
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """A barrier: returns once every process has called it with the same `name` (a no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process; every process must call it (with several, a collective)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def gather_to_host(x: jax.Array) -> np.ndarray:
    """The whole value of `x` as NumPy, gathered from the other processes when they hold parts of it (every
    process must call it then)."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
