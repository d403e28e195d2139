"""Grouped matmuls for TPU: Pallas Mosaic kernels in the style of megablox, over float or low-bit weights.

`gmm` multiplies each group's rows of `lhs` by that group's weight; `tgmm` sums each group's `lhs.T @ dout`
(the weight gradient). Both follow the backend contract in pallas_kernels/grouped (see pallas_kernels/README.md);
pallas_kernels.grouped.reference is the slow, obviously correct twin the tests hold them equal to.

How the grid covers the rows: rows are sorted by group, so group i owns rows [bounds[i], bounds[i+1]). A grid
step is one (group, m tile) pair; a tile that several groups share is visited once per group, consecutively, and
each visit stores only its group's rows (a row store-mask). `group_metadata` builds the step -> (group, m tile)
tables that the kernels read as scalar-prefetch operands, so the grid holds only the steps of this shard's
groups (`group_offset`) and, for `gmm`, skips empty groups.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.quant import QuantizedWeight, unpack_block

# A block's last two dims must be multiples of (8, 128) on TPU unless they span the whole array dim.
_SUBLANES, _LANES = 8, 128


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tile sizes: tm rows of lhs, tk along the contraction, tn output columns (tgmm: tk x tn output tiles).

    A tile larger than its dim is clamped to the dim; a tile smaller than its dim must be a multiple of 8 (tm) or
    128 (tk, tn), the TPU block-shape rule.
    """

    tm: int = 128
    tk: int = 128
    tn: int = 128

    def __post_init__(self):
        for name, multiple in (("tm", _SUBLANES), ("tk", _LANES), ("tn", _LANES)):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % multiple:
                raise ValueError(f"Tiling.{name}={value!r}; expected a positive multiple of {multiple} "
                                 "(the TPU block-shape rule), e.g. the default 128")


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _clamp_tm(tm: int, m: int) -> int:
    return min(tm, _round_up(max(m, 1), _SUBLANES))


def group_metadata(group_sizes, group_offset, *, num_groups: int, m: int, tm: int, visit_empty: bool):
    """The grid's row schedule for groups group_offset .. group_offset + num_groups - 1 of `group_sizes`.

    Returns (bounds int32 [num_groups + 1]: local group i owns rows [bounds[i], bounds[i+1]), clipped to m;
    step_group int32 [steps_max]: the local group of each grid step; step_tile int32 [steps_max]: its m tile;
    num_steps int32 scalar: the steps to run). Steps go group by group, tiles ascending, so the m tile sequence
    never decreases and a shared output tile is revisited only by consecutive steps. Empty groups get one step
    when `visit_empty` (tgmm must write their zeros), none otherwise.
    """
    tiles_m = _round_up(m, tm) // tm
    ends = jnp.minimum(jnp.cumsum(group_sizes, dtype=jnp.int32), m)
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
    bounds = lax.dynamic_slice(offsets, (group_offset,), (num_groups + 1,))
    starts, stops = bounds[:-1], bounds[1:]
    first_tile = starts // tm
    span = (stops + tm - 1) // tm - first_tile
    steps = jnp.where(stops > starts, span, 1 if visit_empty else 0).astype(jnp.int32)
    # Each non-empty group spans its own tiles plus at most one tile shared with the group before it; a visited
    # empty group takes one step.
    steps_max = tiles_m + num_groups - 1
    step_group = jnp.repeat(jnp.arange(num_groups, dtype=jnp.int32), steps, total_repeat_length=steps_max)
    first_step = jnp.cumsum(steps) - steps
    step_tile = first_tile[step_group] + jnp.arange(steps_max, dtype=jnp.int32) - first_step[step_group]
    # Clipping only touches an empty group that starts at row m (and steps past num_steps, which never run).
    step_tile = jnp.clip(step_tile, 0, tiles_m - 1).astype(jnp.int32)
    return bounds, step_group, step_tile, jnp.sum(steps)


def _group_row_mask(bounds_ref, group, tile, shape, tm):
    """bool `shape` [tm, c]: which rows of m tile `tile` belong to local group `group`."""
    rows = tile * tm + lax.broadcasted_iota(jnp.int32, shape, 0)
    return (rows >= bounds_ref[group]) & (rows < bounds_ref[group + 1])


