"""Phi-4-Multimodal's vision path: a SigLIP-shaped encoder, 2x2 token compression, the HD crop assembly and the
projector into the text model's hidden size (transformers' `Phi4MultimodalImageEmbedding`).

`ImageEmbedding.encode` (pixels -> compressed crop features) and `ImageEmbedding.project` are jittable functions
of the arrays; only the assembly of each image's tokens (`num_image_tokens`, `ImageEmbedding.__call__`) reads
`image_sizes` and the patch masks on the host, because they decide how many tokens there are.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.config import require, require_positive_ints
from jaxmoe.models.phi4mm.image_tokens import image_token_sources

__all__ = ["ImageEmbedding", "VisionConfig", "VisionEncoder", "compress_2x2", "num_image_tokens",
           "patch_position_ids"]

_HF_KEYS = {  # our field -> the transformers vision_config key
    "hidden_size": "hidden_size", "intermediate_size": "intermediate_size", "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads", "num_channels": "num_channels", "image_size": "image_size",
    "patch_size": "patch_size", "layer_norm_eps": "layer_norm_eps", "crop_size": "crop_size",
    "feature_layer": "feature_layer", "image_token_id": "image_token_id",
}


@dataclasses.dataclass(frozen=True, slots=True)
class VisionConfig:
    """The vision encoder of Phi-4-multimodal-instruct (transformers' `Phi4MultimodalVisionConfig`)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    num_channels: int = 3
    image_size: int = 448
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    crop_size: int = 448
    feature_layer: int = -2  # index into (embeddings, layer 1 output, ..., layer num_layers output)
    image_token_id: int = 200010

    def __post_init__(self):
        need = functools.partial(require, self)
        require_positive_ints(self, ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_channels",
                                     "image_size", "patch_size", "crop_size"))
        need(self.hidden_size % self.num_heads == 0,
             f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        need(self.image_size % self.patch_size == 0,
             f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}; crops must tile "
             "into whole patches")
        need(self.layer_norm_eps > 0, f"layer_norm_eps={self.layer_norm_eps}; expected a positive number")
        need(isinstance(self.feature_layer, int) and -(self.num_layers + 1) <= self.feature_layer <= self.num_layers,
             f"feature_layer={self.feature_layer!r}; expected an index into the {self.num_layers + 1} hidden states "
             f"(embeddings and {self.num_layers} layer outputs), in [{-(self.num_layers + 1)}, {self.num_layers}]")
        need(isinstance(self.image_token_id, int) and self.image_token_id >= 0,
             f"image_token_id={self.image_token_id!r}; expected a non-negative integer")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_side(self) -> int:
        """Side of a crop's token grid after 2x2 compression (an odd patch grid is padded by one first)."""
        return (self.patches_per_side + 1) // 2

    @property
    def layers_run(self) -> int:
        """Encoder layers the features need: hidden_states[feature_layer] is the output of this many layers."""
        return self.feature_layer % (self.num_layers + 1)

    @classmethod
    def from_hf(cls, d: dict) -> "VisionConfig":
        """From a transformers `vision_config` dict (config.json); absent keys take transformers' defaults."""
        act = d.get("hidden_act", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"vision_config hidden_act={act!r} is not supported; the Phi-4-multimodal vision "
                             "encoder uses 'gelu_pytorch_tanh' (GELU, tanh approximation)")
        kwargs = {ours: d[hf] for ours, hf in _HF_KEYS.items() if hf in d}
        for name in ("image_size", "patch_size"):
            value = kwargs.get(name)
            if isinstance(value, (list, tuple)):
                if len(value) != 2 or value[0] != value[1]:
                    raise ValueError(f"vision_config {name}={value!r}; only square sizes are supported")
                kwargs[name] = value[0]
        return cls(**kwargs)

    def to_hf(self) -> dict:
        """The transformers `vision_config` dict."""
        d = {hf: getattr(self, ours) for ours, hf in _HF_KEYS.items()}
        return {**d, "hidden_act": "gelu_pytorch_tanh", "attention_dropout": 0.0,
                "model_type": "phi4_multimodal_vision"}


