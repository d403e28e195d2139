"""FineQuant's adaptive granularity: per matrix, the coarsest group size that passes a quality test.

`AdaptiveGroupSize.choose` tries the candidates k, k/2, k/4, ... (each dividing k, down to `min_group_size`,
default 64; a matrix with k < min_group_size has the single candidate k) from coarsest to finest, quantizes and
dequantizes the matrix at each, and keeps the first that `test` passes; the finest candidate is the fallback.
Every matrix of a [g, k, n] weight is tested and chosen on its own: each expert of an expert stack gets its own
group size (an outlier in one expert makes only that expert's groups finer); a linear kernel is one matrix.

The default test, `RangeCollapse(shrink=0.5, max_fraction=0.001)`, looks for FineQuant's "catastrophic collapse":
an outlier stretches its group's scale until the other weights of the column round to a few levels, often all to
zero. Cut every column of the matrix into pieces of `rows` consecutive rows (rows = the finest candidate, 64 by
default); a piece *collapses* when its dequantized range max - min is less than half (1 - shrink) of its original
range. Group size G passes when at most 0.1% (max_fraction) of all pieces collapse. (At the
finest size a zero-centred piece is its own group and keeps over half its range with either kind of scale; the
finest candidate is the fallback and is not tested.) Measured on 2 x 4096 x 512 weights: Gaussian weights never
collapse at 3 to 8 bits (per-channel is kept), heavy tails (Student-t, 3 degrees of freedom) at 4 bits need
G = 128, and so do 2-bit symmetric Gaussian weights. (The plain per-column version of this test cannot fire:
absmax and min-max scales reconstruct each group's extremes, so a whole column's range never changes.)

The test is pluggable: any callable `test(w, w_hat, rows) -> (passed: bool, score: float)` on float32 [1, k, n]
arrays, one matrix (one expert) at a time (`rows` = the finest candidate; the score is logged).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxmoe.quant.params import pack

__all__ = ["AdaptiveGroupSize", "RangeCollapse", "collapsed_fraction"]

logger = logging.getLogger("jaxmoe.quant")


def collapsed_fraction(w_gkn: jax.Array, w_hat_gkn: jax.Array, rows: int, shrink: float = 0.5) -> jax.Array:
    """The fraction of pieces (`rows` consecutive rows of one column) whose dequantized range (max - min) is less
    than (1 - shrink) times their original range; a float32 scalar."""
    g, k, n = w_gkn.shape
    w = w_gkn.astype(jnp.float32).reshape(g, k // rows, rows, n)
    w_hat = w_hat_gkn.astype(jnp.float32).reshape(g, k // rows, rows, n)
    before = jnp.max(w, axis=2) - jnp.min(w, axis=2)
    after = jnp.max(w_hat, axis=2) - jnp.min(w_hat, axis=2)
    return jnp.mean(after < (1.0 - shrink) * before)


@dataclasses.dataclass(frozen=True)
class RangeCollapse:
    """Passes when at most `max_fraction` of the pieces collapse (lose more than `shrink` of their range); the
    score is the collapsed fraction."""

    shrink: float = 0.5
    max_fraction: float = 0.001

    def __post_init__(self):
        if not 0.0 < self.shrink <= 0.5:
            raise ValueError(f"RangeCollapse(shrink={self.shrink!r}); expected 0 < shrink <= 0.5 (above 0.5 the "
                             "finest group size would often fail too)")
        if not 0.0 <= self.max_fraction < 1.0:
            raise ValueError(f"RangeCollapse(max_fraction={self.max_fraction!r}); expected 0 <= max_fraction < 1")

    def __call__(self, w, w_hat, rows: int) -> tuple[bool, float]:
        fraction = float(collapsed_fraction(w, w_hat, rows, self.shrink))
        return fraction <= self.max_fraction, fraction


@dataclasses.dataclass(frozen=True)
class AdaptiveGroupSize:
    """group_size="adaptive" is `AdaptiveGroupSize()`; pass an instance to change the test or the floor."""

    test: Callable = RangeCollapse()
    min_group_size: int = 64

    def __post_init__(self):
        if not isinstance(self.min_group_size, int) or self.min_group_size < 1:
            raise ValueError(f"AdaptiveGroupSize(min_group_size={self.min_group_size!r}); expected an int >= 1")
        if not callable(self.test):
            raise ValueError(f"AdaptiveGroupSize(test={self.test!r}); expected a callable "
                             "test(w, w_hat, rows) -> (passed, score)")

    def candidates(self, k: int) -> list[int]:
        """Group sizes to try for k input rows, coarsest first: k, k/2, ... while they divide k and stay
        >= min_group_size (just [k] when k < min_group_size)."""
        sizes = [k]
        while sizes[-1] % 2 == 0 and sizes[-1] // 2 >= self.min_group_size:
            sizes.append(sizes[-1] // 2)
        return sizes

    def choose(self, w_gkn: jax.Array, *, bits: int, symmetric: bool, path: str) -> tuple[int, ...]:
        """For each matrix w[i] of w [g, k, n], the coarsest candidate group size that passes `test`: a tuple of g
        sizes. Logs one line per weight (INFO) with every trial."""
        if isinstance(w_gkn, jax.core.Tracer):
            raise ValueError(f"group_size='adaptive' for {path!r} needs the weight's values, but it is traced "
                             "(inside jax.jit or nnx.eval_shape); quantize outside transformations, or pass a fixed "
                             "group size")
        g, k, _ = w_gkn.shape
        sizes = self.candidates(k)
        w = jnp.asarray(w_gkn, jnp.float32)
        chosen = [sizes[-1]] * g
        undecided = list(range(g))
        trials = [[] for _ in range(g)]
        for size in sizes[:-1]:
            # Matrices are quantized independently, so one round trip of the stack serves every matrix.
            w_hat = pack(w, bits=bits, group_size=size, symmetric=symmetric).dequantize(jnp.float32)
            for i in list(undecided):
                passed, score = self.test(w[i:i + 1], w_hat[i:i + 1], sizes[-1])
                trials[i].append(f"{size}: {score:.3g} {'pass' if passed else 'fail'}")
                if passed:
                    chosen[i] = size
                    undecided.remove(i)
            if not undecided:
                break
        described = [", ".join(t) or "single candidate" for t in trials]
        if g > 1:
            described = [f"expert {i}: {d}" for i, d in enumerate(described)]
        label = (f"group size {chosen[0]}" if len(set(chosen)) == 1 else f"group sizes {chosen} (per expert)")
        logger.info("%s %s: adaptive %s at %d bits (candidates %s; test %r: %s)", path, list(w_gkn.shape), label,
                    bits, sizes, self.test, "; ".join(described))
        return tuple(chosen)
