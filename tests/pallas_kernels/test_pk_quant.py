"""pallas_kernels.quant against a NumPy quantizer and packer written here from the README's format, and the
per-matrix group sizes of MixedQuantizedWeight against quantizing each matrix alone."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.quant import (MixedQuantizedWeight, QuantizedWeight, block_k_for, pack_codes, plane_rows,
                                  quantize_weight, unpack_block, unpack_codes)

BITS = (8, 4, 3, 2)


def np_quantize(w, bits, group_size, symmetric, scale_dtype=ml_dtypes.bfloat16):
    """-> (codes uint8 [g, k, n], scale [g, k/gs, n] in scale_dtype, zero float32 [g, k/gs, n]) per the README."""
    g, k, n = w.shape
    group_size = k if group_size is None else group_size
    wg = w.astype(np.float32).reshape(g, k // group_size, group_size, n)
    top = np.float32(2 ** bits - 1)
    if symmetric:
        qmax = np.float32(2 ** (bits - 1) - 1)
        scale = (np.abs(wg).max(axis=2) / qmax).astype(scale_dtype)
        scale = np.where(scale == 0, np.ones_like(scale), scale)
        s = scale.astype(np.float32)[:, :, None, :]
        codes = np.clip(np.round(wg / s), -qmax, qmax) + np.float32(2 ** (bits - 1))
        zero = np.full(scale.shape, 2 ** (bits - 1), np.float32)
    else:
        lo, hi = np.minimum(wg.min(axis=2), 0), np.maximum(wg.max(axis=2), 0)  # the range contains 0
        scale = ((hi - lo) / top).astype(scale_dtype)
        scale = np.where(scale == 0, np.ones_like(scale), scale)
        s = scale.astype(np.float32)
        zero = np.clip(np.round(-lo / s), 0, top)
        codes = np.clip(np.round(wg / s[:, :, None, :]) + zero[:, :, None, :], 0, top)
    return codes.reshape(g, k, n).astype(np.uint8), scale, zero


def np_dequantize(codes, scale, zero, group_size):
    g, k, n = codes.shape
    c = codes.astype(np.float32).reshape(g, k // group_size, group_size, n)
    return (scale.astype(np.float32)[:, :, None, :] * (c - zero[:, :, None, :])).reshape(g, k, n)


def np_pack(codes, bits, block_k):
    """The README layout, one packed row at a time."""
    if bits == 8:
        return codes
    g, k, n = codes.shape
    out = []
    for b in range(k // block_k):
        block = codes[:, b * block_k:(b + 1) * block_k].astype(np.int64)
        planes = [(block & 3, 2), (block >> 2, 1)] if bits == 3 else [(block, bits)]
        for plane, pbits in planes:
            p, rows = 8 // pbits, block_k * pbits // 8
            for i in range(rows):
                byte = sum(plane[:, j * rows + i] << (pbits * j) for j in range(p))
                out.append(byte)
    return np.stack(out, axis=1).astype(np.uint8)


def weight(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [32, 64, 128, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_scales_and_packing_match_numpy(bits, group_size, symmetric):
    w = weight((2, 128, 24), seed=bits)
    q = quantize_weight(jnp.asarray(w), bits=bits, group_size=group_size, symmetric=symmetric)
    codes, scale, zero = np_quantize(w, bits, group_size, symmetric)
    assert q.block_k == 128 and q.group_size == (group_size or 128) and q.shape == w.shape
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (2, 128 * bits // 8, 24)
    np.testing.assert_array_equal(np.asarray(q.codes), np_pack(codes, bits, 128))
    np.testing.assert_array_equal(np.asarray(q.scale), scale)
    if symmetric:
        assert q.zero is None
    else:
        np.testing.assert_array_equal(np.asarray(q.zero).astype(np.float32), zero)
    np.testing.assert_array_equal(np.asarray(unpack_codes(q.codes, bits, q.block_k, 128)), codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", [8, 48, 96, 512])
def test_pack_then_unpack_is_identity(bits, k):
    block_k = block_k_for(k, bits)
    codes = np.random.default_rng(k).integers(0, 2 ** bits, (2, k, 5)).astype(np.uint8)
    packed = pack_codes(jnp.asarray(codes), bits, block_k)
    np.testing.assert_array_equal(np.asarray(packed), np_pack(codes, bits, block_k))
    np.testing.assert_array_equal(np.asarray(unpack_codes(packed, bits, block_k, k)), codes)


@pytest.mark.parametrize("bits", BITS)
def test_unpack_block_gives_contiguous_row_planes_in_int32(bits):
    block_k = 64
    codes = np.random.default_rng(bits).integers(0, 2 ** bits, (block_k, 7)).astype(np.uint8)
    packed = np_pack(codes[None], bits, block_k)[0].astype(np.int32)  # as a Mosaic kernel would hold it
    planes = unpack_block(jnp.asarray(packed), bits, block_k)
    h = plane_rows(block_k, bits)
    assert len(planes) == block_k // h
    for j, plane in enumerate(planes):
        assert plane.dtype == jnp.int32 and plane.shape == (h, 7)
        np.testing.assert_array_equal(np.asarray(plane), codes[j * h:(j + 1) * h])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [32, None])
@pytest.mark.parametrize("symmetric,offset", [(True, 0.0), (False, 0.0), (False, 3.0), (False, -3.0)])
def test_dequantize_equals_numpy_exactly_and_error_is_within_half_a_step(bits, group_size, symmetric, offset):
    # offset +-3: every group is all positive or all negative, so its asymmetric range is [0, max] or [min, 0].
    w = weight((3, 64, 16), seed=10 + bits) + np.float32(offset)
    q = quantize_weight(jnp.asarray(w), bits=bits, group_size=group_size, symmetric=symmetric)
    codes, scale, zero = np_quantize(w, bits, group_size, symmetric)
    gs = group_size or 64
    ref = np_dequantize(codes, scale, zero, gs)
    deq = np.asarray(q.dequantize(jnp.float32))
    np.testing.assert_array_equal(deq, ref)
    # Values whose rounded code needed no clipping are within half a quantization step.
    s = np.repeat(scale.astype(np.float32), gs, axis=1)
    z = np.repeat(zero, gs, axis=1)
    raw = np.round(w / s) + (z if not symmetric else 0)
    lo, hi = (0, 2 ** bits - 1) if not symmetric else (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    in_range = (raw >= lo) & (raw <= hi)
    assert in_range.mean() > 0.9
    err = np.abs(w - deq)[in_range]
    assert (err <= s[in_range] / 2 * (1 + 1e-6) + 1e-30).all(), err.max()


def test_dequantize_defaults_to_the_weight_dtype_and_rounds_once():
    w = weight((1, 32, 8), seed=3).astype(ml_dtypes.bfloat16)
    q = quantize_weight(jnp.asarray(w), bits=4, group_size=16)
    assert q.dtype == jnp.bfloat16 and q.dequantize().dtype == jnp.bfloat16
    codes, scale, zero = np_quantize(w.astype(np.float32), 4, 16, True)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np_dequantize(codes, scale, zero, 16)
                                  .astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_group_gets_scale_one_and_dequantizes_to_exactly_zero(symmetric):
    w = weight((1, 32, 4), seed=4)
    w[0, :16, 1] = 0.0
    q = quantize_weight(jnp.asarray(w), bits=4, group_size=16, symmetric=symmetric)
    assert float(q.scale[0, 0, 1]) == 1.0
    if not symmetric:
        assert float(q.zero[0, 0, 1]) == 0.0
    np.testing.assert_array_equal(np.asarray(q.dequantize())[0, :16, 1], 0.0)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("c", [0.7, -0.7, 0.5, -0.5, 123.4, -1e-3])
def test_asymmetric_constant_group_comes_back_within_the_rounding_of_its_scale(bits, c):
    """The README's statement: a constant group c spans [0, c] (or [c, 0]); with s = |c| / top rounded to
    bfloat16 it dequantizes to sign(c) * m * s, m = min(round(|c| / s), top); m = top for bits <= 4; and
    |result - c| < 2^-8 |c|."""
    w = weight((1, 32, 3), seed=5)
    w[0, 16:, 2] = c
    q = quantize_weight(jnp.asarray(w), bits=bits, group_size=16, symmetric=False)
    top, c32 = 2 ** bits - 1, np.float32(c)
    s = np.float32(ml_dtypes.bfloat16(np.abs(c32) / np.float32(top)))
    m = min(np.round(np.abs(c32) / s), top)
    assert np.float32(q.scale[0, 1, 2]) == s
    assert float(q.zero[0, 1, 2]) == (0.0 if c > 0 else m)
    got = np.asarray(q.dequantize(jnp.float32))[0, 16:, 2]
    np.testing.assert_array_equal(got, np.sign(c32) * np.float32(m) * s)
    if bits <= 4:
        assert m == top
    elif abs(c) == 0.5:
        assert m == top - 1  # 0.5 / 255 rounds up to a bfloat16 scale 0.2% too large: 0.5 / s = 254.4
    assert (np.abs(got - c32) < 2.0 ** -8 * abs(c)).all()


@pytest.mark.parametrize("bits", BITS)
def test_asymmetric_constant_groups_with_float32_scales_come_back_within_one_ulp(bits):
    """With unrounded (float32) scales, the only error left is fp32's in (|c| / top) · top: at most one ulp of c,
    for constants over six orders of magnitude and both signs."""
    rng = np.random.default_rng(11)
    cs = (rng.standard_normal(64) * rng.choice([1e-3, 1.0, 100.0], 64)).astype(np.float32)
    w = np.repeat(cs.reshape(1, 1, 64), 16, axis=1)  # column j is the constant cs[j]
    q = quantize_weight(jnp.asarray(w), bits=bits, group_size=16, symmetric=False, scale_dtype=jnp.float32)
    got = np.asarray(q.dequantize(jnp.float32))[0]
    assert (np.abs(got - cs) <= np.spacing(np.abs(cs))).all(), np.abs(got - cs).max()


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 64, True), (4, 64, False), (3, 32, True),
                                                       (2, None, False), (8, 32, True)])
def test_nbytes_counts_packed_codes_scales_and_zeros(bits, group_size, symmetric):
    g, k, n = 2, 128, 64
    q = quantize_weight(jnp.asarray(weight((g, k, n))), bits=bits, group_size=group_size, symmetric=symmetric)
    scale_bytes = g * (k // (group_size or k)) * n * 2  # bfloat16
    assert q.nbytes == g * k * bits // 8 * n + scale_bytes * (1 if symmetric else 2)


def test_int4_group64_nbytes_is_the_documented_example():
    q = quantize_weight(jnp.asarray(weight((2, 128, 64))), bits=4, group_size=64)
    assert q.nbytes == 2 * 64 * 64 + 2 * 2 * 64 * 2


def test_scale_dtype_float32_keeps_unrounded_scales():
    w = weight((1, 64, 8), seed=5)
    q = quantize_weight(jnp.asarray(w), bits=4, group_size=32, scale_dtype=jnp.float32)
    codes, scale, zero = np_quantize(w, 4, 32, True, scale_dtype=np.float32)
    assert q.scale.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(q.scale), scale)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np_dequantize(codes, scale, zero, 32))


def test_quantize_is_jit_compatible_and_a_pytree():
    w = jnp.asarray(weight((2, 64, 16), seed=6))
    eager = quantize_weight(w, bits=3, group_size=32, symmetric=False)
    jitted = jax.jit(quantize_weight, static_argnames=("bits", "group_size", "symmetric"))(
        w, bits=3, group_size=32, symmetric=False)
    assert jax.tree_util.tree_structure(eager) == jax.tree_util.tree_structure(jitted)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(jax.tree_util.tree_leaves(quantize_weight(w, bits=4, group_size=32))) == 2  # zero None: no leaf
    deq = jax.jit(lambda q: q.dequantize())(eager)
    np.testing.assert_array_equal(np.asarray(deq), np.asarray(eager.dequantize()))


def test_bits_8_with_k_not_a_multiple_of_8_is_one_block():
    w = weight((1, 12, 4), seed=7)
    q = quantize_weight(jnp.asarray(w), bits=8, group_size=None)
    assert q.block_k == 12 and q.codes.shape == (1, 12, 4)
    codes, scale, zero = np_quantize(w, 8, None, True)
    np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)), np_dequantize(codes, scale, zero, 12))


def test_bad_inputs_raise_clear_errors():
    w = jnp.asarray(weight((2, 128, 8)))
    with pytest.raises(ValueError, match=r"bits=5.*\(8, 4, 3, 2\)"):
        quantize_weight(w, bits=5, group_size=32)
    with pytest.raises(ValueError, match=r"group_size=48 does not divide k=128.*valid group sizes are \[1, 2, 4, "
                                         r"8, 16, 32, 64, 128\]"):
        quantize_weight(w, bits=4, group_size=48)
    with pytest.raises(ValueError, match=r"group_size=0"):
        quantize_weight(w, bits=4, group_size=0)
    with pytest.raises(ValueError, match=r"k=12 .* not a multiple of 8"):
        quantize_weight(jnp.zeros((1, 12, 8)), bits=4, group_size=None)
    with pytest.raises(ValueError, match=r"shape \(128, 8\).*w\[None\]"):
        quantize_weight(w[0], bits=4, group_size=32)
    with pytest.raises(ValueError, match=r"dtype int32.*float"):
        quantize_weight(jnp.zeros((1, 16, 8), jnp.int32), bits=4, group_size=None)
    with pytest.raises(ValueError, match=r"scale_dtype"):
        quantize_weight(w, bits=4, group_size=32, scale_dtype=jnp.int8)
    with pytest.raises(ValueError, match=r"group_size=\(32, 64, 128\) has 3 entries but rhs .* has 2 matrices"):
        quantize_weight(w, bits=4, group_size=(32, 64, 128))
    with pytest.raises(ValueError, match=r"group_size=48 does not divide k=128"):
        quantize_weight(w, bits=4, group_size=(32, 48))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_a_group_size_per_matrix_stores_what_quantizing_each_matrix_alone_gives(bits, symmetric):
    w = weight((3, 64, 16), seed=20 + bits)
    sizes = (64, 16, 32)
    q = quantize_weight(jnp.asarray(w), bits=bits, group_size=sizes, symmetric=symmetric)
    assert isinstance(q, MixedQuantizedWeight) and q.group_size == sizes and q.shape == w.shape
    alone = [np_quantize(w[i:i + 1], bits, size, symmetric) for i, size in enumerate(sizes)]
    codes = np.concatenate([c for c, _, _ in alone])
    np.testing.assert_array_equal(np.asarray(q.codes), np_pack(codes, bits, q.block_k))
    np.testing.assert_array_equal(np.asarray(q.scale), np.concatenate([s[0] for _, s, _ in alone]))
    if symmetric:
        assert q.zero is None
    else:
        np.testing.assert_array_equal(np.asarray(q.zero).astype(np.float32),
                                      np.concatenate([z[0] for _, _, z in alone]))
    expected = np.concatenate([np_dequantize(c, s, z, size) for (c, s, z), size in zip(alone, sizes)])
    np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)), expected)
    # Each scale is stored once: 1 + 4 + 2 rows of 16 bf16 scales (and as many zero points when asymmetric).
    assert q.nbytes == 3 * 64 * bits // 8 * 16 + (1 + 4 + 2) * 16 * 2 * (1 if symmetric else 2)
    uniform = q.uniform()
    assert isinstance(uniform, QuantizedWeight) and uniform.group_size == 16 and uniform.scale.shape == (3, 4, 16)
    np.testing.assert_array_equal(np.asarray(uniform.dequantize(jnp.float32)), expected)


def test_uniform_uses_the_gcd_of_the_group_sizes_and_gmm_takes_it(rng):
    w = weight((2, 96, 8), seed=7)
    q = quantize_weight(jnp.asarray(w), bits=8, group_size=(32, 48), symmetric=False)
    uniform = jax.jit(MixedQuantizedWeight.uniform)(q)
    assert uniform.group_size == 16 and uniform.scale.shape == (2, 6, 8)
    dense = np.asarray(q.dequantize(jnp.float32))
    np.testing.assert_array_equal(np.asarray(uniform.dequantize(jnp.float32)), dense)
    x = rng.normal(size=(10, 96)).astype(np.float32)
    out = pk.gmm(jnp.asarray(x), uniform, jnp.array([4, 6], jnp.int32), backend="xla")
    np.testing.assert_allclose(np.asarray(out), np.concatenate([x[:4] @ dense[0], x[4:] @ dense[1]]), rtol=1e-5,
                               atol=1e-5)


def test_quantized_weight_is_frozen():
    q = quantize_weight(jnp.asarray(weight((1, 16, 8))), bits=4, group_size=None)
    assert isinstance(q, QuantizedWeight)
    with pytest.raises(AttributeError):
        q.bits = 2
