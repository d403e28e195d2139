"""Device meshes and the rules that place every parameter of `Phi3ForCausalLM` / `PhimoeForCausalLM` on one.

A parameter goes to the mesh in two steps. `logical_axes` names each of its dimensions by what it is ("embed",
"vocab", "heads", "mlp", "experts", ...) from its path in `nnx.state(model, nnx.Param)`; `partition_spec` maps
those names to mesh axes through `LOGICAL_RULES`. The model code itself carries no sharding annotations: the
parameters and the batch are placed, and `jax.jit` (GSPMD) propagates the layout through the computation.

Mesh axes (`MESH_AXES`):
  data    plain data parallelism: the batch is split, parameters are replicated.
  fsdp    the batch is split and every weight matrix is split along its model (`embed`) dimension (the
          embedding table along its rows instead, see LOGICAL_RULES).
  expert  MoE expert parallelism: each device holds num_experts / expert experts; the axis also splits the
          batch (as MaxText does), so a dense model or the attention layers still use those devices.
  tensor  Megatron-style tensor parallelism over attention heads, the feed-forward width and the vocabulary.

Axis types. Propagation is GSPMD's, so jaxmoe computes on meshes whose axes are Auto (as Flax's GSPMD guide and
MaxText's default `shard_mode: auto` do). `jax.make_mesh` gives Explicit axes by default (sharding in types,
where every operation whose output layout is ambiguous must be annotated), so every mesh jaxmoe receives
(`load_hf(mesh=)`, `shard_model`, `param_shardings`, `use_mesh_for_experts`) is used as `auto_mesh(mesh)`: the
same devices and axis names with Auto axes, and parameters live there. jaxmoe's entry points (a model's call,
`generate`, `train_step`; `on_auto_axes`) then also take arrays placed on the Explicit mesh (moved to the Auto
one: same devices, same shards, nothing copied) and run inside `jax.set_mesh(explicit_mesh)`. Inside your own
`jax.jit` / `nnx.jit`, JAX requires every argument on one mesh: pass plain arrays (NumPy, or on one device;
jit places them) or arrays placed on `auto_mesh(mesh)`.

Usage: `mesh = make_mesh(fsdp=2, expert=4); shard_model(model, mesh)` (or any `jax.make_mesh` with these axis
names), then call the model on plain [batch, time] ids, or on ids placed with
`jax.device_put(ids, NamedSharding(auto_mesh(mesh), batch_spec(mesh)))`, eagerly or under `nnx.jit`.
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["LOGICAL_RULES", "MESH_AXES", "auto_mesh", "batch_spec", "check_batch", "check_mesh", "logical_axes",
           "make_mesh", "on_auto_axes", "param_shardings", "partition_spec", "shard_model"]

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical axis -> the mesh axes that split it, in order; None replicates. A mesh axis missing from the mesh or of
# size 1 is skipped. "norm" and "bias" vectors are replicated: they are small, and a replicated bias adds to any
# layout of its matmul's output without communication.
#
# The embedding table [vocab, d] is split along its rows only ("table_rows", then None): the lookup then takes
# each device's rows and sums the partial rows across the row-splitting axes, and the [b, t, d] result is
# whole along d, free to follow the batch's split. Split along d over fsdp (as other weights are), the lookup's
# output comes out split along d while the batch is split over fsdp too, and XLA's SPMD partitioner can only go
# from one to the other by replicating the activations ("Involuntary full rematerialization", in the forward
# and again in the backward). Over tensor x fsdp the table keeps the same bytes per device.
LOGICAL_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),  # activations' batch dimension
    "embed": ("fsdp",),  # the model dimension d of every weight matrix (FSDP / ZeRO-3)
    "vocab": ("tensor",),  # the output dimension of an untied lm_head
    "table_rows": ("tensor", "fsdp"),  # the embedding table's vocabulary dimension (also the tied lm_head)
    "heads": ("tensor",),  # fused q|k|v output [(n + 2kv)·h] and o_proj's input [n·h]
    "mlp": ("tensor",),  # the feed-forward width (2f of gate|up, f of down), dense and per expert
    "experts": ("expert",),  # the leading expert dimension of w_gate_up / w_down
    "norm": None,
    "bias": None,
}

# The logical axes that must divide exactly: replicating the experts instead would quietly give every device all
# of them, which is not what a mesh with an expert axis asks for.
_MUST_DIVIDE = {"experts": "experts"}

# `nnx.Linear` layers by attribute name -> logical axes of their kernel [in, out]. The MoE router [d, e] is split
# along d like every weight; its expert dimension stays whole so each device computes all logits of its tokens.
_LINEAR_KERNELS = {
    "qkv_proj": ("embed", "heads"),
    "o_proj": ("heads", "embed"),
    "gate_up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
    "lm_head": ("embed", "vocab"),
    "router": ("embed", None),
}
_EXPERT_WEIGHTS = {"w_gate_up": ("experts", "embed", "mlp"), "w_down": ("experts", "mlp", "embed")}
_NORMS = {"input_layernorm", "post_attention_layernorm", "norm"}
# MoE task adapters (`jaxmoe.moe.task_adapters`, the block's `task_adapter`) by parameter -> its number of
# dimensions. Replicated: they are small (a bottleneck per task or pool slot, task embeddings), and the rows each
# batch row gathers by its task id are then on every device.
_TASK_ADAPTER_PARAMS = {"w_down": 3, "w_up": 3, "task_embedding": 2, "gate": 2, "task_router": 2}


def make_mesh(*, data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A Mesh with all four `MESH_AXES` (sizes as given, 1 allowed) and Auto axis types, over `devices`
    (default: all of `jax.devices()`), whose count must equal the product of the sizes."""
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"make_mesh: {name}={size!r}; every axis size must be an integer >= 1")
    devices = list(jax.devices() if devices is None else devices)
    product = math.prod(sizes.values())
    if product != len(devices):
        raise ValueError(f"make_mesh: data*fsdp*expert*tensor = {data}*{fsdp}*{expert}*{tensor} = {product}, but "
                         f"there are {len(devices)} devices; choose sizes whose product is {len(devices)}, or pass "
                         f"devices= with {product} devices")
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4,
                         devices=devices)


