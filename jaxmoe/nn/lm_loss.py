"""A language model's output head and its cross-entropy, computed without materialising the logits.

`OutputHead` is the last projection, hidden states -> logits. `fused_cross_entropy` sums the cross-entropy of each
token's logits against a target id, counts the targets and the greedy hits, never holding more than [chunk, vocab]
logits; `logits_cross_entropy` is its plain twin (the whole logits, autodiff), and tests hold the two equal.

The fused op (a `jax.custom_vjp`) loops over chunks of tokens and computes, per chunk, the logits (fp32), their
log-sum-exp, the loss and the hits, and already the gradient: dlogits = (softmax - onehot(target)) x weight,
dx = dlogits @ W^T, dW and db summed over the chunks in fp32. The backward only scales those by the loss's
cotangent. That is the three matmuls of an unfused forward and backward, without writing and re-reading the
[tokens, vocab] fp32 logits, softmax and their gradient (262 MB each at 2,048 tokens x vocabulary 32,064). A head
the caller does not differentiate (frozen under LoRA training) costs no weight-gradient matmul.

Chunk size (`python experiments/bench/lm_loss.py`: jitted forward + backward in x, W and b of hidden states
[2, 1024, 512] and an untied head with bias, against train_step's former path, the model's logits then
`next_token_stats`; 2-core Xeon, fp32, median of 7): at vocabulary 32,064 the logits path took 1.91 s and the
fused op 1.41 / 1.36 / 1.37 / 1.37 / 1.40 s with chunks of 128 / 256 / 512 / 1,024 / 2,048 tokens (matmul-bound:
the three matmuls alone take about 0.95 s); at vocabulary 512, 31 ms against 27.5 ms in one chunk of 2,048 and
36-40 ms in chunks of 128-1,024 (scan overhead). Hence the default: chunks of `MIN_CHUNK` = 256 tokens, or more,
up to `LOGITS_BUDGET` fp32 logits per chunk, so a small vocabulary runs in one chunk. In the whole training step
(experiments/bench/train_step.py's models, vocabulary 32,064; a one-off run alternating with the former objective
swapped in) the dense step went from 2.31 to 1.74 s and the PhiMoE step from 3.76 to 2.46 s; at vocabulary 512 the
dense step is unchanged (0.55 s).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.custom_derivatives import SymbolicZero

from jaxmoe.nn.tokens import greedy_tokens

__all__ = ["LOGITS_BUDGET", "MIN_CHUNK", "OutputHead", "default_chunk", "fused_cross_entropy",
           "logits_cross_entropy"]

MIN_CHUNK = 256  # tokens
LOGITS_BUDGET = 1 << 23  # fp32 logits per chunk (32 MiB): 261 tokens at vocabulary 32,064

_LAYOUTS = ("vd", "dv")


@struct.dataclass
class OutputHead:
    """logits float32 [..., v] = x [..., d] @ weight ([d, v], layout "dv": an lm_head kernel) or @ weight.T
    ([v, d], layout "vd": the tied embedding table), + bias float [v] when given. The weight is cast to x's dtype
    (the compute dtype), the product accumulates in fp32."""

    weight: jax.Array
    bias: jax.Array | None
    layout: str = struct.field(pytree_node=False)

    def __post_init__(self):
        if self.layout not in _LAYOUTS:
            raise ValueError(f"OutputHead: layout={self.layout!r}; expected 'vd' (a [vocab, d] table, e.g. tied "
                             "embeddings) or 'dv' (a [d, vocab] kernel)")

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0 if self.layout == "vd" else 1]

    def logits(self, x):
        """x float [..., d] -> float32 [..., v]."""
        return _project(x, self.weight.astype(x.dtype), self.bias, self.layout)


def _project(x_nd, w, bias, layout):
    spec = "...d,vd->...v" if layout == "vd" else "...d,dv->...v"
    logits = jnp.einsum(spec, x_nd, w, preferred_element_type=jnp.float32)
    return logits if bias is None else logits + bias.astype(jnp.float32)


def _check(x_nd, head: OutputHead, targets_n, weights_n, chunk) -> None:
    d = head.weight.shape[1 if head.layout == "vd" else 0]
    if x_nd.ndim != 2 or x_nd.shape[1] != d:
        raise ValueError(f"x has shape {tuple(x_nd.shape)}; expected [tokens, {d}] (the head's weight is "
                         f"{tuple(head.weight.shape)}, layout {head.layout!r}): flatten batch and time first")
    n = x_nd.shape[0]
    for name, a in (("targets", targets_n), ("weights", weights_n)):
        if tuple(a.shape) != (n,):
            raise ValueError(f"{name} has shape {tuple(a.shape)}; expected [{n}], one per row of x")
    if not jnp.issubdtype(targets_n.dtype, jnp.integer):
        raise ValueError(f"targets have dtype {targets_n.dtype}; expected integer token ids")
    if head.bias is not None and tuple(head.bias.shape) != (head.vocab_size,):
        raise ValueError(f"the head's bias has shape {tuple(head.bias.shape)}; expected [{head.vocab_size}]")
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk={chunk!r}; expected a positive number of tokens, or None for default_chunk(vocab)")


def default_chunk(vocab_size: int) -> int:
    """Tokens per chunk of fused_cross_entropy: MIN_CHUNK, or as many as LOGITS_BUDGET logits allow."""
    return max(MIN_CHUNK, LOGITS_BUDGET // vocab_size)


def fused_cross_entropy(x_nd: jax.Array, head: OutputHead, targets_n: jax.Array, weights_n: jax.Array, *,
                        chunk: int | None = None) -> dict[str, jax.Array]:
    """The weighted cross-entropy of head.logits(x) against the targets, in chunks of at most `chunk` tokens
    (default: default_chunk(vocab)), never holding the [n, v] logits; its gradients in x, the weight and the bias
    are computed in the forward pass.

    x_nd float [n, d] (the final normed hidden states), targets_n int [n] in [0, vocab), weights_n float [n]
    (0: the row counts nowhere). Returns float32 []: "loss_sum" (sum of weight x cross-entropy), "tokens" (sum of
    weights) and "correct" (rows with weight > 0 whose first argmax is the target). Only loss_sum has a gradient.
    """
    _check(x_nd, head, targets_n, weights_n, chunk)
    chunk = default_chunk(head.vocab_size) if chunk is None else chunk
    loss_sum, correct, tokens = _fused(head.layout, chunk, x_nd, head.weight, head.bias, targets_n,
                                       weights_n.astype(jnp.float32))
    return {"loss_sum": loss_sum, "tokens": tokens, "correct": correct}


def logits_cross_entropy(x_nd: jax.Array, head: OutputHead, targets_n: jax.Array, weights_n: jax.Array
                         ) -> dict[str, jax.Array]:
    """fused_cross_entropy through the whole [n, v] logits, differentiated by autodiff: the plain formula."""
    _check(x_nd, head, targets_n, weights_n, None)
    logits_nv = head.logits(x_nd)
    weights_n = weights_n.astype(jnp.float32)
    nll_n = jax.nn.logsumexp(logits_nv, axis=-1) - jnp.take_along_axis(logits_nv, targets_n[:, None], -1)[:, 0]
    hits_n = (greedy_tokens(logits_nv) == targets_n) & (weights_n > 0)
    return {"loss_sum": jnp.sum(nll_n * weights_n), "tokens": jnp.sum(weights_n),
            "correct": jnp.sum(hits_n.astype(jnp.float32))}


def _interleave(a, steps: int, rows: int):
    """[n, ...] -> [steps, rows, ...], step j holding tokens j, j + steps, ... (zero-padded to steps x rows). Token i
    goes to row i // steps, so when steps x rows = n a batch split over devices along n stays split along rows and
    no step gathers another device's tokens (a split of contiguous chunks would put each step on one device)."""
    a = jnp.pad(a, [(0, steps * rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1))
    return a.reshape(rows, steps, *a.shape[1:]).swapaxes(0, 1)


def _chunks(n: int, chunk: int) -> tuple[int, int]:
    steps = -(-n // chunk)
    return steps, -(-n // steps)


def _scan_chunks(layout, chunk, x_nd, weight, bias, targets_n, weights_n, *, grad_x, grad_w, grad_b):
    """(loss_sum, correct, tokens) and, as asked, dx [n, d] (x's dtype), dW (weight's shape, fp32) and db (fp32)
    of loss_sum; None for a gradient not asked."""
    n, d = x_nd.shape
    steps, rows = _chunks(n, chunk)
    w = weight.astype(x_nd.dtype)
    vocab = w.shape[0 if layout == "vd" else 1]

    def step(carry, xs):
        x_kd, t_k, wt_k = xs
        logits_kv = _project(x_kd, w, bias, layout)
        max_k = jnp.max(logits_kv, axis=-1, keepdims=True)
        shifted_kv = logits_kv - max_k
        exp_kv = jnp.exp(shifted_kv)
        sum_exp_k = jnp.sum(exp_kv, axis=-1, keepdims=True)
        onehot_kv = jnp.arange(vocab, dtype=t_k.dtype) == t_k[:, None]
        nll_k = jnp.log(sum_exp_k[:, 0]) - jnp.sum(jnp.where(onehot_kv, shifted_kv, 0.0), axis=-1)
        hits_k = (greedy_tokens(logits_kv) == t_k) & (wt_k > 0)
        loss_sum, correct, dw, db = carry
        carry = (loss_sum + jnp.sum(nll_k * wt_k), correct + jnp.sum(hits_k.astype(jnp.float32)), dw, db)
        if not (grad_x or grad_w or grad_b):
            return carry, None
        dlogits_kv = (exp_kv / sum_exp_k - onehot_kv) * wt_k[:, None]
        dlogits_c = dlogits_kv.astype(x_kd.dtype)
        dx_kd = None
        if grad_x:
            spec = "kv,vd->kd" if layout == "vd" else "kv,dv->kd"
            dx_kd = jnp.einsum(spec, dlogits_c, w, preferred_element_type=jnp.float32).astype(x_kd.dtype)
        if grad_w:
            spec = "kv,kd->vd" if layout == "vd" else "kd,kv->dv"
            operands = (dlogits_c, x_kd) if layout == "vd" else (x_kd, dlogits_c)
            dw = dw + jnp.einsum(spec, *operands, preferred_element_type=jnp.float32)
        if grad_b:
            db = db + jnp.sum(dlogits_kv, axis=0)
        return (carry[0], carry[1], dw, db), dx_kd

    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero, jnp.zeros(weight.shape, jnp.float32) if grad_w else None,
            jnp.zeros((vocab,), jnp.float32) if grad_b else None)
    xs = (_interleave(x_nd, steps, rows), _interleave(targets_n, steps, rows), _interleave(weights_n, steps, rows))
    (loss_sum, correct, dw, db), dx_skd = jax.lax.scan(step, init, xs)
    dx_nd = None if dx_skd is None else dx_skd.swapaxes(0, 1).reshape(steps * rows, d)[:n]
    return (loss_sum, correct, jnp.sum(weights_n)), (dx_nd, dw, db)


def _fused_primal(layout, chunk, x_nd, weight, bias, targets_n, weights_n):
    stats, _ = _scan_chunks(layout, chunk, x_nd, weight, bias, targets_n, weights_n, grad_x=False, grad_w=False,
                            grad_b=False)
    return stats


def _fused_forward(layout, chunk, x_nd, weight, bias, targets_n, weights_n):
    # symbolic_zeros: each array argument arrives as CustomVJPPrimal(value, perturbed); an unperturbed one (e.g. a
    # frozen head) needs no gradient, so its matmul is skipped.
    value = lambda p: None if p is None else p.value  # noqa: E731
    perturbed = lambda p: p is not None and p.perturbed  # noqa: E731
    stats, (dx, dw, db) = _scan_chunks(layout, chunk, value(x_nd), value(weight), value(bias), value(targets_n),
                                       value(weights_n), grad_x=perturbed(x_nd), grad_w=perturbed(weight),
                                       grad_b=perturbed(bias))
    # Each gradient in its argument's dtype (dx already is): the backward only scales them.
    return stats, (dx, None if dw is None else dw.astype(weight.value.dtype),
                   None if db is None else db.astype(bias.value.dtype))


def _fused_backward(layout, chunk, residuals, cotangents):
    del layout, chunk
    g = cotangents[0]  # correct and tokens are counts: no gradient
    if isinstance(g, SymbolicZero):
        return None, None, None, None, None
    return (*[None if a is None else (a * g).astype(a.dtype) for a in residuals], None, None)


_fused = jax.custom_vjp(_fused_primal, nondiff_argnums=(0, 1))
_fused.defvjp(_fused_forward, _fused_backward, symbolic_zeros=True)
