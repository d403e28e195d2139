"""Mixture of LoRAs: several named adapters on one linear layer, the one applied chosen per batch row.

Phi-4-multimodal keeps its language model frozen and adds one LoRA adapter per input modality ("vision",
"speech"); a batch may mix rows of different modalities (../shared/docs/phi_models.md §3.5). `MultiLoRALinear`
wraps an `nnx.Linear` with any number of named adapters, each with its own rank and alpha, and applies to batch
row i the adapter that the innermost `select_adapters(names, sel_b)` block names for it:

    with select_adapters(("vision", "speech"), sel_b):   # sel_b int [b]: 0 vision, 1 speech, -1 none
        logits = model(ids).logits

Outside any `select_adapters` block no adapter is applied (the base model, as PEFT's `disable_adapter`), and a
layer without an adapter of the chosen name leaves that row unadapted. Under `jax.jit` / `nnx.jit`, enter the
block inside the jitted function with `sel_b` among its arguments: a selection made outside would be baked into
the first trace and silently reused, so the layers refuse it (a function traced without any selection keeps
running without adapters, whatever block it is later called in).

`jaxmoe.io.peft` reads and writes PEFT adapter folders into and out of these layers. Adapters live only in the
language model's decoder layers (in a multimodal model: in its `language_model`); the adapter matrices are
`nnx.LoRAParam`, so `nnx.LoRAParam` filters select them as in `jaxmoe.nn.lora`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
from collections.abc import Iterator, Sequence

import jax
import jax.extend
import jax.numpy as jnp
from flax import nnx

from jaxmoe.nn.graph import set_submodule, submodules
from jaxmoe.nn.lora import UNSUPPORTED_TARGETS, LoRAAdapter, LoRAConfig, LoRALinear

__all__ = ["MultiLoRALinear", "add_adapter", "adapter_names", "adapter_scope", "base_param_dict", "select_adapters",
           "wrap_linear"]


# ------------------------------------------------------------------------------------------------ selection


@dataclasses.dataclass(frozen=True)
class _Selection:
    names: tuple[str, ...]
    sel_b: jax.Array  # int [b]: index into names, -1 for no adapter
    top_level: bool  # entered outside any JAX transformation (jit, grad, ...)


_SELECTION: contextvars.ContextVar[_Selection | None] = contextvars.ContextVar("jaxmoe_lora_selection",
                                                                                default=None)


def _current_trace():
    return jax.extend.core.get_opaque_trace_state(convention="nnx")


_TOP_LEVEL_TRACE = _current_trace()  # modules are imported outside transformations


@contextlib.contextmanager
def select_adapters(names: Sequence[str], sel_b) -> Iterator[None]:
    """Inside the block, every `MultiLoRALinear` applies to batch row i the adapter `names[sel_b[i]]`, or none
    where sel_b[i] is -1. names: adapter names; sel_b: int [b] (a traced array under jit)."""
    names = (names,) if isinstance(names, str) else tuple(names)
    if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"select_adapters: names is {names!r}; expected distinct non-empty adapter names, e.g. "
                         "('vision', 'speech')")
    sel_b = jnp.asarray(sel_b)
    if sel_b.ndim != 1 or not jnp.issubdtype(sel_b.dtype, jnp.integer):
        raise ValueError(f"select_adapters: sel_b must be an integer array [batch]; got {sel_b.dtype} "
                         f"{list(sel_b.shape)}")
    if not isinstance(sel_b, jax.core.Tracer) and sel_b.size:
        lo, hi = (int(v) for v in jax.device_get((sel_b.min(), sel_b.max())))  # one wait on the device
        if lo < -1 or hi >= len(names):
            raise ValueError(f"select_adapters: sel_b holds {lo if lo < -1 else hi}; expected -1 (no adapter) or "
                             f"an index into names {names} (0 to {len(names) - 1})")
    token = _SELECTION.set(_Selection(names, sel_b, _current_trace() == _TOP_LEVEL_TRACE))
    try:
        yield
    finally:
        _SELECTION.reset(token)


# ------------------------------------------------------------------------------------------------ layers


class MultiLoRALinear(nnx.Module):
    """y = base(x) + the update of the adapter selected for each batch row (see `select_adapters`).

    x [b, ..., in] -> y [b, ..., out]. `base` is the wrapped `nnx.Linear`; `adapters` maps names to
    `LoRAAdapter`s. The adapter matmuls run in the base's compute dtype.
    """

    def __init__(self, base: nnx.Linear):
        self.base = base
        self.adapters = nnx.Dict()

    def add(self, name: str, *, rank: int, alpha: float, use_rslora: bool = False, dtype=jnp.float32,
            rngs: nnx.Rngs) -> LoRAAdapter:
        if name in self.adapters:
            raise ValueError(f"this layer already has an adapter named {name!r}; choose another name")
        adapter = LoRAAdapter(self.base.in_features, self.base.out_features, rank=rank, alpha=alpha,
                              use_rslora=use_rslora, dtype=dtype, rngs=rngs)
        self.adapters[name] = adapter
        return adapter

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        selection = _SELECTION.get()
        chosen = [] if selection is None else [n for n in selection.names if n in self.adapters]
        if not chosen:
            return y
        sel_b = selection.sel_b
        if sel_b.shape[0] != x.shape[0]:
            raise ValueError(f"select_adapters got sel_b for {sel_b.shape[0]} rows, but this layer's input has "
                             f"{x.shape[0]} (shape {list(x.shape)}); pass one adapter index per batch row")
        if isinstance(x, jax.core.Tracer) and not isinstance(sel_b, jax.core.Tracer) and selection.top_level:
            raise ValueError("select_adapters was entered outside the jitted (or otherwise transformed) function "
                             "that runs the model, so its selection would be fixed into the compiled function and "
                             "reused for later calls; enter `with select_adapters(names, sel_b):` inside the "
                             "jitted function and pass sel_b to it as an argument")
        compute = self.base.dtype or y.dtype
        for name in chosen:
            on_b = (sel_b == selection.names.index(name)).reshape((-1,) + (1,) * (x.ndim - 1))
            update = self.adapters[name].update(x, compute)
            y = y + jnp.where(on_b, update, 0).astype(y.dtype)
        return y


# ------------------------------------------------------------------------------------------------ adding


def adapter_names(model: nnx.Module) -> tuple[str, ...]:
    """The names of the adapters on the model's `MultiLoRALinear` layers, in the order first added."""
    names: dict[str, None] = {}
    for _, _, layer in submodules(model, MultiLoRALinear):
        names.update(dict.fromkeys(layer.adapters))
    return tuple(names)


