"""Where each Hugging Face tensor goes in a jaxmoe model, per `model_type`.

A parameter is assembled from one or more `Piece`s: a Hub tensor (stored [out, in] for linear layers, so most are
transposed) that fills a region of the parameter. Phi-3 maps one tensor to one parameter; PhiMoE concatenates
q/k/v into the fused `qkv_proj` and stacks each expert's w1|w3 into `w_gate_up` [e, d, 2f] and w2 into
`w_down` [e, f, d]. Loading fills a host buffer piece by piece; saving slices the parameter the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from jaxmoe.config import ModelConfig

ALL = (slice(None),)


@dataclasses.dataclass(frozen=True)
class Piece:
    name: str  # the Hugging Face tensor name
    region: tuple  # index into our parameter (ALL for the whole of it)
    # True: ours is the Hub tensor transposed (all axes reversed, a linear layer's [out, in] -> [in, out]); a
    # tuple of axes: ours = np.transpose(hub, axes) (a torch conv's [out, in, kh, kw] -> (2, 3, 1, 0)).
    transpose: bool | tuple[int, ...]

    def to_ours(self, hub):
        """The Hub tensor's values in our parameter's layout (a view where NumPy can make one)."""
        if self.transpose is True:
            return hub.T
        return hub.transpose(self.transpose) if self.transpose else hub

    def to_hub(self, ours):
        """Our region's values in the Hub tensor's layout."""
        if self.transpose is True:
            return ours.T
        return ours.transpose(tuple(int(i) for i in np.argsort(self.transpose))) if self.transpose else ours

    def hub_shape(self, ours_shape: tuple) -> tuple:
        if self.transpose is True:
            return tuple(ours_shape[::-1])
        if self.transpose:
            return tuple(ours_shape[int(i)] for i in np.argsort(self.transpose))
        return tuple(ours_shape)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    path: tuple  # the parameter's path in nnx.to_pure_dict(nnx.state(model))
    pieces: tuple[Piece, ...]


def whole_spec(path: tuple, name: str, transpose: bool | tuple[int, ...] = False) -> ParamSpec:
    """The parameter at `path` is the whole Hub tensor `name` (see `Piece.transpose`)."""
    return ParamSpec(path, (Piece(name, ALL, transpose),))


def linear_specs(path: tuple, hf: str, *, bias: bool = True) -> Iterator[ParamSpec]:
    """An `nnx.Linear` at `path` from torch's `hf`.weight [out, in] (transposed) and `hf`.bias."""
    yield whole_spec((*path, "kernel"), hf + ".weight", transpose=True)
    if bias:
        yield whole_spec((*path, "bias"), hf + ".bias")


def conv_specs(path: tuple, hf: str, axes: tuple[int, ...]) -> Iterator[ParamSpec]:
    """An `nnx.Conv` at `path` from torch's `hf`.weight (ours = np.transpose(hub, axes), e.g. (2, 3, 1, 0) for a
    2-D conv's [out, in, kh, kw] -> [kh, kw, in, out]) and `hf`.bias."""
    yield whole_spec((*path, "kernel"), hf + ".weight", transpose=axes)
    yield whole_spec((*path, "bias"), hf + ".bias")


def layer_norm_specs(path: tuple, hf: str) -> Iterator[ParamSpec]:
    """An `nnx.LayerNorm` at `path` from torch's `hf`.weight (our scale) and `hf`.bias."""
    yield whole_spec((*path, "scale"), hf + ".weight")
    yield whole_spec((*path, "bias"), hf + ".bias")


def _norm(config: ModelConfig, path: tuple, hf: str) -> Iterator[ParamSpec]:
    if config.norm == "rms":
        yield whole_spec((*path, "weight"), hf + ".weight")
    else:
        yield from layer_norm_specs(path, hf)


def _qkv(config: ModelConfig, path: tuple, hf: str) -> Iterator[ParamSpec]:
    """Phi-3's fused qkv_proj, or PhiMoE's separate q/k/v projections concatenated into it."""
    if config.moe is None:
        yield whole_spec((*path, "kernel"), hf + "qkv_proj.weight", transpose=True)
        return
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    bounds = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
    yield ParamSpec((*path, "kernel"), tuple(Piece(f"{hf}{p}.weight", (slice(None), slice(a, b)), True)
                                             for p, (a, b) in bounds.items()))
    if config.attention_bias:
        yield ParamSpec((*path, "bias"), tuple(Piece(f"{hf}{p}.bias", (slice(a, b),), False)
                                               for p, (a, b) in bounds.items()))


def _moe(config: ModelConfig, path: tuple, hf: str) -> Iterator[ParamSpec]:
    f = config.intermediate_size
    yield whole_spec((*path, "router", "kernel"), hf + "gate.weight", transpose=True)
    experts = range(config.moe.num_experts)
    yield ParamSpec((*path, "w_gate_up"), tuple(
        piece for e in experts for piece in (
            Piece(f"{hf}experts.{e}.w1.weight", (e, slice(None), slice(0, f)), True),
            Piece(f"{hf}experts.{e}.w3.weight", (e, slice(None), slice(f, 2 * f)), True))))
    yield ParamSpec((*path, "w_down"), tuple(Piece(f"{hf}experts.{e}.w2.weight", (e,), True) for e in experts))


def param_specs(config: ModelConfig) -> Iterator[ParamSpec]:
    """Every parameter of the model `config` builds, with the Hub tensors that make it up."""
    yield whole_spec(("embed_tokens", "embedding"), "model.embed_tokens.weight")
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", ("layers", i)
        yield from _norm(config, (*ours, "input_layernorm"), hf + "input_layernorm")
        yield from _norm(config, (*ours, "post_attention_layernorm"), hf + "post_attention_layernorm")
        yield from _qkv(config, (*ours, "self_attn", "qkv_proj"), hf + "self_attn.")
        yield from linear_specs((*ours, "self_attn", "o_proj"), hf + "self_attn.o_proj", bias=config.attention_bias)
        if config.moe is None:
            for proj in ("gate_up_proj", "down_proj"):
                yield whole_spec((*ours, "mlp", proj, "kernel"), hf + f"mlp.{proj}.weight", transpose=True)
        else:
            yield from _moe(config, (*ours, "mlp"), hf + "block_sparse_moe.")
    yield from _norm(config, ("norm",), "model.norm")
    if not config.tie_word_embeddings:
        yield from linear_specs(("lm_head",), "lm_head", bias=config.lm_head_bias)


def tied_head(name: str) -> bool:
    """The Hub's lm_head.weight, which a model with tied embeddings does not read (it reuses embed_tokens)."""
    return name == "lm_head.weight"
