"""Where each Hugging Face tensor of a `phi4_multimodal` checkpoint goes in `Phi4MultimodalForCausalLM`.

The language model's tensors are Phi-3's (`jaxmoe.io.names`) under `language_model`; the image and audio
embeddings' tensors sit under `model.embed_tokens_extend.{image,audio}_embed.` and map onto `image_embed`
(`ImageEmbedding`) and `audio_embed` (`AudioEmbedding`, whose torch buffers are `Buffer` variables here).
"""

from __future__ import annotations

from collections.abc import Iterator

from jaxmoe.io.names import (ParamSpec, conv_specs, layer_norm_specs, linear_specs, param_specs as text_param_specs,
                             tied_head, whole_spec)
from jaxmoe.models.phi4mm.audio import AudioConfig
from jaxmoe.models.phi4mm.model import Phi4MMConfig
from jaxmoe.models.phi4mm.vision import VisionConfig

__all__ = ["AUDIO_PREFIX", "IMAGE_PREFIX", "VISION_IGNORED", "audio_param_specs", "ignored", "param_specs",
           "vision_param_specs"]

IMAGE_PREFIX = "model.embed_tokens_extend.image_embed."
AUDIO_PREFIX = "model.embed_tokens_extend.audio_embed."
# Hub tensors under the image embedding's prefix that nothing reads: SigLIP's final LayerNorm and pooling head
# (the features are taken before them).
VISION_IGNORED = ("img_processor.post_layernorm.", "img_processor.head.")
_CONV1D, _CONV2D = (2, 1, 0), (2, 3, 1, 0)  # torch [out, in, k...] -> flax [k..., in, out]


def vision_param_specs(config: VisionConfig, ours: tuple, hf: str) -> Iterator[ParamSpec]:
    """Every parameter of an `ImageEmbedding(config, ...)` at path `ours` in the parent's pure state dict, with
    its Hub tensor under the key prefix `hf` (e.g. IMAGE_PREFIX). Hub tensors under `hf + VISION_IGNORED[i]` are
    not read."""
    enc, hf_enc = (*ours, "img_processor"), hf + "img_processor."
    yield from conv_specs((*enc, "patch_embedding"), hf_enc + "embeddings.patch_embedding", _CONV2D)
    yield whole_spec((*enc, "position_embedding", "embedding"), hf_enc + "embeddings.position_embedding.weight")
    for i in range(config.num_layers):
        path, name = (*enc, "layers", i), f"{hf_enc}encoder.layers.{i}."
        yield from layer_norm_specs((*path, "layer_norm1"), name + "layer_norm1")
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield from linear_specs((*path, "self_attn", proj), f"{name}self_attn.{proj}")
        yield from layer_norm_specs((*path, "layer_norm2"), name + "layer_norm2")
        for fc in ("fc1", "fc2"):
            yield from linear_specs((*path, "mlp", fc), f"{name}mlp.{fc}")
    yield from linear_specs((*ours, "img_projection_up"), hf + "img_projection_up")
    yield from linear_specs((*ours, "img_projection_down"), hf + "img_projection_down")
    for name in ("global_img_feature_extensor", "sub_img_feature_extensor"):
        yield whole_spec((*ours, name), hf + name)


def audio_param_specs(config: AudioConfig, ours: tuple, hf: str) -> Iterator[ParamSpec]:
    """Every parameter and buffer of an `AudioEmbedding(config, ...)` at path `ours` in the parent's pure state
    dict, with its Hub tensor under the key prefix `hf` (e.g. AUDIO_PREFIX)."""
    enc, hf_enc = (*ours, "encoder"), hf + "encoder."
    yield whole_spec((*enc, "global_mean"), hf_enc + "encoder_embedding.global_mean")
    yield whole_spec((*enc, "global_invstd"), hf_enc + "encoder_embedding.global_invstd")
    yield from conv_specs((*enc, "embed", "conv_in"), hf_enc + "embed.conv.0", _CONV2D)
    for i in range(config.stride2_convs - 1):  # torch Sequential: conv, relu, (dw, pw, relu)...
        yield from conv_specs((*enc, "embed", "depthwise", i), f"{hf_enc}embed.conv.{3 * i + 2}", _CONV2D)
        yield from conv_specs((*enc, "embed", "pointwise", i), f"{hf_enc}embed.conv.{3 * i + 3}", _CONV2D)
    yield from linear_specs((*enc, "embed", "out"), hf_enc + "embed.out")
    yield whole_spec((*enc, "relative_attention_bias", "embedding"),
                     hf_enc + "relative_attention_bias_layer.bias_values.weight")
    for i in range(config.num_blocks):
        p, n = (*enc, "layers", i), f"{hf_enc}encoders.{i}."
        for ff in ("feed_forward_in", "feed_forward_out"):
            yield from layer_norm_specs((*p, ff, "layer_norm"), n + ff + ".layer_norm")
            yield from linear_specs((*p, ff, "gate_up_proj"), n + ff + ".gate_up_proj")
            yield from linear_specs((*p, ff, "down_proj"), n + ff + ".down_proj")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield from linear_specs((*p, "self_attn", proj), n + "self_attn." + proj)
        yield from layer_norm_specs((*p, "conv", "layer_norm"), n + "conv.layer_norm")
        yield from conv_specs((*p, "conv", "glu_conv"), n + "conv.glu.ext_pw_conv_1d", _CONV1D)
        yield whole_spec((*p, "conv", "b1"), n + "conv.glu.b1")
        yield whole_spec((*p, "conv", "b2"), n + "conv.glu.b2")
        yield from conv_specs((*p, "conv", "dw_conv"), n + "conv.dw_sep_conv_1d.dw_conv", _CONV1D)
        yield from conv_specs((*p, "conv", "pw_conv"), n + "conv.dw_sep_conv_1d.pw_conv", _CONV1D)
        yield from conv_specs((*p, "conv", "ext_pw_conv"), n + "conv.ext_pw_conv_1d", _CONV1D)
        yield from layer_norm_specs((*p, "layer_norm_att"), n + "layer_norm_att")
        yield from layer_norm_specs((*p, "layer_norm"), n + "layer_norm")
    for proj in ("up_proj_for_speech", "down_proj_for_speech", "up_proj_for_vision_speech",
                 "down_proj_for_vision_speech"):
        yield from linear_specs((*ours, proj), hf + proj)


def param_specs(config: Phi4MMConfig) -> Iterator[ParamSpec]:
    """Every parameter (and audio buffer) of Phi4MultimodalForCausalLM(config) with its Hub tensors."""
    for spec in text_param_specs(config.text):
        yield ParamSpec(("language_model", *spec.path), spec.pieces)
    yield from vision_param_specs(config.vision, ("image_embed",), IMAGE_PREFIX)
    yield from audio_param_specs(config.audio, ("audio_embed",), AUDIO_PREFIX)


def ignored(name: str) -> bool:
    """Hub tensors of a phi4_multimodal folder that nothing reads: the vision tower's final LayerNorm and pooling
    head, and a tied lm_head."""
    return tied_head(name) or name.startswith(tuple(IMAGE_PREFIX + p for p in VISION_IGNORED))
