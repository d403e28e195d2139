"""The GPU (Pallas on Triton) grouped matmuls, run with the generic HLO interpreter on CPU (interpret=True), against
float64 NumPy loops and the XLA reference (pallas_kernels.grouped.reference); and lowered to Triton IR for CUDA at real
shapes, which needs no GPU (it catches non-power-of-two blocks and primitives Triton cannot lower).

Tiles are tiny (tm=16, tk=tn=32) so a few dozen rows give many row tiles per group, groups of 0, 1 and 33 rows,
rows past the last group, m below one tile, and ragged k and n edges (k=72, n=80).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmm_oracle import np_gmm, np_tgmm, randn, rel_err
from pallas_kernels.grouped import gpu, reference
from pallas_kernels.quant import quantize_weight

SMALL = gpu.Tiling(tm=16, tk=32, tn=32)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
# G = 6 groups: an empty one, a one-row one, non-multiples of tm; 66 of the 80 rows belong to a group.
SIZES = np.array([9, 0, 33, 1, 17, 6], np.int32)
M = 80


def slow(*values):
    """A grid point for the slow tier (`pytest -m slow`): the default run keeps a representative of its property."""
    return pytest.param(*values, marks=pytest.mark.slow)


# Most of this file's time is XLA:CPU compiling the interpreted kernels; unoptimised code runs these tiny shapes
# in milliseconds and compiles about a third faster.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "out_dtype"), compiler_options=FAST_COMPILE)
def _gmm(lhs, rhs, group_sizes, group_offset, transpose_rhs, out_dtype):
    return gpu.gmm(lhs, rhs, group_sizes, group_offset=group_offset, transpose_rhs=transpose_rhs,
                   out_dtype=out_dtype, interpret=True, tiling=SMALL)


def _call(lhs, rhs, group_sizes, group_offset=0, transpose_rhs=False, out_dtype=None):
    return _gmm(lhs, rhs, jnp.asarray(group_sizes), jnp.int32(group_offset), transpose_rhs=transpose_rhs,
                out_dtype=out_dtype or lhs.dtype)


# One compile per call site instead of one per eager op.
_tgmm = jax.jit(gpu.tgmm, static_argnames=("num_groups", "interpret", "tiling"), compiler_options=FAST_COMPILE)
_ref_gmm = jax.jit(reference.gmm, static_argnames=("transpose_rhs", "out_dtype"))
_ref_tgmm = jax.jit(reference.tgmm, static_argnames=("num_groups",))
_quantize = jax.jit(quantize_weight, static_argnames=("bits", "group_size", "symmetric"))
_dequantize = jax.jit(lambda q: q.dequantize(jnp.float32))


def test_row_tiles_partition_rows_into_group_aligned_tiles():
    # Local groups 1..4 of 6: rows [0, 9) and [60, 80) are zero spans; each span is cut into 16-row tiles from
    # its own first row; the bound m/tm + g + 1 leaves unused (empty) entries.
    tm, offset, g = 16, 1, 4
    num_tiles = -(-M // tm) + g + 1
    row_tiles = jax.jit(gpu._row_tiles, static_argnums=(2, 3, 4, 5))
    tiles = np.asarray(row_tiles(jnp.asarray(SIZES), jnp.int32(offset), g, M, tm, num_tiles))
    ends = np.cumsum(SIZES)
    spans = [(0, ends[offset] - SIZES[offset], -1)]
    spans += [(ends[offset + i] - SIZES[offset + i], ends[offset + i], i) for i in range(g)]
    spans += [(ends[offset + g - 1], M, -1)]
    want = [(s, min(s + tm, stop), grp) for lo, stop, grp in spans for s in range(lo, stop, tm)]
    want += [(0, 0, -1)] * (num_tiles - len(want))
    assert [tuple(int(v) for v in col) for col in tiles.T] == want


@pytest.mark.parametrize("dtype,group_offset,num_local", [(jnp.float32, 2, 3), (jnp.bfloat16, 0, 6)])
def test_gmm_matches_numpy_loop_and_zeroes_other_rows(dtype, group_offset, num_local):
    rng = np.random.default_rng(0)
    lhs, rhs = randn(rng, (M, 72), dtype), randn(rng, (num_local, 72, 80), dtype)
    got = _call(lhs, rhs, SIZES, group_offset)
    assert got.dtype == dtype and got.shape == (M, 80)
    assert rel_err(got, np_gmm(lhs.astype(jnp.float32), rhs.astype(jnp.float32), SIZES, group_offset)) < TOL[dtype]
    ends = np.cumsum(SIZES)
    local = np.zeros(M, bool)
    local[ends[group_offset] - SIZES[group_offset]:ends[group_offset + num_local - 1]] = True
    assert np.all(np.asarray(got)[~local] == 0) and np.all(np.abs(np.asarray(got[local], np.float32)).sum(1) > 0)


def test_gmm_fewer_rows_than_one_tile():
    rng = np.random.default_rng(2)
    sizes = np.array([3, 0, 4], np.int32)  # 7 of m = 9 rows, tm = 16
    lhs, rhs = randn(rng, (9, 32)), randn(rng, (3, 32, 48))
    assert rel_err(_call(lhs, rhs, sizes), np_gmm(lhs, rhs, sizes, 0)) < 1e-5


def test_gmm_transpose_rhs_matches_numpy_loop():
    rng = np.random.default_rng(3)
    lhs, rhs = randn(rng, (M, 80)), randn(rng, (4, 72, 80))  # out [m, 72]
    got = _call(lhs, rhs, SIZES, 1, transpose_rhs=True)
    assert got.shape == (M, 72)
    assert rel_err(got, np_gmm(lhs, rhs, SIZES, 1, transpose_rhs=True)) < 1e-5


def test_gmm_matches_xla_reference_with_mixed_dtypes():
    rng = np.random.default_rng(4)
    lhs, rhs = randn(rng, (M, 72), jnp.bfloat16), randn(rng, (3, 72, 80))
    got = _call(lhs, rhs, SIZES, 1, out_dtype=jnp.float32)  # bf16 x fp32 computes in fp32
    want = _ref_gmm(lhs, rhs, jnp.asarray(SIZES), group_offset=jnp.int32(1), transpose_rhs=False,
                    out_dtype=jnp.float32)
    assert got.dtype == jnp.float32 and rel_err(got, want) < 1e-5


@pytest.mark.parametrize("dtype,group_offset,num_groups", [(jnp.float32, 1, 3), (jnp.bfloat16, 0, 6)])
def test_tgmm_matches_numpy_loop_and_xla_reference(dtype, group_offset, num_groups):
    rng = np.random.default_rng(5)
    lhs, dout, sizes = randn(rng, (M, 72), dtype), randn(rng, (M, 48), dtype), jnp.asarray(SIZES)
    kwargs = dict(group_offset=jnp.int32(group_offset), num_groups=num_groups)
    got = _tgmm(lhs, dout, sizes, interpret=True, tiling=SMALL, **kwargs)
    assert got.shape == (num_groups, 72, 48) and got.dtype == jnp.float32
    # bf16 inputs are exact in float32, so both dtypes are held to float32 accuracy
    assert rel_err(got, np_tgmm(lhs.astype(jnp.float32), dout.astype(jnp.float32), SIZES, group_offset,
                                  num_groups)) < 1e-5
    assert rel_err(got, _ref_tgmm(lhs, dout, sizes, **kwargs)) < 1e-5
    empty = [i for i in range(num_groups) if SIZES[group_offset + i] == 0]
    assert empty and all(np.all(np.asarray(got[i]) == 0) for i in empty)


# k = 128: one packing block, planes of 128/64/16/32 rows; n = 48 leaves a ragged n tile. By default each bits
# once and each group size at least once (and the asymmetric test below: 4 bits, group 64).
@pytest.mark.parametrize("bits,group_size", [
    slow(8, 32), slow(8, 64), (8, None), (4, 32), slow(4, 64), slow(4, None), slow(3, 32), (3, 64), slow(3, None),
    slow(2, 32), slow(2, 64), (2, None)])
def test_quantized_gmm_equals_lhs_times_dequantized_weight(bits, group_size):
    rng = np.random.default_rng(bits * 100 + (group_size or 0))
    lhs, w = randn(rng, (M, 128)), randn(rng, (3, 128, 48))
    q = _quantize(w, bits=bits, group_size=group_size)
    got = _call(lhs, q, SIZES, 1)
    assert rel_err(got, np_gmm(lhs, _dequantize(q), SIZES, 1)) < 1e-5


def test_quantized_gmm_asymmetric_bf16_several_blocks():
    # k = 384: three 128-row packing blocks (three k steps); asymmetric zero points; bf16 activations.
    rng = np.random.default_rng(7)
    lhs, w = randn(rng, (M, 384), jnp.bfloat16), randn(rng, (6, 384, 32))
    q = _quantize(w, bits=4, group_size=64, symmetric=False)
    assert q.zero is not None and q.block_k == 128
    want = np_gmm(lhs.astype(jnp.float32), _dequantize(q), SIZES, 0)
    assert rel_err(_call(lhs, q, SIZES), want) < 1e-2


def test_public_gmm_gradients_through_pallas_gpu_match_xla():
    # pk.gmm's custom VJP runs gmm, gmm(transpose_rhs=True) and tgmm, all on this backend.
    import pallas_kernels as pk

    rng = np.random.default_rng(9)
    lhs, rhs, dout = randn(rng, (M, 32)), randn(rng, (3, 32, 48)), randn(rng, (M, 48))
    sizes = jnp.asarray(SIZES)

    def loss(lhs, rhs, backend):
        out = pk.gmm(lhs, rhs, sizes, backend=backend, group_offset=1, interpret=backend != "xla")
        return jnp.sum(out * dout)

    got = jax.grad(loss, argnums=(0, 1))(lhs, rhs, "pallas_gpu")
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(lhs, rhs, "pallas_gpu"))
    assert "pallas_gpu_gmm" in jaxpr and "pallas_gpu_tgmm" in jaxpr  # no silent fallback to XLA
    want = jax.grad(loss, argnums=(0, 1))(lhs, rhs, "xla")
    assert all(rel_err(g, w) < 1e-5 for g, w in zip(got, want))


def test_unsupported_cases_raise_not_implemented():
    rng = np.random.default_rng(8)
    q = _quantize(randn(rng, (2, 32, 32)), bits=2, group_size=None)  # block_k 32 -> 8-row planes
    lhs = randn(rng, (M, 32))
    kwargs = dict(group_offset=jnp.int32(0), out_dtype=jnp.float32, interpret=True)
    with pytest.raises(NotImplementedError, match="transpose_rhs"):
        gpu.gmm(lhs, _quantize(randn(rng, (2, 32, 32)), bits=8, group_size=None), jnp.asarray(SIZES),
                transpose_rhs=True, **kwargs)
    with pytest.raises(NotImplementedError, match="chunks"):
        gpu.gmm(lhs, q, jnp.asarray(SIZES), transpose_rhs=False, **kwargs)
    with pytest.raises(NotImplementedError, match="n=8"):
        gpu.gmm(lhs, randn(rng, (2, 32, 8)), jnp.asarray(SIZES), transpose_rhs=False, **kwargs)


def test_tiling_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="tm=48"):
        gpu.Tiling(tm=48)
    assert gpu.default_tiling(32, 16).tm == 16 and gpu.default_tiling(16384, 16).tm == 64


def _lowers_to_triton(fn, *avals) -> bool:
    """Lowers `fn` for CUDA on this CPU-only machine: runs the whole Pallas -> Triton IR lowering (power-of-two
    shapes, supported primitives); only Triton's own compile to PTX is left for a GPU."""
    text = jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()
    return "__gpu$xla.gpu.triton" in text


