"""The XLA reference grouped matmuls ("xla"): always available, the last implementation every dispatch tries.

Both ops follow the backend contract (pallas_kernels/grouped/__init__.py): `lax.ragged_dot` / `lax.ragged_dot_general`
over the local groups with two extra groups around them, one for the rows before group `group_offset` and one for
the rows after the last local group (rows of later groups and rows past sum(group_sizes)); those two multiply a
zero weight (gmm) or are dropped (tgmm). A quantized rhs is dequantized first. fp32 inputs run at HIGHEST
precision; accumulation is fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.quant import QuantizedWeight

HIGHEST = lax.Precision.HIGHEST


def group_bounds(group_sizes: jax.Array, group_offset: jax.Array, num_groups: int,
                 num_rows: int) -> tuple[jax.Array, jax.Array]:
    """-> (starts, sizes), int32 [num_groups] each: the rows [starts[i], starts[i] + sizes[i]) of group
    group_offset + i, with every group clipped to the first num_rows rows (so a bad group_sizes under jit can
    never index past the buffer)."""
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), num_rows)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    local = group_offset + jnp.arange(num_groups, dtype=jnp.int32)
    return starts[local], ends[local] - starts[local]


def _padded_group_sizes(group_sizes, group_offset, num_groups, num_rows) -> jax.Array:
    """int32 [num_groups + 2]: [rows before the local groups, the local groups' sizes, all rows after]."""
    starts, sizes = group_bounds(group_sizes, group_offset, num_groups, num_rows)
    before = starts[:1]
    after = num_rows - before - jnp.sum(sizes, keepdims=True)
    return jnp.concatenate([before, sizes, after]).astype(jnp.int32)


def gmm(lhs: jax.Array, rhs: jax.Array | QuantizedWeight, group_sizes: jax.Array, *, group_offset: jax.Array,
        transpose_rhs: bool, out_dtype, interpret=False) -> jax.Array:
    """lhs [m, k] (transpose_rhs: [m, n]), rhs [g, k, n] float or quantized -> [m, n] (transpose_rhs: [m, k])
    in out_dtype; rows outside the local groups are zero."""
    del interpret  # plain XLA
    if isinstance(rhs, QuantizedWeight):
        rhs = rhs.dequantize(lhs.dtype)
    dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
    g = rhs.shape[0]
    rhs = (jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs).astype(dtype)
    zero = jnp.zeros((1,) + rhs.shape[1:], dtype)
    sizes = _padded_group_sizes(group_sizes, group_offset, g, lhs.shape[0])
    out = lax.ragged_dot(lhs.astype(dtype), jnp.concatenate([zero, rhs, zero]), sizes, precision=HIGHEST,
                         preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


def tgmm(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *, group_offset: jax.Array, num_groups: int,
         interpret=False) -> jax.Array:
    """lhs [m, k], dout [m, n] -> float32 [num_groups, k, n]: result[i] = lhs[rows].T @ dout[rows] over the
    rows of group group_offset + i (zeros for an empty group)."""
    del interpret  # plain XLA
    dtype = jnp.promote_types(lhs.dtype, dout.dtype)
    sizes = _padded_group_sizes(group_sizes, group_offset, num_groups, lhs.shape[0])
    numbers = lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                            lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    out = lax.ragged_dot_general(lhs.astype(dtype), dout.astype(dtype), sizes, numbers, precision=HIGHEST,
                                 preferred_element_type=jnp.float32)
    return out[1:num_groups + 1]
