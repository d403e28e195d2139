"""Low-bit weights for the grouped matmuls: `QuantizedWeight`, `quantize_weight`, and the bit packing along k.

The format is the one in pallas_kernels/README.md ("The packed weight format"): uint8 codes [g, k·bits/8, n]
packed along k in blocks of `block_k` rows, one scale (and, asymmetric, one integer-valued zero point) per
`group_size` rows of k per column, and w = scale · (code - zero). `MixedQuantizedWeight` stores a [g, k, n] weight
whose g matrices each have their own group size (same codes, each matrix's scales stored once); the kernels take
its `uniform()` form, a QuantizedWeight.

`unpack_block` is the piece a kernel reuses: it turns one packing block's packed rows into planes of contiguous
weight rows with shifts, ands and casts only, so a kernel multiplies `lhs[:, plane rows]` by each plane with static
slices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BITS = (8, 4, 3, 2)
# Candidate packing blocks along k, largest first; `block_k` is the first that divides k.
BLOCK_K_CANDIDATES = (256, 128, 64, 32, 16, 8)


@dataclasses.dataclass(frozen=True)
class _PackedCodes:
    """The fields both packed forms share: uint8 codes [g, k·bits/8, n] (bits 8: [g, k, n]), float scales, integer
    zero points as floats (None: symmetric, zero point 2^(bits-1)); `shape` and `dtype` are the float weight's."""

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array | None
    bits: int
    group_size: int | tuple[int, ...]
    block_k: int
    shape: tuple[int, int, int]
    dtype: Any

    @property
    def nbytes(self) -> int:
        """Bytes held by codes, scale and zero (the memory a kernel reads)."""
        arrays = [a for a in (self.codes, self.scale, self.zero) if a is not None]
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in arrays)


_register_packed = functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "scale", "zero"],
                                     meta_fields=["bits", "group_size", "block_k", "shape", "dtype"])


