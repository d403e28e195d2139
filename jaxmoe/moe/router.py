"""Routing maths for the MoE block: SparseMixer-v2 (GRIN / Phi-3.5-MoE), conventional top-k, auxiliary losses.

Pure functions over arrays; the MoE module owns the router weight and calls these. The SparseMixer forward and
backward follow transformers' `sparsemixer` / `PhimoeMultiplier` (../shared/docs/phi_models.md §2.4-2.6)
operation for operation, so eval weights and, given the same random draws, training weights and router
gradients match it to float rounding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

# transformers' `torch.add(0.3333, mask_for_one, alpha=0.6667)`: 1.0 (fp32-exact) or 0.3333, not 1/3.
_THIRD = 0.3333
_TWO_THIRDS = 0.6667


@dataclasses.dataclass(frozen=True)
class _Variant:
    logit_scale: float  # the masked softmax (weights and sampling) runs over scores * logit_scale
    coin_threshold: float  # a sampled expert runs at full scale when u > coin_threshold, at 0.3333 otherwise
    argmax_full_scale: bool  # the argmax expert always runs at full scale (v2's first-order step)


# v2: GRIN Alg. 1 / transformers; B ~ Bernoulli(1/4). v2*: GRIN Alg. 2 as docs/paper_methods.md states it:
# MaskedSoftmax(z/2), B ~ Bernoulli(5/8) for every sample (no argmax exception: that is what makes it
# unbiased for sum_i p_i f(p_i E_i) with cubic f), y = 2h + stop_grad(c h - 2h). The factor 2 in the backward
# cancels the 1/2 of d(z/2)/dz, so both variants share the multiplier's backward rule G p (onehot - g).
_VARIANTS = {"v2": _Variant(1.0, 0.75, True), "v2*": _Variant(0.5, 0.375, False)}


@jax.custom_vjp
def _heun_multiplier(scores_te, p_t1, expert_t1, gates_te, c_t1):
    """Forward p * c [T, 1]; backward d/dscores = G p (onehot(expert) - gates), nothing to the other inputs."""
    return p_t1 * c_t1


def _heun_multiplier_fwd(scores_te, p_t1, expert_t1, gates_te, c_t1):
    return p_t1 * c_t1, (p_t1, expert_t1, gates_te)  # the backward's inputs only; onehot is rebuilt from expert


def _heun_multiplier_bwd(residuals, g_t1):
    p_t1, expert_t1, gates_te = residuals
    gp_t1 = g_t1 * p_t1  # the coin's c is deliberately not applied (PhimoeMultiplier.backward)
    onehot_te = (jnp.arange(gates_te.shape[-1]) == expert_t1).astype(jnp.float32)
    d_scores_te = gates_te * -gp_t1 + onehot_te * gp_t1
    return d_scores_te, None, None, None, None  # None: zero cotangents (p and gates come from stop_gradient)


_heun_multiplier.defvjp(_heun_multiplier_fwd, _heun_multiplier_bwd)


def _pick(scores_te, candidates_te, *, threshold, variant, exp_te, u_t1):
    """One SparseMixer round -> (weight float32 [T, 1], expert int32 [T, 1]).

    `candidates_te`: the (scaled) logits with earlier picks at -inf. `exp_te`/`u_t1` None means eval (argmax,
    plain p); otherwise a Gumbel-max sample with Heun's coin and the SparseMixer-v2 multiplier.
    """
    top_t1 = jnp.max(candidates_te, axis=-1, keepdims=True)
    # Relative gap to the round's best. transformers measures it on the unmasked scores; that differs only at
    # earlier picks, which stay -inf either way. 0/0 = NaN compares False: kept.
    far_te = (top_t1 - candidates_te) / jnp.maximum(jnp.abs(candidates_te), top_t1) > threshold
    logits_te = jnp.where(far_te, -jnp.inf, candidates_te)
    gates_te = jax.nn.softmax(logits_te, axis=-1)
    if exp_te is None:
        expert_t1 = jnp.argmax(candidates_te, axis=-1, keepdims=True)
        return jnp.take_along_axis(gates_te, expert_t1, axis=-1), expert_t1.astype(jnp.int32)
    expert_t1 = jnp.argmax(logits_te - jnp.log(exp_te), axis=-1, keepdims=True)  # Gumbel-max: a draw from gates
    p_t1 = jnp.take_along_axis(gates_te, expert_t1, axis=-1)
    full_scale_t1 = u_t1 > variant.coin_threshold
    if variant.argmax_full_scale:
        full_scale_t1 |= expert_t1 == jnp.argmax(gates_te, axis=-1, keepdims=True)
    c_t1 = _THIRD + _TWO_THIRDS * full_scale_t1.astype(jnp.float32)
    expert_t1 = expert_t1.astype(jnp.int32)
    return _heun_multiplier(scores_te, p_t1, expert_t1, gates_te, c_t1), expert_t1


def sparsemixer(scores: jax.Array, *, jitter_eps: float, training: bool, noise=None, rngs: nnx.Rngs | None = None,
                variant: str = "v2") -> tuple[jax.Array, jax.Array]:
    """GRIN's SparseMixer top-2 router. scores float [T, E] -> (weights float32 [T, 2], experts int32 [T, 2]).

    Each round keeps the experts within a relative gap of 2·jitter_eps of the round's best logit, takes the
    softmax over them and picks one; round two excludes round one's pick. Weights are not renormalised.
    Eval: the argmax, weight = its masked-softmax probability (ordinary autograd). Training: a sample from the
    masked softmax, weight = p·c with Heun's coin c in {1, 0.3333}, and the SparseMixer-v2 backward rule.
    `noise = (exp1, u1, exp2, u2)`: Exp(1) [T, E] and U(0, 1) [T, 1] draws as transformers makes them;
    otherwise drawn from `rngs`' `router` stream. Both are ignored in eval. `variant`: "v2" (GRIN,
    transformers) or "v2*" (GRIN Alg. 2 as docs/paper_methods.md reads; see `_VARIANTS`).
    """
    if not (scores.ndim == 2 and scores.shape[1] >= 2 and jnp.issubdtype(scores.dtype, jnp.floating)):
        raise ValueError(f"sparsemixer: scores must be a float array [tokens, experts] with at least 2 experts "
                         f"(it picks 2); got shape {tuple(scores.shape)}, dtype {scores.dtype}. Pass the router "
                         f"logits reshaped to [tokens, experts].")
    if not jitter_eps >= 0:
        raise ValueError(f"sparsemixer: jitter_eps={jitter_eps!r}; expected a number >= 0 (the relative "
                         f"threshold is 2*jitter_eps; Phi-3.5-MoE and GRIN use router_jitter_noise=0.01).")
    if variant not in _VARIANTS:
        raise ValueError(f"sparsemixer: variant={variant!r}; expected one of {sorted(_VARIANTS)}.")
    spec = _VARIANTS[variant]
    scores_te = scores.astype(jnp.float32)
    tokens, experts = scores_te.shape
    if training:
        exp1, u1, exp2, u2 = _training_noise(noise, rngs, tokens, experts)
        z_te = jax.lax.stop_gradient(scores_te) * spec.logit_scale  # gradients come only from the multiplier
    else:
        exp1 = u1 = exp2 = u2 = None
        z_te = scores_te * spec.logit_scale
    pick = dict(threshold=2 * jitter_eps, variant=spec)
    w1_t1, e1_t1 = _pick(scores_te, z_te, exp_te=exp1, u_t1=u1, **pick)
    without_first_te = jnp.where(jnp.arange(experts) == e1_t1, -jnp.inf, z_te)
    w2_t1, e2_t1 = _pick(scores_te, without_first_te, exp_te=exp2, u_t1=u2, **pick)
    return jnp.concatenate([w1_t1, w2_t1], axis=-1), jnp.concatenate([e1_t1, e2_t1], axis=-1)


def sparsemixer_noise(rngs: nnx.Rngs, tokens: int, experts: int) -> tuple[jax.Array, ...]:
    """The training draws of `sparsemixer` from `rngs`' `router` stream: (exp1 [T, E], u1 [T, 1], exp2 [T, E],
    u2 [T, 1]) float32, Exp(1) and U(0, 1) as transformers draws them."""
    k1, k2, k3, k4 = jax.random.split(rngs.router(), 4)
    return (jax.random.exponential(k1, (tokens, experts), jnp.float32),
            jax.random.uniform(k2, (tokens, 1), jnp.float32),
            jax.random.exponential(k3, (tokens, experts), jnp.float32),
            jax.random.uniform(k4, (tokens, 1), jnp.float32))


def _training_noise(noise, rngs, tokens: int, experts: int):
    """(exp1, u1, exp2, u2) float32: given `noise` checked against [T, E], [T, 1], [T, E], [T, 1], or fresh draws."""
    if noise is None:
        if rngs is None:
            raise ValueError("sparsemixer: training=True samples experts; pass noise=(exp1, u1, exp2, u2) or "
                             "rngs=nnx.Rngs(...), or use training=False for deterministic routing.")
        return sparsemixer_noise(rngs, tokens, experts)
    if len(noise) != 4:
        raise ValueError(f"sparsemixer: noise has {len(noise)} arrays; expected 4: (exp1, u1, exp2, u2).")
    expected = [(tokens, experts), (tokens, 1), (tokens, experts), (tokens, 1)]
    for name, array, shape in zip(("exp1", "u1", "exp2", "u2"), noise, expected):
        if tuple(jnp.shape(array)) != shape:
            raise ValueError(f"sparsemixer: noise {name} has shape {tuple(jnp.shape(array))}; expected {shape} "
                             f"for scores [tokens={tokens}, experts={experts}]. Draw Exp(1) [T, E] and U(0, 1) "
                             f"[T, 1] arrays, or pass rngs instead.")
    return tuple(jnp.asarray(array, jnp.float32) for array in noise)


def topk_router(scores: jax.Array, *, k: int, renormalize: bool = True) -> tuple[jax.Array, jax.Array]:
    """GShard / Mixtral routing: softmax over all experts in fp32, the k largest, optionally renormalised to sum
    to 1. scores float [T, E] -> (weights float32 [T, k], experts int32 [T, k]); gradients flow through softmax.
    """
    if not (scores.ndim == 2 and jnp.issubdtype(scores.dtype, jnp.floating)):
        raise ValueError(f"topk_router: scores must be a float array [tokens, experts]; got shape "
                         f"{tuple(scores.shape)}, dtype {scores.dtype}.")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"topk_router: k={k} with {scores.shape[1]} experts; expected 1 <= k <= {scores.shape[1]}. "
                         f"Lower k or add experts.")
    probs_te = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    weights_tk, experts_tk = jax.lax.top_k(probs_te, k)
    if renormalize:
        weights_tk = weights_tk / jnp.sum(weights_tk, axis=-1, keepdims=True)
    return weights_tk, experts_tk.astype(jnp.int32)


def _token_weights(shape: tuple[int, ...], token_mask, caller: str) -> jax.Array:
    """float32 token weights of `shape` (all ones without a mask)."""
    if token_mask is None:
        return jnp.ones(shape, jnp.float32)
    if tuple(jnp.shape(token_mask)) != shape:
        raise ValueError(f"{caller}: token_mask has shape {tuple(jnp.shape(token_mask))}; expected {shape}, the "
                         f"token dimensions (1 = real token, 0 = padding).")
    return jnp.asarray(token_mask, jnp.float32)


def _slot_counts(experts, num_experts: int, mask) -> jax.Array:
    """float32 [E]: how many (masked-in) token slots picked each expert."""
    return jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32) * mask[..., None, None],
                   axis=tuple(range(experts.ndim)))


def load_balancing_loss(router_logits: jax.Array, experts: jax.Array, *, num_experts: int, token_mask=None,
                        axis_name: str | None = None) -> jax.Array:
    """Switch / Mixtral load-balancing loss, float32 scalar: E · Σ_e f_e · P_e.

    router_logits float [..., E]; experts int [..., k], the experts each token went to (transformers'
    `load_balancing_loss_func` uses the top-k of the softmax: pass `topk_router(logits, k=k)[1]` to match it);
    token_mask [...] (1 real, 0 padding). f_e = slots routed to e per token (sums to k), P_e = mean softmax
    probability of e, both over masked-in tokens. Leading dims are pooled, so [layers, tokens, E] gives
    transformers' multi-layer value. With `axis_name` (a data-parallel axis of shard_map/pmap/vmap) the
    counts, probability sums and token counts are `pmean`-ed over it before dividing (GRIN's global f), so every
    shard gets the loss of the whole batch even when shards hold different numbers of real tokens.
    """
    if router_logits.shape[-1] != num_experts or experts.shape[:-1] != router_logits.shape[:-1]:
        raise ValueError(f"load_balancing_loss: router_logits {tuple(router_logits.shape)} and experts "
                         f"{tuple(experts.shape)} with num_experts={num_experts}; expected [..., {num_experts}] and "
                         f"[..., k] with the same leading dimensions.")
    mask = _token_weights(router_logits.shape[:-1], token_mask, "load_balancing_loss")
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    counts_e = _slot_counts(experts, num_experts, mask)
    prob_sums_e = jnp.sum(probs * mask[..., None], axis=tuple(range(probs.ndim - 1)))
    tokens = jnp.sum(mask)
    if axis_name is not None:
        counts_e, prob_sums_e, tokens = jax.lax.pmean((counts_e, prob_sums_e, tokens), axis_name)
    return num_experts * jnp.sum((counts_e / tokens) * (prob_sums_e / tokens))


def router_z_loss(router_logits: jax.Array, token_mask=None) -> jax.Array:
    """ST-MoE router z-loss, float32 scalar: mean over masked-in tokens of logsumexp(logits)². logits [..., E]."""
    mask = _token_weights(router_logits.shape[:-1], token_mask, "router_z_loss")
    lse = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(lse**2 * mask) / jnp.sum(mask)


def expert_load(experts: jax.Array, num_experts: int, token_mask=None) -> jax.Array:
    """Fraction of masked-in token slots routed to each expert, float32 [E] summing to 1. experts int [..., k]."""
    mask = _token_weights(experts.shape[:-1], token_mask, "expert_load")
    return _slot_counts(experts, num_experts, mask) / (jnp.sum(mask) * experts.shape[-1])
