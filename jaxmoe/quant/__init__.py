"""Weight-only quantization (MoQE, FineQuant): quantize, QAT, bytes, and saving quantized models.

  quantize(model, *, bits, group_size, target, symmetric=True, rules=None)   quantize.py; targets and rules: plan.py
  group_size="adaptive"                                                     adaptive.py (FineQuant's per-matrix test)
  apply_qat(...), fake_quantize(w, bits, group_size, symmetric)             qat.py (straight-through estimator)
  param_bytes(model), bytes_by_group(model)                                 memory.py
  save_quantized(model, path), load_quantized(path)                         checkpoint.py (safetensors or orbax)
  QuantizedParam, QuantizedLinear                                           params.py (where packed weights live)

The packed format is pallas_kernels.QuantizedWeight (pallas_kernels/README.md). Guide: docs/quantization.md.
"""

from jaxmoe.quant.adaptive import AdaptiveGroupSize, RangeCollapse, collapsed_fraction
from jaxmoe.quant.checkpoint import load_quantized, save_quantized
from jaxmoe.quant.memory import bytes_by_group, param_bytes
from jaxmoe.quant.params import QuantizedLinear, QuantizedParam, quantized_matmul
from jaxmoe.quant.plan import BITS, TARGETS
from jaxmoe.quant.qat import FakeQuantParam, apply_qat, fake_quantize
from jaxmoe.quant.quantize import QuantizedMatrix, dequantize, quantization_report, quantize

__all__ = ["AdaptiveGroupSize", "BITS", "FakeQuantParam", "QuantizedLinear", "QuantizedMatrix", "QuantizedParam",
           "RangeCollapse", "TARGETS", "apply_qat", "bytes_by_group", "collapsed_fraction", "dequantize",
           "fake_quantize", "load_quantized", "param_bytes", "quantization_report", "quantize", "quantized_matmul",
           "save_quantized"]
