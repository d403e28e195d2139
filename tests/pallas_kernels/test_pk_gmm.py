"""pk.gmm / pk.tgmm on the "xla" and "cpu" backends against a NumPy per-group loop, and their gradients against
jax.grad of a dense one-hot formulation; the row tiles (grouped/tiles.py) that the "cpu" backend and jaxmoe's
blocked expert FFN share."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import registry
from pallas_kernels.grouped import cpu, reference, tiles

BACKENDS = ("xla", "cpu")
# (group sizes, rows m): empty groups, sizes that are not tile multiples, a group past the largest cpu tile (64
# rows for m <= 96), rows past the total, all rows used, every group empty.
LAYOUTS = [([13, 0, 41, 1, 22], 96), ([70, 0, 9, 3], 96), ([5, 17, 0, 40], 62), ([0, 0, 0], 40), ([96], 96)]
TOL = {np.float32: 1e-5, ml_dtypes.bfloat16: 1e-2}


def slow(*values):
    """A grid point for the slow tier (`pytest -m slow`): the default run keeps a representative of its property."""
    return pytest.param(*values, marks=pytest.mark.slow)


def np_gmm(x, w, sizes, offset=0, transpose=False):
    """x [m, k_in], w [g, k, n] -> float64 [m, n_out], one group at a time."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    ends = np.cumsum(sizes)
    out = np.zeros((x.shape[0], w.shape[1] if transpose else w.shape[2]))
    for i in range(w.shape[0]):
        rows = slice(ends[offset + i] - sizes[offset + i], ends[offset + i])
        out[rows] = x[rows] @ (w[i].T if transpose else w[i])
    return out


def np_tgmm(x, d, sizes, offset, num_groups):
    x, d = x.astype(np.float64), d.astype(np.float64)
    ends = np.cumsum(sizes)
    return np.stack([x[ends[offset + i] - sizes[offset + i]:ends[offset + i]].T
                     @ d[ends[offset + i] - sizes[offset + i]:ends[offset + i]] for i in range(num_groups)])


def dense_gmm(x, w, sizes, offset=0):
    """The same product as one-hot masked einsum over every group (jnp, differentiable)."""
    group = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(x.shape[0]), side="right") - offset
    onehot = jax.nn.one_hot(group, w.shape[0], dtype=x.dtype)  # rows outside the local groups: all zero
    return jnp.einsum("mg,mk,gkn->mn", onehot, x, w, precision=jax.lax.Precision.HIGHEST)


def randn(rng, shape, dtype=np.float32):
    return rng.normal(size=shape).astype(dtype)


def assert_close(actual, expected, tol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(), 1e-30)
    assert np.abs(actual - expected).max() <= tol * scale, np.abs(actual - expected).max() / scale


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes,m", LAYOUTS)
def test_gmm_matches_per_group_loop_f32(backend, sizes, m, rng):
    x, w = randn(rng, (m, 24)), randn(rng, (len(sizes), 24, 40))
    out = pk.gmm(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes, jnp.int32), backend=backend)
    assert out.shape == (m, 40) and out.dtype == jnp.float32
    assert_close(out, np_gmm(x, w, np.array(sizes)), 1e-5)
    np.testing.assert_array_equal(np.asarray(out)[sum(sizes):], 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gmm_bf16_and_preferred_element_type(backend, rng):
    sizes, m = LAYOUTS[0]
    x, w = randn(rng, (m, 32), ml_dtypes.bfloat16), randn(rng, (len(sizes), 32, 16), ml_dtypes.bfloat16)
    ref = np_gmm(x, w, np.array(sizes))
    out = pk.gmm(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes, jnp.int32), backend=backend)
    assert out.dtype == jnp.bfloat16
    assert_close(out, ref, 1e-2)
    out32 = pk.gmm(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes, jnp.int32), backend=backend,
                   preferred_element_type=jnp.float32)
    assert out32.dtype == jnp.float32
    assert_close(out32, ref, 1e-5)  # bf16 products are exact in fp32; only the accumulation rounds


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [0, 1, 2])
def test_group_offset_computes_only_the_local_groups(backend, offset, rng):
    sizes, m = [13, 0, 41, 1, 22], 96
    x, w_all = randn(rng, (m, 16)), randn(rng, (5, 16, 8))
    w = w_all[offset:offset + 3]
    out = pk.gmm(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes, jnp.int32), backend=backend,
                 group_offset=offset)
    assert_close(out, np_gmm(x, w, np.array(sizes), offset), 1e-5)