def check_mesh(mesh: Mesh) -> None:
    """Raises ValueError when an axis of `mesh` is not one of `MESH_AXES` (a mesh may leave axes out)."""
    for name in mesh.axis_names:
        if name not in MESH_AXES:
            raise ValueError(f"mesh axis {name!r} is unknown; the known mesh axes are {MESH_AXES} (build the mesh "
                             "with jaxmoe.sharding.make_mesh)")


def auto_mesh(mesh: Mesh) -> Mesh:
    """The mesh jaxmoe computes on: `mesh` itself when none of its axes is Explicit, else a Mesh over the same
    devices (same order) and axis names with those axes Auto. Meshes compare equal by value, so the result of
    two calls shares jit caches."""
    if not mesh.explicit_axes:
        return mesh
    auto = jax.sharding.AxisType.Auto
    return mesh.update(axis_types=tuple(auto if t == jax.sharding.AxisType.Explicit else t for t in mesh.axis_types))


def on_auto_axes(fn):
    """Decorates a jaxmoe entry point (a model's `__call__`, `generate`, `train_step`) so that it accepts what a
    mesh with Explicit axes leads to: arrays placed on such a mesh, passed as arguments (or leaves of them, e.g.
    a `Batch`) or held by an nnx argument (e.g. an `nnx.Rngs` created inside `jax.set_mesh(explicit_mesh)`,
    updated in place), are moved onto its `auto_mesh`: the same devices hold the same shards, so nothing is
    copied. Inside `jax.set_mesh(explicit_mesh)`, or under a jit traced there, the body runs with that mesh's
    axes Auto. Tracers are left as they are."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args, kwargs = jax.tree.map(_onto_auto_mesh, (args, kwargs), is_leaf=nnx.graph.is_graph_node)
        context = jax.sharding.get_abstract_mesh()
        if context.empty or not context.explicit_axes:
            return fn(*args, **kwargs)
        auto = dict.fromkeys(context.explicit_axes, jax.sharding.AxisType.Auto)
        with jax.sharding.use_abstract_mesh(context.update_axis_types(auto)):
            return fn(*args, **kwargs)

    return wrapper


def _onto_auto_mesh(x):
    if nnx.graph.is_graph_node(x):
        state = nnx.state(x)
        moved = jax.tree.map(_onto_auto_mesh, state)
        if any(a is not b for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(moved))):
            nnx.update(x, moved)
        return x
    if isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array):
        return x
    placed = x.sharding
    if not isinstance(placed, NamedSharding) or not placed.mesh.explicit_axes:
        return x
    return jax.device_put(x, NamedSharding(auto_mesh(placed.mesh), placed.spec, memory_kind=placed.memory_kind))


def logical_axes(path: tuple[str | int, ...], shape: tuple[int, ...]) -> tuple[str | None, ...]:
    """The logical axis name (or None) of each dimension of the parameter at `path` in `nnx.state(model,
    nnx.Param)` (layer indices may be ints), e.g. ('layers', 0, 'mlp', 'w_gate_up') -> ('experts', 'embed', 'mlp').

    LoRA adapters: `<layer>.base.kernel` is the plain kernel, `lora_a` [in, r] keeps the kernel's input axis and
    `lora_b` [r, out] its output axis. MoE task adapters (`mlp.task_adapter.*`) are replicated (all None).
    Raises ValueError for a path no rule covers, so that a new parameter cannot go unsharded unnoticed.
    """
    names = tuple(str(p) for p in path)
    leaf = names[-1] if names else ""
    owners = [n for n in names[:-1] if n != "base"]
    owner = owners[-1] if owners else ""
    axes = None
    if names == ("embed_tokens", "embedding"):
        axes = ("table_rows", None)
    elif owner == "task_adapter" and leaf in _TASK_ADAPTER_PARAMS:
        axes = (None,) * _TASK_ADAPTER_PARAMS[leaf]
    elif owner == "mlp" and leaf in _EXPERT_WEIGHTS:
        axes = _EXPERT_WEIGHTS[leaf]
    elif owner in _LINEAR_KERNELS:
        kernel_in, kernel_out = _LINEAR_KERNELS[owner]
        axes = {"kernel": (kernel_in, kernel_out), "bias": ("bias",), "lora_a": (kernel_in, None),
                "lora_b": (None, kernel_out)}.get(leaf)
    elif owner in _NORMS and leaf in ("weight", "scale", "bias"):
        axes = ("norm",)
    if axes is None:
        raise ValueError(f"no sharding rule for the parameter at {'.'.join(names)!r} (shape {tuple(shape)}); add "
                         "one to jaxmoe.sharding.logical_axes")
    if len(axes) != len(shape):
        raise ValueError(f"the parameter at {'.'.join(names)!r} has shape {tuple(shape)}; its rule {axes} expects "
                         f"{len(axes)} dimensions")
    return axes


def _mesh_axes(logical: str | None, mesh: Mesh, rules) -> tuple[str, ...]:
    """The mesh axes of size > 1 in `mesh` that `rules` assigns to `logical`."""
    if logical is None:
        return ()
    if logical not in rules:
        raise ValueError(f"logical axis {logical!r} has no entry in the rules; known: {sorted(rules)}")
    return tuple(a for a in (rules[logical] or ()) if mesh.shape.get(a, 1) > 1)


def partition_spec(logical: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
                   rules: dict[str, tuple[str, ...] | None] = LOGICAL_RULES) -> PartitionSpec:
    """A PartitionSpec (one entry per dimension of `shape`) from `logical` axis names through `rules`.

    A mesh axis that does not divide what is left of its dimension is skipped, so that dimension is replicated
    over it (a vocab of 50 over tensor=4 stays whole); the "experts" dimension instead must divide (ValueError).
    A mesh axis already used by an earlier dimension is skipped, as one axis cannot split two dimensions.
    """
    check_mesh(mesh)
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} name {len(logical)} dimensions; shape {tuple(shape)} has "
                         f"{len(shape)}")
    used: set[str] = set()
    entries = []
    for name, dim in zip(logical, shape):
        axes = tuple(a for a in _mesh_axes(name, mesh, rules) if a not in used)
        if name in _MUST_DIVIDE and dim % math.prod(mesh.shape[a] for a in axes):
            size = math.prod(mesh.shape[a] for a in axes)
            raise ValueError(f"{dim} {_MUST_DIVIDE[name]} do not divide over the {'*'.join(axes)} axis of size "
                             f"{size}; choose an {'*'.join(axes)} axis size that divides the expert count")
        kept, remaining = [], dim
        for a in axes:
            if remaining % mesh.shape[a] == 0:
                kept.append(a)
                remaining //= mesh.shape[a]
        used.update(kept)
        entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*entries)


def param_shardings(model: nnx.Module, mesh: Mesh) -> nnx.State:
    """`nnx.state(model, nnx.Param)` with each parameter's value replaced by its NamedSharding on
    `auto_mesh(mesh)`."""
    check_mesh(mesh)
    mesh = auto_mesh(mesh)

    def sharding(path, variable):
        shape = variable.get_value().shape
        return variable.replace(NamedSharding(mesh, partition_spec(logical_axes(path, shape), shape, mesh)))

    return nnx.map_state(sharding, nnx.state(model, nnx.Param))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Places the model's parameters on `auto_mesh(mesh)` by `param_shardings`, in place, and lets its MoE blocks
    run expert-parallel over the mesh's `expert` axis; returns the model. `mesh` may have Auto or Explicit axes
    (`jax.make_mesh`'s default): see the module docstring."""
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.device_put(state, param_shardings(model, mesh)))
    use_mesh_for_experts(model, mesh)
    return model


