"""Dispatch: sort the t·k token copies by expert, drop copies past capacity; un-sort with a weighted sum over k.

Names: t tokens, k copies per token (top-k), m = t·k copies, e experts, d model width. A copy's flat id is
t·k + j (token t, slot j), so flat order is token order. Pure functions over arrays; no parameters.

    x_td --permute--> x_md (sorted by expert; kept copies first, grouped by `group_sizes_e`)
    out_md --unpermute(weights_tk)--> y_td (un-sorted and summed over k with the routing weights, in fp32)

Both carry a custom VJP made of gathers by the inverse index (MaxText's permute/unpermute), so the backward
pass has no scatter-add.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """Where each token copy goes (after MaxText's RouteOutput). int32 arrays (kept_tk: bool), static shapes.

    sorted_copy_m:   flat copy id at each sorted position; kept copies come first, grouped by expert in
                     increasing expert order, each group in token order; dropped copies (capacity) come last.
    sorted_pos_tk:   sorted position of copy (t, j): the inverse permutation, shaped per token.
    group_sizes_e:   kept copies per expert; sum(group_sizes_e) = m on the dropless path.
    kept_tk:         bool, whether copy (t, j) is computed (all True on the dropless path).
    """

    sorted_copy_m: jax.Array
    sorted_pos_tk: jax.Array
    group_sizes_e: jax.Array
    kept_tk: jax.Array

    @property
    def top_k(self) -> int:
        return self.sorted_pos_tk.shape[1]


jax.tree_util.register_dataclass(Dispatch, data_fields=[f.name for f in dataclasses.fields(Dispatch)],
                                 meta_fields=[])


def expert_capacity(num_copies: int, num_experts: int, capacity_factor: float) -> int | None:
    """Copies kept per expert: ceil(m / e · capacity_factor), or None (dropless) when capacity_factor < 0."""
    if capacity_factor == 0 or not math.isfinite(capacity_factor):
        raise ValueError(f"capacity_factor={capacity_factor!r}: use a value < 0 for dropless routing or > 0 to "
                         "keep ceil(tokens·k / experts · capacity_factor) copies per expert")
    if capacity_factor < 0:
        return None
    return math.ceil(num_copies / num_experts * capacity_factor)


def route(experts_tk: jax.Array, num_experts: int, *, capacity_factor: float = -1.0) -> Dispatch:
    """experts_tk int [t, k] in [0, e) -> Dispatch. capacity_factor > 0 keeps, per expert, the first
    ceil(t·k / e · capacity_factor) copies in token order and drops the rest; < 0 keeps every copy."""
    t, k = experts_tk.shape
    m = t * k
    expert_m = experts_tk.reshape(m).astype(jnp.int32)
    capacity = expert_capacity(m, num_experts, capacity_factor)
    # A stable sort keeps each expert's copies in token order, which is what "the first copies" means.
    order_m = jnp.argsort(expert_m, stable=True).astype(jnp.int32)
    if capacity is None:
        kept_m = jnp.ones((m,), bool)
    else:
        counts_e = jnp.bincount(expert_m, length=num_experts).astype(jnp.int32)
        starts_e = jnp.cumsum(counts_e) - counts_e
        sorted_expert_m = expert_m[order_m]
        rank_in_expert_m = jnp.arange(m, dtype=jnp.int32) - starts_e[sorted_expert_m]
        kept_m = _scatter_positions(order_m, rank_in_expert_m < capacity)
        # Re-sort with dropped copies keyed past the last expert: kept copies stay grouped, drops go last.
        expert_m = jnp.where(kept_m, expert_m, num_experts)
        order_m = jnp.argsort(expert_m, stable=True).astype(jnp.int32)
    group_sizes_e = jnp.bincount(expert_m, length=num_experts).astype(jnp.int32)  # drops (id e) not counted
    sorted_pos_m = _scatter_positions(order_m, jnp.arange(m, dtype=jnp.int32))
    return Dispatch(sorted_copy_m=order_m, sorted_pos_tk=sorted_pos_m.reshape(t, k), group_sizes_e=group_sizes_e,
                    kept_tk=kept_m.reshape(t, k))


def _scatter_positions(order_m: jax.Array, values_m: jax.Array) -> jax.Array:
    """out[order_m[i]] = values_m[i]: moves per-sorted-position values back to flat copy order (integer data)."""
    return jnp.zeros_like(values_m).at[order_m].set(values_m, unique_indices=True)


def permute(x_td: jax.Array, dispatch: Dispatch) -> jax.Array:
    """x [t, d] -> x_md [t·k, d], the token copies in sorted order (dropped copies included, at the end)."""
    return _gather_copies(x_td, dispatch.sorted_copy_m // dispatch.top_k, dispatch.sorted_pos_tk)


def unpermute(out_md: jax.Array, weights_tk: jax.Array, dispatch: Dispatch) -> jax.Array:
    """out_md [t·k, d] in sorted order -> y [t, d] float32, y[t] = Σ_j w[t, j]·out[copy (t, j)] over kept copies
    (dropped copies add zero). Un-sorting and the weighted sum are one gather-and-reduce: no [t, k, d] buffer."""
    weights_tk = jnp.where(dispatch.kept_tk, weights_tk.astype(jnp.float32), 0.0)
    return _combine_copies(out_md, weights_tk, dispatch.sorted_pos_tk, dispatch.sorted_copy_m)


@jax.custom_vjp
def _gather_copies(x_td: jax.Array, token_m: jax.Array, sorted_pos_tk: jax.Array) -> jax.Array:
    """x_md[i] = x[token_m[i]]; token t's copies land at rows sorted_pos_tk[t]."""
    return x_td[token_m]


def _gather_copies_fwd(x_td, token_m, sorted_pos_tk):
    return x_td[token_m], sorted_pos_tk


def _gather_copies_bwd(sorted_pos_tk, dx_md):
    # dx[t] = Σ_j dx_md[sorted_pos[t, j]]: a gather by the inverse permutation, not autodiff's scatter-add.
    return dx_md[sorted_pos_tk].sum(axis=1), None, None


_gather_copies.defvjp(_gather_copies_fwd, _gather_copies_bwd)


@jax.custom_vjp
def _combine_copies(out_md, weights_tk, sorted_pos_tk, sorted_copy_m):
    """y[t] = Σ_j w[t, j]·out[sorted_pos_tk[t, j]] in fp32; sorted row i is flat copy sorted_copy_m[i]."""
    return jnp.sum(out_md[sorted_pos_tk].astype(jnp.float32) * weights_tk[..., None], axis=1)


def _combine_copies_fwd(out_md, weights_tk, sorted_pos_tk, sorted_copy_m):
    y_td = _combine_copies.fun(out_md, weights_tk, sorted_pos_tk, sorted_copy_m)
    return y_td, (out_md, weights_tk, sorted_pos_tk, sorted_copy_m)


def _combine_copies_bwd(residuals, dy_td):
    out_md, weights_tk, sorted_pos_tk, sorted_copy_m = residuals
    k = weights_tk.shape[1]
    # Sorted row i is copy c = sorted_copy_m[i] of token c // k: d out[i] = w[c]·dy[c // k], a gather.
    dout_md = dy_td[sorted_copy_m // k] * weights_tk.reshape(-1)[sorted_copy_m][:, None]
    dweights_tk = jnp.sum(out_md[sorted_pos_tk].astype(jnp.float32) * dy_td[:, None, :], axis=-1)
    return dout_md.astype(out_md.dtype), dweights_tk, None, None


_combine_copies.defvjp(_combine_copies_fwd, _combine_copies_bwd)
