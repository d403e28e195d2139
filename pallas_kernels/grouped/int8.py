"""Integer matmuls for decoding on CPU: x @ w with w a QuantizedWeight, computed as int8 x int8 -> int32 dots.

Decode multiplies a handful of rows by each weight, so the step is bound by reading the weights. Dequantizing a
weight to float first reads its codes and then writes and reads a float copy four times their size; XLA:CPU's
integer dot reads the int8 codes directly.

The activations go in as two int8 limbs per value. Each row's values in each weight group (the rows of k that
share one weight scale) are divided by a = absmax / 127 and split into q1 = round(x / a) and q2 =
round(254 · (x / a - q1)), both in [-127, 127], so x ≈ a · (q1 + q2 / 254) to within a / 508: about 16-bit
precision, against the 1/254 of one int8 rounding. Both limbs go through the same dot as 2m rows (decode's m is
small and the codes are read once for both), so the second limb costs arithmetic, not memory traffic. An output
element then differs from `x @ w.dequantize()` by at most Σ_g (a[m, g] / 508) · Σ_{k in g} |w[k, n]|
(`activation_rounding_bound`).

With c the stored code and z the zero point (2^(bits-1) when symmetric), w = s · (c - z) per group g:
    x @ w [m, n] = Σ_g  a[m, g] · s[g, n] · (Σ_{k in g} q[m, k] · c'[k, n]  -  z'[g, n] · Σ_{k in g} q[m, k])
with q = q1 + q2 / 254, c' = c - 2^(bits-1) and z' = z - 2^(bits-1) (0 when symmetric), both of which fit int8;
the sums over k are exact int32 products of each limb.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.quant import QuantizedWeight, packed_rows, unpack_block, unpack_codes

LIMB = 254.0  # the second limb's weight: q2 / LIMB refines q1 (|x / a - q1| <= 1/2, so |q2| <= 127)


def int8_matmul(x_mk: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x float [m, k] @ w (a QuantizedWeight of shape (1, k, n), any bits) -> float32 [m, n], through int8 dots
    with int32 accumulation; see the module docstring for the activations' two limbs.

    The codes are unpacked one plane at a time (`unpack_block`: contiguous rows of k from shifts and ands) and each
    plane, cut where weight groups end, goes straight into its own dot: no [k, n] array of codes is assembled."""
    g, k, n = w.shape
    if g != 1 or x_mk.ndim != 2 or x_mk.shape[1] != k:
        raise ValueError(f"int8_matmul needs x [m, k] and one matrix w (1, k, n); got x {x_mk.shape}, w {w.shape}")
    m = x_mk.shape[0]
    size = w.group_size
    q1, q2, a = quantize_rows(x_mk, size)  # int8 [m, k] twice, float32 [m, groups]
    limbs = jnp.concatenate([q1, q2], axis=0)  # [2m, k]: one dot reads the codes once for both
    scale = w.scale[0].astype(jnp.float32)  # [groups, n]
    out = jnp.zeros((m, n), jnp.float32)
    for start, plane in _planes(w):
        r0, end = start, start + plane.shape[0]
        while r0 < end:  # the plane cut where a weight group ends: pieces inside one group
            j = r0 // size
            r1 = min(end, (j + 1) * size)
            acc = lax.dot_general(limbs[:, r0:r1], plane[r0 - start:r1 - start], (((1,), (0,)), ((), ())),
                                  preferred_element_type=jnp.int32).astype(jnp.float32)
            acc = acc[:m] + acc[m:] / LIMB
            if w.zero is not None:
                shift = w.zero[0, j].astype(jnp.float32) - 2.0 ** (w.bits - 1)  # z' [n], an integer value
                total = (jnp.sum(q1[:, r0:r1], axis=1, dtype=jnp.int32).astype(jnp.float32)
                         + jnp.sum(q2[:, r0:r1], axis=1, dtype=jnp.int32).astype(jnp.float32) / LIMB)
                acc = acc - total[:, None] * shift[None, :]
            out = out + acc * a[:, j:j + 1] * scale[j][None, :]
            r0 = r1
    return out


def _planes(w: QuantizedWeight) -> list[tuple[int, jax.Array]]:
    """(first row of k, signed codes int8 [rows, n]) for every plane of every packing block of matrix 0, in row
    order; together they are `signed_codes(w)[0]`."""
    k = w.shape[1]
    packed_per_block = packed_rows(w.block_k, w.bits)
    out = []
    for b in range(k // w.block_k):
        block = w.codes[0, b * packed_per_block:(b + 1) * packed_per_block]
        start = b * w.block_k
        for plane in unpack_block(block, w.bits, w.block_k):
            out.append((start, _signed(plane, w.bits)))
            start += plane.shape[0]
    return out


def _signed(codes: jax.Array, bits: int) -> jax.Array:
    """uint8 codes -> int8 c - 2^(bits-1). For 8 bits that is the top bit flipped and the byte read as signed (no
    arithmetic), for fewer bits a subtraction that fits int8."""
    if bits == 8:
        return lax.bitcast_convert_type(codes ^ jnp.uint8(0x80), jnp.int8)
    return codes.astype(jnp.int8) - jnp.int8(2 ** (bits - 1))


def quantize_rows(x_mk: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float [m, k] -> (q1 int8 [m, k], q2 int8 [m, k], a float32 [m, k / group_size]) with
    x ≈ a · (q1 + q2 / 254) per row and group of `group_size` values; a = absmax / 127 (1 for an all-zero group)."""
    m, k = x_mk.shape
    x = x_mk.astype(jnp.float32).reshape(m, k // group_size, group_size)
    a = jnp.max(jnp.abs(x), axis=2) / 127.0
    a = jnp.where(a == 0, 1.0, a)
    y = x / a[:, :, None]
    q1 = jnp.clip(jnp.round(y), -127, 127)
    q2 = jnp.clip(jnp.round((y - q1) * LIMB), -127, 127)
    return q1.astype(jnp.int8).reshape(m, k), q2.astype(jnp.int8).reshape(m, k), a


def signed_codes(w: QuantizedWeight) -> jax.Array:
    """A QuantizedWeight's codes unpacked as int8 [g, k, n]: c - 2^(bits-1)."""
    return _signed(unpack_codes(w.codes, w.bits, w.block_k, w.shape[1]), w.bits)


def activation_rounding_bound(x_mk: jax.Array, w: QuantizedWeight) -> jax.Array:
    """float32 [m, n]: the most `int8_matmul(x, w)` can differ from `x @ w.dequantize()` before float rounding:
    Σ_g (a[m, g] / 508) · Σ_{k in g} |w[k, n]|, the two limbs' rounding of each activation times the weights it
    meets (a = the group's absmax / 127)."""
    g, k, n = w.shape
    size = w.group_size
    a = jnp.max(jnp.abs(x_mk.astype(jnp.float32)).reshape(x_mk.shape[0], k // size, size), axis=2) / 127.0
    w_abs = jnp.abs(w.dequantize(jnp.float32)[0]).reshape(k // size, size, n).sum(axis=1)
    return (a / (2 * LIMB)) @ w_abs
