"""Which matrices of a model get quantized, and how: targets, rules, per-matrix settings, their checks.

A matrix is named by its path in the model, "/"-joined: a linear layer by its module path
("layers/3/self_attn/qkv_proj", "layers/3/mlp/down_proj", "lm_head"), an expert stack by its parameter path
("layers/3/mlp/w_gate_up", "layers/3/mlp/w_down"). Every matrix is handled as a [g, k, n] weight: g = 1 and
the kernel [k, n] for a linear layer, g = experts for an expert stack; k is the input dimension that group
sizes divide.

target "experts": the MoE expert weights only (MoQE). target "linear": every `nnx.Linear` except the MoE
routers (lm_head included when the embeddings are untied), and the expert weights. Embeddings and norms are never
candidates. `rules`, a list of (regex, settings), then adjust the defaults per matrix: the first rule whose regex
`re.search`es the path wins; settings is a dict with any of "bits", "group_size", "symmetric"; "bits": None
keeps the matrix in float. Every rule must match at least one candidate (a typo fails loudly).
"""

from __future__ import annotations

import dataclasses
import re

from flax import nnx

from jaxmoe.moe.layer import SparseMoeBlock
from jaxmoe.quant.adaptive import AdaptiveGroupSize

__all__ = ["BITS", "Matrix", "Settings", "TARGETS", "find_matrices", "plan_matrices"]

BITS = (8, 4, 3, 2)
TARGETS = ("experts", "linear")
RULE_KEYS = ("bits", "group_size", "symmetric")
EXPERT_WEIGHTS = ("w_gate_up", "w_down")


@dataclasses.dataclass(frozen=True)
class Matrix:
    """One quantizable matrix: its path, "linear" or "experts", where it sits (`parent.<key>` is the nnx.Linear
    or the expert variable) and its [g, k, n] shape."""

    path: str
    kind: str
    parent: object
    key: str
    shape: tuple[int, int, int]

    def variable(self) -> nnx.Variable:
        """The weight's variable: the linear layer's kernel, or the expert parameter."""
        node = getattr(self.parent, self.key)
        return node.kernel if self.kind == "linear" else node


@dataclasses.dataclass(frozen=True)
class Settings:
    """How one matrix is quantized. group_size: an int (rows of k per scale), None (per-channel: k), or an
    AdaptiveGroupSize (chosen per matrix from its values, per expert for an expert stack). bits None: the matrix
    stays float."""

    bits: int | None
    group_size: int | None | AdaptiveGroupSize
    symmetric: bool = True


def _path_name(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def find_matrices(model: nnx.Module) -> list[Matrix]:
    """Every candidate matrix of `model` (see the module docstring), in graph order."""
    nodes = dict(nnx.iter_graph(model))
    found = []
    for path, node in nodes.items():
        if not path:
            continue
        parent, key = nodes[path[:-1]], path[-1]
        if isinstance(node, nnx.Linear) and isinstance(key, str):
            if isinstance(parent, SparseMoeBlock) and key == "router":
                continue
            k, n = node.kernel.shape
            found.append(Matrix(_path_name(path), "linear", parent, key, (1, k, n)))
        elif isinstance(node, SparseMoeBlock):
            for name in EXPERT_WEIGHTS:
                found.append(Matrix(_path_name(path + (name,)), "experts", node, name,
                                    tuple(getattr(node, name).shape)))
    return found


def check_bits(bits, where: str) -> None:
    if bits not in BITS:
        raise ValueError(f"bits={bits!r}{where}; expected one of {list(BITS)}")


def normalize_group_size(group_size, where: str):
    """int / None / "adaptive" / AdaptiveGroupSize -> int, None or AdaptiveGroupSize; raises for anything else."""
    if group_size == "adaptive":
        return AdaptiveGroupSize()
    if group_size is None or isinstance(group_size, AdaptiveGroupSize):
        return group_size
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r}{where}; expected a positive int (rows of the input dimension "
                         "per scale, e.g. 64), None for per-channel, or 'adaptive'")
    return group_size