@pytest.mark.parametrize("module", [reference, cpu])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("offset", [slow(0), 1])  # offset 0: also each gradient test's dlhs, on both backends
def test_transpose_rhs_multiplies_by_each_groups_transpose(module, dtype, offset, rng):
    sizes, m = [5, 17, 0, 40], 70
    x, w = randn(rng, (m, 24), dtype), randn(rng, (3, 40, 24), dtype)  # rhs [g, k=40, n=24]; x is [m, n]
    out = module.gmm(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes, jnp.int32), group_offset=jnp.int32(offset),
                     transpose_rhs=True, out_dtype=jnp.float32, interpret=False)
    assert out.shape == (m, 40)
    assert_close(out, np_gmm(x, w, np.array(sizes), offset, transpose=True), TOL[dtype] / 10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes,m,offset,num_groups", [([13, 0, 41, 1, 22], 96, 0, 5), ([13, 0, 41, 1, 22], 96, 1, 3),
                                                      ([70, 0, 9, 3], 90, 0, 4), ([0, 0, 0], 40, 0, 3)])
def test_tgmm_matches_per_group_loop(backend, sizes, m, offset, num_groups, rng):
    x, d = randn(rng, (m, 24)), randn(rng, (m, 16))
    out = pk.tgmm(jnp.asarray(x), jnp.asarray(d), jnp.asarray(sizes, jnp.int32), num_groups=num_groups,
                  backend=backend, group_offset=offset)
    assert out.shape == (num_groups, 24, 16) and out.dtype == jnp.float32
    ref = np_tgmm(x, d, np.array(sizes), offset, num_groups)
    if np.abs(ref).max() == 0:
        np.testing.assert_array_equal(np.asarray(out), 0.0)
    else:
        assert_close(out, ref, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tgmm_bf16_inputs_accumulate_in_f32(backend, rng):
    sizes, m = [13, 0, 41, 1, 22], 96
    x, d = randn(rng, (m, 16), ml_dtypes.bfloat16), randn(rng, (m, 8), ml_dtypes.bfloat16)
    out = pk.tgmm(jnp.asarray(x), jnp.asarray(d), jnp.asarray(sizes, jnp.int32), num_groups=5, backend=backend)
    assert out.dtype == jnp.float32
    assert_close(out, np_tgmm(x, d, np.array(sizes), 0, 5), 1e-5)


# Both backends with an empty local group, a group past the largest cpu tile and rows past the groups; the cpu
# backend (row tiles of its own) also with a group offset.
@pytest.mark.parametrize("backend,sizes,m,offset", [
    ("cpu", [70, 0, 9, 3], 90, 0), ("cpu", [13, 0, 41, 1, 22], 96, 2), ("xla", [70, 0, 9, 3], 90, 0),
    slow("cpu", [13, 0, 41, 1, 22], 96, 0), slow("xla", [13, 0, 41, 1, 22], 96, 0),
    slow("xla", [13, 0, 41, 1, 22], 96, 2)])
def test_gradients_match_dense_one_hot_formulation(backend, sizes, m, offset, rng):
    g = len(sizes) if offset == 0 else 3
    x, w, cot = randn(rng, (m, 16)), randn(rng, (g, 16, 24)), randn(rng, (m, 24))
    sizes_j = jnp.asarray(sizes, jnp.int32)

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w) * cot)

    grads = jax.grad(loss(lambda x, w: pk.gmm(x, w, sizes_j, backend=backend, group_offset=offset)),
                     argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
    dense = jax.grad(loss(lambda x, w: dense_gmm(x, w, sizes_j, offset)), argnums=(0, 1))(jnp.asarray(x),
                                                                                          jnp.asarray(w))
    for got, want in zip(grads, dense):
        assert_close(got, want, 1e-5)


@pytest.mark.parametrize("backend", ["cpu", slow("xla")])  # the dtype rule is ops.py's, shared by both backends
def test_gradients_in_bf16_keep_the_weight_dtype(backend, rng):
    sizes, m = [13, 0, 41, 1, 22], 96
    x, w = randn(rng, (m, 16), ml_dtypes.bfloat16), randn(rng, (5, 16, 8), ml_dtypes.bfloat16)
    sizes_j = jnp.asarray(sizes, jnp.int32)
    f = lambda fn: jax.grad(lambda x, w: jnp.sum(fn(x, w).astype(jnp.float32) ** 2), argnums=(0, 1))(
        jnp.asarray(x), jnp.asarray(w))
    grads = f(lambda x, w: pk.gmm(x, w, sizes_j, backend=backend))
    dense = f(lambda x, w: dense_gmm(x, w, sizes_j))
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
    for got, want in zip(grads, dense):
        assert_close(got, want, 2e-2)


# Every bits with every group size (32, 64, per-channel of k = 128), each bits and each group size both
# symmetric and asymmetric. The default run keeps each bits once, each group size and both symmetries.
QUANT_CASES = [(8, 32, True), slow(8, 64, False), slow(8, None, True), slow(4, 32, False), slow(4, 64, True),
               (4, None, False), slow(3, 32, True), (3, 64, False), slow(3, None, True), slow(2, 32, False),
               (2, 64, True), slow(2, None, False)]


@pytest.mark.parametrize("bits,group_size,symmetric", QUANT_CASES)
def test_quantized_rhs_equals_matmul_with_the_dequantized_weight(bits, group_size, symmetric, rng):
    sizes, m = [13, 0, 41, 1, 22], 96
    x, w = randn(rng, (m, 128)), randn(rng, (5, 128, 16))
    q = pk.quantize_weight(jnp.asarray(w), bits=bits, group_size=group_size, symmetric=symmetric)
    ref = np_gmm(x, np.asarray(q.dequantize(jnp.float32)), np.array(sizes))
    for backend in BACKENDS:
        assert_close(pk.gmm(jnp.asarray(x), q, jnp.asarray(sizes, jnp.int32), backend=backend), ref, 1e-5)


@pytest.mark.parametrize("module", [reference, cpu])
def test_quantized_rhs_with_offset_and_transpose(module, rng):
    sizes, m = [13, 0, 41, 1, 22], 96
    q = pk.quantize_weight(jnp.asarray(randn(rng, (3, 64, 16))), bits=4, group_size=32, symmetric=False)
    w = np.asarray(q.dequantize(jnp.float32))
    x, d = randn(rng, (m, 64)), randn(rng, (m, 16))
    kwargs = dict(group_offset=jnp.int32(2), out_dtype=jnp.float32, interpret=False)
    out = module.gmm(jnp.asarray(x), q, jnp.asarray(sizes, jnp.int32), transpose_rhs=False, **kwargs)
    assert_close(out, np_gmm(x, w, np.array(sizes), 2), 1e-5)
    out_t = module.gmm(jnp.asarray(d), q, jnp.asarray(sizes, jnp.int32), transpose_rhs=True, **kwargs)
    assert_close(out_t, np_gmm(d, w, np.array(sizes), 2, transpose=True), 1e-5)


# xla's part of this gradient (reference.gmm with a quantized rhs, transpose_rhs=True) is held to NumPy by
# test_quantized_rhs_with_offset_and_transpose; the zero cotangent is ops.py's, shared by both backends.
@pytest.mark.parametrize("backend", ["cpu", slow("xla")])
def test_quantized_rhs_is_differentiable_in_lhs(backend, rng):
    sizes, m = [13, 0, 41, 1, 22], 96
    x, cot = randn(rng, (m, 64)), randn(rng, (m, 16))
    q = pk.quantize_weight(jnp.asarray(randn(rng, (5, 64, 16))), bits=3, group_size=32)
    sizes_j = jnp.asarray(sizes, jnp.int32)
    got = jax.grad(lambda x: jnp.sum(pk.gmm(x, q, sizes_j, backend=backend) * cot))(jnp.asarray(x))
    want = jax.grad(lambda x: jnp.sum(dense_gmm(x, q.dequantize(jnp.float32), sizes_j) * cot))(jnp.asarray(x))
    assert_close(got, want, 1e-5)
    dx, dq = jax.grad(lambda x, q: jnp.sum(pk.gmm(x, q, sizes_j, backend=backend)), argnums=(0, 1),
                      allow_int=True)(jnp.asarray(x), q)
    assert dq.codes.dtype == jax.dtypes.float0
    np.testing.assert_array_equal(np.asarray(dq.scale), 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gmm_under_jit_with_traced_sizes_and_offset_equals_eager(backend, rng):
    sizes, m = [13, 0, 41, 1, 22], 96
    x, w = jnp.asarray(randn(rng, (m, 16))), jnp.asarray(randn(rng, (3, 16, 8)))
    jitted = jax.jit(lambda x, w, s, o: pk.gmm(x, w, s, backend=backend, group_offset=o))
    out = jitted(x, w, jnp.asarray(sizes, jnp.int32), jnp.int32(1))
    assert_close(out, np_gmm(np.asarray(x), np.asarray(w), np.array(sizes), 1), 1e-5)


FOLD_LAYOUTS = [([13, 0, 41, 1, 22], 96, 0, 5), ([70, 0, 9, 3], 96, 1, 3), ([600, 3, 0, 300, 129], 1100, 0, 5),
                ([5, 17, 0, 40], 62, 2, 2), ([3, 2], 5, 0, 2), ([0, 0, 0], 40, 0, 3)]
# Every layout on the cpu backend's ladder (whose 256 is above m but for the 1100-row layout). By default the
# other two ladders once each: (512, ..., 64) where its top tile is used (a group of 600 rows), (16,) where a group
# needs several tiles of the one height; every layout with them in the slow tier.
FOLD_CASES = [(cpu.TILE_ROWS, *layout) for layout in FOLD_LAYOUTS] + [
    (heights, *layout) if layout == default else slow(heights, *layout)
    for heights, default in [((512, 256, 128, 64), FOLD_LAYOUTS[2]), ((16,), FOLD_LAYOUTS[0])]
    for layout in FOLD_LAYOUTS]


@pytest.mark.parametrize("heights,sizes,m,offset,num_groups", FOLD_CASES)
def test_fold_group_tiles_visits_each_row_of_the_local_groups_once_with_its_group(heights, sizes, m, offset,
                                                                                   num_groups):
    """Every row of a local group is covered exactly once, by a tile of its own group whose per_group context is
    that group's; rows of other groups and past the groups are never claimed; an empty group's per_group never
    runs."""
    ends = np.cumsum(sizes)
    expected_group = np.full(m, -1)  # local group of each row, -1 for rows no local group owns
    for i in range(num_groups):
        expected_group[ends[offset + i] - sizes[offset + i]:ends[offset + i]] = i

    def tile(carry, ctx, i, start, rows, valid):
        visits_m, group_m, heights_seen = carry
        mine = jnp.ones(rows, bool) if valid is None else valid
        row = start + jnp.arange(rows)
        visits_m = visits_m.at[row].add(mine.astype(jnp.int32))
        group_m = group_m.at[row].max(jnp.where(mine, ctx, -1))
        return visits_m, group_m, heights_seen.at[rows].add(1)

    per_group_calls = []

    def per_group(i):
        jax.debug.callback(lambda i: per_group_calls.append(int(i)), i)
        return i

    start = (jnp.zeros(m, jnp.int32), jnp.full(m, -1, jnp.int32), jnp.zeros(m + 1, jnp.int32))
    visits, groups, heights_seen = jax.jit(lambda s: tiles.fold_group_tiles(
        tile, start, s, num_rows=m, heights=heights, per_group=per_group, group_offset=offset,
        num_groups=num_groups))(jnp.asarray(sizes, jnp.int32))
    np.testing.assert_array_equal(visits, expected_group >= 0)
    np.testing.assert_array_equal(groups, expected_group)
    jax.effects_barrier()
    local_sizes = sizes[offset:offset + num_groups]
    assert sorted(per_group_calls) == [i for i, size in enumerate(local_sizes) if size > 0]
    used = {r for r in range(m + 1) if heights_seen[r]}
    assert used <= set(heights) | {m}  # heights above m give way to one tile of m rows
    if max(local_sizes) >= heights[0] and m >= heights[0]:
        assert heights[0] in used


@pytest.mark.parametrize("heights", [(), (64, 16), (128, 64, 64), (8, 16), (0,), (16.0, 8.0)])
def test_fold_group_tiles_refuses_heights_that_are_not_a_halving_ladder(heights):
    with pytest.raises(ValueError, match=r"heights=.*each half the one before"):
        tiles.fold_group_tiles(lambda c, *_: c, 0, jnp.array([4, 4]), num_rows=8, heights=heights)
    with pytest.raises(ValueError, match=r"heights=.*each half the one before"):
        tiles.fold_row_tiles(lambda c, *_: c, 0, jnp.int32(0), jnp.int32(4), num_rows=8, heights=heights)


@pytest.mark.parametrize("bits", [None, 4])
def test_group_weight_is_one_group_of_the_whole_weight(bits, rng):
    w = jnp.asarray(randn(rng, (3, 64, 16)))
    rhs = w if bits is None else pk.quantize_weight(w, bits=bits, group_size=32, symmetric=False)
    whole = np.asarray(w if bits is None else rhs.dequantize(jnp.float32), np.float32)
    for i in range(3):
        one = jax.jit(tiles.group_weight, static_argnums=2)(rhs, jnp.int32(i), jnp.bfloat16)
        assert one.dtype == jnp.bfloat16 and one.shape == (64, 16)
        np.testing.assert_array_equal(np.asarray(one, np.float32), whole[i].astype(ml_dtypes.bfloat16))


def test_auto_on_cpu_resolves_to_the_cpu_backend_then_xla():
    assert jax.default_backend() == "cpu"
    assert pk.backends("gmm") == ("cpu", "xla") and pk.backends("tgmm") == ("cpu", "xla")
    assert [(n, f) for n, f in registry.resolve("gmm")] == [("cpu", cpu.gmm), ("xla", reference.gmm)]
    assert [(n, f) for n, f in registry.resolve("tgmm", "cpu")] == [("cpu", cpu.tgmm), ("xla", reference.tgmm)]
    assert [n for n, _ in registry.resolve("gmm", "xla")] == ["xla"]
    assert pk.backends("sparsemixer_top2") == ("xla",)


def test_bad_inputs_raise_clear_errors(rng):
    x, w, sizes = jnp.asarray(randn(rng, (16, 8))), jnp.asarray(randn(rng, (3, 8, 4))), jnp.array([4, 4, 4])
    with pytest.raises(ValueError, match=r"lhs has shape \(2, 16, 8\).*\[m, k\]"):
        pk.gmm(x[None].repeat(2, 0), w, sizes)
    with pytest.raises(ValueError, match=r"lhs \(16, 8\) has k=8 but rhs \(3, 6, 4\) has k=6"):
        pk.gmm(x, w[:, :6], sizes)
    with pytest.raises(ValueError, match=r"group_sizes has 2 entries but rhs \(3, 8, 4\) has 3 groups"):
        pk.gmm(x, w, sizes[:2])
    with pytest.raises(ValueError, match=r"group_sizes has dtype float32; expected an integer"):
        pk.gmm(x, w, sizes.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"group_sizes has shape \(1, 3\); expected a 1-D"):
        pk.gmm(x, w, sizes[None])
    with pytest.raises(ValueError, match=r"rhs has shape \(8, 4\).*\[groups, k, n\]"):
        pk.gmm(x, w[0], sizes)
    with pytest.raises(ValueError, match=r"sum 17\) must be >= 0 and sum to at most the 16 rows"):
        pk.gmm(x, w, jnp.array([4, 4, 9]))
    with pytest.raises(ValueError, match=r"group_offset=1 with 3 local groups needs 0 <= group_offset <= 0"):
        pk.gmm(x, w, sizes, group_offset=1)
    with pytest.raises(ValueError, match=r"backend='triton' is not an implementation of gmm.*\['cpu', "
                                         r"'pallas_gpu', 'pallas_tpu', 'xla'\]"):
        pk.gmm(x, w, sizes, backend="triton")
    with pytest.raises(ValueError, match=r"backend='pallas_tpu' runs on \['tpu'\], not on 'cpu'.*interpret=True"):
        pk.gmm(x, w, sizes, backend="pallas_tpu")
    with pytest.raises(ValueError, match=r"preferred_element_type"):
        pk.gmm(x, w, sizes, preferred_element_type=jnp.int32)
    with pytest.raises(ValueError, match=r"lhs \(16, 8\) and dout \(12, 4\) have different row counts"):
        pk.tgmm(x, x[:12, :4], sizes, num_groups=3)
    with pytest.raises(ValueError, match=r"group_sizes has 3 entries but num_groups=4 has 4 groups"):
        pk.tgmm(x, x[:, :4], sizes, num_groups=4)
    with pytest.raises(ValueError, match=r"num_groups=0"):
        pk.tgmm(x, x[:, :4], sizes, num_groups=0)
