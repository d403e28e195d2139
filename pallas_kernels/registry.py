"""Which implementations exist for each op, on which platforms they run natively, and the order "auto" tries.

A static table. Implementations are "module:function" paths imported at resolve time, so a module is loaded only
when a dispatch names it. The order for a platform always ends with "xla", the reference that runs anywhere.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import jax

ANY_PLATFORM = ("cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Implementation:
    """`path` "package.module:function"; `platforms` where it runs without interpret mode."""

    path: str
    platforms: tuple[str, ...]
    pallas: bool = False  # a Pallas kernel: runs on any platform with interpret=True

    def load(self) -> Callable:
        module, function = self.path.split(":")
        return getattr(importlib.import_module(module), function)


def _gmm_table(function: str) -> dict[str, Implementation]:
    return {
        "pallas_tpu": Implementation(f"pallas_kernels.grouped.tpu:{function}", ("tpu",), pallas=True),
        "pallas_gpu": Implementation(f"pallas_kernels.grouped.gpu:{function}", ("gpu",), pallas=True),
        "cpu": Implementation(f"pallas_kernels.grouped.cpu:{function}", ANY_PLATFORM),
        "xla": Implementation(f"pallas_kernels.grouped.reference:{function}", ANY_PLATFORM),
    }


IMPLEMENTATIONS: dict[str, dict[str, Implementation]] = {
    "gmm": _gmm_table("gmm"),
    "tgmm": _gmm_table("tgmm"),
    "sparsemixer_top2": {
        "pallas": Implementation("pallas_kernels.router.kernel:sparsemixer_top2", ("gpu", "tpu"), pallas=True),
        "xla": Implementation("pallas_kernels.router.reference:sparsemixer_top2", ANY_PLATFORM),
    },
}

_GMM_ORDER = {"cpu": ("cpu", "xla"), "gpu": ("pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla")}
AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "gmm": _GMM_ORDER,
    "tgmm": _GMM_ORDER,
    "sparsemixer_top2": {"cpu": ("xla",), "gpu": ("pallas", "xla"), "tpu": ("pallas", "xla")},
}


def backends(op: str) -> tuple[str, ...]:
    """The implementation names for `op` on the current platform (jax.default_backend()), in the order "auto"
    tries them; "xla" is last."""
    _check_op(op)
    return AUTO_ORDER[op].get(jax.default_backend(), ("xla",))


def resolve(op: str, backend: str = "auto", *, interpret=False) -> list[tuple[str, Callable]]:
    """-> [(name, function)] to try in order: "auto" gives `backends(op)`; a name gives that implementation then
    "xla". A Pallas implementation named off its platforms needs interpret (True or InterpretParams)."""
    _check_op(op)
    table = IMPLEMENTATIONS[op]
    if backend == "auto":
        names = backends(op)
    elif backend in table:
        names = (backend,) if backend == "xla" else (backend, "xla")
    else:
        raise ValueError(f"backend={backend!r} is not an implementation of {op}; expected 'auto' or one of "
                         f"{sorted(table)}")
    platform = jax.default_backend()
    first = table[names[0]]
    if platform not in first.platforms and not (first.pallas and interpret):
        raise ValueError(f"backend={names[0]!r} runs on {list(first.platforms)}, not on {platform!r}; pass "
                         f"interpret=True to run the kernel in interpret mode, or use backend='auto'")
    return [(name, table[name].load()) for name in names]


def _check_op(op: str) -> None:
    if op not in IMPLEMENTATIONS:
        raise ValueError(f"op={op!r}; expected one of {sorted(IMPLEMENTATIONS)}")
