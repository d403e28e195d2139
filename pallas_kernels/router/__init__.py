"""The fused SparseMixer-v2 top-2 router (GRIN / Phi-3.5-MoE): `sparsemixer_top2`, checked and dispatched.

Implementations, each `(scores, *, jitter_eps, training, noise, interpret) -> (weights, experts)` and
differentiable in scores: `kernel.py` (Pallas, token tiles, forward and backward kernels) and `reference.py`
(XLA, the slow twin).
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from pallas_kernels import registry


def sparsemixer_top2(scores, *, jitter_eps, training, noise=None, backend="auto", interpret=False):
    """GRIN's SparseMixer-v2 top-2 router. scores float [T, E] (E >= 2) -> (weights float32 [T, 2], experts
    int32 [T, 2]); same results as `jaxmoe.moe.router.sparsemixer(..., variant="v2")`.

    Each round keeps the experts within a relative gap of 2·jitter_eps of the round's best score, takes the softmax
    over them and picks one; round two excludes round one's pick; weights are not renormalised. Eval: the argmax,
    weight = its masked-softmax probability p. Training: a Gumbel-max sample from the masked softmax, weight p·c
    with Heun's coin c in {1, 0.3333}. The op draws no random numbers: training needs
    `noise = (exp1 [T, E], u1 [T, 1], exp2 [T, E], u2 [T, 1])`, Exp(1) and U(0, 1) draws (ignored in eval).
    Gradient in scores: sum over the rounds of g_r p_r (onehot_r - gates_r) (SparseMixer-v2's rule, c not
    applied; in eval this is ordinary autograd). `backend`: "auto" ("pallas" on GPU/TPU, "xla" on CPU),
    "pallas" or "xla"; `interpret` (True or `pltpu.InterpretParams()`) runs the Pallas kernel in interpret mode,
    which is how it runs on CPU.
    """
    tokens, experts = _check_scores(scores)
    _check_jitter_eps(jitter_eps)
    training = bool(training)
    noise = _check_noise(noise, tokens, experts) if training else None
    (_, implementation), *_ = registry.resolve("sparsemixer_top2", backend, interpret=interpret)
    return implementation(
        scores, jitter_eps=float(jitter_eps), training=training, noise=noise, interpret=interpret)


def _check_scores(scores) -> tuple[int, int]:
    shape, dtype = tuple(jnp.shape(scores)), jnp.result_type(scores)
    if not (len(shape) == 2 and shape[1] >= 2 and jnp.issubdtype(dtype, jnp.floating)):
        raise ValueError(f"sparsemixer_top2: scores must be a float array [tokens, experts] with at least 2 experts "
                         f"(it picks 2); got shape {shape}, dtype {dtype}. Pass the router logits reshaped to "
                         f"[tokens, experts].")
    return shape


def _check_jitter_eps(jitter_eps) -> None:
    if isinstance(jitter_eps, bool) or not isinstance(jitter_eps, numbers.Real) or not jitter_eps >= 0:
        raise ValueError(f"sparsemixer_top2: jitter_eps={jitter_eps!r}; expected a Python number >= 0 (the relative "
                         f"threshold is 2*jitter_eps; Phi-3.5-MoE and GRIN use router_jitter_noise=0.01).")


def _check_noise(noise, tokens: int, experts: int) -> tuple[jax.Array, ...]:
    """noise -> (exp1, u1, exp2, u2) float32, checked against [T, E], [T, 1], [T, E], [T, 1]."""
    if noise is None:
        raise ValueError("sparsemixer_top2: training=True samples experts, and this op draws no random numbers "
                         "itself; pass noise=(exp1, u1, exp2, u2) with exp ~ Exp(1) [tokens, experts] and "
                         "u ~ U(0, 1) [tokens, 1] (e.g. jax.random.exponential / jax.random.uniform), or use "
                         "training=False for deterministic routing.")
    if not isinstance(noise, (tuple, list)) or len(noise) != 4:
        raise ValueError(f"sparsemixer_top2: noise must be a tuple of 4 arrays (exp1, u1, exp2, u2); got "
                         f"{type(noise).__name__} of length {len(noise) if hasattr(noise, '__len__') else '?'}.")
    expected = [(tokens, experts), (tokens, 1), (tokens, experts), (tokens, 1)]
    for name, array, shape in zip(("exp1", "u1", "exp2", "u2"), noise, expected):
        if tuple(jnp.shape(array)) != shape:
            raise ValueError(f"sparsemixer_top2: noise {name} has shape {tuple(jnp.shape(array))}; expected {shape} "
                             f"for scores [tokens={tokens}, experts={experts}]. Draw Exp(1) [T, E] and U(0, 1) "
                             f"[T, 1] arrays.")
    return tuple(jnp.asarray(array, jnp.float32) for array in noise)


__all__ = ["sparsemixer_top2"]
