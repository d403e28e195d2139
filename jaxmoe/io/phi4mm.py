"""Hugging Face `phi4_multimodal` checkpoint folders <-> `Phi4MultimodalForCausalLM`.

The language model's config keys and tensors are Phi-4-mini's (`phi3` layout under `model.`, tied embeddings);
the image and audio embeddings sit under `model.embed_tokens_extend.{image,audio}_embed.` (the tensor names:
`jaxmoe.io.names_phi4mm`). LoRA adapters are not part of the checkpoint: they are PEFT folders
(`jaxmoe.io.peft.load_peft_adapter`). This module registers the family in `jaxmoe.io.families`, so
`jaxmoe.load_hf` / `jaxmoe.save_hf` dispatch here for this model type.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from jaxmoe.io import families
from jaxmoe.io import hf as hf_io
from jaxmoe.io.names_phi4mm import ignored, param_specs
from jaxmoe.models.phi4mm.audio import AudioConfig, Buffer
from jaxmoe.models.phi4mm.model import Phi4MMConfig, Phi4MultimodalForCausalLM
from jaxmoe.models.phi4mm.vision import VisionConfig
from jaxmoe.nn.multi_lora import base_param_dict

__all__ = ["MODEL_TYPE", "config_from_hf", "config_to_hf", "load_phi4mm", "save_phi4mm"]

MODEL_TYPE = "phi4_multimodal"

# transformers' Phi4MultimodalConfig defaults, for keys a config.json leaves out.
_TEXT_DEFAULTS = {
    "vocab_size": 200064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "bos_token_id": 199999, "pad_token_id": 199999, "eos_token_id": [199999, 200020],
    "rope_theta": 10000.0,
}


def config_from_hf(hf: dict) -> Phi4MMConfig:
    """Phi4MMConfig from a `model_type: phi4_multimodal` config.json dict."""
    if hf.get("model_type") != MODEL_TYPE:
        raise hf_io.CheckpointError(f"model_type is {hf.get('model_type')!r}; expected {MODEL_TYPE!r}")
    text = {key: value for key, value in hf.items() if key not in ("vision_config", "audio_config")}
    for key, value in _TEXT_DEFAULTS.items():
        if text.get(key) is None:
            text[key] = value
    if text.get("head_dim") not in (None, text["hidden_size"] // text["num_attention_heads"]):
        raise hf_io.CheckpointError(
            f"config.json sets head_dim={text['head_dim']}, but transformers' Phi4Multimodal attention uses "
            f"hidden_size // num_attention_heads = {text['hidden_size'] // text['num_attention_heads']}")
    try:
        text_config = hf_io.config_from_hf({**text, "model_type": "phi3"})
        vision = VisionConfig.from_hf(hf.get("vision_config") or {})
        audio = AudioConfig.from_hf(hf.get("audio_config") or {})
        return Phi4MMConfig(text=text_config, vision=vision, audio=audio)
    except ValueError as error:
        if isinstance(error, hf_io.CheckpointError):
            raise
        raise hf_io.CheckpointError(f"config.json describes a Phi-4-multimodal model jaxmoe cannot build: {error}") \
            from error


def config_to_hf(config: Phi4MMConfig, *, dtype=jnp.float32) -> dict:
    """A config.json dict that transformers reads back as the same Phi4MultimodalForCausalLM."""
    text = config.text
    if text.head_dim * text.num_heads != text.hidden_size:
        raise ValueError(f"text head_dim={text.head_dim} x num_heads={text.num_heads} != hidden_size="
                         f"{text.hidden_size}; transformers' Phi4Multimodal derives head_dim as hidden_size // "
                         "num_attention_heads, so this model cannot be saved for it")
    hf = hf_io.config_to_hf(text, dtype=dtype)
    del hf["head_dim"]
    hf.update(architectures=["Phi4MultimodalForCausalLM"], model_type=MODEL_TYPE, vision_config=config.vision.to_hf(),
              audio_config=config.audio.to_hf())
    return hf


def load_phi4mm(path, *, dtype=jnp.float32, mesh=None, compute_dtype=None) -> Phi4MultimodalForCausalLM:
    """Reads a Hugging Face `phi4_multimodal` checkpoint folder; returns Phi4MultimodalForCausalLM in eval mode,
    parameters in `dtype`, computing in `compute_dtype` (default: `dtype`). With `mesh`, the language model's
    parameters are sharded by `jaxmoe.sharding`'s rules and the encoders' replicated."""
    folder = Path(path)
    return _load(folder, hf_io.read_config(folder), dtype=dtype, mesh=mesh, compute_dtype=compute_dtype)


def _load(folder: Path, hf: dict, *, dtype, mesh, compute_dtype) -> Phi4MultimodalForCausalLM:
    config = config_from_hf(hf)
    place = hf_io.placer(mesh, lambda path: path[1:] if path[0] == "language_model" else None)
    model = hf_io.load_into(lambda: Phi4MultimodalForCausalLM(config, dtype=compute_dtype, param_dtype=dtype,
                                                              rngs=nnx.Rngs(0)),
                            folder, list(param_specs(config)), dtype, place=place, ignore=ignored)
    model.eval()
    return model


def save_phi4mm(model: Phi4MultimodalForCausalLM, path, *, overwrite: bool = False,
                max_shard_bytes: int = hf_io.DEFAULT_SHARD_BYTES) -> Path:
    """Writes config.json and safetensors weights that transformers' Phi4MultimodalForCausalLM `from_pretrained`
    loads (atomically; refuses a non-empty folder unless overwrite=True). LoRA adapters are left out: save them
    with `jaxmoe.io.peft.save_peft_adapter`."""
    config = model.config
    return hf_io.write_checkpoint(path, param_specs(config), base_param_dict(model, nnx.Any(nnx.Param, Buffer)),
                                  lambda dtype: config_to_hf(config, dtype=dtype), overwrite=overwrite,
                                  max_shard_bytes=max_shard_bytes)


families.register(families.Family(model_types=(MODEL_TYPE,), model_classes=(Phi4MultimodalForCausalLM,),
                                  param_specs=param_specs, load=_load, save=save_phi4mm))
