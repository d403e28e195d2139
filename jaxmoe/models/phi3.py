"""The Phi-3 / Phi-3.5-mini / Phi-4-mini dense decoder (`Phi3ForCausalLM`, model_type `phi3`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.config import ModelConfig
from jaxmoe.models.outputs import CausalLMOutput
from jaxmoe.nn.attention import Attention, AttentionMask, KVCache
from jaxmoe.nn.lm_loss import OutputHead
from jaxmoe.nn.mlp import GatedMLP
from jaxmoe.moe.layer import SparseMoeBlock
from jaxmoe.moe.router import expert_load, load_balancing_loss, router_z_loss
from jaxmoe.moe.task_adapters import check_task_ids
from jaxmoe.nn.norms import make_norm
from jaxmoe.nn.rope import rope_cos_sin
from jaxmoe.nn.tokens import check_token_ids
from jaxmoe.sharding import on_auto_axes


def routing_losses(routings, valid_bt, moe) -> dict:
    """aux_loss over all layers' tokens pooled (transformers' value in eval mode, where SparseMixer's picks are the
    softmax top-2), router_z_loss, and expert_load [layers, experts]. The experts counted are the ones actually
    routed to, so in training mode the loss balances SparseMixer's samples."""
    token_mask = valid_bt.reshape(-1)
    logits_lte = jnp.stack([r.router_logits for r in routings])
    experts_ltk = jnp.stack([r.experts for r in routings])
    layers_mask = jnp.broadcast_to(token_mask, logits_lte.shape[:2])
    return {
        "aux_loss": load_balancing_loss(logits_lte, experts_ltk, num_experts=moe.num_experts, token_mask=layers_mask),
        "router_z_loss": router_z_loss(logits_lte, token_mask=layers_mask),
        "expert_load": jnp.stack([expert_load(r.experts, moe.num_experts, token_mask=token_mask) for r in routings]),
    }


