"""Pallas kernels for jaxmoe (grouped matmuls over quantized experts, the sparse router gradient).

This package knows nothing of `jaxmoe`. Its ops arrive with the kernels issue; see ../docs in the README.
"""