def adapter_scope(model: nnx.Module, name: str, *, caller: str) -> tuple[nnx.Module, tuple]:
    """Checks that a new adapter `name` can go on `model` and returns the part of the model that holds adapters
    (a multimodal model's `language_model`, else the model itself) with its path in the model.

    Raises ValueError, naming `caller`, for a name that is not letters, digits, '_' or '-', a name the model
    already has, and a model carrying single LoRA adapters (`jaxmoe.nn.lora.apply_lora`)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"{caller}: adapter name {name!r} is not usable; expected a non-empty string of letters, "
                         "digits, '_' or '-', e.g. 'vision'")
    lm = getattr(model, "language_model", None)
    scope, path = (lm, ("language_model",)) if isinstance(lm, nnx.Module) else (model, ())
    if submodules(scope, LoRALinear):
        raise ValueError(f"{caller}: this model has single LoRA adapters (jaxmoe.nn.lora.apply_lora); fold them in "
                         "with merge_lora(model) first")
    if name in adapter_names(model):
        raise ValueError(f"{caller}: the model already has an adapter named {name!r}; choose another name")
    return scope, path


def wrap_linear(parent, key: str | int) -> MultiLoRALinear:
    """The `MultiLoRALinear` at `parent.key` (`parent[key]` for a list index); a plain `nnx.Linear` there is
    wrapped in one in place first."""
    node = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(node, nnx.Linear):
        node = MultiLoRALinear(node)
        set_submodule(parent, key, node)
    if not isinstance(node, MultiLoRALinear):
        raise TypeError(f"wrap_linear: layer {key!r} is a {type(node).__name__}; adapters wrap nnx.Linear layers "
                        "only (a quantized model: add adapters before quantizing, or dequantize it)")
    return node


def add_adapter(model: nnx.Module, name: str, config: LoRAConfig, *, rngs: nnx.Rngs) -> int:
    """Adds, in place, a fresh adapter `name` (config.rank, config.alpha; a LoRAConfig or any object with rank,
    alpha and targets) to every linear layer of the language model whose attribute name is in `config.targets`,
    wrapping plain `nnx.Linear`s in `MultiLoRALinear`.

    A fresh adapter leaves the outputs unchanged (lora_b is zero) until trained. Returns the number of layers.
    """
    if not isinstance(config, LoRAConfig):
        if not all(hasattr(config, field) for field in ("rank", "alpha", "targets")):
            raise TypeError(f"add_adapter: config is a {type(config).__name__}; expected a jaxmoe.nn.lora.LoRAConfig "
                            "(or an object with rank, alpha and targets)")
        config = LoRAConfig(rank=config.rank, alpha=config.alpha, targets=tuple(config.targets))
    scope, _ = adapter_scope(model, name, caller="add_adapter")
    layers = [(p, k) for p, k, _ in submodules(scope, (nnx.Linear, MultiLoRALinear))
              if isinstance(k, str) and not isinstance(p, MultiLoRALinear)]
    existing = sorted({k for _, k in layers} - set(UNSUPPORTED_TARGETS))
    missing = [t for t in config.targets if t not in existing]
    if missing:
        raise ValueError(f"add_adapter: targets {missing} match no linear layer of this {type(scope).__name__}; "
                         f"its adaptable linear layers are {existing}. Pass LoRAConfig(targets=...) with names from "
                         "that list")
    chosen = [(p, k) for p, k in layers if k in config.targets]
    for parent, key in chosen:
        wrap_linear(parent, key).add(name, rank=config.rank, alpha=config.alpha, rngs=rngs)
    return len(chosen)


def base_param_dict(model: nnx.Module, variables=nnx.Param) -> dict:
    """`nnx.to_pure_dict` of the model's `variables` (an nnx filter) without the adapters, every
    `MultiLoRALinear` replaced by its base layer's parameters: the layout of the same model without adapters."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.All(variables, nnx.Not(nnx.LoRAParam))))
    for path, node in nnx.iter_graph(model):
        if isinstance(node, MultiLoRALinear):
            parent = pure
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = parent[path[-1]]["base"]
    return pure
