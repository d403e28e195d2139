"""PEMA at generation time: `gradual_unrolling` builds the `GradualUnrolling` logits processor for
`jaxmoe.generate`, which mixes P = c_t P_PEMA + (1 - c_t) P_LM with c_t from `gu_coefficients`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxmoe.mt.pema.module import PEMA, Head, check_unit, project

__all__ = ["GradualUnrolling", "gradual_unrolling", "gu_coefficients"]

_SCHEDULES = ("gradual", "constant")


def gu_coefficients(step, lambda_max, length_r, schedule: str = "gradual") -> jax.Array:
    """PEMA's weight in the mixture at generation step `step` (0 for the first new token), float32 [rows].

    "gradual" (Gradual Unrolling): lambda_0 = lambda_max and lambda drops by lambda_max / L per step, so
    lambda_s = lambda_max (1 - s / L); the weight applied is lambda_s ** 2 while lambda_s > 0, then 0.
    "constant": lambda_max at every step (the paper's no-GU ablation). length_r float [rows]: L per row.
    """
    lam = jnp.float32(lambda_max) * (1.0 - jnp.asarray(step, jnp.float32) / jnp.asarray(length_r, jnp.float32))
    if schedule == "constant":
        return jnp.broadcast_to(jnp.float32(lambda_max), lam.shape)
    return jnp.where(lam > 0, lam * lam, 0.0)


@struct.dataclass
class GradualUnrolling:
    """A `jaxmoe.generate` logits processor: next-token log-probabilities log(c P_PEMA + (1 - c) P_LM), mixed by
    logsumexp of the log-probabilities, c from `gu_coefficients`; rows where c = 0 keep the model's logits
    unchanged. Built by `gradual_unrolling`."""

    a_rd: jax.Array
    b_pd_dr: jax.Array
    scale: jax.Array
    head: Head
    lambda_max: jax.Array
    length_b: jax.Array  # float32 [b]: L per prompt
    schedule: str = struct.field(pytree_node=False)

    def coefficients(self, step, rows: int) -> jax.Array:
        """c float32 [rows] at `step`; rows a multiple of the prompts (beam search: prompt i's beams adjacent)."""
        b = self.length_b.shape[0]
        if rows % b:
            raise ValueError(f"GradualUnrolling holds {b} lengths but generation runs {rows} rows; pass one "
                             "source length per prompt")
        return gu_coefficients(step, self.lambda_max, jnp.repeat(self.length_b, rows // b), self.schedule)

    def __call__(self, step, logits_rv, hidden_rd):
        c_r = self.coefficients(step, logits_rv.shape[0])[:, None]
        logp_lm = jax.nn.log_softmax(logits_rv.astype(jnp.float32), axis=-1)
        logp_pema = jax.nn.log_softmax(self.head.logits(project(self.a_rd, self.b_pd_dr, self.scale, hidden_rd)),
                                       axis=-1)
        mixed = jax.nn.logsumexp(jnp.stack([jnp.log(c_r) + logp_pema, jnp.log1p(-c_r) + logp_lm]), axis=0)
        return jnp.where(c_r > 0, mixed, logits_rv.astype(jnp.float32))


def gradual_unrolling(pema: PEMA, head: Head, *, lambda_max: float = 0.9, length: str | int = "source",
                      source_lengths=None, length_ratio: float = 1.0, schedule: str = "gradual"
                      ) -> GradualUnrolling:
    """The PEMA mixture for `jaxmoe.generate(..., logits_processor=...)`.

    lambda_max in [0, 1] (the paper's example uses 0.9; 0 is plain generation). L, the number of steps over which
    lambda decays to 0, never uses the reference: length="source" takes L = max(1, length_ratio x the source's
    token count) per prompt, from `source_lengths` int [b] (one per prompt, in the batch's order); an int
    length is L for every prompt (e.g. max_new_tokens). NOTE: the paper's released code sets L to the REFERENCE
    target length, oracle information a real system does not have; its figures are not reproduced by either
    choice here. schedule="constant" applies lambda_max at every step (no Gradual Unrolling, the paper's ablation;
    `length` is then not used).
    """
    check_unit("lambda_max", lambda_max, "PEMA's weight at the first step; 0.9 in the paper, 0 turns PEMA off")
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule={schedule!r}; expected one of {_SCHEDULES}")
    if not isinstance(head, Head):
        raise TypeError(f"head is a {type(head).__name__}; expected a Head (jaxmoe.mt.pema.lm_head_of(model))")
    if pema.hidden_size != head.hidden_size:
        raise ValueError(f"the PEMA has hidden size {pema.hidden_size} but the head {head.hidden_size}; they must "
                         "come from the same model")
    if schedule == "constant":
        length_b = np.ones((1,))
    elif length == "source":
        if source_lengths is None:
            raise ValueError('length="source" needs source_lengths: int [b], each prompt\'s source token count')
        lengths = np.asarray(source_lengths)
        if lengths.ndim != 1 or lengths.size == 0 or not np.issubdtype(lengths.dtype, np.number) or (lengths < 0).any():
            raise ValueError(f"source_lengths={source_lengths!r}; expected non-negative counts [b], one per prompt")
        if not (isinstance(length_ratio, (int, float)) and length_ratio > 0):
            raise ValueError(f"length_ratio={length_ratio!r}; expected a positive number (target / source length)")
        length_b = np.maximum(1.0, length_ratio * lengths.astype(np.float64))
    elif isinstance(length, (int, np.integer)) and not isinstance(length, bool) and length >= 1:
        length_b = np.full((1,), float(length))
    else:
        raise ValueError(f"length={length!r}; expected 'source' (with source_lengths) or an integer >= 1 (a maximum "
                         "length); the reference length is oracle information and is not offered")
    return GradualUnrolling(a_rd=pema.a_rd[...], b_pd_dr=pema.b_pd_dr[...], scale=jnp.float32(pema.scale),
                            head=head, lambda_max=jnp.float32(lambda_max),
                            length_b=jnp.asarray(length_b, jnp.float32), schedule=schedule)
