"""Where a quantized weight lives in a model: `QuantizedParam` (the variable) and `QuantizedLinear` (the layer).

A quantized matrix is a `pallas_kernels.QuantizedWeight` (packed codes, scales, zero points; the format of
pallas_kernels/README.md) of shape (g, k, n): g = 1 for a linear kernel [k, n], g = experts for an expert stack;
an expert stack whose experts have different group sizes ("adaptive") is a `pallas_kernels.MixedQuantizedWeight`
(each expert's scales stored once; the MoE block hands the kernels its `uniform()` form). It sits in a
`QuantizedParam`, an `nnx.Variable` that is *not* an `nnx.Param`, so optimizers and `nnx.Param` filters skip it
(it has no gradient) while `nnx.state`, `nnx.split` and `nnx.eval_shape` carry it as usual.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pallas_kernels
from flax import nnx
from jax import lax
from pallas_kernels import QuantizedWeight

__all__ = ["QuantizedLinear", "QuantizedParam", "matrix_path", "pack", "quantized_matmul", "quantized_variables",
           "refuse_quantized", "unpack"]

pack = pallas_kernels.quantize_weight  # already one compiled program per (shape, settings)
# QuantizedWeight.dequantize likewise: w -> float [g, k, n] in `dtype` (default: the weight's float dtype).
unpack = jax.jit(lambda w, dtype=None: w.dequantize(dtype), static_argnames="dtype")

MATMUL_IMPLEMENTATIONS = ("auto", "dequantize", "gmm")


class QuantizedParam(nnx.Variable):
    """A packed low-bit weight: `get_value()` is the `QuantizedWeight`; `[...]` is the dequantized float weight
    (in the original float dtype; [k, n] for a linear kernel, [g, k, n] for experts), so code that reads
    `layer.kernel[...]` (the model's untied lm_head) keeps working. Metadata `linear` (bool): a linear kernel
    stored with g = 1."""

    def __getitem__(self, key):
        w = unpack(self.get_value())
        return (w[0] if self.get_metadata().get("linear", False) else w)[key]


def quantized_matmul(x: jax.Array, w: QuantizedWeight, *, dtype, precision=None,
                     implementation: str = "auto") -> jax.Array:
    """x [..., k] @ w (a QuantizedWeight of shape (1, k, n)) -> [..., n] in `dtype`.

    implementation: "dequantize" (the weight dequantized to `dtype`, then one XLA dot; under jit XLA may fuse
    the unpacking into the dot's operand) or "gmm" (`pallas_kernels.gmm` with one group: the packed weight goes
    into the kernel; fp32 accumulation). "auto": "dequantize" on CPU, "gmm" elsewhere.
    """
    if implementation not in MATMUL_IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; expected one of {MATMUL_IMPLEMENTATIONS}")
    if implementation == "auto":
        implementation = "dequantize" if jax.default_backend() == "cpu" else "gmm"
    _, k, n = w.shape
    x = x.astype(dtype)
    if implementation == "dequantize":
        return lax.dot_general(x, w.dequantize(dtype)[0], (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
    x_mk = x.reshape(-1, k)
    y = pallas_kernels.gmm(x_mk, w, jnp.full((1,), x_mk.shape[0], jnp.int32))
    return y.reshape(x.shape[:-1] + (n,))


class QuantizedLinear(nnx.Module):
    """y = x @ dequantize(kernel) + bias: an `nnx.Linear` whose kernel [k, n] is stored packed.

    Built by `jaxmoe.quantize` from an `nnx.Linear` (same call signature, x [..., k] -> [..., n]). `kernel` is a
    `QuantizedParam` holding a QuantizedWeight of shape (1, k, n); `bias` [n] stays a float `nnx.Param` (or None).
    Computes in `dtype` (None: the result type of x, the weight's float dtype and the bias).
    """

    def __init__(self, kernel: QuantizedWeight, bias: jax.Array | None, *, dtype=None, precision=None):
        if not isinstance(kernel, QuantizedWeight) or kernel.shape[0] != 1:
            raise ValueError(f"QuantizedLinear needs a QuantizedWeight of shape (1, k, n); got "
                             f"{type(kernel).__name__} {getattr(kernel, 'shape', None)}")
        _, self.in_features, self.out_features = kernel.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({self.out_features},)")
        self.kernel = QuantizedParam(kernel, linear=True)
        self.bias = None if bias is None else nnx.Param(bias)
        self.use_bias = bias is not None
        self.dtype = dtype
        self.precision = precision

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.kernel.get_value()
        bias = None if self.bias is None else self.bias[...]
        dtype = self.dtype or jnp.result_type(x, w.dtype, *([] if bias is None else [bias]))
        y = quantized_matmul(x, w, dtype=dtype, precision=self.precision)
        if bias is not None:
            y = y + bias.astype(dtype)
        return y


def quantized_variables(model: nnx.Module) -> list[tuple[tuple, QuantizedParam]]:
    """(path, variable) of every QuantizedParam in `model`, in graph order."""
    return [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, QuantizedParam)]


def matrix_path(path: tuple, variable: QuantizedParam) -> str:
    """The name `jaxmoe.quantize` uses for the matrix: the layer's path for a linear kernel
    ("layers/0/self_attn/qkv_proj"), the parameter's path for experts ("layers/0/mlp/w_gate_up")."""
    return "/".join(str(p) for p in (path[:-1] if variable.get_metadata().get("linear", False) else path))


def refuse_quantized(model: nnx.Module, action: str) -> None:
    """Raises ValueError when `model` already holds QuantizedParams (`action` names the caller)."""
    found = quantized_variables(model)
    if found:
        path, variable = found[0]
        w = variable.get_value()
        raise ValueError(f"{action}: this {type(model).__name__} is already quantized ({len(found)} matrices, e.g. "
                         f"{matrix_path(path, variable)!r} at {w.bits} bits, group size {w.group_size}); start from "
                         "the float model, or call jaxmoe.quant.dequantize(model) first")
