"""The GPU backend ("pallas_gpu"): grouped matmuls as Pallas kernels on the Triton lowering.

gmm: XLA first cuts every group's rows into row tiles of `tm` rows that start at the group's first row (so a group
of 3 rows is one tile and its weight is read once), plus tiles of zeros for the rows outside the local groups;
`_row_tiles` gives each tile (first row, end row, local group or -1). A 1-D grid runs over
(row tile, n tile) pairs in a grouped order (`group_m` row tiles share each sweep over n, so their weight tiles
stay in L2). A program loads its tile's entry, loops over k with `fori_loop` (a zero tile runs no iteration),
loads lhs rows masked to its rows and the group's weight tile, accumulates float32 and stores only its rows:
every output row is written by exactly one program, with no read-modify-write.

A quantized rhs is read as packed bytes only: each k step covers one packing block (`block_k` rows) in chunks
of `c` packed rows (c = the largest power of two dividing both a plane's rows and `group_size`, so one chunk
has one scale row). A chunk is loaded once and split into its planes with shifts and ands; each plane multiplies
the lhs columns of its contiguous weight rows, as `dot(x, code - zero) * scale`, with scales applied to the
float32 partial products.

tgmm: grid (group, k tile, n tile); each program loops over its group's rows `tm` at a time.

Triton needs power-of-two tensor shapes and at least 16 along each dot dimension: `Tiling` is clamped to the
problem, ragged edges are masked (masked lanes are never read or written), and a case that cannot meet this
(k or n < 16, a quantized chunk < 16 rows, a quantized rhs with transpose_rhs) raises NotImplementedError so the
dispatcher falls back to XLA. Only shapes, masks, dots and scalar loads are used, nothing TPU-specific.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.grouped.reference import group_bounds
from pallas_kernels.quant import QuantizedWeight, packed_rows, plane_rows

MIN_DOT = 16  # Triton's smallest dot dimension


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tile sizes (powers of two) and Triton launch parameters. For a quantized rhs the k step is one packing
    block and `tk` is unused. `group_m`: row tiles that sweep the n tiles together (L2 reuse)."""

    tm: int = 64
    tk: int = 64
    tn: int = 128
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("tm", "tk", "tn"):
            value = getattr(self, name)
            if value < MIN_DOT or value & (value - 1):
                raise ValueError(f"Tiling.{name}={value}; expected a power of two >= {MIN_DOT} (Triton needs "
                                 "power-of-two blocks and dots of at least 16 along each dimension)")


