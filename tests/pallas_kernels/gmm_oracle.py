"""NumPy oracles shared by the Pallas gmm kernel tests (test_pk_gmm_tpu.py, test_pk_gmm_gpu.py)."""

import jax.numpy as jnp
import numpy as np


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def randn(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype)


def np_gmm(lhs, rhs, group_sizes, group_offset, transpose_rhs=False):
    """float64 loop: rows of group group_offset + i times rhs[i] (or rhs[i].T); all other rows zero."""
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    ends = np.cumsum(group_sizes)
    out = np.zeros((lhs.shape[0], rhs.shape[1] if transpose_rhs else rhs.shape[2]))
    for i in range(rhs.shape[0]):
        stop = ends[group_offset + i]
        start = stop - group_sizes[group_offset + i]
        out[start:stop] = lhs[start:stop] @ (rhs[i].T if transpose_rhs else rhs[i])
    return out


def np_tgmm(lhs, dout, group_sizes, group_offset, num_groups):
    """float64: [num_groups, k, n], group g's lhs rows transposed times its dout rows."""
    lhs, dout = np.asarray(lhs, np.float64), np.asarray(dout, np.float64)
    ends = np.cumsum(group_sizes)
    starts = ends - group_sizes
    return np.stack([lhs[starts[g]:ends[g]].T @ dout[starts[g]:ends[g]]
                     for g in range(group_offset, group_offset + num_groups)])
