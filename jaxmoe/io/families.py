"""The model families that read and write Hugging Face folders, in one table.

Each family registers itself from its own module (`jaxmoe.io.hf`: phi3 and phimoe; `jaxmoe.io.phi4mm`:
phi4_multimodal), so the generic entry points dispatch without knowing any family by name: `load_hf` by
config.json's `model_type`, `save_hf` and the PEFT adapter reader by the model's class. `jaxmoe.io.load` imports
every family module, and `import jaxmoe` imports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["Family", "for_model", "for_model_type", "register", "registered"]


@dataclasses.dataclass(frozen=True)
class Family:
    """How one family of models maps onto Hugging Face folders.

    model_types: the config.json `model_type`s it reads; model_classes: the jaxmoe classes it writes (subclasses
    included); param_specs(config): every parameter with its Hub tensors (`jaxmoe.io.names.ParamSpec`);
    load(folder: Path, hf: dict (config.json), *, dtype, mesh, compute_dtype) -> the model in eval mode;
    save(model, path, *, overwrite: bool, max_shard_bytes: int) -> the folder written.
    """

    model_types: tuple[str, ...]
    model_classes: tuple[type, ...]
    param_specs: Callable[[object], Iterable]
    load: Callable[..., object]
    save: Callable[..., Path]


_FAMILIES: list[Family] = []


def register(family: Family) -> Family:
    """Adds `family` to the table; a model_type or class another family already claims is refused."""
    for other in _FAMILIES:
        clash = set(family.model_types) & set(other.model_types) or set(family.model_classes) & set(
            other.model_classes)
        if clash:
            raise ValueError(f"model family for {family.model_types} claims {sorted(map(str, clash))}, already "
                             f"registered for {other.model_types}")
    _FAMILIES.append(family)
    return family


def registered() -> tuple[Family, ...]:
    """Every registered family, in registration order."""
    return tuple(_FAMILIES)


def for_model_type(model_type) -> Family | None:
    """The family that reads config.json's `model_type`, or None."""
    return next((family for family in _FAMILIES if model_type in family.model_types), None)


def for_model(model) -> Family | None:
    """The family that writes `model` (the most specific registered class of its type), or None."""
    for cls in type(model).__mro__:
        family = next((family for family in _FAMILIES if cls in family.model_classes), None)
        if family is not None:
            return family
    return None
