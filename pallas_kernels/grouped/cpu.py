"""The CPU backend ("cpu"): grouped matmuls as ordinary dense matmuls over row tiles of each group.

XLA:CPU runs `lax.ragged_dot` about 15x slower than a dense matmul of the same FLOPs, so this backend folds over
the row tiles of each local group (tiles.py), multiplying each tile by the group's weight (a quantized weight is
dequantized once per non-empty group). Rows outside the local groups are never written (they stay zero). Same
contract and results as reference.py, which the tests hold it to. Works on any platform (plain XLA).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.grouped.reference import HIGHEST, group_bounds
from pallas_kernels.grouped.tiles import fold_group_tiles, fold_row_tiles, group_weight, write_rows
from pallas_kernels.quant import QuantizedWeight

# Row-tile heights, largest first, each half the one before (see `tiles.fold_row_tiles`). Down to 8 rows: at
# decode a group holds a handful of rows.
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
    contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))

    def tile(out, w, i, start, rows, valid):
        y = lax.dot_general(lax.dynamic_slice_in_dim(lhs, start, rows), w, (contract, ((), ())),
                            precision=HIGHEST, preferred_element_type=jnp.float32)
        return write_rows(out, start, y, valid)

    out = jnp.zeros((m, k if transpose_rhs else n), out_dtype)
    return fold_group_tiles(tile, out, group_sizes, num_rows=m, heights=TILE_ROWS, group_offset=group_offset,
                            num_groups=g, per_group=lambda i: group_weight(rhs, i, dtype))


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

    def group(i, out):  # a [k, n] accumulator per group: adding into out[i] per tile measured 15% slower
        acc_kn = fold_row_tiles(tile, jnp.zeros((k, n), jnp.float32), starts[i], sizes[i], num_rows=m,
                                heights=TILE_ROWS)
        return lax.dynamic_update_index_in_dim(out, acc_kn, i, 0)

    return lax.fori_loop(0, num_groups, group, jnp.zeros((num_groups, k, n), jnp.float32))