def default_tiling(m: int, num_groups: int) -> Tiling:
    """H100 defaults: tm about the mean group size (16 for decode, 64 for prefill), 64 x 128 k/n tiles."""
    return Tiling(tm=min(64, _pow2_at_least(-(-m // max(num_groups, 1)))))


def gmm(lhs: jax.Array, rhs: jax.Array | QuantizedWeight, group_sizes: jax.Array, *, group_offset: jax.Array,
        transpose_rhs: bool, out_dtype, interpret=False, tiling: Tiling | None = None) -> jax.Array:
    """lhs [m, k] (transpose_rhs: [m, n]), rhs [g, k, n] float or quantized -> [m, n] (transpose_rhs: [m, k])
    in out_dtype; rows outside the local groups are zero."""
    m = lhs.shape[0]
    g, k, n = rhs.shape
    quantized = isinstance(rhs, QuantizedWeight)
    if quantized and transpose_rhs:
        raise NotImplementedError("pallas_gpu gmm: a quantized rhs with transpose_rhs=True (the lhs gradient of a "
                                  "frozen quantized weight) is left to XLA, which dequantizes first")
    k_in, n_out = (n, k) if transpose_rhs else (k, n)
    tiling = tiling or default_tiling(m, g)
    tm, tn = _clamp(tiling.tm, m, "m"), _clamp(tiling.tn, n_out, "n")
    if quantized and 2 ** 31 <= rhs.codes.size <= 2 ** 32:
        # Pallas/Triton index an array below 4 GiB with int32 offsets, which wrap past 2^31 one-byte elements.
        raise NotImplementedError(f"pallas_gpu gmm: codes of {rhs.codes.size} bytes (2-4 GiB) overflow Triton's "
                                  "int32 offsets; split the experts over more calls/devices or use XLA")
    if quantized:
        chunk = _quant_chunk(rhs)
        tk = rhs.block_k
        dtype = lhs.dtype
        weights = [rhs.codes, rhs.scale] + ([] if rhs.zero is None else [rhs.zero])
    else:
        chunk = None
        tk = _clamp(tiling.tk, k_in, "k")
        dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
        weights = [rhs]
    num_tiles = -(-m // tm) + g + 1  # bound on sum over groups of cdiv(rows, tm), with the two zero spans
    tiles = _row_tiles(group_sizes, group_offset, g, m, tm, num_tiles)
    tiles_n = -(-n_out // tn)
    kernel = functools.partial(
        _gmm_kernel, num_tiles=num_tiles, tiles_n=tiles_n, group_m=tiling.group_m, tm=tm, tk=tk, tn=tn,
        k_in=k_in, n_out=n_out, transpose_rhs=transpose_rhs, dtype=dtype,
        quant=None if not quantized else (rhs.bits, rhs.group_size, rhs.block_k, chunk, rhs.zero is not None))
    return pl.pallas_call(
        kernel,
        grid=(num_tiles * tiles_n,),
        out_shape=jax.ShapeDtypeStruct((m, n_out), out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=bool(interpret),  # any interpret mode: the generic HLO interpreter runs Triton-style kernels
        name="pallas_gpu_gmm",
    )(tiles, lhs, *weights)


def tgmm(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *, group_offset: jax.Array, num_groups: int,
         interpret=False, tiling: Tiling | None = None) -> jax.Array:
    """lhs [m, k], dout [m, n] -> float32 [num_groups, k, n]: result[i] = lhs[rows].T @ dout[rows] over the
    rows of group group_offset + i (zeros for an empty group)."""
    (m, k), n = lhs.shape, dout.shape[1]
    tiling = tiling or default_tiling(m, num_groups)
    tm, tk, tn = _clamp(tiling.tm, m, "m"), _clamp(tiling.tk, k, "k"), _clamp(tiling.tn, n, "n")
    starts, sizes = group_bounds(group_sizes, group_offset, num_groups, m)
    bounds = jnp.stack([starts, starts + sizes]).astype(jnp.int32)  # [2, num_groups]
    kernel = functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn, k=k, n=n,
                               dtype=jnp.promote_types(lhs.dtype, dout.dtype))
    return pl.pallas_call(
        kernel,
        grid=(num_groups, -(-k // tk), -(-n // tn)),
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=bool(interpret),  # any interpret mode: the generic HLO interpreter runs Triton-style kernels
        name="pallas_gpu_tgmm",
    )(bounds, lhs, dout)


def _row_tiles(group_sizes, group_offset, num_groups: int, m: int, tm: int, num_tiles: int) -> jax.Array:
    """-> int32 [3, num_tiles]: per row tile (first row, end row, local group or -1 for zeros); tiles
    start at each span's first row. Spans: rows before the local groups (zeros), each local group, rows after
    (zeros); they partition [0, m). Entries past the last tile are empty (first row == end row)."""
    starts, sizes = group_bounds(group_sizes, group_offset, num_groups, m)
    ends = starts + sizes
    lo = jnp.concatenate([jnp.zeros((1,), jnp.int32), starts, ends[-1:]])
    hi = jnp.concatenate([starts[:1], ends, jnp.full((1,), m, jnp.int32)])
    span_group = jnp.concatenate([jnp.full((1,), -1, jnp.int32), jnp.arange(num_groups, dtype=jnp.int32),
                                  jnp.full((1,), -1, jnp.int32)])
    count = (hi - lo + tm - 1) // tm
    cum = jnp.cumsum(count)
    tile = jnp.arange(num_tiles, dtype=jnp.int32)
    span = jnp.sum(cum[None, :] <= tile[:, None], axis=1, dtype=jnp.int32)  # one fused op, not a search loop
    used = span < num_groups + 2
    span = jnp.minimum(span, num_groups + 1)
    first = lo[span] + (tile - (cum[span] - count[span])) * tm
    end = jnp.minimum(first + tm, hi[span])
    return jnp.stack([jnp.where(used, first, 0), jnp.where(used, end, 0),
                      jnp.where(used, span_group[span], -1)]).astype(jnp.int32)


def _gmm_kernel(tiles_ref, lhs_ref, *refs, num_tiles, tiles_n, group_m, tm, tk, tn, k_in, n_out, transpose_rhs,
                dtype, quant):
    *weight_refs, out_ref = refs
    t, j = _grouped_order(pl.program_id(0), num_tiles, tiles_n, group_m)
    first, end, group = tiles_ref[0, t], tiles_ref[1, t], tiles_ref[2, t]
    rows = first + jnp.arange(tm, dtype=jnp.int32)
    row_ok = (rows < end)[:, None]
    n0 = j * tn
    n_ok = _edge_mask(n0, tn, n_out)
    steps = jnp.where(group >= 0, -(-k_in // tk), 0)  # a zero tile (or an unused one) runs no step
    group = jnp.maximum(group, 0)
    if quant is None:
        step = functools.partial(_float_step, lhs_ref, weight_refs[0], first, row_ok, group, n0, n_ok, tm=tm,
                                 tk=tk, tn=tn, k_in=k_in, transpose_rhs=transpose_rhs, dtype=dtype)
    else:
        step = functools.partial(_quant_step, lhs_ref, weight_refs, first, row_ok, group, n0, n_ok, tm=tm,
                                 tn=tn, dtype=dtype, quant=quant)
    acc = lax.fori_loop(0, steps, step, jnp.zeros((tm, tn), jnp.float32))
    mask = row_ok if n_ok is None else row_ok & n_ok[None, :]
    pltriton.store(out_ref.at[pl.ds(first, tm), pl.ds(n0, tn)], acc.astype(out_ref.dtype), mask=mask)


def _float_step(lhs_ref, rhs_ref, first, row_ok, group, n0, n_ok, kt, acc, *, tm, tk, tn, k_in, transpose_rhs,
                dtype):
    """acc [tm, tn] += lhs[rows, k tile] @ rhs[group][k tile, n tile] (transpose_rhs: rhs[group][n tile, k tile].T)."""
    k0 = kt * tk
    k_ok = _edge_mask(k0, tk, k_in)
    x_mask = row_ok if k_ok is None else row_ok & k_ok[None, :]
    x = _load(lhs_ref.at[pl.ds(first, tm), pl.ds(k0, tk)], x_mask).astype(dtype)
    if transpose_rhs:
        w = _load(rhs_ref.at[group, pl.ds(n0, tn), pl.ds(k0, tk)], _outer_mask(n_ok, k_ok, tn, tk))
        return acc + pl.dot(x, w.astype(dtype), trans_b=True)
    w = _load(rhs_ref.at[group, pl.ds(k0, tk), pl.ds(n0, tn)], _outer_mask(k_ok, n_ok, tk, tn))
    return acc + pl.dot(x, w.astype(dtype))


def _quant_step(lhs_ref, weight_refs, first, row_ok, group, n0, n_ok, kb, acc, *, tm, tn, dtype, quant):
    """acc [tm, tn] += lhs[rows, block kb] @ dequantized rhs[group][block kb, n tile], one chunk of packed rows
    at a time (`_chunk_planes`), scales applied to each plane's float32 partial product."""
    bits, group_size, block_k, chunk, asymmetric = quant
    codes_ref, scale_ref = weight_refs[:2]
    zero_ref = weight_refs[2] if asymmetric else None
    w_mask = None if n_ok is None else n_ok[None, :]
    k0 = kb * block_k
    packed0 = kb * packed_rows(block_k, bits)

    def load_packed(offset):
        return _load(codes_ref.at[group, pl.ds(packed0 + offset, chunk), pl.ds(n0, tn)], w_mask).astype(jnp.int32)

    for row, code in _chunk_planes(load_packed, bits, block_k, chunk):
        srow = (k0 + row) // group_size
        scale = _load(scale_ref.at[group, srow, pl.ds(n0, tn)], n_ok).astype(jnp.float32)
        if asymmetric:
            zero = _load(zero_ref.at[group, srow, pl.ds(n0, tn)], n_ok)
            w = code.astype(jnp.float32) - zero.astype(jnp.float32)[None, :]
        else:
            w = (code - 2 ** (bits - 1)).astype(jnp.float32)
        x = _load(lhs_ref.at[pl.ds(first, tm), pl.ds(k0 + row, chunk)], row_ok)
        acc = acc + pl.dot(x.astype(dtype), w.astype(dtype)) * scale[None, :]
    return acc


def _chunk_planes(load_packed, bits: int, block_k: int, chunk: int):
    """Yields (first weight row within the block, codes int32 [chunk, tn]) covering one packing block, for the
    README's planar layout. `load_packed(offset)` loads packed rows [offset, offset + chunk) of the block. Each
    packed chunk is loaded once: bits 4/2 give 8/bits planes per chunk; bits 3 join a chunk of the 2-bit low
    part (4 planes) with a chunk of the 1-bit high part (8 planes)."""
    plane = plane_rows(block_k, bits)
    if bits == 8:
        for offset in range(0, block_k, chunk):
            yield offset, load_packed(offset)
        return
    if bits in (4, 2):
        for offset in range(0, plane, chunk):
            packed = load_packed(offset)
            for j in range(8 // bits):
                yield j * plane + offset, (packed >> (bits * j)) & (2 ** bits - 1)
        return
    low_plane = block_k // 4  # bits 3: weight row r = J * plane + i takes low plane J // 2 at row (J % 2) * plane + i
    for offset in range(0, plane, chunk):
        high = load_packed(low_plane + offset)
        lows = [load_packed(half * plane + offset) for half in (0, 1)]
        for plane_j in range(8):
            low = (lows[plane_j % 2] >> (2 * (plane_j // 2))) & 3
            yield plane_j * plane + offset, low | (((high >> plane_j) & 1) << 2)


def _tgmm_kernel(bounds_ref, lhs_ref, dout_ref, out_ref, *, tm, tk, tn, k, n, dtype):
    i, kt, nt = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = bounds_ref[0, i], bounds_ref[1, i]
    k0, n0 = kt * tk, nt * tn
    k_ok, n_ok = _edge_mask(k0, tk, k), _edge_mask(n0, tn, n)

    def step(r, acc):
        first = start + r * tm
        row_ok = ((first + jnp.arange(tm, dtype=jnp.int32)) < end)[:, None]
        x = _load(lhs_ref.at[pl.ds(first, tm), pl.ds(k0, tk)], row_ok if k_ok is None else row_ok & k_ok[None, :])
        d = _load(dout_ref.at[pl.ds(first, tm), pl.ds(n0, tn)], row_ok if n_ok is None else row_ok & n_ok[None, :])
        return acc + pl.dot(x.astype(dtype), d.astype(dtype), trans_a=True)

    acc = lax.fori_loop(0, (end - start + tm - 1) // tm, step, jnp.zeros((tk, tn), jnp.float32))
    pltriton.store(out_ref.at[i, pl.ds(k0, tk), pl.ds(n0, tn)], acc, mask=_outer_mask(k_ok, n_ok, tk, tn))


def _load(ref, mask):
    """A load where `mask` (None: all lanes) says which lanes exist; masked lanes read 0 and touch no memory."""
    return pltriton.load(ref) if mask is None else pltriton.load(ref, mask=mask, other=0)


def _grouped_order(pid, num_tiles: int, tiles_n: int, group_m: int):
    """Program id -> (row tile, n tile): `group_m` consecutive row tiles sweep all n tiles together."""
    width = group_m * tiles_n
    first_tile = (pid // width) * group_m
    rows_in_group = jnp.minimum(num_tiles - first_tile, group_m)
    return first_tile + (pid % width) % rows_in_group, (pid % width) // rows_in_group


def _edge_mask(start, size: int, limit: int):
    """bool [size]: start + i < limit, or None when `size` divides `limit` (no tile crosses the edge)."""
    if limit % size == 0:
        return None
    return start + jnp.arange(size, dtype=jnp.int32) < limit


def _outer_mask(rows_ok, cols_ok, rows: int, cols: int):
    if rows_ok is None and cols_ok is None:
        return None
    if rows_ok is None:
        return jnp.broadcast_to(cols_ok[None, :], (rows, cols))
    if cols_ok is None:
        return jnp.broadcast_to(rows_ok[:, None], (rows, cols))
    return rows_ok[:, None] & cols_ok[None, :]


def _quant_chunk(rhs: QuantizedWeight) -> int:
    """Packed rows per chunk: the largest power of two dividing a plane's rows and group_size (so a chunk has one
    scale row), at most 256."""
    plane = plane_rows(rhs.block_k, rhs.bits)
    chunk = 1
    while chunk < 256 and plane % (2 * chunk) == 0 and rhs.group_size % (2 * chunk) == 0:
        chunk *= 2
    if chunk < MIN_DOT:
        raise NotImplementedError(
            f"pallas_gpu gmm: bits={rhs.bits}, block_k={rhs.block_k}, group_size={rhs.group_size} give {chunk}-row "
            f"chunks (plane {plane} rows); Triton dots need >= {MIN_DOT}. XLA handles this weight.")
    return chunk


def _clamp(tile: int, size: int, name: str) -> int:
    """A power-of-two tile no larger than needed for `size` (never below 16)."""
    if size < MIN_DOT and name != "m":
        raise NotImplementedError(f"pallas_gpu: {name}={size} < {MIN_DOT}, below Triton's smallest dot; XLA "
                                  "handles it")
    return min(tile, _pow2_at_least(size))


def _pow2_at_least(x: int) -> int:
    return max(MIN_DOT, 1 << max(x - 1, 0).bit_length())