def patch_position_ids(valid_nhw: jax.Array, patches_per_side: int) -> jax.Array:
    """Position-embedding ids int32 [n, h * w] for patch masks bool [n, h, w], as transformers computes them.

    A crop whose valid patches form an a x b block (right and bottom padding) spreads its rows and columns over
    the whole learned grid (NaViT-style fractional buckets); a full crop gets the identity ids; padded patches
    get id 0. Counts come from the first column and the first row, like transformers'.
    """
    n, h, w = valid_nhw.shape
    # torch.arange(1/p, 1, 1/p): exact for a power-of-two p (32 in the released model).
    boundaries = jnp.asarray(np.arange(1 / patches_per_side, 1.0, 1 / patches_per_side).astype(np.float32))

    def buckets(count_n, length):
        step_n = jnp.float32(1.0) / count_n.astype(jnp.float32)
        coords = jnp.arange(length, dtype=jnp.float32)[None, :] * step_n[:, None]
        coords = jnp.minimum(coords, jnp.float32(1.0 - 1e-6))
        return jnp.sum(boundaries <= coords[..., None], axis=-1, dtype=jnp.int32)  # bucketize(right=True)

    rows = buckets(valid_nhw[:, :, 0].sum(axis=1), h)
    cols = buckets(valid_nhw[:, 0, :].sum(axis=1), w)
    ids = rows[:, :, None] * patches_per_side + cols[:, None, :]
    return jnp.where(valid_nhw, ids, 0).reshape(n, h * w)


def compress_2x2(x_npd: jax.Array, side: int) -> jax.Array:
    """[n, side * side, d] patch features -> [n, m * m, d], m = ceil(side / 2): 2x2 average pooling of the grid,
    after reflection-padding one row and column at the bottom and right when `side` is odd."""
    n, _, d = x_npd.shape
    grid = x_npd.reshape(n, side, side, d)
    if side % 2:
        grid = jnp.pad(grid, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="reflect")
    m = grid.shape[1] // 2
    return grid.reshape(n, m, 2, m, 2, d).mean(axis=(2, 4)).reshape(n, m * m, d)


def _layer_norm(config: VisionConfig, param_dtype, rngs) -> nnx.LayerNorm:
    # fp32 statistics and output (the caller casts back), two-pass variance like torch.
    return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, use_fast_variance=False,
                         dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)


class VisionAttention(nnx.Module):
    """Bidirectional multi-head self-attention; padded patches are masked as keys only (transformers' eager)."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        linear = lambda: nnx.Linear(d, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)  # noqa: E731
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = linear(), linear(), linear(), linear()

    def __call__(self, x_btd: jax.Array, valid_bt: jax.Array) -> jax.Array:
        b, t, d = x_btd.shape
        split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)  # noqa: E731
        q, k, v = split(self.q_proj(x_btd)), split(self.k_proj(x_btd)), split(self.v_proj(x_btd))
        scores = jnp.einsum("bqnh,bknh->bnqk", q, k, preferred_element_type=jnp.float32) * self.head_dim ** -0.5
        # The finite minimum, as transformers adds it: a crop with every patch masked attends uniformly.
        scores = jnp.where(valid_bt[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return self.out_proj(jnp.einsum("bnqk,bknh->bqnh", probs, v).reshape(b, t, d))


class VisionMLP(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(config.hidden_size, config.intermediate_size, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)
        self.fc2 = nnx.Linear(config.intermediate_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class VisionEncoderLayer(nnx.Module):
    """Pre-norm block: h = x + attn(ln1(x)); y = h + mlp(ln2(h))."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layer_norm1 = _layer_norm(config, param_dtype, rngs)
        self.self_attn = VisionAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm2 = _layer_norm(config, param_dtype, rngs)
        self.mlp = VisionMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_btd: jax.Array, valid_bt: jax.Array) -> jax.Array:
        h = x_btd + self.self_attn(self.layer_norm1(x_btd).astype(x_btd.dtype), valid_bt)
        return h + self.mlp(self.layer_norm2(h).astype(h.dtype))


