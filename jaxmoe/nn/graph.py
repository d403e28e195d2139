"""Finding and swapping submodules of an NNX model in place: how adapters wrap a layer and are folded back."""

from __future__ import annotations

from flax import nnx

__all__ = ["set_submodule", "submodules"]


def submodules(model: nnx.Module, kind: type | tuple[type, ...]) -> list[tuple[object, str | int, nnx.Module]]:
    """(parent, attribute name or list index, node) for every `kind` node in the graph below `model`."""
    nodes = dict(nnx.iter_graph(model))
    return [(nodes[path[:-1]], path[-1], node) for path, node in nodes.items()
            if path and isinstance(node, kind)]


def set_submodule(parent, key: str | int, node: nnx.Module) -> None:
    """Puts `node` at `parent.key` (`parent[key]` for a list index), replacing what was there."""
    if isinstance(key, int):
        parent[key] = node
    else:
        setattr(parent, key, node)
