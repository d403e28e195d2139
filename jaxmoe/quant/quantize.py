"""Weight-only quantization of a model: `quantize`, its inverse `dequantize`, and `quantization_report`.

`quantize` returns a copy of the model (arrays shared, the input untouched) in which the selected matrices
(jaxmoe.quant.plan: target, rules) are packed `pallas_kernels.QuantizedWeight`s: an `nnx.Linear` becomes a
`QuantizedLinear`, an expert stack's parameter a `QuantizedParam`. Each decision is logged (logger
"jaxmoe.quant", INFO) and `quantization_report(model)` lists the stored per-matrix settings (the group size
"adaptive" chose included: one per expert for an expert stack whose experts chose differently, stored as a
`pallas_kernels.MixedQuantizedWeight`). With fixed group sizes `quantize` traces, so `nnx.eval_shape(lambda:
quantize(Model(config, rngs=...), ...))` sizes a quantized model without materialising any weight.
"""

from __future__ import annotations

import dataclasses
import logging

from flax import nnx

from jaxmoe.moe.layer import SparseMoeBlock
from jaxmoe.quant.adaptive import AdaptiveGroupSize
from jaxmoe.quant.params import (QuantizedLinear, QuantizedParam, matrix_path, pack, quantized_variables,
                                 refuse_quantized, unpack)
from jaxmoe.quant.plan import Matrix, find_matrices, plan_matrices
from jaxmoe.quant.qat import FakeQuantParam

__all__ = ["QuantizedMatrix", "apply_plan", "dequantize", "quantization_report", "quantize"]

logger = logging.getLogger("jaxmoe.quant")


@dataclasses.dataclass(frozen=True)
class QuantizedMatrix:
    """One quantized matrix as stored: its path (jaxmoe.quant.plan), "linear" or "experts", the float weight's
    [g, k, n] shape, bits, group size (rows of k per scale; k is per-channel; a tuple of g sizes when the experts
    of a stack have different ones), symmetric, and packed bytes."""

    path: str
    kind: str
    shape: tuple[int, int, int]
    bits: int
    group_size: int | tuple[int, ...]
    symmetric: bool
    nbytes: int

    @property
    def group_sizes(self) -> tuple[int, ...]:
        """The group size of each of the g matrices (experts)."""
        return self.group_size if isinstance(self.group_size, tuple) else (self.group_size,) * self.shape[0]

    def settings(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}


def quantize(model: nnx.Module, *, bits: int, group_size, target: str, symmetric: bool = True,
             rules=None) -> nnx.Module:
    """A copy of `model` with weight-only quantized matrices; same call signature and outputs' structure.

    bits: 8, 4, 3 or 2. group_size: rows of the input dimension k per scale (must divide k), None for one scale
    per column (per-channel), "adaptive" (FineQuant: per matrix, and per expert in an expert stack, the coarsest
    of k, k/2, ... down to 64 that passes `jaxmoe.quant.RangeCollapse`: at most 0.1% of 64-row column pieces lose
    over half their range; see jaxmoe.quant.adaptive), or an `AdaptiveGroupSize` (another test or floor). target:
    "experts" (MoE expert weights only: MoQE) or "linear" (every linear layer but the embeddings and the router,
    lm_head included when untied, and the experts). symmetric: absmax scales (zero point 2^(bits-1)) or, False,
    min-max scales over a range that includes 0, with per-group zero points. rules: [(regex, settings)] per
    matrix path, first match wins, e.g. "dense FFN only" is
        quantize(model, bits=4, group_size=64, target="linear", rules=[(r"mlp/(gate_up|down)_proj", {}),
                                                                       (r".", {"bits": None})])
    (see jaxmoe.quant.plan). Scales are stored in bfloat16.

    A model prepared with `apply_qat` must be quantized with the settings it trained with; the result then
    computes exactly what its QAT forward computed (on the weight-only expert paths; CPU's "decode_int8", the
    default for a few tokens, also rounds activations, to within about 1e-4: see MoEConfig.expert_implementation). Raises ValueError for bits outside {8, 4, 3, 2}, a group
    size that does not divide a matrix's k, an already quantized model, an unknown target, or a target or rule
    that matches no parameter.
    """
    refuse_quantized(model, "quantize")
    copy = nnx.clone(model)
    planned = plan_matrices(copy, bits=bits, group_size=group_size, target=target, symmetric=symmetric,
                            rules=rules)
    _check_qat_settings(copy, planned)
    for matrix, settings in planned:
        w = matrix.variable().get_value()
        w_gkn = w[None] if matrix.kind == "linear" else w
        size = settings.group_size
        if isinstance(size, AdaptiveGroupSize):
            sizes = size.choose(w_gkn, bits=settings.bits, symmetric=settings.symmetric, path=matrix.path)
            size = sizes[0] if len(set(sizes)) == 1 else sizes  # one int unless the experts differ
        size = matrix.shape[1] if size is None else size
        _quantize_matrix(matrix, w_gkn, bits=settings.bits, group_size=size, symmetric=settings.symmetric)
        logger.info("quantized %s %s: %d bits, group size %s%s, %s", matrix.path, list(matrix.shape), settings.bits,
                    size if isinstance(size, int) else f"per expert {list(size)}",
                    " (per-channel)" if size == matrix.shape[1] else "",
                    "symmetric" if settings.symmetric else "asymmetric")
    return copy


