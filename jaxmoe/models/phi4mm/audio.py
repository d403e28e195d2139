"""Phi-4-Multimodal's audio path: log-mel features -> conformer encoder -> projector into the text model's width.

Reproduces transformers' `Phi4MultimodalAudioEmbedding` (docs/phi_models.md §3.3) as it computes, quirks included:
the 0/1 key-padding mask is *added* to the attention logits together with the relative position bias (padded
keys are down-weighted by e, not masked out), and an encoder sequence longer than `CHUNK_FRAMES` frames is
zero-padded to whole chunks that are encoded independently (with no padding mask at all, the padded frames of
the last chunk are attended to like real ones).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.config import require, require_positive_ints

__all__ = ["CHUNK_FRAMES", "AudioConfig", "AudioEmbedding", "AudioEncoder", "Buffer"]

CHUNK_FRAMES = 500  # transformers' `max_seq_len` in Phi4MultimodalAudioModel.forward (hard-coded there too)
MODES = ("speech", "vision")
_SWISH = ("swish", "silu")  # transformers' ACT2FN maps both to SiLU


@dataclasses.dataclass(frozen=True, slots=True)
class AudioConfig:
    """Hugging Face `audio_config` of Phi-4-Multimodal (`Phi4MultimodalAudioConfig`), the fields that shape the
    model. Activations are fixed (swish in the conformer, ReLU in the subsampling); `dropout_rate`, `left_chunk`,
    `audio_token_id` and `feature_layer` only travel through `to_hf` (transformers' encoder returns its last
    block's output whatever `feature_layer` says)."""

    hidden_size: int = 1024
    intermediate_size: int = 1536
    num_blocks: int = 24
    num_heads: int = 16
    input_size: int = 80
    time_reduction: int = 8
    nemo_conv_channels: int = 1024
    kernel_size: int = 3
    ext_pw_out_channel: int = 1024
    depthwise_separable_out_channel: int = 1024
    depthwise_multiplier: int = 1
    bias_max_distance: int = 1000
    bias_symmetric: bool = False
    chunk_size: int = -1
    left_chunk: int = 18
    dropout_rate: float = 0.0
    audio_token_id: int = 200011
    feature_layer: int = -2
    downsample_rate: int = 1

    def __post_init__(self):
        need = functools.partial(require, self)
        require_positive_ints(self, ("hidden_size", "intermediate_size", "num_blocks", "num_heads", "input_size",
                                     "time_reduction", "nemo_conv_channels", "kernel_size", "ext_pw_out_channel",
                                     "depthwise_separable_out_channel", "depthwise_multiplier", "bias_max_distance",
                                     "downsample_rate"))
        need(self.hidden_size % self.num_heads == 0,
             f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        need(self.time_reduction >= 2 and self.time_reduction & (self.time_reduction - 1) == 0,
             f"time_reduction={self.time_reduction}; expected a power of 2 (one stride-2 conv per factor 2)")
        # transformers builds these convs with in_channels=hidden_size and adds their outputs to the residual.
        for name in ("ext_pw_out_channel", "depthwise_separable_out_channel"):
            need(getattr(self, name) == self.hidden_size,
                 f"{name}={getattr(self, name)} differs from hidden_size={self.hidden_size}; transformers' conv "
                 "module only works when they are equal")
        need(self.chunk_size == -1,
             f"chunk_size={self.chunk_size}; only -1 (full attention, no streaming chunks) is supported")
        need(self.bias_symmetric is False, "bias_symmetric=True is not supported; expected False")
        need(self.downsample_rate == 1,
             f"downsample_rate={self.downsample_rate}; transformers' audio embedding only works with 1")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def stride2_convs(self) -> int:
        """The subsampling's stride-2 convs: the first conv, then a depthwise one per further factor 2."""
        return int(math.log2(self.time_reduction))

    @property
    def nemo_final_size(self) -> int:
        """Feature bins left after the stride-2 convs (80 -> 10), as transformers derives it."""
        size = self.input_size
        for _ in range(self.stride2_convs):
            size = (size - 1) // 2 + 1
        return size

    @classmethod
    def from_hf(cls, d: dict) -> "AudioConfig":
        """From the `audio_config` dict of a Phi-4-Multimodal config.json; refuses what this module cannot run."""
        if d.get("model_type", "phi4_multimodal_audio") != "phi4_multimodal_audio":
            raise ValueError(f"audio_config model_type={d['model_type']!r}; expected 'phi4_multimodal_audio'")
        for key, allowed in (("activation", _SWISH), ("conv_activation", _SWISH), ("conv_glu_type", _SWISH),
                             ("nemo_activation", ("relu",))):
            if d.get(key, allowed[0]) not in allowed:
                raise ValueError(f"audio_config {key}={d[key]!r} is not supported; expected one of {allowed}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in fields}
        if "num_attention_heads" in d:
            kwargs["num_heads"] = d["num_attention_heads"]
        config = cls(**kwargs)
        if d.get("nemo_final_size", config.nemo_final_size) != config.nemo_final_size:
            raise ValueError(f"audio_config nemo_final_size={d['nemo_final_size']} does not follow from "
                             f"input_size={config.input_size} and time_reduction={config.time_reduction} "
                             f"(expected {config.nemo_final_size})")
        return config

    def to_hf(self) -> dict:
        """The `audio_config` dict transformers' Phi4MultimodalAudioConfig reads back to this configuration."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "num_heads"}
        return {**d, "num_attention_heads": self.num_heads, "activation": "swish", "conv_activation": "swish",
                "conv_glu_type": "swish", "nemo_activation": "relu", "nemo_final_size": self.nemo_final_size,
                "model_type": "phi4_multimodal_audio"}


class Buffer(nnx.Variable):
    """A checkpoint tensor that is not trained (a torch buffer): `nnx.state` carries it, `nnx.Param` filters
    (optimizers, gradients) skip it."""


def _layer_norm(features: int, dtype, param_dtype, rngs) -> nnx.LayerNorm:
    # torch.nn.LayerNorm: eps 1e-5, variance as E[(x - mean)^2]; statistics in fp32.
    return nnx.LayerNorm(features, epsilon=1e-5, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)


class ConvSubsampling(nnx.Module):
    """NeMo "dw_striding" subsampling: [b, t, f] -> [b, ceil(t / time_reduction), hidden].

    Conv2d(1 -> c, 3, stride 2) + ReLU, then per further factor 2 a depthwise stride-2 conv, a pointwise conv and
    ReLU; the (channel, frequency) planes are flattened channel-major and projected to the hidden size.
    """

    def __init__(self, config: AudioConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        c = config.nemo_conv_channels
        conv = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv_in = nnx.Conv(1, c, (3, 3), (2, 2), padding=((1, 1), (1, 1)), **conv)
        steps = config.stride2_convs - 1
        self.depthwise = nnx.List([nnx.Conv(c, c, (3, 3), (2, 2), padding=((1, 1), (1, 1)), feature_group_count=c,
                                            **conv) for _ in range(steps)])
        self.pointwise = nnx.List([nnx.Conv(c, c, (1, 1), padding="VALID", **conv) for _ in range(steps)])
        self.out = nnx.Linear(c * config.nemo_final_size, config.hidden_size, **conv)

    def __call__(self, x_btf: jax.Array) -> jax.Array:
        x = jax.nn.relu(_conv3x3_stride2(self.conv_in, x_btf[..., None]))  # [b, t, f, c]: time, frequency = H, W
        for depthwise, pointwise in zip(self.depthwise, self.pointwise):
            x = _conv3x3_stride2(depthwise, x)
            x = jax.nn.relu(x @ pointwise.kernel[0, 0].astype(x.dtype) + pointwise.bias[...].astype(x.dtype))
        b, t, f, c = x.shape
        return self.out(x.transpose(0, 1, 3, 2).reshape(b, t, c * f))


def _conv3x3_stride2(conv: nnx.Conv, x_bhwc: jax.Array) -> jax.Array:
    """`conv(x_bhwc)` for a 3x3, stride-2, padding-1 conv with one input channel per group (the first conv's single
    channel broadcast to all outputs, or a depthwise conv) as nine shifted multiply-adds: on XLA:CPU the
    subsampling of 5 s of audio at width 256 took 27 ms with lax convolutions and takes ~10 ms so."""
    kernel = conv.kernel[...].astype(conv.dtype or x_bhwc.dtype)  # [3, 3, 1, c]
    x = jnp.pad(x_bhwc.astype(kernel.dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = (x_bhwc.shape[1] - 1) // 2 + 1, (x_bhwc.shape[2] - 1) // 2 + 1
    out = sum(x[:, i:i + 2 * h - 1:2, j:j + 2 * w - 1:2, :] * kernel[i, j, 0] for i in range(3) for j in range(3))
    return out + conv.bias[...].astype(kernel.dtype)


def relative_position_bias(table_kh: jax.Array, length: int, max_distance: int) -> jax.Array:
    """T5-style bias float32 [heads, length, length]: entry (i, j) is table[clip(j - i, -m, m - 1) + m]."""
    pos = np.arange(length)
    index = np.clip(pos[None, :] - pos[:, None], -max_distance, max_distance - 1) + max_distance
    return table_kh.astype(jnp.float32)[index].transpose(2, 0, 1)


class SelfAttention(nnx.Module):
    """Bidirectional multi-head attention with an additive float32 term [b, heads, t, t] on the logits."""

    def __init__(self, config: AudioConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        linear = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nnx.Linear(d, d, **linear) for _ in range(4))

    def __call__(self, x_btd: jax.Array, add_bhts: jax.Array) -> jax.Array:
        b, t, _ = x_btd.shape
        q, k, v = (proj(x_btd).reshape(b, t, self.num_heads, self.head_dim)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        scores = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * self.head_dim ** -0.5
        probs = jax.nn.softmax(scores + add_bhts, axis=-1).astype(v.dtype)
        return self.o_proj(jnp.einsum("bnts,bsnh->btnh", probs, v).reshape(b, t, -1))


class FeedForward(nnx.Module):
    """LayerNorm -> gate_up_proj -> up * swish(gate) -> down_proj; the fused output is [up | gate] (up first)."""

    def __init__(self, config: AudioConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.layer_norm = _layer_norm(d, dtype, param_dtype, rngs)
        self.gate_up_proj = nnx.Linear(d, 2 * f, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.down_proj = nnx.Linear(f, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        up, gate = jnp.split(self.gate_up_proj(self.layer_norm(x_btd)), 2, axis=-1)
        return self.down_proj(up * jax.nn.silu(gate))


class ConvModule(nnx.Module):
    """LayerNorm -> GLU pointwise conv ((value + b1) * swish(gate + b2)) -> causal depthwise conv (left padding
    kernel_size - 1: transformers pads both sides and drops the trailing outputs) -> pointwise conv -> swish ->
    pointwise conv. b1 and b2 keep transformers' shape [1, channels, 1]."""

    def __init__(self, config: AudioConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d, k, mult = config.hidden_size, config.kernel_size, config.depthwise_multiplier
        conv = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm = _layer_norm(d, dtype, param_dtype, rngs)
        self.glu_conv = nnx.Conv(d, 2 * d, (1,), padding="VALID", **conv)
        self.b1 = nnx.Param(jnp.zeros((1, d, 1), param_dtype))
        self.b2 = nnx.Param(jnp.zeros((1, d, 1), param_dtype))
        self.dw_conv = nnx.Conv(d, d * mult, (k,), padding=((k - 1, 0),), feature_group_count=d, **conv)
        self.pw_conv = nnx.Conv(d * mult, d, (1,), padding="VALID", **conv)
        self.ext_pw_conv = nnx.Conv(d, d, (1,), padding="VALID", **conv)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        value, gate = jnp.split(self.glu_conv(self.layer_norm(x_btd)), 2, axis=-1)
        b1, b2 = (b[0, :, 0].astype(value.dtype) for b in (self.b1[...], self.b2[...]))
        h = (value + b1) * jax.nn.silu(gate + b2)
        return self.ext_pw_conv(jax.nn.silu(self.pw_conv(self.dw_conv(h))))


class ConformerBlock(nnx.Module):
    """x + ½FFN_in; + MHSA(LN); + Conv; + ½FFN_out; then LayerNorm."""

    def __init__(self, config: AudioConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.feed_forward_in = FeedForward(config, **kw)
        self.self_attn = SelfAttention(config, **kw)
        self.conv = ConvModule(config, **kw)
        self.feed_forward_out = FeedForward(config, **kw)
        self.layer_norm_att = _layer_norm(config.hidden_size, dtype, param_dtype, rngs)
        self.layer_norm = _layer_norm(config.hidden_size, dtype, param_dtype, rngs)

    def __call__(self, x_btd: jax.Array, add_bhts: jax.Array) -> jax.Array:
        x = x_btd + 0.5 * self.feed_forward_in(x_btd)
        x = x + self.self_attn(self.layer_norm_att(x), add_bhts)
        x = x + self.conv(x)
        x = x + 0.5 * self.feed_forward_out(x)
        return self.layer_norm(x)


class AudioEncoder(nnx.Module):
    """transformers' Phi4MultimodalAudioModel: features [b, t, input_size] -> [b, ceil(t / time_reduction),
    hidden] in `dtype`.

    `global_mean` / `global_invstd` [input_size] are `Buffer`s (loaded, never trained).
    """

    def __init__(self, config: AudioConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(dtype or param_dtype)
        self.global_mean = Buffer(jnp.zeros((config.input_size,), param_dtype))
        self.global_invstd = Buffer(jnp.ones((config.input_size,), param_dtype))
        self.embed = ConvSubsampling(config, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
        bias_rows = 2 * config.bias_max_distance
        self.relative_attention_bias = nnx.Embed(bias_rows, config.num_heads, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([ConformerBlock(config, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(config.num_blocks)])

    def __call__(self, features_btf: jax.Array, mask_bt: jax.Array | None = None) -> jax.Array:
        """mask_bt: optional bool [b, t], True for real frames; as in transformers only each row's count of them
        matters (the first ceil(count / time_reduction) encoder frames are the valid keys)."""
        c = self.config
        x = (features_btf.astype(jnp.float32) - self.global_mean[...].astype(jnp.float32)) \
            * self.global_invstd[...].astype(jnp.float32)
        x = self.embed(x.astype(self.dtype))
        b, t, d = x.shape
        if mask_bt is None:
            key_valid_bt = jnp.ones((b, t), bool)
        else:
            frames_b = jnp.sum(mask_bt.astype(jnp.int32), axis=1)
            key_valid_bt = jnp.arange(t)[None, :] < -(-frames_b // c.time_reduction)[:, None]
        s = t
        if t > CHUNK_FRAMES:  # independent chunks; without a mask even the zero padding counts as valid keys
            pad = -t % CHUNK_FRAMES
            x = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(-1, CHUNK_FRAMES, d)
            key_valid_bt = jnp.pad(key_valid_bt, ((0, 0), (0, pad)), constant_values=mask_bt is None)
            key_valid_bt = key_valid_bt.reshape(-1, CHUNK_FRAMES)
            s = CHUNK_FRAMES
        bias_nts = relative_position_bias(self.relative_attention_bias.embedding[...], s, c.bias_max_distance)
        # transformers adds the boolean key mask (as 0/1) to the bias: padded keys are weighted down, not removed.
        add_bnts = key_valid_bt.astype(jnp.float32)[:, None, None, :] + bias_nts[None]
        for layer in self.layers:
            x = layer(x, add_bnts)
        return x.reshape(b, -1, d)[:, :t]


class AudioEmbedding(nnx.Module):
    """transformers' Phi4MultimodalAudioEmbedding: the encoder and the speech / vision-speech projectors
    (Linear -> exact GELU -> Linear, with biases) into the text model's hidden size."""

    def __init__(self, config: AudioConfig, text_hidden_size: int, *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if not (isinstance(text_hidden_size, int) and text_hidden_size > 0):
            raise ValueError(f"text_hidden_size={text_hidden_size!r}; expected a positive integer")
        self.config = config
        self.dtype = jnp.dtype(dtype or param_dtype)
        kw = dict(dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = AudioEncoder(config, **kw)
        d = config.hidden_size * config.downsample_rate
        self.up_proj_for_speech = nnx.Linear(d, text_hidden_size, **kw)
        self.down_proj_for_speech = nnx.Linear(text_hidden_size, text_hidden_size, **kw)
        self.up_proj_for_vision_speech = nnx.Linear(d, text_hidden_size, **kw)
        self.down_proj_for_vision_speech = nnx.Linear(text_hidden_size, text_hidden_size, **kw)

    def encode(self, audio_input_features, audio_attention_mask=None, *, mode: str = "speech") -> jax.Array:
        """Jittable (`mode` static): features float [b, t, input_size], optional bool mask [b, t] (True for real
        frames) -> projected frames [b, ceil(t / time_reduction), text_hidden_size] in `dtype`."""
        return self._encode(*self._checked(audio_input_features, audio_attention_mask, mode), mode)

    def __call__(self, audio_input_features, audio_embed_sizes, audio_attention_mask=None, *,
                 mode: str = "speech") -> jax.Array:
        """-> [sum(audio_embed_sizes), text_hidden_size]: row i's first audio_embed_sizes[i] frames, in order (what
        transformers writes into the audio placeholder tokens). audio_embed_sizes: int [b], concrete values."""
        if isinstance(audio_embed_sizes, jax.core.Tracer):
            raise ValueError("audio_embed_sizes must be concrete host values (they set the output's length); "
                             "pass them outside jit (or as a static argument), or jit `encode` and slice its rows")
        features, mask = self._checked(audio_input_features, audio_attention_mask, mode)
        sizes = np.asarray(audio_embed_sizes)
        b, frames, _ = features.shape
        t = -(-frames // self.config.time_reduction)  # each stride-2 conv maps n frames to ceil(n / 2)
        if sizes.shape != (b,) or not np.issubdtype(sizes.dtype, np.integer) or (sizes < 0).any() \
                or (sizes > t).any():
            raise ValueError(f"audio_embed_sizes={sizes.tolist()}; expected {b} integers in [0, {t}] (the encoder "
                             f"gives {t} frames per row)")
        embeds_btd = self._encode(features, mask, mode)
        return jnp.concatenate([embeds_btd[i, :n] for i, n in enumerate(sizes.tolist())], axis=0)

    def _checked(self, audio_input_features, audio_attention_mask, mode: str):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; expected 'speech' (audio only) or 'vision' (audio with images)")
        features = jnp.asarray(audio_input_features)
        if features.ndim != 3 or features.shape[-1] != self.config.input_size:
            raise ValueError(f"audio_input_features has shape {tuple(features.shape)}; expected [batch, frames, "
                             f"{self.config.input_size}] log-mel features")
        if audio_attention_mask is None:
            return features, None
        mask = jnp.asarray(audio_attention_mask).astype(bool)
        if mask.shape != features.shape[:2]:
            raise ValueError(f"audio_attention_mask has shape {tuple(mask.shape)}; expected the features' "
                             f"[batch, frames] = {tuple(features.shape[:2])}")
        return features, mask

    def _encode(self, features_btf, mask_bt, mode: str) -> jax.Array:
        up, down = ((self.up_proj_for_speech, self.down_proj_for_speech) if mode == "speech"
                    else (self.up_proj_for_vision_speech, self.down_proj_for_vision_speech))
        return down(jax.nn.gelu(up(self.encoder(features_btf, mask_bt)), approximate=False))