@_register_packed
@dataclasses.dataclass(frozen=True)
class QuantizedWeight(_PackedCodes):
    """A [g, k, n] weight in `bits`-bit codes; see the module docstring and the README for the layout.

    codes uint8 [g, k·bits/8, n] (bits 8: [g, k, n]); group_size: an int; scale [g, k/group_size, n]; zero like
    scale or None (symmetric: zero point 2^(bits-1)). `shape` and `dtype` are the float weight's.
    """

    def dequantize(self, dtype=None) -> jax.Array:
        """-> [g, k, n] in `dtype` (default: the float weight's dtype): scale · (code - zero), computed in fp32."""
        g, k, n = self.shape
        codes = unpack_codes(self.codes, self.bits, self.block_k, k).astype(jnp.float32)
        codes = codes.reshape(g, k // self.group_size, self.group_size, n)
        zero = (jnp.float32(2 ** (self.bits - 1)) if self.zero is None
                else self.zero.astype(jnp.float32)[:, :, None, :])
        w = self.scale.astype(jnp.float32)[:, :, None, :] * (codes - zero)
        return w.reshape(g, k, n).astype(self.dtype if dtype is None else dtype)

    def zero_cotangent(self) -> "QuantizedWeight":
        """The cotangent of a quantized weight (nothing flows into it): float0 for the integer codes, zeros for
        scale and zero."""
        return dataclasses.replace(self, codes=np.zeros(self.codes.shape, jax.dtypes.float0),
                                   scale=jnp.zeros_like(self.scale),
                                   zero=None if self.zero is None else jnp.zeros_like(self.zero))


@_register_packed
@dataclasses.dataclass(frozen=True)
class MixedQuantizedWeight(_PackedCodes):
    """A [g, k, n] weight whose g matrices (experts) each have their own group size, scales stored once each.

    codes uint8 [g, k·bits/8, n] exactly as QuantizedWeight's; group_size: a tuple of g sizes (each dividing k);
    scale [Σ_i k/group_size[i], n]: matrix 0's k/group_size[0] scale rows, then matrix 1's, ...; zero like scale
    or None (symmetric). Matrix i quantized alone at group_size[i] gives the same codes and scale rows. The kernels
    take `uniform()`.
    """

    def uniform(self) -> QuantizedWeight:
        """The QuantizedWeight the kernels take: group size gcd(group_size), each matrix's scale (and zero) rows
        repeated group_size[i] / gcd times. Same codes and dequantized values; the repeated scales are a
        [g, k/gcd, n] copy made where this is called (under jit: inside the program)."""
        k = self.shape[1]
        finest = math.gcd(*self.group_size)
        offsets = np.cumsum([0] + [k // size for size in self.group_size[:-1]])
        rows = np.stack([offset + np.arange(0, k, finest) // size for offset, size in zip(offsets, self.group_size)])
        return QuantizedWeight(codes=self.codes, scale=self.scale[rows],
                               zero=None if self.zero is None else self.zero[rows], bits=self.bits,
                               group_size=finest, block_k=self.block_k, shape=self.shape, dtype=self.dtype)

    def dequantize(self, dtype=None) -> jax.Array:
        """-> [g, k, n] in `dtype` (default: the float weight's dtype): scale · (code - zero), computed in fp32."""
        return self.uniform().dequantize(dtype)


def block_k_for(k: int, bits: int) -> int:
    """The packing block along k: the largest of BLOCK_K_CANDIDATES dividing k. bits 8 is unpacked, so a k with
    no such divisor (k % 8 != 0) is one block of k rows; bits < 8 require k % 8 == 0."""
    for block_k in BLOCK_K_CANDIDATES:
        if k % block_k == 0:
            return block_k
    if bits == 8:
        return k
    raise ValueError(f"k={k} is not a multiple of 8; bits={bits} packs codes along k in blocks of 8 to 256 rows. "
                     "Pad k to a multiple of 8 or use bits=8.")


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric", "scale_dtype"))
def quantize_weight(rhs: jax.Array, *, bits: int, group_size: int | tuple[int, ...] | None, symmetric: bool = True,
                    scale_dtype=jnp.bfloat16) -> QuantizedWeight | MixedQuantizedWeight:
    """rhs float [g, k, n] -> QuantizedWeight (use rhs[None] for a plain [k, n] linear weight).

    bits in {8, 4, 3, 2}; group_size: rows of k per scale (must divide k), None for one scale per column
    (group_size = k), or a tuple of g such sizes, one per matrix rhs[i] -> MixedQuantizedWeight. symmetric: zero
    point 2^(bits-1); else min-max over a range widened to include 0, with a per-group integer zero point. Scales
    are rounded to `scale_dtype` before the codes are computed (formulas: README.md). Jitted, with bits,
    group_size, symmetric and scale_dtype static.
    """
    g, k, n, sizes = _check_quantize_args(rhs, bits, group_size, scale_dtype)
    block_k = block_k_for(k, bits)
    w = rhs.astype(jnp.float32)
    if isinstance(group_size, tuple):
        parts = [_quantize_codes(w[i:i + 1], bits, size, symmetric, scale_dtype) for i, size in enumerate(sizes)]
        codes = jnp.concatenate([c for c, _, _ in parts])
        scale = jnp.concatenate([s[0] for _, s, _ in parts])
        zero = None if symmetric else jnp.concatenate([z[0] for _, _, z in parts])
        return MixedQuantizedWeight(codes=pack_codes(codes, bits, block_k), scale=scale, zero=zero, bits=bits,
                                    group_size=sizes, block_k=block_k, shape=(g, k, n), dtype=jnp.dtype(rhs.dtype))
    codes, scale, zero = _quantize_codes(w, bits, sizes[0], symmetric, scale_dtype)
    return QuantizedWeight(codes=pack_codes(codes, bits, block_k), scale=scale, zero=zero, bits=bits,
                           group_size=sizes[0], block_k=block_k, shape=(g, k, n), dtype=jnp.dtype(rhs.dtype))


def _quantize_codes(w_gkn: jax.Array, bits: int, group_size: int, symmetric: bool, scale_dtype):
    """float32 [g, k, n] -> (unpacked codes uint8 [g, k, n], scale [g, k/group_size, n] in scale_dtype, zero like
    scale or None): the README's formulas."""
    g, k, n = w_gkn.shape
    w = w_gkn.reshape(g, k // group_size, group_size, n)
    top = 2 ** bits - 1
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = _stored_scale(_divide(jnp.max(jnp.abs(w), axis=2), qmax), scale_dtype)
        q = jnp.clip(jnp.round(_divide(w, scale.astype(jnp.float32)[:, :, None, :])), -qmax, qmax)
        codes = q + 2 ** (bits - 1)
        zero = None
    else:
        # The range always contains 0, so 0 has an exact code (the zero point) and a constant group c != 0 spans
        # [0, c] (or [c, 0]): it maps to the code at the far end of the range instead of collapsing.
        lo = jnp.minimum(jnp.min(w, axis=2), 0.0)
        hi = jnp.maximum(jnp.max(w, axis=2), 0.0)
        scale = _stored_scale(_divide(hi - lo, top), scale_dtype)
        scale_f32 = scale.astype(jnp.float32)
        zero_f32 = jnp.clip(jnp.round(_divide(-lo, scale_f32)), 0, top)
        codes = jnp.clip(jnp.round(_divide(w, scale_f32[:, :, None, :])) + zero_f32[:, :, None, :], 0, top)
        zero = zero_f32.astype(scale_dtype)
    return codes.astype(jnp.uint8).reshape(g, k, n), scale, zero


def _stored_scale(scale_f32: jax.Array, scale_dtype) -> jax.Array:
    """scale_f32 rounded to scale_dtype, with 1 where it is 0 (an all-zero group, or a range too small to survive
    the rounding). XLA may keep excess precision through a float32 -> bfloat16 -> float32 round trip, which would
    compute the codes against the unrounded scale instead of the stored one; the optimization barrier keeps the
    rounding."""
    scale = scale_f32.astype(scale_dtype)
    return jax.lax.optimization_barrier(jnp.where(scale == 0, jnp.ones_like(scale), scale))


def _divide(a: jax.Array, b) -> jax.Array:
    """a / b correctly rounded in fp32, b broadcast to a's shape. XLA rewrites a division by a broadcast value
    into a multiplication by its reciprocal (1 ulp off about half the time, which moves a scale's rounding or a
    code at a .5 tie); the optimization barrier keeps the true division the README's formulas specify."""
    return a / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, a.dtype), a.shape))


def packed_rows(block_k: int, bits: int) -> int:
    """Packed rows per packing block: block_k · bits / 8."""
    return block_k * bits // 8


def plane_rows(block_k: int, bits: int) -> int:
    """Rows of k in each plane `unpack_block` returns: block_k (bits 8), block_k/2 (4), block_k/4 (2),
    block_k/8 (3)."""
    return {8: block_k, 4: block_k // 2, 2: block_k // 4, 3: block_k // 8}[bits]


def pack_codes(codes_gkn: jax.Array, bits: int, block_k: int) -> jax.Array:
    """codes uint8 [g, k, n] in [0, 2^bits) -> packed uint8 [g, k·bits/8, n] (the README layout)."""
    if bits == 8:
        return codes_gkn.astype(jnp.uint8)
    g, k, n = codes_gkn.shape
    blocks = codes_gkn.astype(jnp.uint8).reshape(g, k // block_k, block_k, n)
    if bits == 3:
        packed = jnp.concatenate([_pack_planar(blocks & 3, 2), _pack_planar(blocks >> 2, 1)], axis=2)
    else:
        packed = _pack_planar(blocks, bits)
    return packed.reshape(g, k * bits // 8, n)


def _pack_planar(blocks: jax.Array, bits: int) -> jax.Array:
    """[..., block_k, n] codes < 2^bits -> [..., block_k·bits/8, n]: bits [bits·j, bits·(j+1)) of packed row i
    hold row j·(block_k/p) + i, p = 8/bits."""
    p = 8 // bits
    rows = blocks.shape[-2] // p
    packed = jnp.zeros(blocks.shape[:-2] + (rows, blocks.shape[-1]), jnp.uint8)
    for j in range(p):
        packed = packed | (blocks[..., j * rows:(j + 1) * rows, :] << (bits * j)).astype(jnp.uint8)
    return packed


def unpack_block(packed: jax.Array, bits: int, block_k: int) -> list[jax.Array]:
    """One packing block: packed [..., block_k·bits/8, n] (any integer dtype) -> planes, each
    [..., plane_rows(block_k, bits), n] in packed's dtype; plane j holds weight rows
    [j·plane_rows, (j+1)·plane_rows) of the block, so concatenating the planes gives the block's codes.

    Shifts, ands and static slices only, so it runs inside a kernel (on Mosaic, cast the packed tile to int32
    first). bits 8: [packed]; bits 4: 2 planes; bits 2: 4 planes; bits 3: 8 planes of block_k/8 rows, each
    combining a slice of a 2-bit low plane with one 1-bit high plane.
    """
    if bits == 8:
        return [packed]
    if bits in (4, 2):
        return _unpack_planar(packed, bits)
    if bits != 3:
        raise ValueError(f"bits={bits}; expected one of {BITS}")
    low_rows = block_k // 4
    low_planes = _unpack_planar(packed[..., :low_rows, :], 2)  # 4 planes of block_k/4 rows
    high_planes = _unpack_planar(packed[..., low_rows:, :], 1)  # 8 planes of block_k/8 rows
    h = block_k // 8
    return [low_planes[j // 2][..., (j % 2) * h:(j % 2 + 1) * h, :] | (high_planes[j] << 2) for j in range(8)]


def _unpack_planar(packed: jax.Array, bits: int) -> list[jax.Array]:
    mask = 2 ** bits - 1
    return [(packed >> (bits * j)) & mask for j in range(8 // bits)]


def unpack_codes(packed: jax.Array, bits: int, block_k: int, k: int) -> jax.Array:
    """packed uint8 [g, k·bits/8, n] -> codes uint8 [g, k, n] (the inverse of `pack_codes`)."""
    if bits == 8:
        return packed
    g, _, n = packed.shape
    blocks = packed.reshape(g, k // block_k, packed_rows(block_k, bits), n)
    return jnp.concatenate(unpack_block(blocks, bits, block_k), axis=2).reshape(g, k, n)


def _check_quantize_args(rhs, bits, group_size, scale_dtype) -> tuple[int, int, int, tuple[int, ...]]:
    """-> (g, k, n, group sizes): one size for an int or None group_size, g sizes for a tuple."""
    if bits not in BITS:
        raise ValueError(f"bits={bits!r}; expected one of {BITS}")
    if getattr(rhs, "ndim", None) != 3:
        raise ValueError(f"rhs has shape {getattr(rhs, 'shape', None)}; expected a float [groups, k, n] weight "
                         "(use w[None] for a single [k, n] matrix)")
    if not jnp.issubdtype(rhs.dtype, jnp.floating):
        raise ValueError(f"rhs has dtype {rhs.dtype}; expected a float weight to quantize")
    if not jnp.issubdtype(jnp.dtype(scale_dtype), jnp.floating):
        raise ValueError(f"scale_dtype={scale_dtype!r}; expected a float dtype such as jnp.bfloat16")
    g, k, n = rhs.shape
    if isinstance(group_size, tuple):
        if len(group_size) != g:
            raise ValueError(f"group_size={group_size!r} has {len(group_size)} entries but rhs (shape {rhs.shape}) "
                             f"has {g} matrices; give one group size per matrix, or one int for all")
        sizes = group_size
    else:
        sizes = (k if group_size is None else group_size,)
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0 or k % size:
            valid = [d for d in range(1, k + 1) if k % d == 0]
            raise ValueError(f"group_size={size!r} does not divide k={k} (rhs shape {rhs.shape}); valid group "
                             f"sizes are {valid}, or None for one scale per column")
    if bits < 8 and k % 8:
        raise ValueError(f"k={k} (rhs shape {rhs.shape}) is not a multiple of 8; bits={bits} packs codes along k "
                         "in blocks of 8 to 256 rows. Pad k to a multiple of 8 or use bits=8.")
    return g, k, n, tuple(int(size) for size in sizes)