def use_mesh_for_experts(model: nnx.Module, mesh: Mesh) -> None:
    """Sets `auto_mesh(mesh)` on every SparseMoeBlock of `model` (checking the expert count divides the expert
    axis)."""
    from jaxmoe.moe.layer import SparseMoeBlock

    check_mesh(mesh)
    mesh = auto_mesh(mesh)
    for _, module in model.iter_modules():
        if isinstance(module, SparseMoeBlock):
            partition_spec(("experts",), (module.moe.num_experts,), mesh)  # raises when they do not divide
            module.mesh = mesh


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
    check_mesh(mesh)
    return _mesh_axes("batch", mesh, LOGICAL_RULES)


def batch_spec(mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of [batch, time] inputs: the batch split over the batch axes, time whole."""
    axes = _batch_axes(mesh)
    return PartitionSpec(axes or None, None)


def check_batch(batch_size: int, mesh: Mesh) -> None:
    """Raises ValueError when `batch_size` does not divide over the mesh's batch axes (data*fsdp*expert)."""
    axes = _batch_axes(mesh)
    size = math.prod(mesh.shape[a] for a in axes)
    if batch_size % size:
        raise ValueError(f"batch size {batch_size} does not divide over the mesh's batch axes "
                         f"{'*'.join(axes)} = {size}; use a batch size that is a multiple of {size}")
