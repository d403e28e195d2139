"""The fused SparseMixer-v2 top-2 router as Pallas kernels over token tiles (forward and backward).

One grid step holds a tile of `tt` tokens and every expert: scores [tt, E'] in float32, E' = E padded to a power of
two >= 8 with -inf scores (never picked, weight 0), T padded to a multiple of `tt` (a power of two in [8, 128])
with zero rows that are sliced off. Both rounds run in one step; the forward writes weights, experts and each
round's masked-softmax probability p, which the backward kernel takes with the saved experts, recomputing the
masks and gates from the scores. Only generic Pallas (refs, jnp, iota), so the same kernels lower through Mosaic
on TPU and through Triton on GPU; argmax is spelled out as max + lowest index (jnp.argmax's tie rule and NaN rule)
instead of relying on each lowering's argmax.

`reference.py` is the slow twin; both follow `jaxmoe.moe.router.sparsemixer` (variant "v2") operation for
operation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

# transformers' `torch.add(0.3333, mask_for_one, alpha=0.6667)`: 1.0 (fp32-exact) or 0.3333, not 1/3.
_THIRD = 0.3333
_TWO_THIRDS = 0.6667
_COIN_THRESHOLD = 0.75  # a sampled non-argmax expert runs at full scale when u > 0.75 (B ~ Bernoulli(1/4))
# Token tiles and the padded expert width are powers of two (Triton) and at least one sublane of 8 (Mosaic).
_MIN_BLOCK_TOKENS, _MAX_BLOCK_TOKENS = 8, 128
_MIN_EXPERTS = 8


def sparsemixer_top2(scores, *, jitter_eps, training, noise, interpret):
    """SparseMixer-v2 top-2 routing. scores float [T, E] -> (weights float32 [T, 2], experts int32 [T, 2]).

    Inputs are taken as checked (`pallas_kernels.router.sparsemixer_top2` checks them). `noise` = (exp1 [T, E],
    u1 [T, 1], exp2 [T, E], u2 [T, 1]) float32 when `training`, ignored otherwise. `interpret`: False, True (the
    generic HLO interpreter) or `pltpu.InterpretParams()`. Differentiable in `scores`: d scores = sum over the
    rounds of g_r p_r (onehot_r - gates_r).
    """
    tokens, experts = scores.shape
    block_tokens = min(_MAX_BLOCK_TOKENS, _next_power_of_two(max(tokens, _MIN_BLOCK_TOKENS)))
    pad_tokens = _round_up(max(tokens, 1), block_tokens) - tokens
    pad_experts = max(_MIN_EXPERTS, _next_power_of_two(experts)) - experts
    # Rows first, then experts, so padded rows also carry -inf at the padded experts.
    scores_tp = jnp.pad(scores.astype(jnp.float32), ((0, pad_tokens), (0, 0)))
    scores_tp = jnp.pad(scores_tp, ((0, 0), (0, pad_experts)), constant_values=-jnp.inf)
    if training:
        # Exp(1) draws of 1 at padded experts keep their Gumbel scores at -inf; padded rows are never read back.
        exp1, u1, exp2, u2 = (jnp.asarray(array, jnp.float32) for array in noise)
        wide, narrow = ((0, pad_tokens), (0, pad_experts)), ((0, pad_tokens), (0, 0))
        noise = tuple(jnp.pad(array, pad, constant_values=1.0)
                      for array, pad in ((exp1, wide), (u1, narrow), (exp2, wide), (u2, narrow)))
    else:
        noise = None
    weights_tp, experts_tp = _route(scores_tp, noise, 2 * float(jitter_eps), block_tokens, interpret)
    return weights_tp[:tokens], experts_tp[:tokens]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _route(scores_tp, noise, threshold, block_tokens, interpret):
    """Padded routing: scores float32 [T', E'] -> (weights float32 [T', 2], experts int32 [T', 2])."""
    weights_t2, experts_t2, _ = _forward(scores_tp, noise, threshold, block_tokens, interpret)
    return weights_t2, experts_t2


def _route_fwd(scores_tp, noise, threshold, block_tokens, interpret):
    weights_t2, experts_t2, probs_t2 = _forward(scores_tp, noise, threshold, block_tokens, interpret)
    return (weights_t2, experts_t2), (scores_tp, experts_t2, probs_t2)  # not the noise: it gets no gradient


def _route_bwd(threshold, block_tokens, interpret, residuals, cotangents):
    scores_tp, experts_t2, probs_t2 = residuals
    d_weights_t2, _ = cotangents  # the experts' cotangent is float0
    d_scores_tp = _backward(scores_tp, experts_t2, probs_t2, d_weights_t2, threshold, block_tokens, interpret)
    return d_scores_tp, None  # None: a zero cotangent for every noise array


_route.defvjp(_route_fwd, _route_bwd)


def _forward(scores_tp, noise, threshold, block_tokens, interpret):
    """-> weights float32 [T', 2], experts int32 [T', 2], per-round masked-softmax probability p float32 [T', 2]."""
    padded_tokens, padded_experts = scores_tp.shape
    wide = pl.BlockSpec((block_tokens, padded_experts), lambda i: (i, 0))
    column = pl.BlockSpec((block_tokens, 1), lambda i: (i, 0))
    pair = pl.BlockSpec((block_tokens, 2), lambda i: (i, 0))
    inputs, in_specs = (scores_tp,), [wide]
    if noise is not None:
        inputs += noise
        in_specs += [wide, column, wide, column]
    return _pallas_call(
        functools.partial(_forward_kernel, threshold=threshold, training=noise is not None),
        interpret,
        grid=(padded_tokens // block_tokens,),
        in_specs=in_specs,
        out_specs=[pair, pair, pair],
        out_shape=[jax.ShapeDtypeStruct((padded_tokens, 2), dtype) for dtype in (jnp.float32, jnp.int32, jnp.float32)],
    )(*inputs)


def _backward(scores_tp, experts_t2, probs_t2, d_weights_t2, threshold, block_tokens, interpret):
    """-> d scores float32 [T', E'] = sum over rounds r of g_r p_r (onehot_r - gates_r)."""
    padded_tokens, padded_experts = scores_tp.shape
    wide = pl.BlockSpec((block_tokens, padded_experts), lambda i: (i, 0))
    pair = pl.BlockSpec((block_tokens, 2), lambda i: (i, 0))
    return _pallas_call(
        functools.partial(_backward_kernel, threshold=threshold),
        interpret,
        grid=(padded_tokens // block_tokens,),
        in_specs=[wide, pair, pair, pair],
        out_specs=wide,
        out_shape=jax.ShapeDtypeStruct(scores_tp.shape, jnp.float32),
    )(scores_tp, experts_t2, probs_t2, d_weights_t2)


def _forward_kernel(*refs, threshold: float, training: bool):
    """One token tile: scores [tt, E'] (and in training exp1, u1, exp2, u2) -> weights, experts, p [tt, 2]."""
    if training:
        scores_ref, exp1_ref, u1_ref, exp2_ref, u2_ref, weights_ref, experts_ref, probs_ref = refs
        draws = ((exp1_ref[...], u1_ref[...]), (exp2_ref[...], u2_ref[...]))
    else:
        scores_ref, weights_ref, experts_ref, probs_ref = refs
        draws = (None, None)
    scores_te = scores_ref[...]
    index_te = lax.broadcasted_iota(jnp.int32, scores_te.shape, 1)
    w1_t1, e1_t1, p1_t1 = _pick(scores_te, index_te, threshold, draws[0])
    without_first_te = jnp.where(index_te == e1_t1, -jnp.inf, scores_te)
    w2_t1, e2_t1, p2_t1 = _pick(without_first_te, index_te, threshold, draws[1])
    first_t2 = lax.broadcasted_iota(jnp.int32, weights_ref.shape, 1) == 0
    weights_ref[...] = jnp.where(first_t2, w1_t1, w2_t1)
    experts_ref[...] = jnp.where(first_t2, e1_t1, e2_t1)
    probs_ref[...] = jnp.where(first_t2, p1_t1, p2_t1)


def _backward_kernel(scores_ref, experts_ref, probs_ref, d_weights_ref, d_scores_ref, *, threshold: float):
    """One token tile: scores [tt, E'], experts, p, d weights [tt, 2] -> d scores [tt, E'], gates recomputed."""
    scores_te = scores_ref[...]
    index_te = lax.broadcasted_iota(jnp.int32, scores_te.shape, 1)
    first_t2 = lax.broadcasted_iota(jnp.int32, experts_ref.shape, 1) == 0
    experts_t2 = experts_ref[...]
    gp_t2 = d_weights_ref[...] * probs_ref[...]
    e1_t1, e2_t1 = _column(experts_t2, first_t2), _column(experts_t2, ~first_t2)
    gp1_t1, gp2_t1 = _column(gp_t2, first_t2), _column(gp_t2, ~first_t2)
    gates1_te = _gates(scores_te, threshold)[1]
    gates2_te = _gates(jnp.where(index_te == e1_t1, -jnp.inf, scores_te), threshold)[1]
    # The order of jaxmoe's PhimoeMultiplier backward: gates * -Gp + onehot * Gp, rounds summed.
    d1_te = gates1_te * -gp1_t1 + jnp.where(index_te == e1_t1, 1.0, 0.0) * gp1_t1
    d2_te = gates2_te * -gp2_t1 + jnp.where(index_te == e2_t1, 1.0, 0.0) * gp2_t1
    d_scores_ref[...] = d1_te + d2_te


def _gates(candidates_te, threshold: float):
    """One round's mask and softmax over a tile: candidates [tt, E'] (earlier picks -inf) -> (logits, gates).

    Experts farther than `threshold` (relative) below the best candidate are set to -inf; 0/0 = NaN compares
    False, so those are kept (and -inf candidates stay -inf whatever the compare says).
    """
    top_t1 = jnp.max(candidates_te, axis=1, keepdims=True)
    far_te = (top_t1 - candidates_te) / jnp.maximum(jnp.abs(candidates_te), top_t1) > threshold
    logits_te = jnp.where(far_te, -jnp.inf, candidates_te)
    unnormalized_te = jnp.exp(logits_te - jnp.max(logits_te, axis=1, keepdims=True))
    return logits_te, unnormalized_te / jnp.sum(unnormalized_te, axis=1, keepdims=True)


def _pick(candidates_te, index_te, threshold: float, draws):
    """One round -> (weight, expert int32, p), each [tt, 1]. `draws` None: eval argmax, weight p; else
    (exp [tt, E'], u [tt, 1]): Gumbel-max sample, weight p * c with Heun's coin c."""
    logits_te, gates_te = _gates(candidates_te, threshold)
    if draws is None:
        expert_t1 = _argmax(candidates_te, index_te)
        p_t1 = _take(gates_te, index_te, expert_t1)
        return p_t1, expert_t1, p_t1
    exp_te, u_t1 = draws
    expert_t1 = _argmax(logits_te - jnp.log(exp_te), index_te)
    p_t1 = _take(gates_te, index_te, expert_t1)
    full_scale_t1 = (u_t1 > _COIN_THRESHOLD) | (expert_t1 == _argmax(gates_te, index_te))
    c_t1 = _THIRD + _TWO_THIRDS * jnp.where(full_scale_t1, 1.0, 0.0)
    return p_t1 * c_t1, expert_t1, p_t1


def _argmax(x_te, index_te):
    """int32 [tt, 1]: the lowest index of the row maximum, or of the first NaN if the row has one (jnp.argmax's
    rules). Built from [tt, 1] selects only, no boolean broadcasts, for Mosaic's sake."""
    width = x_te.shape[1]
    is_nan_te = x_te != x_te
    first_nan_t1 = jnp.min(jnp.where(is_nan_te, index_te, width), axis=1, keepdims=True)
    top_t1 = jnp.max(jnp.where(is_nan_te, -jnp.inf, x_te), axis=1, keepdims=True)
    first_top_t1 = jnp.min(jnp.where(x_te == top_t1, index_te, width), axis=1, keepdims=True)
    return jnp.where(first_nan_t1 < width, first_nan_t1, first_top_t1)


def _take(x_te, index_te, expert_t1):
    """x[t, expert[t]] as [tt, 1] (a masked sum: exact, one non-zero term)."""
    return jnp.sum(jnp.where(index_te == expert_t1, x_te, 0.0), axis=1, keepdims=True)


def _column(x_t2, mask_t2):
    """The one entry per row of [tt, 2] where `mask_t2` holds, as [tt, 1] (exact: a sum with one non-zero)."""
    return jnp.sum(jnp.where(mask_t2, x_t2, jnp.zeros_like(x_t2)), axis=1, keepdims=True)


def _pallas_call(kernel, interpret, **specs):
    """pl.pallas_call for this platform: the interpreter when `interpret`, else Mosaic on TPU and Triton on GPU
    (jax's GPU default, Mosaic GPU, wants differently written kernels). The choice is made at lowering, for the
    platform lowered for (which AOT lowering and jax.export may name off the host), not the host's default."""
    if interpret:
        return pl.pallas_call(kernel, interpret=interpret, **specs)
    tpu = pl.pallas_call(kernel, compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)), **specs)
    gpu = pl.pallas_call(kernel, compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1), **specs)
    return lambda *args: lax.platform_dependent(*args, tpu=tpu, cuda=gpu, rocm=gpu)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