class VisionEncoder(nnx.Module):
    """Crops -> hidden_states[feature_layer] of the SigLIP encoder (only the layers that needs are run).

    Holds all `num_layers` layers so that every Hub tensor except the final LayerNorm and pooling head loads.
    """

    def __init__(self, config: VisionConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(dtype or param_dtype)
        p, d = config.patch_size, config.hidden_size
        self.patch_embedding = nnx.Conv(config.num_channels, d, kernel_size=(p, p), strides=(p, p), padding="VALID",
                                        dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
        self.position_embedding = nnx.Embed(config.patches_per_side ** 2, d, dtype=self.dtype,
                                            param_dtype=param_dtype,
                                            embedding_init=nnx.initializers.normal(d ** -0.5), rngs=rngs)
        self.layers = nnx.List([VisionEncoderLayer(config, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(config.num_layers)])

    def __call__(self, pixels_nchw: jax.Array, valid_nhw: jax.Array) -> jax.Array:
        """pixels float [n, channels, S, S] (S = image_size), patch mask bool [n, S/p, S/p] -> [n, (S/p)^2, d]
        in the compute dtype."""
        n = pixels_nchw.shape[0]
        x = self.patch_embedding(jnp.transpose(pixels_nchw, (0, 2, 3, 1)).astype(self.dtype))
        x = x.reshape(n, -1, self.config.hidden_size)
        x = x + self.position_embedding(patch_position_ids(valid_nhw, self.config.patches_per_side))
        valid_nt = valid_nhw.reshape(n, -1)
        for i in range(self.config.layers_run):
            x = self.layers[i](x, valid_nt)
        return x


def _host(value, name: str) -> np.ndarray:
    if isinstance(value, jax.core.Tracer):
        raise ValueError(f"{name} is a traced value; the number of image tokens depends on it, so it must be a "
                         "concrete (host) array. Call the image embedding outside jax.jit, or close over "
                         f"{name} as a NumPy constant and trace only the pixel values")
    return np.asarray(value)


def _token_sources(image_sizes, image_attention_mask, config: VisionConfig) -> list[np.ndarray]:
    """`image_tokens.image_token_sources` for this config's geometry, from concrete arrays only."""
    sizes = _host(image_sizes, "image_sizes")
    mask = _host(image_attention_mask, "image_attention_mask")
    p = config.patches_per_side
    if mask.ndim != 4 or mask.shape[2:] != (p, p):
        raise ValueError(f"image_attention_mask has shape {mask.shape}; expected [images, crops >= 2, {p}, {p}] "
                         f"(image_size / patch_size = {config.image_size} / {config.patch_size} patches a side; "
                         "make the inputs with Phi4MMProcessor(size=image_size, patch_size=patch_size))")
    return image_token_sources(sizes, mask, config.crop_size)


def num_image_tokens(image_sizes, image_attention_mask, config: VisionConfig) -> list[int]:
    """Image tokens (id `config.image_token_id` placeholders) each image takes in the text, from host arrays
    image_sizes int [images, 2] and image_attention_mask [images, crops, S/p, S/p]: valid sub-tile tokens plus
    one separator per sub row, one global separator, m * (m + 1) global tokens (545 for one 448 x 448 image;
    the formula: `jaxmoe.models.phi4mm.image_tokens`, which the processor's num_img_tokens uses too)."""
    return [len(s) for s in _token_sources(image_sizes, image_attention_mask, config)]


class ImageEmbedding(nnx.Module):
    """Processor outputs -> the image token embeddings [tokens, text_hidden_size] (transformers'
    `Phi4MultimodalImageEmbedding`, the rows it writes into the image placeholder positions)."""

    def __init__(self, config: VisionConfig, text_hidden_size: int, *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if not isinstance(text_hidden_size, int) or text_hidden_size < 1:
            raise ValueError(f"text_hidden_size={text_hidden_size!r}; expected the text model's hidden size, a "
                             "positive integer")
        self.config = config
        self.dtype = jnp.dtype(dtype or param_dtype)
        d = config.hidden_size
        self.img_processor = VisionEncoder(config, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
        self.img_projection_up = nnx.Linear(d, text_hidden_size, dtype=self.dtype, param_dtype=param_dtype,
                                            rngs=rngs)
        self.img_projection_down = nnx.Linear(text_hidden_size, text_hidden_size, dtype=self.dtype,
                                              param_dtype=param_dtype, rngs=rngs)
        # Learned separators, zero-initialised (as transformers); shapes as on the Hub.
        self.global_img_feature_extensor = nnx.Param(jnp.zeros((1, 1, d), param_dtype))
        self.sub_img_feature_extensor = nnx.Param(jnp.zeros((1, 1, 1, d), param_dtype))

    def encode(self, pixels_nchw: jax.Array, valid_nhw: jax.Array) -> jax.Array:
        """Crops float [n, channels, S, S], patch mask bool [n, S/p, S/p] -> compressed features [n, m * m, d]."""
        features = self.img_processor(pixels_nchw, valid_nhw)
        return compress_2x2(features, self.config.patches_per_side)

    def project(self, x: jax.Array) -> jax.Array:
        """[..., d] -> [..., text_hidden_size]: Linear, exact (erf) GELU, Linear."""
        return self.img_projection_down(jax.nn.gelu(self.img_projection_up(x.astype(self.dtype)),
                                                    approximate=False))

    def __call__(self, image_pixel_values, image_sizes, image_attention_mask) -> jax.Array:
        """image_pixel_values float [images, crops, channels, S, S]; image_sizes int [images, 2] (h, w of each
        HD image); image_attention_mask [images, crops, S/p, S/p] (padded crops: zero pixels, all-ones mask) ->
        [sum(num_image_tokens), text_hidden_size] in the compute dtype, every image's tokens in batch order.
        image_sizes and the mask must be concrete; the pixels may be traced."""
        c = self.config
        sources = _token_sources(image_sizes, image_attention_mask, c)
        mask = np.asarray(image_attention_mask).astype(bool)
        images, crops = mask.shape[:2]
        expected = (images, crops, c.num_channels, c.image_size, c.image_size)
        if tuple(image_pixel_values.shape) != expected:
            raise ValueError(f"image_pixel_values has shape {tuple(image_pixel_values.shape)}; expected {expected} "
                             "([images, crops, channels, image_size, image_size], matching image_attention_mask)")
        pixels = jnp.asarray(image_pixel_values).reshape(images * crops, *expected[2:])
        features = self.encode(pixels, jnp.asarray(mask.reshape(images * crops, *mask.shape[2:])))
        d, per_image = c.hidden_size, crops * c.tokens_per_side ** 2
        rows = images * per_image
        table = jnp.concatenate([features.reshape(rows, d),
                                 self.sub_img_feature_extensor[...].reshape(1, d).astype(features.dtype),
                                 self.global_img_feature_extensor[...].reshape(1, d).astype(features.dtype)])
        # Separators index the two rows after the features: ROW_SEPARATOR (-1) -> rows, GLOBAL_SEPARATOR (-2) ->
        # rows + 1.
        index = np.concatenate([np.where(s >= 0, i * per_image + s, rows - 1 - s) for i, s in enumerate(sources)])
        return self.project(jnp.take(table, jnp.asarray(index, jnp.int32), axis=0))
