"""`load_model`: one entry point for every checkpoint folder jaxmoe reads.

Importing this module registers every model family with `jaxmoe.io.families` (phi3 and phimoe in
`jaxmoe.io.hf`, phi4_multimodal in `jaxmoe.io.phi4mm`); `import jaxmoe` imports it.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.io import phi4mm  # noqa: F401  (registers the phi4_multimodal family)
from jaxmoe.io.hf import CheckpointError, load_hf
from jaxmoe.quant.checkpoint import is_jaxmoe_checkpoint, load_quantized

__all__ = ["load_model"]


def load_model(path, *, dtype=None) -> nnx.Module:
    """Reads a Hugging Face folder (`load_hf`) or one in jaxmoe's own format (`load_quantized`: quantized models,
    and float models transformers has no class for, such as a dense model with LayerNorm and biases) and returns
    the model in eval mode. `dtype`: the float parameters' dtype (default: float32 for Hugging Face folders, as
    saved for jaxmoe's); quantized matrices keep their codes and scales."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {str(folder)!r} does not exist or is not a folder; expected one "
                              "with config.json and model.safetensors")
    if not is_jaxmoe_checkpoint(folder):
        return load_hf(folder, dtype=jnp.float32 if dtype is None else jnp.dtype(dtype))
    model = load_quantized(folder)
    if dtype is not None:
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                       params))
    return model