@pytest.mark.parametrize("case", ["float", "float_transposed", "int8", "int4_asym", "int3", "int2", "tgmm"])
def test_kernels_lower_to_triton_at_model_shapes(case):
    spec = jax.ShapeDtypeStruct
    sizes, bf16 = spec((16,), jnp.int32), jnp.bfloat16

    def gmm(lhs, rhs, group_sizes, transpose_rhs=False):
        return gpu.gmm(lhs, rhs, group_sizes, group_offset=jnp.int32(0), transpose_rhs=transpose_rhs, out_dtype=bf16)

    if case == "tgmm":
        fn = functools.partial(gpu.tgmm, group_offset=jnp.int32(0), num_groups=16)
        assert _lowers_to_triton(lambda x, d, s: fn(x, d, s), spec((16384, 4096), bf16), spec((16384, 6400), bf16),
                                 sizes)
    elif case.startswith("float"):
        transposed = case == "float_transposed"
        lhs = spec((16384, 4100 if transposed else 6400), bf16)  # 4100: ragged edges
        assert _lowers_to_triton(functools.partial(gmm, transpose_rhs=transposed), lhs,
                                 spec((16, 6400, 4100), bf16), sizes)
    else:
        bits, group_size, symmetric = {"int8": (8, 128, True), "int4_asym": (4, 64, False), "int3": (3, None, True),
                                       "int2": (2, 64, True)}[case]
        q = jax.eval_shape(functools.partial(quantize_weight, bits=bits, group_size=group_size, symmetric=symmetric),
                           spec((16, 4096, 6400), bf16))
        assert _lowers_to_triton(gmm, spec((32, 4096), bf16), q, sizes)
