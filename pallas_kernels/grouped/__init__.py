"""Grouped matmul backends. Each module (reference "xla", cpu "cpu", tpu "pallas_tpu", gpu "pallas_gpu") defines

  gmm(lhs, rhs, group_sizes, *, group_offset, transpose_rhs, out_dtype, interpret) -> [m, n_out]
      lhs [m, k_in]; rhs float [g, k, n] or a QuantizedWeight of shape (g, k, n); group_sizes int32 [G], G >= g;
      group_offset int32 scalar array (0 when unused): groups group_offset .. group_offset + g - 1 are computed,
      rhs[i] belonging to group group_offset + i; rows of other groups and rows past sum(group_sizes) are zero.
      transpose_rhs=False: k_in = k, out [m, n]; True (the lhs gradient): lhs [m, n], rhs[i].T, out [m, k].
      Accumulates in float32 and returns out_dtype. lhs and rhs may differ in float dtype.
  tgmm(lhs, dout, group_sizes, *, group_offset, num_groups, interpret) -> float32 [num_groups, k, n]
      lhs [m, k], dout [m, n]; result[i] = lhs[rows of group group_offset + i].T @ dout[those rows]; zeros for
      a group with no rows.

A backend raises NotImplementedError("...why...") for a case it does not handle; pallas_kernels.ops then tries
the next implementation registered in pallas_kernels.registry, XLA ("xla", reference.py) last.

tiles.py holds the blocked loop of the "cpu" backend, public for other blocked CPU paths (jaxmoe's fused expert
FFN): `fold_group_tiles` (a fold over each group's row tiles), `group_weight` (one group's float or dequantized
weight), `write_rows` and `add_to_group` (in-place row and group updates).
"""