def _check_qat_settings(model: nnx.Module, planned) -> None:
    """A FakeQuantParam's matrix must be quantized, with the settings its QAT forward used."""
    chosen = {matrix.path: settings for matrix, settings in planned}
    for matrix in find_matrices(model):
        variable = matrix.variable()
        if not isinstance(variable, FakeQuantParam):
            continue
        meta = variable.get_metadata()
        trained = {"bits": meta["bits"], "group_size": meta["group_size"], "symmetric": meta["symmetric"]}
        settings = chosen.get(matrix.path)
        asked = None if settings is None else {
            "bits": settings.bits,
            "group_size": matrix.shape[1] if settings.group_size is None else settings.group_size,
            "symmetric": settings.symmetric}
        if asked != trained:
            raise ValueError(f"quantize: {matrix.path!r} was trained with apply_qat({trained}) but would be "
                             f"{'left float' if asked is None else f'quantized with {asked}'}; quantize a QAT model "
                             "with the bits, group_size, symmetric and target it trained with")


def _quantize_matrix(matrix: Matrix, w_gkn, *, bits: int, group_size: int | tuple[int, ...],
                     symmetric: bool) -> None:
    """Replaces the matrix in its parent: nnx.Linear -> QuantizedLinear, expert parameter -> QuantizedParam
    (a MixedQuantizedWeight when group_size is a tuple, one size per expert)."""
    packed = pack(w_gkn, bits=bits, group_size=group_size, symmetric=symmetric)
    if matrix.kind == "linear":
        linear = getattr(matrix.parent, matrix.key)
        bias = None if linear.bias is None else linear.bias.get_value()
        layer = QuantizedLinear(packed, bias, dtype=linear.dtype, precision=linear.precision)
        setattr(matrix.parent, matrix.key, layer)
    else:
        setattr(matrix.parent, matrix.key, QuantizedParam(packed))


def apply_plan(model: nnx.Module, plan: dict[str, dict]) -> nnx.Module:
    """Quantizes `model` in place by a stored plan {matrix path: {"bits", "group_size" (int, or a list / tuple of
    one int per expert), "symmetric"}} (`quantization_report`'s settings; used to rebuild a saved model's
    structure). Returns the model."""
    matrices = {m.path: m for m in find_matrices(model)}
    unknown = sorted(set(plan) - set(matrices))
    if unknown:
        raise ValueError(f"the quantization plan names {unknown[:4]} ({len(unknown)} in all), which this "
                         f"{type(model).__name__} does not have; its quantizable matrices are "
                         f"{sorted(matrices)[:6]}...")
    for path, settings in plan.items():
        matrix = matrices[path]
        w = matrix.variable().get_value()
        if isinstance(settings.get("group_size"), list):  # per-expert sizes, as JSON stores them
            settings = {**settings, "group_size": tuple(settings["group_size"])}
        _quantize_matrix(matrix, w[None] if matrix.kind == "linear" else w, **settings)
    return model


def quantization_report(model: nnx.Module) -> list[QuantizedMatrix]:
    """Every quantized matrix of `model` with its stored settings, in graph order (empty for a float model)."""
    report = []
    for path, variable in quantized_variables(model):
        w = variable.get_value()
        kind = "linear" if variable.get_metadata().get("linear", False) else "experts"
        report.append(QuantizedMatrix(matrix_path(path, variable), kind, tuple(w.shape), w.bits, w.group_size,
                                      w.zero is None, w.nbytes))
    return report


def dequantize(model: nnx.Module) -> nnx.Module:
    """A float copy of a quantized model: each QuantizedLinear back to an nnx.Linear and each quantized expert
    stack back to an nnx.Param, holding the dequantized weights in their original float dtype. Its forward is
    the quantized model's twin (the same weights through the float code paths)."""
    copy = nnx.clone(model)
    nodes = dict(nnx.iter_graph(copy))
    for path, node in list(nodes.items()):
        parent = nodes.get(path[:-1]) if path else None
        if isinstance(node, QuantizedLinear):
            w = node.kernel.get_value()
            linear = nnx.eval_shape(lambda: nnx.Linear(node.in_features, node.out_features, use_bias=node.use_bias,
                                                       dtype=node.dtype, param_dtype=w.dtype,
                                                       precision=node.precision, rngs=nnx.Rngs(0)))
            linear.kernel = nnx.Param(unpack(w)[0])
            linear.bias = None if node.bias is None else nnx.Param(node.bias.get_value())
            setattr(parent, path[-1], linear)
        elif isinstance(node, QuantizedParam) and isinstance(parent, SparseMoeBlock):
            setattr(parent, path[-1], nnx.Param(unpack(node.get_value())))
    return copy

