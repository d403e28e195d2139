"""Bytes that a model's parameters occupy as stored: `param_bytes`, and `bytes_by_group` for reports.

Counts every `nnx.Param` (LoRA adapters and QAT weights included) and every `QuantizedParam` (its packed codes,
scales and zero points: `QuantizedWeight.nbytes`). Shapes and dtypes are all it reads, so it works on abstract
models (`nnx.eval_shape`) as well; no buffer is touched.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx

from jaxmoe.quant.params import QuantizedParam

__all__ = ["GROUPS", "bytes_by_group", "param_bytes"]

# Report groups, in print order; `group_of` assigns each parameter path to one.
GROUPS = ("embeddings", "attention", "dense ffn", "router", "experts", "norms", "lm_head", "other")


def _leaf_bytes(leaf) -> int:
    return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize


def _parameters(model: nnx.Module):
    """(path tuple, variable) for every stored parameter."""
    return [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, (nnx.Param, QuantizedParam))]


def _variable_bytes(variable: nnx.Variable) -> int:
    return sum(_leaf_bytes(leaf) for leaf in jax.tree.leaves(variable.get_value()))


def param_bytes(model: nnx.Module) -> int:
    """Total bytes of the model's parameters as stored (packed low-bit weights as packed)."""
    return sum(_variable_bytes(variable) for _, variable in _parameters(model))


def group_of(path: tuple) -> str:
    """The report group of a parameter path, e.g. ("layers", 0, "self_attn", "qkv_proj", "kernel") -> "attention"."""
    names = [str(p) for p in path]
    if names[0] == "embed_tokens":
        return "embeddings"
    if names[0] == "lm_head":
        return "lm_head"
    if any("norm" in name for name in names):
        return "norms"
    if "self_attn" in names:
        return "attention"
    if "router" in names:
        return "router"
    if names[-1] in ("w_gate_up", "w_down"):
        return "experts"
    if "mlp" in names:
        return "dense ffn"
    return "other"


def bytes_by_group(model: nnx.Module) -> dict[str, int]:
    """{group: bytes} over GROUPS (groups the model lacks are left out) plus "total" (= param_bytes)."""
    totals = dict.fromkeys(GROUPS, 0)
    present = set()
    for path, variable in _parameters(model):
        group = group_of(path)
        totals[group] += _variable_bytes(variable)
        present.add(group)
    out = {group: totals[group] for group in GROUPS if group in present}
    out["total"] = sum(out.values())
    return out
