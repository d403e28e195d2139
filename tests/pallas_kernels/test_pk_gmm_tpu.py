"""The TPU (Pallas Mosaic) grouped matmuls, run in TPU interpret mode on CPU, against NumPy loops and the XLA
reference (pallas_kernels.grouped.reference).

Shapes are tiny but chosen so the grid has several m tiles, tiles shared by two groups, an empty group, rows past
the last group, m not a multiple of tm (padded), and ragged k and n tiles (k=160, n=144 with tk=tn=128).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from gmm_oracle import np_gmm, np_tgmm, randn, rel_err
from pallas_kernels.grouped import reference, tpu
from pallas_kernels.quant import quantize_weight

SMALL = tpu.Tiling(tm=16, tk=128, tn=128)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def slow(*values):
    """A grid point for the slow tier (`pytest -m slow`): the default run keeps a representative of its property."""
    return pytest.param(*values, marks=pytest.mark.slow)


def _gmm(lhs, rhs, group_sizes, group_offset=0, transpose_rhs=False, tiling=SMALL):
    return tpu.gmm(lhs, rhs, jnp.asarray(group_sizes, jnp.int32), group_offset=jnp.int32(group_offset),
                   transpose_rhs=transpose_rhs, out_dtype=lhs.dtype, interpret=True, tiling=tiling)


def test_group_metadata_visits_each_group_tile_pair_in_order():
    # Local groups 1..5 of 7: an empty group at a tile boundary, one inside a tile, one at row m, a group
    # starting mid-tile; m = 64 is a tile multiple, so the empty group at row m has no tile of its own.
    sizes = np.array([5, 11, 0, 13, 0, 35, 0], np.int32)
    m, tm, offset, num_groups = 64, 16, 1, 5
    ends = np.minimum(np.cumsum(sizes), m)
    starts = ends - sizes
    for visit_empty in (False, True):
        want = []
        for g in range(offset, offset + num_groups):
            if ends[g] > starts[g]:
                want += [(g - offset, t) for t in range(starts[g] // tm, -(-ends[g] // tm))]
            elif visit_empty:
                want.append((g - offset, min(starts[g] // tm, m // tm - 1)))
        bounds, step_group, step_tile, num_steps = tpu.group_metadata(
            jnp.asarray(sizes), jnp.int32(offset), num_groups=num_groups, m=m, tm=tm, visit_empty=visit_empty)
        got = list(zip(np.asarray(step_group)[:int(num_steps)].tolist(),
                       np.asarray(step_tile)[:int(num_steps)].tolist()))
        assert got == want, (visit_empty, got, want)
        np.testing.assert_array_equal(bounds, np.concatenate([[0], ends])[offset:offset + num_groups + 1])


@pytest.mark.parametrize("dtype", [jnp.float32, slow(jnp.bfloat16)])
def test_gmm_matches_numpy_with_shared_tiles_empty_group_and_ragged_k_n(dtype):
    rng = np.random.default_rng(0)
    sizes = np.array([16, 0, 21, 23], np.int32)  # rows 60..71 belong to no group
    lhs, rhs = randn(rng, (72, 160), dtype), randn(rng, (4, 160, 144), dtype)
    out = _gmm(lhs, rhs, sizes)
    assert out.shape == (72, 144) and out.dtype == dtype
    assert rel_err(out, np_gmm(lhs, rhs, sizes, 0)) <= TOL[dtype]
    assert not np.asarray(out[60:]).any()


def test_gmm_group_offset_computes_only_the_local_groups():
    rng = np.random.default_rng(1)
    sizes = np.array([9, 20, 0, 25, 10], np.int32)  # local groups 1..3 own rows 9..53
    lhs, rhs_local = randn(rng, (72, 160), jnp.float32), randn(rng, (3, 160, 144), jnp.float32)
    out = _gmm(lhs, rhs_local, sizes, group_offset=1)
    assert rel_err(out, np_gmm(lhs, rhs_local, sizes, 1)) <= 1e-5
    assert not np.asarray(out[:9]).any() and not np.asarray(out[54:]).any()


@pytest.mark.parametrize("dtype", [jnp.float32, slow(jnp.bfloat16)])  # bf16 kernels: the gmm and tgmm tests
def test_gmm_transpose_rhs_multiplies_by_each_groups_transpose(dtype):
    rng = np.random.default_rng(2)
    sizes = np.array([9, 20, 0, 25, 10], np.int32)
    lhs, rhs = randn(rng, (72, 144), dtype), randn(rng, (4, 160, 144), dtype)
    out = _gmm(lhs, rhs, sizes, group_offset=1, transpose_rhs=True)
    assert out.shape == (72, 160)
    assert rel_err(out, np_gmm(lhs, rhs, sizes, 1, transpose_rhs=True)) <= TOL[dtype]
    want = reference.gmm(lhs, rhs, jnp.asarray(sizes), group_offset=jnp.int32(1), transpose_rhs=True,
                         out_dtype=dtype)
    assert rel_err(out, want) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [jnp.float32, slow(jnp.bfloat16)])
def test_tgmm_matches_numpy_including_empty_groups(dtype):
    rng = np.random.default_rng(3)
    # Local groups 1..4: group 2 is empty, group 4 is empty and starts at row m (= 64, a tile multiple).
    sizes = np.array([9, 20, 0, 35, 0], np.int32)
    lhs, dout = randn(rng, (64, 160), dtype), randn(rng, (64, 144), dtype)
    got = tpu.tgmm(lhs, dout, jnp.asarray(sizes), group_offset=jnp.int32(1), num_groups=4, interpret=True,
                   tiling=SMALL)
    assert got.shape == (4, 160, 144) and got.dtype == jnp.float32
    assert rel_err(got, np_tgmm(lhs, dout, sizes, 1, 4)) <= TOL[dtype]
    assert not np.asarray(got[1]).any() and not np.asarray(got[3]).any()


# k = 384: block_k = 128 and three k tiles, so a per-channel scale spans all three tiles, while group sizes 32 and
# 64 put 4 or 2 scale groups in each tile. By default a packed width with a group size and a per-channel width (and
# the asymmetric test below: 4 bits, group 32); the slow tier runs every pair.
@pytest.mark.parametrize("bits,group_size", [
    slow(8, None), slow(8, 32), slow(8, 64), (4, 64), slow(4, 32), slow(4, None), slow(3, 32), slow(3, 64),
    slow(3, None), (2, None), slow(2, 32), slow(2, 64)])
def test_quantized_gmm_equals_lhs_times_dequantized_weight(bits, group_size):
    rng = np.random.default_rng(10 + bits)
    sizes = jnp.array([7, 0, 30, 19], jnp.int32)
    lhs, w = randn(rng, (64, 384), jnp.float32), randn(rng, (4, 384, 128), jnp.float32)
    q = quantize_weight(w, bits=bits, group_size=group_size)
    out = _gmm(lhs, q, sizes, tiling=tpu.Tiling(tm=32, tk=128, tn=128))
    assert rel_err(out, np_gmm(lhs, q.dequantize(jnp.float32), np.asarray(sizes), 0)) <= 1e-5


@pytest.mark.parametrize("dtype,bits,group_size", [slow(jnp.float32, 3, 64), (jnp.bfloat16, 4, 32)])
def test_asymmetric_quantized_gmm_with_group_offset_matches_reference(dtype, bits, group_size):
    rng = np.random.default_rng(20 + bits)
    sizes = jnp.array([9, 20, 0, 25, 10], jnp.int32)
    lhs = randn(rng, (64, 384), dtype)
    w = randn(rng, (3, 384, 128), jnp.float32) + 0.5  # off-centre, so the zero points differ from 2^(bits-1)
    q = quantize_weight(w, bits=bits, group_size=group_size, symmetric=False)
    out = _gmm(lhs, q, sizes, group_offset=1, tiling=tpu.Tiling(tm=32, tk=128, tn=128))
    want = reference.gmm(lhs, q, sizes, group_offset=jnp.int32(1), transpose_rhs=False, out_dtype=dtype)
    assert rel_err(out, want) <= TOL[dtype]
    assert not np.asarray(out[:9]).any() and not np.asarray(out[54:]).any()


def test_quantized_rhs_with_transpose_rhs_is_not_implemented():
    q = quantize_weight(jnp.ones((2, 64, 32)), bits=4, group_size=32)
    with pytest.raises(NotImplementedError, match="transpose_rhs"):
        _gmm(jnp.ones((16, 32)), q, np.array([8, 8]), transpose_rhs=True)


def test_float16_inputs_are_left_to_another_backend():
    sizes = jnp.array([8, 8], jnp.int32)
    with pytest.raises(NotImplementedError, match="float16"):
        _gmm(jnp.ones((16, 32), jnp.float16), jnp.ones((2, 32, 32), jnp.float16), sizes)
    with pytest.raises(NotImplementedError, match="float16"):
        tpu.tgmm(jnp.ones((16, 32), jnp.float16), jnp.ones((16, 32)), sizes, group_offset=jnp.int32(0),
                 num_groups=2, interpret=True)


def test_gradients_through_pk_gmm_match_the_xla_backend():
    # The public op's VJP runs this backend's gmm (transpose_rhs=True for dlhs) and tgmm (drhs); default
    # tiling, so one 40-row tile shared by three groups.
    rng = np.random.default_rng(4)
    sizes = jnp.array([11, 0, 17, 9], jnp.int32)
    lhs, rhs, dout = (randn(rng, s, jnp.float32) for s in ((40, 96), (4, 96, 80), (40, 80)))

    def loss(backend, interpret):
        return lambda x, w: jnp.sum(pk.gmm(x, w, sizes, backend=backend, interpret=interpret) * dout)

    got = jax.grad(loss("pallas_tpu", True), argnums=(0, 1))(lhs, rhs)
    want = jax.grad(loss("xla", False), argnums=(0, 1))(lhs, rhs)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5


@pytest.mark.parametrize("bad", [dict(tm=12), dict(tk=64), dict(tn=0)])
def test_tiling_rejects_tiles_that_break_the_tpu_block_rule(bad):
    with pytest.raises(ValueError, match="multiple of"):
        tpu.Tiling(**bad)


def test_kernels_lower_to_mosaic_for_tpu():
    """Lowering for the TPU platform runs the Pallas -> Mosaic rules and the TPU block-shape checks that
    interpret mode skips (not Mosaic's own compiler, which needs a TPU)."""
    sizes, offset = jnp.array([100, 0, 300, 112], jnp.int32), jnp.int32(0)
    x, dy = jnp.ones((512, 384), jnp.bfloat16), jnp.ones((512, 256), jnp.bfloat16)
    w = jnp.ones((4, 384, 256), jnp.bfloat16)
    q = quantize_weight(w, bits=3, group_size=32, symmetric=False)
    cases = [
        (lambda a, b: tpu.gmm(a, b, sizes, group_offset=offset, transpose_rhs=False, out_dtype=jnp.bfloat16,
                              interpret=False), (x, w)),
        (lambda a, b: tpu.gmm(a, b, sizes, group_offset=offset, transpose_rhs=True, out_dtype=jnp.bfloat16,
                              interpret=False), (dy, w)),
        (lambda a, b: tpu.gmm(a, b, sizes, group_offset=offset, transpose_rhs=False, out_dtype=jnp.float32,
                              interpret=False), (x, q)),
        (lambda a, b: tpu.tgmm(a, b, sizes, group_offset=offset, num_groups=4, interpret=False), (x, dy)),
    ]
    for fn, args in cases:
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",))
        assert "tpu_custom_call" in lowered.as_text()
