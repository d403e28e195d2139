"""Quantization-aware training (MoQE's 2-bit recipe): the forward uses fake-quantized weights, the backward passes
gradients straight through (STE), and the parameters stay trainable float `nnx.Param`s.

`apply_qat` replaces each selected weight's variable by a `FakeQuantParam` (an `nnx.Param` subclass carrying
bits, group_size and symmetric) whose `[...]` returns `fake_quantize(value)`. Every reader of the weight
(`nnx.Linear.__call__`, the MoE block, the model's untied lm_head) reads it through `[...]`, so the whole forward
sees the quantized values, while `get_value()`, optimizers, checkpoints and `nnx.Param` filters see the float
master weights. `jaxmoe.quantize` with the same settings then gives exactly the weights the QAT forward used.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.quant.adaptive import AdaptiveGroupSize
from jaxmoe.quant.params import pack, refuse_quantized
from jaxmoe.quant.plan import check_bits, find_matrices, plan_matrices

__all__ = ["FakeQuantParam", "apply_qat", "fake_quantize"]


def fake_quantize(w: jax.Array, bits: int, group_size: int | None, symmetric: bool = True) -> jax.Array:
    """w [k, n] or [g, k, n] -> same shape and dtype: dequantize(quantize_weight(w)) in the forward (bf16 scales,
    as `jaxmoe.quantize` stores them), the identity in the backward (straight-through estimator).

    group_size: rows of k per scale (dividing k) or None for per-channel.
    """
    check_bits(bits, " for fake_quantize")
    if getattr(w, "ndim", None) not in (2, 3) or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"fake_quantize: w has shape {getattr(w, 'shape', None)} and dtype "
                         f"{getattr(w, 'dtype', None)}; expected a float [k, n] or [g, k, n] weight")
    return _straight_through(w, bits, group_size, bool(symmetric))


def _round_trip(w, bits, group_size, symmetric):
    w_gkn = w[None] if w.ndim == 2 else w
    w_hat = pack(w_gkn, bits=bits, group_size=group_size, symmetric=symmetric).dequantize(w.dtype)
    return w_hat[0] if w.ndim == 2 else w_hat


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _straight_through(w, bits, group_size, symmetric):
    return _round_trip(w, bits, group_size, symmetric)


def _straight_through_fwd(w, bits, group_size, symmetric):
    return _round_trip(w, bits, group_size, symmetric), None


def _straight_through_bwd(bits, group_size, symmetric, residual, dw_hat):
    return (dw_hat,)


_straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


class FakeQuantParam(nnx.Param):
    """A float, trainable parameter read as its fake-quantized value: `[...]` = fake_quantize(value, bits,
    group_size, symmetric) (metadata); `get_value()` is the float master weight."""

    def __getitem__(self, key):
        meta = self.get_metadata()
        return fake_quantize(self.get_value(), meta["bits"], meta["group_size"], meta["symmetric"])[key]


def apply_qat(model: nnx.Module, *, bits: int, group_size: int | None, target: str, symmetric: bool = True,
              rules=None) -> nnx.Module:
    """A copy of `model` (arrays shared) whose selected weights are `FakeQuantParam`s: the forward runs with
    fake-quantized weights, gradients pass straight through to the float weights.

    bits, group_size, target, symmetric, rules: as in `jaxmoe.quantize` (see jaxmoe.quant.plan), except that
    group_size cannot be "adaptive" (QAT needs a size fixed for the whole run: pick one, e.g. by quantizing
    once with "adaptive" and reading `quantization_report`). Train the copy as usual (the FakeQuantParams are
    `nnx.Param`s), then `jaxmoe.quantize` it with the same arguments.
    """
    refuse_quantized(model, "apply_qat")
    prepared = [m.path for m in find_matrices(model) if isinstance(m.variable(), FakeQuantParam)]
    if prepared:
        raise ValueError(f"apply_qat: this {type(model).__name__} is already prepared for QAT ({len(prepared)} "
                         f"matrices, e.g. {prepared[0]!r}); train it, or start again from the float model")
    copy = nnx.clone(model)
    for matrix, settings in plan_matrices(copy, bits=bits, group_size=group_size, target=target,
                                          symmetric=symmetric, rules=rules):
        if isinstance(settings.group_size, AdaptiveGroupSize):
            raise ValueError(f"apply_qat: group_size 'adaptive' for {matrix.path!r}; QAT needs a fixed group size "
                             "(an int or None for per-channel)")
        size = matrix.shape[1] if settings.group_size is None else settings.group_size
        param = FakeQuantParam(matrix.variable().get_value(), bits=settings.bits, group_size=size,
                               symmetric=settings.symmetric)
        if matrix.kind == "linear":
            getattr(matrix.parent, matrix.key).kernel = param
        else:
            setattr(matrix.parent, matrix.key, param)
    return copy
