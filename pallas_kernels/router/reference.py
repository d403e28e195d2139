"""The XLA reference for the SparseMixer-v2 top-2 router: plain jnp, the slow obviously-correct twin of kernel.py.

Each round keeps the experts within a relative gap of 2·jitter_eps of the round's best logit, takes the softmax
over them and picks one (eval: the argmax; training: a Gumbel-max draw with the given Exp(1) noise); round two
excludes round one's pick. Training weights are p·c with Heun's coin c in {1, 0.3333}. One custom VJP for both
modes: d scores = sum over the rounds of g_r p_r (onehot_r - gates_r), the SparseMixer-v2 multiplier rule (c is
not applied), which in eval is exactly the autograd of the picked masked-softmax probability.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# transformers' `torch.add(0.3333, mask_for_one, alpha=0.6667)`: 1.0 (fp32-exact) or 0.3333, not 1/3.
_THIRD = 0.3333
_TWO_THIRDS = 0.6667
_COIN_THRESHOLD = 0.75  # a sampled non-argmax expert runs at full scale when u > 0.75 (B ~ Bernoulli(1/4))


def sparsemixer_top2(scores, *, jitter_eps, training, noise, interpret):
    """SparseMixer-v2 top-2 routing. scores float [T, E] -> (weights float32 [T, 2], experts int32 [T, 2]).

    Inputs are taken as checked (`pallas_kernels.router.sparsemixer_top2` checks them). `noise` = (exp1 [T, E],
    u1 [T, 1], exp2 [T, E], u2 [T, 1]) when `training`, ignored otherwise; `interpret` is ignored (no kernel).
    """
    del interpret
    draws = tuple(jnp.asarray(array, jnp.float32) for array in noise) if training else None
    return _route(scores.astype(jnp.float32), draws, 2 * float(jitter_eps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _route(scores_te, draws, threshold):
    weights_t2, experts_t2, _ = _forward(scores_te, draws, threshold)
    return weights_t2, experts_t2


def _forward(scores_te, draws, threshold):
    """-> weights [T, 2], experts int32 [T, 2], and per round what the backward needs: (p [T, 1], expert int32
    [T, 1], gates [T, E])."""
    exp1, u1, exp2, u2 = draws if draws is not None else (None,) * 4
    w1_t1, e1_t1, saved1 = _pick(scores_te, threshold, exp1, u1)
    without_first_te = jnp.where(jnp.arange(scores_te.shape[1]) == e1_t1, -jnp.inf, scores_te)
    w2_t1, e2_t1, saved2 = _pick(without_first_te, threshold, exp2, u2)
    return jnp.concatenate([w1_t1, w2_t1], axis=1), jnp.concatenate([e1_t1, e2_t1], axis=1), (saved1, saved2)


def _route_fwd(scores_te, draws, threshold):
    weights_t2, experts_t2, saved = _forward(scores_te, draws, threshold)
    return (weights_t2, experts_t2), saved  # not the draws: they get no gradient


def _route_bwd(threshold, saved, cotangents):
    d_weights_t2, _ = cotangents  # the experts' cotangent is float0
    d_scores_te = 0.0
    for r, (p_t1, expert_t1, gates_te) in enumerate(saved):
        gp_t1 = d_weights_t2[:, r : r + 1] * p_t1
        d_scores_te = d_scores_te + (gates_te * -gp_t1 + _onehot(expert_t1, gates_te.shape[1]) * gp_t1)
    return d_scores_te, None  # None: a zero cotangent for every draw


_route.defvjp(_route_fwd, _route_bwd)


def _onehot(expert_t1, experts: int):
    """float32 [T, experts]: 1 at each row's expert."""
    return (jnp.arange(experts) == expert_t1).astype(jnp.float32)


def _pick(candidates_te, threshold, exp_te, u_t1):
    """One round over candidates [T, E] (earlier picks -inf) -> (weight [T, 1], expert int32 [T, 1],
    (p [T, 1], expert int32 [T, 1], gates [T, E])). `exp_te` None: eval."""
    top_t1 = jnp.max(candidates_te, axis=-1, keepdims=True)
    far_te = (top_t1 - candidates_te) / jnp.maximum(jnp.abs(candidates_te), top_t1) > threshold  # 0/0: kept
    logits_te = jnp.where(far_te, -jnp.inf, candidates_te)
    gates_te = jax.nn.softmax(logits_te, axis=-1)
    if exp_te is None:
        expert_t1 = jnp.argmax(candidates_te, axis=-1, keepdims=True)
    else:
        expert_t1 = jnp.argmax(logits_te - jnp.log(exp_te), axis=-1, keepdims=True)  # Gumbel-max: a draw from gates
    p_t1 = jnp.take_along_axis(gates_te, expert_t1, axis=-1)
    expert_t1 = expert_t1.astype(jnp.int32)
    saved = (p_t1, expert_t1, gates_te)
    if exp_te is None:
        return p_t1, expert_t1, saved
    full_scale_t1 = (u_t1 > _COIN_THRESHOLD) | (expert_t1 == jnp.argmax(gates_te, axis=-1, keepdims=True))
    c_t1 = _THIRD + _TWO_THIRDS * full_scale_t1.astype(jnp.float32)
    return p_t1 * c_t1, expert_t1, saved
