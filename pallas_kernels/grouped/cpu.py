"""The CPU backend ("cpu"): grouped matmuls as ordinary dense matmuls over row tiles of each group.

XLA:CPU runs `lax.ragged_dot` about 15x slower than a dense matmul of the same FLOPs, so this backend loops
(`lax.fori_loop`) over the local groups and, inside each, over row tiles of that group's rows, multiplying each
tile by the group's weight (a quantized weight is dequantized once per non-empty group). Rows are read with
`dynamic_slice` and written with `dynamic_update_slice`, so nothing is gathered or scattered, and rows outside the
local groups are never written (they stay zero). Same contract and results as reference.py, which the tests hold
it to. Works on any platform (plain XLA).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.grouped.reference import HIGHEST, group_bounds
from pallas_kernels.quant import QuantizedWeight

# Row-tile heights, largest first, each half the one before (see `_fold_row_tiles`).
TILE_ROWS = (256, 128, 64, 32, 16, 8)


def gmm(lhs: jax.Array, rhs: jax.Array | QuantizedWeight, group_sizes: jax.Array, *, group_offset: jax.Array,
        transpose_rhs: bool, out_dtype, interpret=False) -> jax.Array:
    """lhs [m, k] (transpose_rhs: [m, n]), rhs [g, k, n] float or quantized -> [m, n] (transpose_rhs: [m, k])
    in out_dtype; rows outside the local groups are zero."""
    del interpret  # plain XLA
    m = lhs.shape[0]
    g, k, n = rhs.shape
    dtype = lhs.dtype if isinstance(rhs, QuantizedWeight) else jnp.promote_types(lhs.dtype, rhs.dtype)
    lhs = lhs.astype(dtype)
    starts, sizes = group_bounds(group_sizes, group_offset, g, m)
    contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))

    def group(i, out):
        w = _group_weight(rhs, i, dtype)

        def tile(out, start, rows, valid):
            y = lax.dot_general(lax.dynamic_slice_in_dim(lhs, start, rows), w, (contract, ((), ())),
                                precision=HIGHEST, preferred_element_type=jnp.float32).astype(out_dtype)
            if valid is not None:  # rows of neighbouring groups keep what they hold
                y = jnp.where(valid[:, None], y, lax.dynamic_slice_in_dim(out, start, rows))
            return lax.dynamic_update_slice_in_dim(out, y, start, axis=0)

        return _fold_row_tiles(starts[i], sizes[i], m, tile, out)

    def nonempty_group(i, out):  # an empty group costs neither its weight slice nor its dequantization
        return lax.cond(sizes[i] > 0, group, lambda i, out: out, i, out)

    out = jnp.zeros((m, k if transpose_rhs else n), out_dtype)
    return lax.fori_loop(0, g, nonempty_group, out)


def tgmm(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *, group_offset: jax.Array, num_groups: int,
         interpret=False) -> jax.Array:
    """lhs [m, k], dout [m, n] -> float32 [num_groups, k, n]: result[i] = lhs[rows].T @ dout[rows] over the
    rows of group group_offset + i (zeros for an empty group)."""
    del interpret  # plain XLA
    (m, k), n = lhs.shape, dout.shape[1]
    dtype = jnp.promote_types(lhs.dtype, dout.dtype)
    lhs, dout = lhs.astype(dtype), dout.astype(dtype)
    starts, sizes = group_bounds(group_sizes, group_offset, num_groups, m)

    def tile(acc_kn, start, rows, valid):
        x = lax.dynamic_slice_in_dim(lhs, start, rows)
        d = lax.dynamic_slice_in_dim(dout, start, rows)
        if valid is not None:  # rows of neighbouring groups must not reach this group's sum
            x, d = jnp.where(valid[:, None], x, 0), jnp.where(valid[:, None], d, 0)
        return acc_kn + lax.dot_general(x, d, (((0,), (0,)), ((), ())), precision=HIGHEST,
                                        preferred_element_type=jnp.float32)

    def group(i, out):
        acc_kn = _fold_row_tiles(starts[i], sizes[i], m, tile, jnp.zeros((k, n), jnp.float32))
        return lax.dynamic_update_index_in_dim(out, acc_kn, i, 0)

    return lax.fori_loop(0, num_groups, group, jnp.zeros((num_groups, k, n), jnp.float32))


def _group_weight(rhs: jax.Array | QuantizedWeight, i: jax.Array, dtype) -> jax.Array:
    """rhs[i] as a float [k, n] in dtype (dequantized when rhs is quantized)."""
    if not isinstance(rhs, QuantizedWeight):
        return lax.dynamic_index_in_dim(rhs, i, keepdims=False).astype(dtype)
    one = QuantizedWeight(
        codes=lax.dynamic_index_in_dim(rhs.codes, i), scale=lax.dynamic_index_in_dim(rhs.scale, i),
        zero=None if rhs.zero is None else lax.dynamic_index_in_dim(rhs.zero, i), bits=rhs.bits,
        group_size=rhs.group_size, block_k=rhs.block_k, shape=(1,) + rhs.shape[1:], dtype=rhs.dtype)
    return one.dequantize(dtype)[0]


def _fold_row_tiles(start: jax.Array, size: jax.Array, num_rows: int, tile: Callable, carry):
    """Folds `tile(carry, tile_start, rows, valid)` over rows [start, start + size) of a [num_rows, ...] buffer.

    The rows are covered by tiles of the largest height in TILE_ROWS (at most num_rows), then at most one tile of
    each smaller height (the binary digits of the remainder), then one tile of the smallest height whose bool
    [rows] `valid` marks the last few rows (the tile moves back if it would run past the buffer). `valid` is None
    for full tiles. So most rows go through the largest matmuls and fewer than TILE_ROWS[-1] rows are wasted.
    """
    heights = tuple(r for r in TILE_ROWS if r <= num_rows) or (num_rows,)
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