def _zero_rows_outside(out, bounds):
    """Rows of other shards' groups and rows past the last group are zero (the kernel never writes them)."""
    rows = jnp.arange(out.shape[0], dtype=jnp.int32)[:, None]
    return jnp.where((rows >= bounds[0]) & (rows < bounds[-1]), out, jnp.zeros((), out.dtype))


def _interpret_params(interpret):
    """interpret: False (compile for TPU), True (TPU interpret mode with default settings) or a
    pltpu.InterpretParams, passed through -> the pallas_call `interpret` argument."""
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    return pltpu.InterpretParams() if interpret else False


def _dot(x, w, contract_w: int):
    """x [tm, c] @ w (contracting w's dim `contract_w`) in float32; full fp32 passes for fp32 operands."""
    precision = lax.Precision.HIGHEST if jnp.float32 in (x.dtype, w.dtype) else None
    return lax.dot_general(x, w, (((1,), (contract_w,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------------------------------------
# Quantized weight tiles


def _quantized_tk(tk: int, k: int, block_k: int, group_size: int) -> int:
    """The k tile for a quantized rhs: it divides k, holds whole packing blocks, is a TPU-legal block (a multiple
    of 128, or k) and meets the scale groups evenly (a multiple or a divisor of group_size). The largest such
    tile <= tk, else the smallest one (k itself always qualifies)."""
    valid = [t for t in range(block_k, k + 1, block_k)
             if k % t == 0 and (t % _LANES == 0 or t == k) and (t % group_size == 0 or group_size % t == 0)]
    return max([t for t in valid if t <= tk], default=valid[0])


def _expand_rows(x, rows: int):
    """[r, tn] -> [rows, tn], each row of x repeated rows / r times (static slices and broadcasts only)."""
    r, tn = x.shape
    if r == 1:
        return jnp.broadcast_to(x, (rows, tn))
    return jnp.concatenate([jnp.broadcast_to(x[i:i + 1], (rows // r, tn)) for i in range(r)], axis=0)


def _dequantize_tile(codes, scale, zero, *, bits: int, block_k: int, tk: int):
    """One k tile of a QuantizedWeight: codes uint8 [tk·bits/8, tn] (whole packing blocks), scale / zero
    [r, tn] (r scale groups in the tile, or 1 when a group spans several tiles) -> float32 [tk, tn]."""
    packed = codes.astype(jnp.int32)  # Mosaic shifts and masks 32-bit integers
    if bits == 8:
        q = packed
    else:
        block_rows = block_k * bits // 8
        planes = []
        for b in range(tk // block_k):
            planes += unpack_block(packed[b * block_rows:(b + 1) * block_rows], bits, block_k)
        q = jnp.concatenate(planes, axis=0)
    s = _expand_rows(scale.astype(jnp.float32), tk)
    z = jnp.float32(2 ** (bits - 1)) if zero is None else _expand_rows(zero.astype(jnp.float32), tk)
    return s * (q.astype(jnp.float32) - z)


def _quantized_operands(rhs: QuantizedWeight, tk: int, tn: int):
    """The codes, scale (and zero) arrays regrouped so each k tile is a whole trailing [rows, n] block (a legal
    TPU block however few rows it has), with their BlockSpecs for grid (n_i, step, k_i)."""
    g, k, n = rhs.shape
    gs = rhs.group_size
    scale_rows = tk // gs if gs <= tk else 1
    tiles_per_scale = 1 if gs <= tk else gs // tk
    codes = rhs.codes.reshape(g, k // tk, tk * rhs.bits // 8, n)

    def codes_map(n_i, s, k_i, bounds, step_group, step_tile):
        return step_group[s], k_i, 0, n_i

    def scale_map(n_i, s, k_i, bounds, step_group, step_tile):
        # lax.div: k_i >= 0, and it lowers without floor division's sign fix-up.
        return step_group[s], lax.div(k_i, tiles_per_scale), 0, n_i

    arrays = [codes, rhs.scale.reshape(g, k // gs // scale_rows, scale_rows, n)]
    specs = [pl.BlockSpec((None, None, tk * rhs.bits // 8, tn), codes_map),
             pl.BlockSpec((None, None, scale_rows, tn), scale_map)]
    if rhs.zero is not None:
        arrays.append(rhs.zero.reshape(g, k // gs // scale_rows, scale_rows, n))
        specs.append(pl.BlockSpec((None, None, scale_rows, tn), scale_map))
    return arrays, specs


# ---------------------------------------------------------------------------------------------------------
# gmm


def _gmm_kernel(bounds_ref, step_group_ref, step_tile_ref, lhs_ref, *refs, tm, tk, k, tiles_k, transpose_rhs,
                bits, block_k, out_dtype):
    """One grid step (n_i, s, k_i): acc += lhs tile @ rhs tile of group step_group[s]; at the last k tile store
    the group's rows of the out tile. refs: the rhs refs (a float tile, or codes, scale[, zero] tiles when `bits`
    is set), out, the f32 accumulator."""
    *rhs_refs, out_ref, acc_ref = refs
    s, k_i = pl.program_id(1), pl.program_id(2)

    @pl.when(k_i == 0)
    def _zero_acc():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    x = lhs_ref[...]
    if bits is None:
        w = rhs_refs[0][...]
    else:
        zero = rhs_refs[2][...] if len(rhs_refs) == 3 else None
        w = _dequantize_tile(rhs_refs[0][...], rhs_refs[1][...], zero, bits=bits, block_k=block_k, tk=tk)
    contract_w = 1 if transpose_rhs else 0
    if k % tk:
        # The last k tile reads past k; zero both sides there (the padding may hold NaNs).
        valid = k - k_i * tk
        x = jnp.where(lax.broadcasted_iota(jnp.int32, x.shape, 1) < valid, x, jnp.zeros_like(x))
        w = jnp.where(lax.broadcasted_iota(jnp.int32, w.shape, contract_w) < valid, w, jnp.zeros_like(w))
    if x.dtype == jnp.bfloat16 and (bits is not None or w.dtype == jnp.bfloat16):
        compute_dtype = jnp.bfloat16
    else:
        compute_dtype = jnp.float32
    acc_ref[...] += _dot(x.astype(compute_dtype), w.astype(compute_dtype), contract_w)

    @pl.when(k_i == tiles_k - 1)
    def _store():
        mask = _group_row_mask(bounds_ref, step_group_ref[s], step_tile_ref[s], acc_ref.shape, tm)
        out_ref[...] = jnp.where(mask, acc_ref[...], out_ref[...].astype(jnp.float32)).astype(out_dtype)


def gmm(lhs, rhs, group_sizes, *, group_offset, transpose_rhs, out_dtype, interpret, tiling=None):
    """lhs [m, k] (rows sorted by group), rhs float [g, k, n] or QuantizedWeight (g, k, n), group_sizes int32 [G]
    -> out_dtype [m, n]: rows of group group_offset + i times rhs[i]; other rows zero. transpose_rhs: lhs [m, n],
    rhs[i].T, out [m, k]. Accumulates in float32. tiling: a Tiling (default 128s); for a quantized rhs the k
    tile is adjusted to whole packing blocks and scale groups (`_quantized_tk`). Raises NotImplementedError for
    a quantized rhs with transpose_rhs (the dispatcher then falls back)."""
    if isinstance(rhs, QuantizedWeight) and transpose_rhs:
        raise NotImplementedError("pallas_tpu gmm: transpose_rhs=True with a QuantizedWeight rhs is not "
                                  "implemented (the codes are packed along k, the contraction of the "
                                  "untransposed product); use a float rhs or another backend")
    _check_gmm_args(lhs, rhs, group_sizes, transpose_rhs)
    if lhs.shape[0] == 0:
        return jnp.zeros((0, rhs.shape[1] if transpose_rhs else rhs.shape[2]), out_dtype)
    return _gmm(lhs, rhs, group_sizes, jnp.asarray(group_offset, jnp.int32), transpose_rhs=transpose_rhs,
                out_dtype=jnp.dtype(out_dtype), interpret=_interpret_params(interpret), tiling=tiling or Tiling())


def _check_gmm_args(lhs, rhs, group_sizes, transpose_rhs):
    _check_float_dtype("lhs", lhs)
    if not isinstance(rhs, QuantizedWeight):
        _check_float_dtype("rhs", rhs)
    g, k, n = rhs.shape
    k_in = n if transpose_rhs else k
    if lhs.ndim != 2 or lhs.shape[1] != k_in:
        raise ValueError(f"lhs has shape {lhs.shape} but rhs of shape {tuple(rhs.shape)} with "
                         f"transpose_rhs={transpose_rhs} needs lhs [m, {k_in}]")
    _check_group_sizes(group_sizes, g)


def _check_float_dtype(name, x):
    """A dtype the kernels do not take is a case for another backend (NotImplementedError), not a bad call."""
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        raise NotImplementedError(f"pallas_tpu: {name} has dtype {x.dtype}; these kernels take float32 or "
                                  "bfloat16 (cast it, or use another backend)")


def _check_group_sizes(group_sizes, num_groups):
    if group_sizes.ndim != 1 or group_sizes.dtype != jnp.int32 or group_sizes.shape[0] < num_groups:
        raise ValueError(f"group_sizes has shape {group_sizes.shape} and dtype {group_sizes.dtype}; expected "
                         f"int32 [G] with G >= {num_groups} (the local groups)")


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "out_dtype", "interpret", "tiling"))
def _gmm(lhs, rhs, group_sizes, group_offset, *, transpose_rhs, out_dtype, interpret, tiling):
    quantized = isinstance(rhs, QuantizedWeight)
    m, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm = _clamp_tm(tiling.tm, m)
    tk = min(tiling.tk, k)
    tn = min(tiling.tn, n)
    if quantized:
        tk = _quantized_tk(tk, k, rhs.block_k, rhs.group_size)
    m_pad = _round_up(m, tm)
    tiles_k, tiles_n = -(-k // tk), -(-n // tn)
    bounds, step_group, step_tile, num_steps = group_metadata(
        group_sizes, group_offset, num_groups=g, m=m, tm=tm, visit_empty=False)

    def lhs_map(n_i, s, k_i, bounds, step_group, step_tile):
        return step_tile[s], k_i

    def rhs_map(n_i, s, k_i, bounds, step_group, step_tile):
        return (step_group[s], n_i, k_i) if transpose_rhs else (step_group[s], k_i, n_i)

    def out_map(n_i, s, k_i, bounds, step_group, step_tile):
        return step_tile[s], n_i

    if quantized:
        rhs_arrays, rhs_specs = _quantized_operands(rhs, tk, tn)
        bits, block_k = rhs.bits, rhs.block_k
        rhs_bytes = rhs.nbytes // g
    else:
        rhs_arrays = [rhs]
        rhs_specs = [pl.BlockSpec((None, tn, tk) if transpose_rhs else (None, tk, tn), rhs_map)]
        bits = block_k = None
        rhs_bytes = k * n * rhs.dtype.itemsize
    kernel = functools.partial(_gmm_kernel, tm=tm, tk=tk, k=k, tiles_k=tiles_k, transpose_rhs=transpose_rhs,
                               bits=bits, block_k=block_k, out_dtype=out_dtype)
    steps_max = step_group.shape[0]
    cost = pl.CostEstimate(
        flops=2 * m * k * n,
        bytes_accessed=lhs.size * lhs.dtype.itemsize * tiles_n + rhs_bytes * steps_max + m * n * out_dtype.itemsize,
        transcendentals=0)
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m_pad, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(tiles_n, num_steps, tiles_k),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), *rhs_specs],
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        cost_estimate=cost)
    lhs_padded = jnp.pad(lhs, ((0, m_pad - m), (0, 0))) if m_pad != m else lhs
    out = call(bounds, step_group, step_tile, lhs_padded, *rhs_arrays)
    return _zero_rows_outside(out[:m], bounds)


# ---------------------------------------------------------------------------------------------------------
# tgmm


def _tgmm_kernel(bounds_ref, step_group_ref, step_tile_ref, lhs_ref, dout_ref, out_ref, acc_ref, *, tm):
    """One grid step (n_i, k_i, s): acc += lhs tile.T @ dout tile over group step_group[s]'s rows; the
    accumulator starts at the group's first step and is stored at its last."""
    s, num_steps = pl.program_id(2), pl.num_programs(2)
    group = step_group_ref[s]
    first = (s == 0) | (step_group_ref[jnp.maximum(s - 1, 0)] != group)
    last = (s == num_steps - 1) | (step_group_ref[jnp.minimum(s + 1, num_steps - 1)] != group)

    @pl.when(first)
    def _zero_acc():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(bounds_ref[group + 1] > bounds_ref[group])
    def _accumulate():
        tile = step_tile_ref[s]
        x, dy = lhs_ref[...], dout_ref[...]
        x = jnp.where(_group_row_mask(bounds_ref, group, tile, x.shape, tm), x, jnp.zeros_like(x))
        dy = jnp.where(_group_row_mask(bounds_ref, group, tile, dy.shape, tm), dy, jnp.zeros_like(dy))
        both_bf16 = x.dtype == jnp.bfloat16 and dy.dtype == jnp.bfloat16
        dtype = jnp.bfloat16 if both_bf16 else jnp.float32
        acc_ref[...] += _dot(x.astype(dtype).T, dy.astype(dtype), 0)

    @pl.when(last)
    def _store():
        out_ref[...] = acc_ref[...]


def tgmm(lhs, dout, group_sizes, *, group_offset, num_groups, interpret, tiling=None):
    """lhs [m, k], dout [m, n], group_sizes int32 [G] -> float32 [num_groups, k, n]: result[i] sums
    lhs[r].T @ dout[r] over rows r of group group_offset + i (zeros for an empty group). tiling: a Tiling
    (default 128s); tk x tn is the output tile."""
    _check_float_dtype("lhs", lhs)
    _check_float_dtype("dout", dout)
    if lhs.ndim != 2 or dout.ndim != 2 or lhs.shape[0] != dout.shape[0]:
        raise ValueError(f"lhs {lhs.shape} and dout {dout.shape}; expected lhs [m, k] and dout [m, n] with the "
                         "same rows m")
    _check_group_sizes(group_sizes, num_groups)
    if lhs.shape[0] == 0:
        return jnp.zeros((num_groups, lhs.shape[1], dout.shape[1]), jnp.float32)
    return _tgmm(lhs, dout, group_sizes, jnp.asarray(group_offset, jnp.int32), num_groups=int(num_groups),
                 interpret=_interpret_params(interpret), tiling=tiling or Tiling())


@functools.partial(jax.jit, static_argnames=("num_groups", "interpret", "tiling"))
def _tgmm(lhs, dout, group_sizes, group_offset, *, num_groups, interpret, tiling):
    (m, k), n = lhs.shape, dout.shape[1]
    tm = _clamp_tm(tiling.tm, m)
    tk, tn = min(tiling.tk, k), min(tiling.tn, n)
    m_pad = _round_up(m, tm)
    tiles_k, tiles_n = -(-k // tk), -(-n // tn)
    bounds, step_group, step_tile, num_steps = group_metadata(
        group_sizes, group_offset, num_groups=num_groups, m=m, tm=tm, visit_empty=True)

    def lhs_map(n_i, k_i, s, bounds, step_group, step_tile):
        return step_tile[s], k_i

    def dout_map(n_i, k_i, s, bounds, step_group, step_tile):
        return step_tile[s], n_i

    def out_map(n_i, k_i, s, bounds, step_group, step_tile):
        return step_group[s], k_i, n_i

    cost = pl.CostEstimate(
        flops=2 * m * k * n,
        bytes_accessed=(lhs.size * lhs.dtype.itemsize * tiles_n + dout.size * dout.dtype.itemsize * tiles_k
                        + num_groups * k * n * 4),
        transcendentals=0)
    call = pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm),
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), jnp.float32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(tiles_n, tiles_k, num_steps),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), dout_map)],
            out_specs=pl.BlockSpec((None, tk, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        cost_estimate=cost)
    pad = ((0, m_pad - m), (0, 0))
    if m_pad != m:
        lhs, dout = jnp.pad(lhs, pad), jnp.pad(dout, pad)
    return call(bounds, step_group, step_tile, lhs, dout)
