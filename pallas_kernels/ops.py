"""The public grouped matmuls: `gmm` (differentiable, a custom VJP) and `tgmm` (the weight gradient).

Each checks its inputs once, then runs jitted (the backend, interpret mode and output dtype are static): the
implementations to try come from pallas_kernels.registry ("auto" or a name, then "xla"), and the first that does
not raise NotImplementedError runs. The VJP of gmm is dlhs = gmm(dout, rhs, transpose_rhs=True) and
drhs = tgmm(lhs, dout), both through the same implementations (dout cast to lhs's dtype first).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import registry
from pallas_kernels.quant import QuantizedWeight


def gmm(lhs: jax.Array, rhs: jax.Array | QuantizedWeight, group_sizes: jax.Array, *, backend: str = "auto",
        group_offset: jax.Array | int | None = None, interpret=False, preferred_element_type=None) -> jax.Array:
    """lhs [m, k] (rows sorted by group), rhs [g, k, n] float or QuantizedWeight, group_sizes int [G] -> [m, n].

    Rows of group group_offset + i (default offset 0) multiply rhs[i]; rows of other groups and rows past
    sum(group_sizes) are zero. Output dtype: preferred_element_type, else lhs's; accumulation is fp32.
    backend: "auto" or a name from `pallas_kernels.backends("gmm")` / registry.IMPLEMENTATIONS; interpret:
    True or a Pallas InterpretParams to run a Pallas backend in interpret mode. Differentiable in lhs and in a
    float rhs (a QuantizedWeight gets zero cotangents).
    """
    _check_gmm_inputs(lhs, rhs, group_sizes, group_offset, preferred_element_type)
    out_dtype = jnp.dtype(lhs.dtype if preferred_element_type is None else preferred_element_type)
    dispatch = _Dispatch(backend, interpret, out_dtype)
    return _gmm_jit(lhs, rhs, jnp.asarray(group_sizes, jnp.int32), _offset_array(group_offset), dispatch)


def tgmm(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *, num_groups: int, backend: str = "auto",
         group_offset: jax.Array | int | None = None, interpret=False) -> jax.Array:
    """lhs [m, k], dout [m, n], group_sizes int [G] -> float32 [num_groups, k, n]: result[i] sums
    lhs[r].T @ dout[r] over the rows r of group group_offset + i (zeros for an empty group). backend and
    interpret as in `gmm`."""
    _check_tgmm_inputs(lhs, dout, group_sizes, num_groups, group_offset)
    dispatch = _Dispatch(backend, interpret, jnp.dtype(jnp.float32))
    return _tgmm_jit(lhs, dout, jnp.asarray(group_sizes, jnp.int32), _offset_array(group_offset), num_groups,
                     dispatch)


@dataclasses.dataclass(frozen=True)
class _Dispatch:
    """The static half of a call (hashable: it keys the jit cache). Resolving checks the backend name."""

    backend: str
    interpret: Any
    out_dtype: np.dtype

    def __post_init__(self):
        registry.resolve("gmm", self.backend, interpret=self.interpret)

    def call(self, op: str, *args, **kwargs) -> jax.Array:
        """Calls the implementations of op in order; one raising NotImplementedError passes to the next."""
        reasons = []
        for name, impl in registry.resolve(op, self.backend, interpret=self.interpret):
            try:
                return impl(*args, interpret=self.interpret, **kwargs)
            except NotImplementedError as e:
                reasons.append(f"{name}: {e}")
        raise NotImplementedError(f"no implementation of {op} handled this call: " + "; ".join(reasons))


def _gmm_forward(lhs, rhs, group_sizes, group_offset, dispatch: _Dispatch) -> jax.Array:
    return dispatch.call("gmm", lhs, rhs, group_sizes, group_offset=group_offset, transpose_rhs=False,
                         out_dtype=dispatch.out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm(lhs, rhs, group_sizes, group_offset, dispatch: _Dispatch) -> jax.Array:
    return _gmm_forward(lhs, rhs, group_sizes, group_offset, dispatch)


def _gmm_fwd(lhs, rhs, group_sizes, group_offset, dispatch):
    return _gmm_forward(lhs, rhs, group_sizes, group_offset, dispatch), (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(dispatch, residuals, dout):
    lhs, rhs, group_sizes, group_offset = residuals
    dout = dout.astype(lhs.dtype)
    dlhs = dispatch.call("gmm", dout, rhs, group_sizes, group_offset=group_offset, transpose_rhs=True,
                         out_dtype=lhs.dtype)
    if isinstance(rhs, QuantizedWeight):
        drhs = rhs.zero_cotangent()
    else:
        drhs = dispatch.call("tgmm", lhs, dout, group_sizes, group_offset=group_offset,
                             num_groups=rhs.shape[0]).astype(rhs.dtype)
    return dlhs, drhs, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)
_gmm_jit = jax.jit(_gmm, static_argnums=(4,))


@functools.partial(jax.jit, static_argnums=(4, 5))
def _tgmm_jit(lhs, dout, group_sizes, group_offset, num_groups: int, dispatch: _Dispatch) -> jax.Array:
    return dispatch.call("tgmm", lhs, dout, group_sizes, group_offset=group_offset, num_groups=num_groups)


def _offset_array(group_offset) -> jax.Array:
    return jnp.zeros((), jnp.int32) if group_offset is None else jnp.asarray(group_offset, jnp.int32)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_group_sizes(group_sizes, num_groups: int, num_rows: int, group_offset, what: str) -> None:
    """group_sizes int [G >= num_groups]; concrete values also: no negative size, sum <= num_rows, and
    0 <= group_offset <= G - num_groups."""
    shape, dtype = getattr(group_sizes, "shape", None), getattr(group_sizes, "dtype", None)
    if shape is None or len(shape) != 1:
        raise ValueError(f"group_sizes has shape {shape}; expected a 1-D [G] array of row counts per group")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"group_sizes has dtype {dtype}; expected an integer dtype (int32)")
    if shape[0] < num_groups:
        raise ValueError(f"group_sizes has {shape[0]} entries but {what} has {num_groups} groups; pass one size "
                         "per group (G >= the number of local groups)")
    if group_offset is not None:
        if np.ndim(group_offset) != 0 or not jnp.issubdtype(jnp.result_type(group_offset), jnp.integer):
            raise ValueError(f"group_offset={group_offset!r}; expected an integer scalar (the first local group)")
        if _is_concrete(group_offset) and not 0 <= int(group_offset) <= shape[0] - num_groups:
            raise ValueError(f"group_offset={int(group_offset)} with {num_groups} local groups needs "
                             f"0 <= group_offset <= {shape[0] - num_groups} (group_sizes has {shape[0]} groups)")
    if _is_concrete(group_sizes):
        sizes = np.asarray(group_sizes)
        if (sizes < 0).any() or sizes.sum() > num_rows:
            raise ValueError(f"group_sizes {sizes.tolist()[:16]} (sum {sizes.sum()}) must be >= 0 and sum to at "
                             f"most the {num_rows} rows of lhs")


def _check_gmm_inputs(lhs, rhs, group_sizes, group_offset, preferred_element_type) -> None:
    if getattr(lhs, "ndim", None) != 2 or not jnp.issubdtype(lhs.dtype, jnp.floating):
        raise ValueError(f"lhs has shape {getattr(lhs, 'shape', None)} and dtype {getattr(lhs, 'dtype', None)}; "
                         "expected a float [m, k] array (flatten leading dimensions into m)")
    if not isinstance(rhs, QuantizedWeight):
        if getattr(rhs, "ndim", None) != 3 or not jnp.issubdtype(rhs.dtype, jnp.floating):
            raise ValueError(f"rhs has shape {getattr(rhs, 'shape', None)} and dtype "
                             f"{getattr(rhs, 'dtype', None)}; expected a float [groups, k, n] array or a "
                             "QuantizedWeight (use w[None] for a single [k, n] matrix)")
    g, k, _ = rhs.shape
    if lhs.shape[1] != k:
        raise ValueError(f"lhs {lhs.shape} has k={lhs.shape[1]} but rhs {tuple(rhs.shape)} has k={k}; the "
                         "contracted dimensions must match")
    _check_group_sizes(group_sizes, g, lhs.shape[0], group_offset, f"rhs {tuple(rhs.shape)}")
    if preferred_element_type is not None and not jnp.issubdtype(preferred_element_type, jnp.floating):
        raise ValueError(f"preferred_element_type={preferred_element_type!r}; expected None or a float dtype")


def _check_tgmm_inputs(lhs, dout, group_sizes, num_groups, group_offset) -> None:
    for name, x in (("lhs", lhs), ("dout", dout)):
        if getattr(x, "ndim", None) != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} has shape {getattr(x, 'shape', None)} and dtype "
                             f"{getattr(x, 'dtype', None)}; expected a float 2-D array")
    if lhs.shape[0] != dout.shape[0]:
        raise ValueError(f"lhs {lhs.shape} and dout {dout.shape} have different row counts; both are [m, ...] "
                         "with the same rows")
    if not isinstance(num_groups, (int, np.integer)) or num_groups <= 0:
        raise ValueError(f"num_groups={num_groups!r}; expected a positive int (the groups of the weight gradient)")
    _check_group_sizes(group_sizes, num_groups, lhs.shape[0], group_offset, f"num_groups={num_groups}")
