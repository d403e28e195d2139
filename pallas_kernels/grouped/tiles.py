"""Row tiles over groups of sorted rows: the blocked loop that the "cpu" grouped matmuls (cpu.py) and jaxmoe's
"blocked" expert FFN share.

XLA:CPU runs `lax.ragged_dot` about 15x slower than a dense matmul of the same FLOPs, so these paths cut each
group's rows into tiles of a few static heights and run ordinary matmuls on them, inside `fori_loop`s whose trip
counts come from the group sizes. Rows are read with `dynamic_slice` and written with `dynamic_update_slice`
(`write_rows`, `add_to_group`), so nothing is gathered or scattered. `fold_row_tiles` covers one group's rows;
`fold_group_tiles` loops it over the groups.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.grouped.reference import group_bounds
from pallas_kernels.quant import QuantizedWeight


def fold_group_tiles(tile: Callable, carry, group_sizes: jax.Array, *, num_rows: int, heights: Sequence[int],
                     per_group: Callable = lambda i: None, group_offset: jax.Array | int = 0,
                     num_groups: int | None = None):
    """Folds `tile(carry, ctx, i, start, rows, valid)` over the row tiles (`fold_row_tiles`) of every non-empty
    local group -> carry.

    A buffer of num_rows rows is sorted by group, group_sizes int [G] rows each (rows past the groups belong to
    none); local group i in [0, num_groups) (default G) is group group_offset + i. ctx = per_group(i) (e.g. the
    group's weight) is computed once per non-empty group; a group with no rows costs nothing.
    """
    _check_heights(heights)
    num_groups = group_sizes.shape[0] if num_groups is None else num_groups
    starts, sizes = group_bounds(group_sizes, jnp.asarray(group_offset, jnp.int32), num_groups, num_rows)

    def group(i, carry):
        ctx = per_group(i)
        return fold_row_tiles(lambda c, start, rows, valid: tile(c, ctx, i, start, rows, valid), carry, starts[i],
                              sizes[i], num_rows=num_rows, heights=heights)

    def nonempty_group(i, carry):  # skips even per_group (a weight slice, a dequantization) for an empty group
        return lax.cond(sizes[i] > 0, group, lambda i, c: c, i, carry)

    return lax.fori_loop(0, num_groups, nonempty_group, carry)


def fold_row_tiles(tile: Callable, carry, start: jax.Array, size: jax.Array, *, num_rows: int,
                   heights: Sequence[int]):
    """Folds `tile(carry, tile_start, rows, valid)` over rows [start, start + size) of a [num_rows, ...] buffer.

    A tile is rows [tile_start, tile_start + rows), all of them in range when `valid` is None. `heights`: static
    tile heights, largest first, each half the one before (e.g. (512, 256, 128, 64)); heights above num_rows are
    dropped. The rows go through tiles of the largest height while they last, then at most one tile of each
    smaller height (the binary digits of the remainder), then one tile of the smallest height whose bool [rows]
    `valid` marks the last rows (the tile moves back if it would run past the buffer). So most rows go through the
    largest matmuls and fewer than heights[-1] rows are wasted; `tile` keeps the rows where `valid` is False out
    of its result (see `write_rows`).
    """
    heights = tuple(r for r in _check_heights(heights) if r <= num_rows) or (num_rows,)
    big, last = heights[0], heights[-1]
    n_big = size // big
    carry = lax.fori_loop(0, n_big, lambda j, c: tile(c, start + j * big, big, None), carry)
    start, rest = start + n_big * big, size - n_big * big
    for rows in heights[1:]:
        take = rest >= rows
        carry = lax.cond(take, lambda c, s=start, r=rows: tile(c, s, r, None), lambda c: c, carry)
        start, rest = start + jnp.where(take, rows, 0), rest - jnp.where(take, rows, 0)
    shifted = jnp.minimum(start, num_rows - last)
    row = shifted + jnp.arange(last)
    valid = (row >= start) & (row < start + rest)
    return lax.cond(rest > 0, lambda c: tile(c, shifted, last, valid), lambda c: c, carry)


def group_weight(rhs: jax.Array | QuantizedWeight, i: jax.Array, dtype) -> jax.Array:
    """rhs [g, k, n] float or QuantizedWeight -> rhs[i] as a float [k, n] in dtype; a QuantizedWeight's slice i
    (codes, scales, zeros) alone is dequantized."""
    if not isinstance(rhs, QuantizedWeight):
        return lax.dynamic_index_in_dim(rhs, i, keepdims=False).astype(dtype)
    return quantized_group(rhs, i).dequantize(dtype)[0]


def quantized_group(rhs: QuantizedWeight, i: jax.Array) -> QuantizedWeight:
    """Matrix i of a [g, k, n] QuantizedWeight as a QuantizedWeight of shape (1, k, n) (its codes, scales and zero
    points sliced, still packed)."""
    take = lambda a: None if a is None else lax.dynamic_index_in_dim(a, i)  # noqa: E731
    return dataclasses.replace(rhs, codes=take(rhs.codes), scale=take(rhs.scale), zero=take(rhs.zero),
                               shape=(1,) + tuple(rhs.shape[1:]))


def write_rows(buffer_mn: jax.Array, start: jax.Array, rows_rn: jax.Array, valid: jax.Array | None) -> jax.Array:
    """buffer [m, n] with rows [start, start + r) replaced by rows [r, n], except where bool [r] `valid` is False
    (those keep the buffer's rows: they belong to a neighbouring group). In place inside a loop."""
    rows_rn = rows_rn.astype(buffer_mn.dtype)
    if valid is not None:
        rows_rn = jnp.where(valid[:, None], rows_rn, lax.dynamic_slice_in_dim(buffer_mn, start, valid.shape[0]))
    return lax.dynamic_update_slice_in_dim(buffer_mn, rows_rn, start, axis=0)


def add_to_group(acc_gkn: jax.Array, i: jax.Array, update_kn: jax.Array) -> jax.Array:
    """acc [g, k, n] with update [k, n] added to acc[i], as a dynamic_update_slice (in place inside a loop, no
    scatter-add)."""
    total_kn = lax.dynamic_index_in_dim(acc_gkn, i, keepdims=False) + update_kn
    return lax.dynamic_update_index_in_dim(acc_gkn, total_kn.astype(acc_gkn.dtype), i, 0)


def _check_heights(heights: Sequence[int]) -> tuple[int, ...]:
    heights = tuple(heights)
    ladder = bool(heights) and all(isinstance(r, int) and r > 0 for r in heights) and all(
        big == 2 * small for big, small in zip(heights, heights[1:]))
    if not ladder:
        raise ValueError(f"heights={heights!r}; expected positive ints, largest first, each half the one before "
                         f"(e.g. (512, 256, 128, 64)), so that one tile of each smaller height covers any remainder")
    return heights