class DecoderLayer(nnx.Module):
    """Pre-norm block: h = x + attn(norm(x)); y = h + ffn(norm(h)), the ffn a SwiGLU MLP or a sparse MoE block."""

    def __init__(self, config: ModelConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.input_layernorm = make_norm(c.norm, c.hidden_size, eps=c.rms_norm_eps, param_dtype=param_dtype,
                                         rngs=rngs)
        self.self_attn = Attention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                                   use_bias=c.attention_bias, implementation=c.attention_impl, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = make_norm(c.norm, c.hidden_size, eps=c.rms_norm_eps,
                                                  param_dtype=param_dtype, rngs=rngs)
        if c.moe is None:
            self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        else:
            self.mlp = SparseMoeBlock(c.hidden_size, c.intermediate_size, c.moe, dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_btd, cos, sin, *, mask: AttentionMask, kv=None, index=None, rngs=None, task_ids=None):
        """Returns (y [b, t, d], updated kv or None, the MoE block's Routing or None). task_ids int [b] go to an
        MoE block with task adapters."""
        attn_out, kv = self.self_attn(self.input_layernorm(x_btd), cos, sin, mask=mask, kv=kv, index=index)
        h = x_btd + attn_out
        normed = self.post_attention_layernorm(h)
        if isinstance(self.mlp, SparseMoeBlock):
            out, routing = self.mlp(normed, rngs=rngs, task_ids=task_ids)
            return h + out, kv, routing
        return h + self.mlp(normed, rngs=rngs), kv, None


def _rematerialised_layer(layer: DecoderLayer, x_btd, cos, sin, *, mask, kv, index, rngs, task_ids=None):
    """`layer(...)` under `jax.checkpoint`: the backward keeps only the layer's inputs and recomputes its
    activations. The layer's state goes in as values and only the rngs' state comes back out, so the call also
    works where the parameters belong to an outer trace (generation's decode loop); the MoE routers' draws advance
    `rngs` exactly as without remat, and the recomputation replays them."""
    graphdef, state = nnx.split(layer)
    rng_graphdef, rng_state = nnx.split(rngs) if rngs is not None else (None, None)

    def run(state, rng_state, x_btd, cos, sin, mask, kv, index, task_ids):
        layer_rngs = nnx.merge(rng_graphdef, rng_state) if rngs is not None else None
        out = nnx.merge(graphdef, state)(x_btd, cos, sin, mask=mask, kv=kv, index=index, rngs=layer_rngs,
                                         task_ids=task_ids)
        return out, (nnx.state(layer_rngs) if rngs is not None else None)

    out, rng_state = jax.checkpoint(run)(state, rng_state, x_btd, cos, sin, mask, kv, index, task_ids)
    if rngs is not None:
        nnx.update(rngs, rng_state)
    return out


class Phi3ForCausalLM(nnx.Module):
    """Token ids -> logits. `dtype` is the compute dtype (default: the parameters'); `param_dtype` the storage.

    Norm statistics, attention softmax and logits are always fp32.
    """

    def __init__(self, config: ModelConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(dtype or param_dtype)
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=self.dtype,
                                      param_dtype=param_dtype, embedding_init=nnx.initializers.normal(0.02),
                                      rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(config.num_layers)])
        self.norm = make_norm(config.norm, config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype,
                              rngs=rngs)
        self.lm_head = None if config.tie_word_embeddings else nnx.Linear(
            config.hidden_size, config.vocab_size, use_bias=config.lm_head_bias,
            kernel_init=nnx.initializers.normal(0.02), dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty KV cache for `batch` rows of up to `max_len` tokens (prompt plus generated)."""
        c = self.config
        return KVCache.create(num_layers=c.num_layers, batch=batch, max_len=max_len, num_kv_heads=c.num_kv_heads,
                              head_dim=c.head_dim, dtype=dtype or self.dtype)

    def output_head(self) -> OutputHead:
        """The projection from the final normed hidden states to the logits: the embedding table [v, d] when
        the embeddings are tied, else lm_head's kernel [d, v] and bias."""
        if self.lm_head is None:
            return OutputHead(self.embed_tokens.embedding[...], None, "vd")
        bias = None if self.lm_head.bias is None else self.lm_head.bias[...]
        return OutputHead(self.lm_head.kernel[...], bias, "dv")

    @on_auto_axes  # a mesh with Explicit axes: see jaxmoe.sharding
    def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, positions=None,
                 segment_ids=None, cache: KVCache | None = None, logits_to_keep: int = 0,
                 return_hidden: bool | str = False, rngs: nnx.Rngs | None = None,
                 task_ids=None) -> CausalLMOutput:
        """input_ids int [b, t] -> CausalLMOutput(logits float32 [b, t, vocab], cache).

        inputs_embeds: optional float [b, t, hidden] used instead of embedding input_ids (multimodal models
        splice image and audio features into the embedded text); input_ids may then be None, or given to be
        validated against the same [b, t].

        attention_mask: optional [b, t] (1 = token, 0 = padding). positions: optional int [b, t]; by default
        the count of real tokens before each one (so left padding works), counted within each segment when
        `segment_ids` is given. segment_ids: optional int [b, t] for packed rows (several sequences per row):
        a token attends only to its own segment; not with `cache`. With `cache`, this call's tokens go
        into slots cache.index ... cache.index + t - 1 and attend to everything cached before them.
        logits_to_keep > 0 computes logits for the last that many positions only ([b, logits_to_keep, vocab]),
        as transformers does; generation's prefill needs just the last one. return_hidden=True returns the final
        normed hidden states [b, t, d] as `hidden_states` instead of the logits (None), for a loss that applies
        `output_head()` itself (training's fused cross-entropy, jaxmoe.nn.lm_loss). return_hidden="pre_norm" returns
        the logits as usual and, as `hidden_states`, the last layer's output BEFORE the final norm [b, t, d] (what
        kNN-LM and PEMA memories key on, jaxmoe.mt.pema). `rngs` feeds the MoE routers' sampling and jitter in
        training mode (`model.train()`). task_ids: int [b], each row's task (e.g. its language pair), required
        exactly when the config has MoE task adapters (`MoEConfig.task_adapters`, jaxmoe.moe.task_adapters); ids
        outside [0, num_tasks) raise here when concrete.
        """
        pre_norm_hidden = isinstance(return_hidden, str)
        if pre_norm_hidden and return_hidden != "pre_norm":
            raise ValueError(f"return_hidden={return_hidden!r}; expected False (logits), True (final normed hidden "
                             "states, no logits) or 'pre_norm' (logits and the hidden states before the final norm)")
        if input_ids is None and inputs_embeds is None:
            raise ValueError("pass input_ids int [batch, time] or inputs_embeds float [batch, time, hidden]")
        if input_ids is not None:
            input_ids = jnp.asarray(input_ids)
            if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
                raise ValueError(f"input_ids must be an integer array [batch, time]; got {input_ids.dtype} "
                                 f"{tuple(input_ids.shape)}")
            check_token_ids(input_ids, self.config.vocab_size)
        if inputs_embeds is not None:
            inputs_embeds = jnp.asarray(inputs_embeds)
        bt = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        if inputs_embeds is not None:
            want = (*bt, self.config.hidden_size)
            if inputs_embeds.shape != want or not jnp.issubdtype(inputs_embeds.dtype, jnp.floating):
                raise ValueError(f"inputs_embeds must be a float array [batch, time, hidden] = {list(want)}"
                                 f"{' (input_ids shape plus hidden)' if input_ids is not None else ''}; got "
                                 f"{inputs_embeds.dtype} {list(inputs_embeds.shape)}")
        b, t = bt
        task_ids = check_task_ids(task_ids, None if self.config.moe is None else self.config.moe.task_adapters, b)
        valid = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache; generate "
                                 "from one sequence per row")
            segment_ids = jnp.asarray(segment_ids)
            if segment_ids.shape != (b, t):
                raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}; expected input_ids' {(b, t)}")
        counted_positions = positions is None
        if counted_positions:
            positions = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1
            if segment_ids is not None:
                # Restart the count at each segment: subtract the count reached just before the segment starts.
                starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
                before = jnp.where(starts, positions - valid.astype(jnp.int32) + 1, 0)
                positions = positions - jax.lax.cummax(before, axis=1)
        positions = jnp.where(valid, positions, -1).astype(jnp.int32)

        if cache is None:
            k_positions = positions
        else:
            k_positions = jax.lax.dynamic_update_slice(cache.positions_bs, positions, (0, cache.index))
        # Positions counted here rise with the column within each segment, so a later column is never attended
        # to: the blocked attention path may skip the tiles above the diagonal.
        mask = AttentionMask(positions, k_positions, segment_ids, self.config.sliding_window,
                             causal_columns=cache is None and counted_positions)
        cos, sin = rope_cos_sin(self.config, positions, valid, self.dtype)

        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        call_layer = _rematerialised_layer if self.config.remat == "layer" else DecoderLayer.__call__
        new_k, new_v, routings = [], [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x, kv, routing = call_layer(layer, x, cos, sin, mask=mask, kv=kv,
                                        index=None if cache is None else cache.index, rngs=rngs,
                                        task_ids=task_ids)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
            if routing is not None:
                routings.append(routing)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        pre_norm = x
        x = self.norm(x)
        if cache is not None:
            cache = KVCache(k=tuple(new_k), v=tuple(new_v), positions_bs=k_positions, index=cache.index + t)
        if pre_norm_hidden:
            out = CausalLMOutput(logits=self.output_head().logits(x), hidden_states=pre_norm, cache=cache)
        elif return_hidden:
            out = CausalLMOutput(logits=None, hidden_states=x, cache=cache)
        else:
            out = CausalLMOutput(logits=self.output_head().logits(x), cache=cache)
        if routings:
            out = out.replace(**routing_losses(routings, valid, self.config.moe))
        return out
