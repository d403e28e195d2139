"""The experts' SwiGLU feed-forward over token copies sorted by expert (`moe_ffn`), and its dense-masked twin.

Expert e computes down(silu(gate(x)) * up(x)) with `w_gate_up` [e, d, 2f] ([..., :f] gate, [..., f:] up) and
`w_down` [e, f, d]; a token's output is Σ_j w[t, j]·Expert_{experts[t, j]}(x_t) in fp32, weights as given (no
renormalisation). Both functions take the same parameters, so `dense_moe_reference` checks `moe_ffn`.

Either expert weight may also be a `pallas_kernels.QuantizedWeight` of the same (g, k, n) shape (from
`jaxmoe.quantize`): a forward-only weight, differentiable in x but not in the weight.

The expert computation over the sorted copies, `expert_ffn`, picks an implementation from `IMPLEMENTATIONS`:
  "pallas"      two grouped matmuls through `pallas_kernels.gmm` (its "auto" backend: the Pallas kernel on GPU /
                TPU, XLA elsewhere) with SwiGLU between; the default off CPU. Quantized weights go into the kernel
                packed.
  "xla_ragged"  the same with `lax.ragged_dot` (a quantized weight is dequantized whole first).
  "blocked"     the CPU path: one loop over row tiles (the "cpu" gmm backend's, `pallas_kernels.grouped.tiles`)
                that runs gate_up -> SwiGLU -> down per tile (XLA:CPU runs `ragged_dot` about 15x slower than a
                dense matmul of the same FLOPs); a quantized weight is dequantized one expert at a time, once per
                non-empty expert.
  "decode"      the CPU path for a few rows (decoding: t·k copies, at most DECODE_MAX_ROWS): one loop over the
                experts that received a copy, each multiplying all the rows and keeping its own, so a step reads
                each active expert's weights once and nothing else. Quantized weights are dequantized one expert
                at a time, as "blocked" does. Its backward is "blocked"'s.
  "decode_int8" "decode", with quantized weights multiplied as int8 codes by int8-rounded activations
                (`pallas_kernels.grouped.int8`: int32 accumulation per weight group, no float copy of a weight);
                within `activation_rounding_bound` of "decode". Float weights go as in "decode".
"auto" picks "pallas" off CPU; on CPU "decode_int8" for a few rows and a quantized weight, "decode" for a few rows,
"blocked" otherwise (measured: experiments/bench/moe_decode.py, BENCHMARKS.md).

Either weight may also be a `PerExpertWeights` (the same [e, k, n] weight held as one buffer per expert): the
"decode" paths then multiply by the routed expert's own buffer (a `lax.switch` over the experts) instead of slicing
it out of the stacked array, which XLA:CPU does by copying the slice on every call; the other implementations take
it stacked again. `jaxmoe.generate` builds it once per call for its decode loop (`split_experts`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pallas_kernels
from jax import lax
from pallas_kernels import QuantizedWeight
from pallas_kernels.grouped.int8 import int8_matmul
from pallas_kernels.grouped.tiles import add_to_group, fold_group_tiles, group_weight, quantized_group, write_rows

from jaxmoe.moe.dispatch import permute, route, unpermute

# Row-tile heights of the "blocked" path, largest first, each half the one before (`fold_group_tiles`). Measured
# on experiments/bench/moe_layer.py: a single height of 128 rows (all tiles masked) was 10% slower, 512 rows 20%.
TILE_ROWS = (512, 256, 128, 64)
# "auto" takes the "decode" paths on CPU for buffers of at most this many token copies (batch x top_k at decode).
DECODE_MAX_ROWS = 64
# The "decode" paths multiply an active expert's rows in tiles of this many (the last one shifted back inside the
# buffer, masked): at decode most experts hold one or two copies.
DECODE_TILE_ROWS = 2


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PerExpertWeights:
    """An expert weight [e, k, n] as e separate buffers: float [k, n] arrays, or QuantizedWeights of shape (1, k, n)
    (still packed). `split_experts` makes one, `stacked` gives the [e, k, n] weight back."""

    parts: tuple

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.parts),) + tuple(self.parts[0].shape[-2:])

    @property
    def quantized(self) -> bool:
        return isinstance(self.parts[0], QuantizedWeight)

    def stacked(self):
        """The [e, k, n] array or QuantizedWeight these parts were split from."""
        if not self.quantized:
            return jnp.stack(self.parts)
        join = lambda *fields: None if fields[0] is None else jnp.concatenate(fields)  # noqa: E731
        first = self.parts[0]
        return dataclasses.replace(first, codes=join(*(p.codes for p in self.parts)),
                                   scale=join(*(p.scale for p in self.parts)),
                                   zero=join(*(p.zero for p in self.parts)), shape=self.shape)


def split_experts(w) -> PerExpertWeights:
    """An expert weight [e, k, n] (float array or QuantizedWeight) -> PerExpertWeights: one copy of every expert's
    matrix in a buffer of its own (the memory of the weight once more, for as long as the result lives)."""
    if isinstance(w, PerExpertWeights):
        return w
    if isinstance(w, QuantizedWeight):
        return PerExpertWeights(tuple(quantized_group(w, i) for i in range(w.shape[0])))
    return PerExpertWeights(tuple(w[i] for i in range(w.shape[0])))


def moe_ffn(x_td: jax.Array, weights_tk: jax.Array, experts_tk: jax.Array, w_gate_up: jax.Array,
            w_down: jax.Array, *, capacity_factor: float = -1.0, implementation: str = "auto") -> jax.Array:
    """x [t, d], weights float [t, k], experts int [t, k] -> y [t, d] in x's dtype (weighted sum in fp32).

    capacity_factor < 0: every copy is computed (dropless). > 0: each expert keeps its first
    ceil(t·k / e · capacity_factor) copies in token order; the others add zero. implementation: see
    `expert_ffn`. Differentiable in x, weights, and float w_gate_up and w_down (QuantizedWeights get zero
    cotangents).
    """
    check_moe_ffn_inputs(x_td, weights_tk, experts_tk, w_gate_up, w_down)
    dispatch = route(experts_tk, w_gate_up.shape[0], capacity_factor=capacity_factor)
    out_md = expert_ffn(permute(x_td, dispatch), w_gate_up, w_down, dispatch.group_sizes_e,
                        implementation=implementation)
    return unpermute(out_md, weights_tk, dispatch).astype(x_td.dtype)


def dense_moe_reference(x_td: jax.Array, weights_tk: jax.Array, experts_tk: jax.Array, w_gate_up: jax.Array,
                        w_down: jax.Array) -> jax.Array:
    """The obviously correct twin of `moe_ffn` (dropless): every token through every expert, masked combine.
    Costs e/k times the FLOPs of `moe_ffn`; meant for tests and for checking a run. A QuantizedWeight is
    dequantized whole (to its float dtype) first."""
    check_moe_ffn_inputs(x_td, weights_tk, experts_tk, w_gate_up, w_down)
    w_gate_up, w_down = (w.dequantize() if isinstance(w, QuantizedWeight) else w for w in (w_gate_up, w_down))
    e = w_gate_up.shape[0]
    hi = lax.Precision.HIGHEST
    h_et2f = jnp.einsum("td,edf->etf", x_td, w_gate_up, precision=hi)
    out_etd = jnp.einsum("etf,efd->etd", _swiglu(h_et2f), w_down, precision=hi)
    combine_te = jnp.einsum("tk,tke->te", weights_tk.astype(jnp.float32),
                            jax.nn.one_hot(experts_tk, e, dtype=jnp.float32), precision=hi)
    return jnp.einsum("etd,te->td", out_etd.astype(jnp.float32), combine_te, precision=hi).astype(x_td.dtype)


def expert_ffn(x_md: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, group_sizes_e: jax.Array, *,
               implementation: str = "auto") -> jax.Array:
    """Rows [s_e, s_e + group_sizes_e[e]) of x [m, d] through expert e -> [m, d], s_e = Σ_{i<e} sizes; rows
    past sum(group_sizes_e) are zero. implementation: "auto" ("blocked" on CPU, "pallas" elsewhere) or a key of
    IMPLEMENTATIONS. Either weight may be a QuantizedWeight, dequantized to the compute dtype (x's and the float
    weights' result type). Differentiable in x_md and float w_gate_up and w_down."""
    e, d, two_f = w_gate_up.shape
    if x_md.ndim != 2 or x_md.shape[1] != d or w_down.shape != (e, two_f // 2, d):
        raise ValueError(f"expert_ffn needs x [m, d], w_gate_up [e, d, 2f], w_down [e, f, d]; got x {x_md.shape}, "
                         f"w_gate_up {w_gate_up.shape}, w_down {w_down.shape}")
    if group_sizes_e.shape != (e,):
        raise ValueError(f"group_sizes_e has shape {group_sizes_e.shape}; expected ({e},), one size per expert of "
                         f"w_gate_up {w_gate_up.shape}")
    quantized = [isinstance(w, QuantizedWeight) or (isinstance(w, PerExpertWeights) and w.quantized)
                 for w in (w_gate_up, w_down)]
    name = resolve_implementation(implementation, rows=x_md.shape[0], quantized=any(quantized))
    split = name in ("decode", "decode_int8") and isinstance(w_gate_up, PerExpertWeights) and isinstance(
        w_down, PerExpertWeights)
    if not split:
        w_gate_up, w_down = (w.stacked() if isinstance(w, PerExpertWeights) else w for w in (w_gate_up, w_down))
    floats = [w for w, q in zip((w_gate_up, w_down), quantized, strict=True) if not q]
    dtype = jnp.result_type(x_md, *(w.parts[0] if isinstance(w, PerExpertWeights) else w for w in floats))
    w_gate_up, w_down = (w if q else _cast(w, dtype) for w, q in zip((w_gate_up, w_down), quantized, strict=True))
    group_sizes_e = group_sizes_e.astype(jnp.int32)
    if split:  # no custom rule: differentiable through lax.switch like any XLA program
        return _decode_forward(x_md.astype(dtype), w_gate_up, w_down, group_sizes_e, name == "decode_int8")
    return IMPLEMENTATIONS[name](x_md.astype(dtype), w_gate_up, w_down, group_sizes_e)


def _cast(w, dtype):
    if isinstance(w, PerExpertWeights):
        return PerExpertWeights(tuple(p.astype(dtype) for p in w.parts))
    return w.astype(dtype)


def resolve_implementation(implementation: str, *, rows: int | None = None, quantized: bool = False) -> str:
    """"auto" -> "pallas" off CPU; on CPU, for a buffer of `rows` <= DECODE_MAX_ROWS token copies, "decode_int8"
    when a weight is `quantized` and "decode" otherwise, and "blocked" for more rows (or rows None). Other names
    are checked against IMPLEMENTATIONS."""
    if implementation == "auto":
        if jax.default_backend() != "cpu":
            return "pallas"
        if rows is not None and rows <= DECODE_MAX_ROWS:
            return "decode_int8" if quantized else "decode"
        return "blocked"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; expected 'auto' or one of {sorted(IMPLEMENTATIONS)}")
    return implementation


def _swiglu(h: jax.Array) -> jax.Array:
    """[..., 2f] -> [..., f]: silu(gate) * up, gate first."""
    f = h.shape[-1] // 2
    return jax.nn.silu(h[..., :f]) * h[..., f:]


def _two_grouped_matmuls(grouped_matmul: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]) -> Callable:
    """An expert_ffn implementation from a grouped matmul (lhs [m, k], rhs [e, k, n] float or QuantizedWeight,
    group_sizes [e]) -> [m, n] in lhs's dtype."""
    def ffn(x_md, w_gate_up, w_down, group_sizes_e):
        return grouped_matmul(_swiglu(grouped_matmul(x_md, w_gate_up, group_sizes_e)), w_down, group_sizes_e)
    return ffn


def _ragged_dot(lhs_md: jax.Array, rhs_ekn, group_sizes_e: jax.Array) -> jax.Array:
    if isinstance(rhs_ekn, QuantizedWeight):
        rhs_ekn = rhs_ekn.dequantize(lhs_md.dtype)
    return lax.ragged_dot(lhs_md, rhs_ekn, group_sizes_e, preferred_element_type=jnp.float32).astype(lhs_md.dtype)


# The "blocked" CPU path. Each expert's rows are cut into row tiles (`pallas_kernels.grouped.tiles`, heights
# TILE_ROWS) inside `fori_loop`s whose trip counts come from group_sizes_e, and each tile runs gate_up -> SwiGLU ->
# down as ordinary matmuls against that expert's weights. On the 2-core benchmark machine the layer is bound by
# memory traffic (a fresh page costs about 0.3 ms per MB), so the whole FFN runs per tile and the backward
# recomputes the tile's gate_up product instead of keeping it: no [m, 2f] or [m, f] activation or gradient buffer
# exists in either pass. Alternatives measured by experiments/bench/moe_layer.py --alternatives (figures in
# BENCHMARKS.md), all slower: the same tiles as two separate grouped matmuls with SwiGLU between (materialises
# those buffers), the fused tiles keeping h for the backward, one batched einsum over padded [blocks, B, d] with
# each block's expert weight gathered (a weight copy per block), and lax.ragged_dot. A dense [e, C, d] buffer or a
# one-hot dense formulation would need e/k times the FLOPs to stay dropless (C = t).
def _fold_expert_tiles(tile: Callable, carry, x_md, w_gate_up, w_down, group_sizes_e):
    """Folds `tile(carry, (w_gate_up[e] [d, 2f], w_down[e] [f, d]), e, start, rows, valid)` over every expert's
    row tiles of the sorted buffer x [m, d]; the weights come in x's dtype (a QuantizedWeight dequantized one
    expert at a time), empty experts cost nothing (decoding touches k experts)."""
    def expert_weights(e):
        return group_weight(w_gate_up, e, x_md.dtype), group_weight(w_down, e, x_md.dtype)

    return fold_group_tiles(tile, carry, group_sizes_e, num_rows=x_md.shape[0], heights=TILE_ROWS,
                            per_group=expert_weights)


def _matmul(a, b, contract):
    return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def _blocked_forward(x_md, w_gate_up, w_down, group_sizes_e):
    def tile(out_md, weights, e, start, rows, valid):
        w_d2f, w_fd = weights
        h = _matmul(lax.dynamic_slice_in_dim(x_md, start, rows), w_d2f, ((1,), (0,))).astype(x_md.dtype)
        return write_rows(out_md, start, _matmul(_swiglu(h), w_fd, ((1,), (0,))), valid)

    return _fold_expert_tiles(tile, jnp.zeros_like(x_md), x_md, w_gate_up, w_down, group_sizes_e)


def _blocked_backward(x_md, w_gate_up, w_down, group_sizes_e, dout_md):
    """-> (dx [m, d], dw_gate_up float32 [e, d, 2f] or None, dw_down float32 [e, f, d] or None); None for a
    QuantizedWeight, which gets no gradient."""
    def tile(carry, weights, e, start, rows, valid):
        dx_md, dw_gate_up, dw_down = carry
        w_d2f, w_fd = weights
        x = lax.dynamic_slice_in_dim(x_md, start, rows)
        dout = lax.dynamic_slice_in_dim(dout_md, start, rows)
        if valid is not None:  # rows of other experts must not reach this expert's weight gradients
            dout = jnp.where(valid[:, None], dout, 0)
        h = _matmul(x, w_d2f, ((1,), (0,))).astype(x_md.dtype)  # recomputed: cheaper than storing [m, 2f]
        a, swiglu_vjp = jax.vjp(_swiglu, h)
        (dh,) = swiglu_vjp(_matmul(dout, w_fd, ((1,), (1,))).astype(h.dtype))
        dx = _matmul(dh, w_d2f, ((1,), (1,)))
        if dw_gate_up is not None:
            dw_gate_up = add_to_group(dw_gate_up, e, _matmul(x, dh, ((0,), (0,))))
        if dw_down is not None:
            dw_down = add_to_group(dw_down, e, _matmul(a, dout, ((0,), (0,))))
        return write_rows(dx_md, start, dx, valid), dw_gate_up, dw_down

    def gradient_buffer(w):
        return None if isinstance(w, QuantizedWeight) else jnp.zeros(w.shape, jnp.float32)

    carry = (jnp.zeros_like(x_md), gradient_buffer(w_gate_up), gradient_buffer(w_down))
    return _fold_expert_tiles(tile, carry, x_md, w_gate_up, w_down, group_sizes_e)


@jax.custom_vjp
def _blocked(x_md, w_gate_up, w_down, group_sizes_e):
    return _blocked_forward(x_md, w_gate_up, w_down, group_sizes_e)


def _blocked_fwd(x_md, w_gate_up, w_down, group_sizes_e):
    return _blocked_forward(x_md, w_gate_up, w_down, group_sizes_e), (x_md, w_gate_up, w_down, group_sizes_e)


def _blocked_bwd(residuals, dout_md):
    x_md, w_gate_up, w_down, group_sizes_e = residuals
    dx_md, dw_gate_up, dw_down = _blocked_backward(x_md, w_gate_up, w_down, group_sizes_e, dout_md)
    return dx_md, _weight_cotangent(w_gate_up, dw_gate_up), _weight_cotangent(w_down, dw_down), None


def _weight_cotangent(w, dw):
    """dw in w's dtype; for a QuantizedWeight, zeros (float0 for the integer codes)."""
    if not isinstance(w, QuantizedWeight):
        return dw.astype(w.dtype)
    return w.zero_cotangent()


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


# The "decode" paths. A decode step holds t·k token copies (2 at batch 1 with top-2, 16 at batch 8), spread over up
# to that many experts, and is bound by reading the weights: the loop runs once per expert that received a copy
# (the non-empty groups, found by one sort), multiplies the whole [m, d] buffer by that expert's weights (m is
# small, so the extra rows cost little arithmetic) and keeps the expert's own rows. No per-expert cond or row tiles:
# measured at e=16, d=512, f=1024 on 2 CPU cores, the "blocked" loop took 1.3-1.8x as long per step at t = 1-16
# tokens (BENCHMARKS.md, issue 19).
def _active_experts(group_sizes_e: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-> (expert ids int32 [e]: the non-empty ones first, in increasing order; how many are non-empty)."""
    order = jnp.argsort(group_sizes_e == 0, stable=True).astype(jnp.int32)
    return order, jnp.sum(group_sizes_e > 0, dtype=jnp.int32)


def _one_expert_ffn(x_mk: jax.Array, w_gate_up, w_down, integer: bool) -> jax.Array:
    """x [m, d] through one expert (float [k, n] weights, or QuantizedWeights (1, k, n) multiplied as int8 codes
    when `integer`, dequantized otherwise) -> float32 [m, d]."""
    def matmul(x, w):
        if isinstance(w, QuantizedWeight):
            return int8_matmul(x, w) if integer else _matmul(x, w.dequantize(x.dtype)[0], ((1,), (0,)))
        return _matmul(x, w.astype(x.dtype), ((1,), (0,)))
    return matmul(_swiglu(matmul(x_mk, w_gate_up).astype(x_mk.dtype)), w_down)


def _expert_rows(w_gate_up, w_down, integer: bool) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """-> ffn(x [m, d], e) = Expert_e(x) in float32, reading expert e's weights once: a lax.switch over the buffers
    of PerExpertWeights, else expert e's slice of the stacked weights (still packed if quantized)."""
    if isinstance(w_gate_up, PerExpertWeights):
        branches = [functools.partial(_one_expert_ffn, w_gate_up=g, w_down=d, integer=integer)
                    for g, d in zip(w_gate_up.parts, w_down.parts, strict=True)]
        return lambda x, e: lax.switch(e, branches, x)

    def one(w, e):
        return quantized_group(w, e) if isinstance(w, QuantizedWeight) else lax.dynamic_index_in_dim(w, e, 0, False)
    return lambda x, e: _one_expert_ffn(x, one(w_gate_up, e), one(w_down, e), integer)


def _decode_forward(x_md, w_gate_up, w_down, group_sizes_e, integer: bool, tile_rows: int | None = None):
    m = x_md.shape[0]
    rows = min(DECODE_TILE_ROWS if tile_rows is None else tile_rows, m)
    ends_e = jnp.cumsum(group_sizes_e)
    starts_e = ends_e - group_sizes_e
    experts, count = _active_experts(group_sizes_e)
    ffn = _expert_rows(w_gate_up, w_down, integer)

    def expert(i, out_md):
        e = experts[i]
        start, end = starts_e[e], ends_e[e]

        def tile(j, out_md):  # rows [first, first + rows) of the buffer, kept where they are expert e's
            first = jnp.minimum(start + j * rows, m - rows)
            y = ffn(lax.dynamic_slice_in_dim(x_md, first, rows), e)
            row = first + jnp.arange(rows)
            return write_rows(out_md, first, y, (row >= start + j * rows) & (row < end))

        return lax.fori_loop(0, (end - start + rows - 1) // rows, tile, out_md)

    return lax.fori_loop(0, count, expert, jnp.zeros_like(x_md))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _decode(x_md, w_gate_up, w_down, group_sizes_e, integer):
    return _decode_forward(x_md, w_gate_up, w_down, group_sizes_e, integer)


def _decode_fwd(x_md, w_gate_up, w_down, group_sizes_e, integer):
    out = _decode_forward(x_md, w_gate_up, w_down, group_sizes_e, integer)
    return out, (x_md, w_gate_up, w_down, group_sizes_e)


def _decode_bwd(integer, residuals, dout_md):
    del integer  # the gradient is the dequantized weights' (a QuantizedWeight gets none)
    return _blocked_bwd(residuals, dout_md)


_decode.defvjp(_decode_fwd, _decode_bwd)

IMPLEMENTATIONS: dict[str, Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]] = {
    "blocked": _blocked,
    "decode": functools.partial(_decode, integer=False),
    "decode_int8": functools.partial(_decode, integer=True),
    "pallas": _two_grouped_matmuls(pallas_kernels.gmm),
    "xla_ragged": _two_grouped_matmuls(_ragged_dot),
}


def check_moe_ffn_inputs(x_td, weights_tk, experts_tk, w_gate_up, w_down) -> None:
    """The boundary checks of `moe_ffn` and its twins (also `jaxmoe.moe.parallel`'s): x [t, d], weights float
    [t, k], int experts [t, k] with concrete ids in [0, e), w_gate_up [e, d, 2f], w_down [e, f, d]; raises
    ValueError naming the value otherwise."""
    if x_td.ndim != 2:
        raise ValueError(f"x_td has shape {x_td.shape}; expected [tokens, d_model] (flatten batch and time)")
    t, d = x_td.shape
    if weights_tk.ndim != 2 or experts_tk.ndim != 2:
        raise ValueError(f"weights_tk {weights_tk.shape} and experts_tk {experts_tk.shape} must both be "
                         "[tokens, top_k]")
    if weights_tk.shape[1] != experts_tk.shape[1]:
        raise ValueError(f"top-k mismatch: weights_tk has k={weights_tk.shape[1]} (shape {weights_tk.shape}) "
                         f"but experts_tk has k={experts_tk.shape[1]} (shape {experts_tk.shape})")
    if weights_tk.shape[0] != t or experts_tk.shape[0] != t:
        raise ValueError(f"token count mismatch: x_td {x_td.shape}, weights_tk {weights_tk.shape}, experts_tk "
                         f"{experts_tk.shape}; all need the same first dimension")
    if not jnp.issubdtype(experts_tk.dtype, jnp.integer):
        raise ValueError(f"experts_tk has dtype {experts_tk.dtype}; expected integer expert ids")
    if len(w_gate_up.shape) != 3 or w_gate_up.shape[1] != d or w_gate_up.shape[2] % 2:
        raise ValueError(f"w_gate_up has shape {w_gate_up.shape}; expected [experts, d_model={d}, 2·d_ff] for "
                         f"x_td {x_td.shape}")
    e, _, two_f = w_gate_up.shape
    if tuple(w_down.shape) != (e, two_f // 2, d):
        raise ValueError(f"w_down has shape {w_down.shape}; expected (experts, d_ff, d_model) = "
                         f"{(e, two_f // 2, d)} from w_gate_up {w_gate_up.shape} and x_td {x_td.shape}")
    if not isinstance(experts_tk, jax.core.Tracer):
        ids = np.asarray(experts_tk)
        bad = np.unique(ids[(ids < 0) | (ids >= e)])
        if bad.size:
            raise ValueError(f"experts_tk holds ids {bad[:8].tolist()} outside [0, {e}): w_gate_up has {e} "
                             "experts")
