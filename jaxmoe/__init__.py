"""jaxmoe: Phi-family dense and Mixture-of-Experts models in JAX / Flax NNX. Public API: docs/API.md."""

from jaxmoe.config import LongRoPE, ModelConfig, MoEConfig, PRESETS, TaskAdapterConfig, get_preset
from jaxmoe.infer.generate import generate
from jaxmoe.io.hf import CheckpointError, load_hf, save_hf
from jaxmoe.io.load import load_model
from jaxmoe.io.tokenizer import Tokenizer
from jaxmoe.models.phi3 import Phi3ForCausalLM
from jaxmoe.models.phimoe import PhimoeForCausalLM
from jaxmoe.models.phi4mm.model import MM_PRESETS, Phi4MMConfig, Phi4MultimodalForCausalLM, get_mm_preset
from jaxmoe.models.phi4mm.processor import Phi4MMProcessor
from jaxmoe.moe.router import sparsemixer
from jaxmoe.quant import load_quantized, param_bytes, quantize, save_quantized

__all__ = ["CheckpointError", "LongRoPE", "MM_PRESETS", "MoEConfig", "ModelConfig", "PRESETS", "Phi3ForCausalLM",
           "Phi4MMConfig", "Phi4MMProcessor", "Phi4MultimodalForCausalLM", "PhimoeForCausalLM", "TaskAdapterConfig",
           "Tokenizer", "generate", "get_mm_preset", "get_preset", "load_hf", "load_model", "load_quantized",
           "param_bytes", "quantize", "save_hf", "save_quantized", "sparsemixer"]