def check_rules(rules) -> list[tuple[re.Pattern, dict]]:
    """[(regex, settings dict)] checked and compiled."""
    if rules is None:
        return []
    if isinstance(rules, (str, dict)) or not all(isinstance(r, (tuple, list)) and len(r) == 2 for r in rules):
        raise ValueError(f"rules={rules!r}; expected a list of (regex, settings dict) pairs, e.g. "
                         "[(r'self_attn', {'bits': None}), (r'w_down', {'bits': 8})]")
    compiled = []
    for i, (pattern, settings) in enumerate(rules):
        where = f" in rule {i} ({pattern!r})"
        try:
            regex = re.compile(pattern)
        except (re.error, TypeError) as error:
            raise ValueError(f"rule {i}: pattern {pattern!r} is not a valid regular expression ({error})") from None
        if not isinstance(settings, dict) or set(settings) - set(RULE_KEYS):
            raise ValueError(f"rule {i} ({pattern!r}) has settings {settings!r}; expected a dict with keys from "
                             f"{list(RULE_KEYS)}")
        if settings.get("bits", BITS[0]) is not None:
            check_bits(settings.get("bits", BITS[0]), where)
        if "group_size" in settings:
            normalize_group_size(settings["group_size"], where)
        compiled.append((regex, dict(settings)))
    return compiled


def check_settings_fit(matrix: Matrix, settings: Settings) -> None:
    """The group size divides k, and bits < 8 has k % 8 == 0 (codes pack along k in blocks of 8 rows)."""
    k = matrix.shape[1]
    if isinstance(settings.group_size, int) and k % settings.group_size:
        valid = [d for d in range(8, k + 1, 8) if k % d == 0] or [k]
        raise ValueError(f"group_size={settings.group_size} does not divide the input dimension k={k} of "
                         f"{matrix.path!r} (weight [g, k, n] = {list(matrix.shape)}); valid group sizes for it: "
                         f"{valid}, None (per-channel) or 'adaptive'. Use a rule to give it another size")
    if settings.bits < 8 and k % 8:
        raise ValueError(f"{matrix.path!r} has input dimension k={k}, not a multiple of 8, which {settings.bits}-bit "
                         "codes need (they pack along k in blocks of 8 rows); quantize it with 8 bits or keep it "
                         "float with a rule, e.g. (pattern, {'bits': 8})")


def plan_matrices(model: nnx.Module, *, bits, group_size, target, symmetric, rules) -> list[tuple[Matrix, Settings]]:
    """The matrices to quantize with their settings; raises ValueError for bad arguments, a target or rule that
    matches nothing, or settings that do not fit a matrix (see the module docstring)."""
    check_bits(bits, "")
    group_size = normalize_group_size(group_size, "")
    if target not in TARGETS:
        raise ValueError(f"target={target!r}; expected one of {list(TARGETS)} ('experts': MoE expert weights only; "
                         "'linear': every linear layer but the router, and the experts)")
    if not isinstance(symmetric, bool):
        raise ValueError(f"symmetric={symmetric!r}; expected True (absmax scales) or False (min-max with zero points)")
    compiled = check_rules(rules)
    matrices = [m for m in find_matrices(model) if target == "linear" or m.kind == "experts"]
    if not matrices:
        if target == "experts":
            raise ValueError(f"target='experts' matches no parameter: this {type(model).__name__} has no MoE expert "
                             "weights. Only models with a `moe` config (model_type phimoe: PhimoeForCausalLM, e.g. the "
                             "presets grin-moe, phi3.5-moe, tiny-moe) have experts; use target='linear' for a dense "
                             "model")
        raise ValueError(f"target={target!r} matches no parameter: this {type(model).__name__} has no nnx.Linear "
                         "layers or MoE experts")
    default = Settings(bits, group_size, symmetric)
    used = [False] * len(compiled)
    planned = []
    for matrix in matrices:
        settings = default
        for i, (regex, changes) in enumerate(compiled):
            if regex.search(matrix.path):
                used[i] = True
                if "group_size" in changes:
                    changes = {**changes, "group_size": normalize_group_size(changes["group_size"], "")}
                settings = dataclasses.replace(settings, **changes)
                break
        if settings.bits is not None:
            check_settings_fit(matrix, settings)
            planned.append((matrix, settings))
    unused = [rules[i][0] for i, hit in enumerate(used) if not hit]
    if unused:
        names = ", ".join(m.path for m in matrices[:8]) + (", ..." if len(matrices) > 8 else "")
        raise ValueError(f"rule pattern(s) {unused} match none of the {len(matrices)} matrices target={target!r} "
                         f"selects ({names}); fix the regex or drop the rule")
    if not planned:
        raise ValueError(f"nothing to quantize: the rules keep all {len(matrices)} matrices of target={target!r} in "
                         "float (bits=None)")
    return planned
