"""Pallas kernels for jaxmoe (grouped matmuls over quantized experts, the sparse router gradient).

This package knows nothing of `jaxmoe`. The ops, their backends and the packed weight
format: README.md beside this file. Backends live in `grouped/` (gmm, tgmm) and `router/` (SparseMixer top-2).
"""

from pallas_kernels.ops import gmm, tgmm
from pallas_kernels.quant import MixedQuantizedWeight, QuantizedWeight, quantize_weight
from pallas_kernels.registry import backends
from pallas_kernels.router import sparsemixer_top2

__all__ = ["MixedQuantizedWeight", "QuantizedWeight", "backends", "gmm", "quantize_weight", "sparsemixer_top2",
           "tgmm"]
