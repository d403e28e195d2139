"""Expert parallelism: the dropless `moe_ffn` with tokens and experts sharded over a mesh, in one `jax.shard_map`.

Tokens are split over `token_axes` (those present in the mesh), experts over `expert_axis`: shard s of the
expert axis holds experts [s·e_l, (s+1)·e_l), e_l = e / ep. With a "tensor" axis of size > 1 each expert's
hidden width f is split over it as well, and the down projection's partial sums are added with a psum.
Weights replicated over the token axes (FSDP) are all-gathered by the shard_map boundary. Strategies:

  "all_gather"  all-gather the token slice over the expert axis, compute only the copies routed to this shard's
                experts (the others go to a trailing dummy group, whose rows `expert_ffn` leaves zero), then
                psum_scatter the partial outputs back to each shard's token slice. No data-dependent sizes.
  "all_to_all"  sort the local copies by destination shard and exchange them with `lax.all_to_all` into
                buffers sized for the worst case (every local copy bound for one shard), compute the local
                experts, exchange back and combine. Offsets come from `all_to_all_params`.

  "ragged_all_to_all"  the same exchange with `lax.ragged_all_to_all`: each shard sends exactly its rows for each
                other shard (offsets from `all_to_all_params`), receives them packed sender after sender, runs its
                experts on them and sends the results back the same way. For GPU / TPU: XLA:CPU does not run
                the primitive. Here the tests run the strategy's arithmetic with `ragged_exchange` replaced by an
                all_gather emulation of the primitive's documented semantics, and check that the real primitive
                is what the program lowers to; experiments/bench/kernels_gpu.py compares it on a GPU.

Every strategy computes exactly the maths of `moe_ffn` with capacity_factor < 0, and is tested against it on
eight fake CPU devices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxmoe.moe.dispatch import permute, route, unpermute
from jaxmoe.moe.experts import check_moe_ffn_inputs, expert_ffn

STRATEGIES = ("all_gather", "all_to_all", "ragged_all_to_all")
# The exchange the "ragged_all_to_all" strategy calls (the tests swap in an emulation to run it on CPU).
ragged_exchange = lax.ragged_all_to_all


def all_to_all_params(sizes_ee, shard):
    """The exchange seen from sender `shard`, for sizes[i, j] = rows shard i sends to shard j ([ep, ep] ints).

    Returns (input_offsets, send_sizes, output_offsets, recv_sizes), each [ep]:
      input_offsets[j]   where the chunk for shard j starts in this shard's send buffer (chunks in shard order),
      send_sizes[j]      rows sent to shard j (this shard's row of sizes),
      output_offsets[j]  where that chunk lands in shard j's receive buffer (after the chunks of senders < shard),
      recv_sizes[i]      rows received from shard i (this shard's column of sizes).
    Works on NumPy arrays and on traced jnp arrays (shard may be `lax.axis_index`); the layout of
    `lax.ragged_all_to_all`'s offset arguments.
    """
    xp = jnp if isinstance(sizes_ee, jax.Array) or isinstance(shard, jax.Array) else np
    sizes_ee = xp.asarray(sizes_ee)
    send_sizes = sizes_ee[shard]
    input_offsets = xp.cumsum(send_sizes) - send_sizes
    senders_before = (xp.arange(sizes_ee.shape[0]) < shard)[:, None]
    output_offsets = xp.sum(xp.where(senders_before, sizes_ee, 0), axis=0)
    recv_sizes = sizes_ee[:, shard]
    return input_offsets, send_sizes, output_offsets, recv_sizes


def resolve_strategy(strategy: str, backend: str | None = None) -> str:
    """"auto" -> "all_gather" on every backend for now: "all_to_all" pads each exchange to the worst case, and
    "ragged_all_to_all" (meant for GPU / TPU) has not been timed on one yet. Other names are checked."""
    if strategy == "auto":
        return "all_gather"
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; expected 'auto' or one of {list(STRATEGIES)}")
    return strategy


def moe_ffn_sharded(x_td: jax.Array, weights_tk: jax.Array, experts_tk: jax.Array, w_gate_up: jax.Array,
                    w_down: jax.Array, *, mesh: Mesh, token_axes: Sequence[str] = ("data", "fsdp", "expert"),
                    expert_axis: str = "expert", tensor_axis: str = "tensor", strategy: str = "auto",
                    implementation: str = "auto") -> jax.Array:
    """`moe_ffn` (dropless) over a mesh: x [t, d], weights float [t, k], experts int [t, k], w_gate_up
    [e, d, 2f], w_down [e, f, d] -> y [t, d] in x's dtype, tokens sharded over the `token_axes` present in the
    mesh. Axis names absent from the mesh are skipped (an absent expert axis means one expert shard); t must
    divide over the token axes and e over the expert axis. strategy: see the module docstring and
    `resolve_strategy`; implementation: see `expert_ffn`. Meant for `jax.jit`; on a mesh with Explicit axes the
    inputs are resharded to the shard_map's specs first. Differentiable in x, weights, w_gate_up and w_down.
    """
    check_moe_ffn_inputs(x_td, weights_tk, experts_tk, w_gate_up, w_down)
    strategy = resolve_strategy(strategy)
    names = tuple(mesh.axis_names)
    if isinstance(token_axes, str):
        raise ValueError(f"token_axes={token_axes!r} must be a sequence of axis names, e.g. ({token_axes!r},)")
    if unused := [a for a in names if mesh.shape[a] > 1 and a not in (*token_axes, expert_axis, tensor_axis)]:
        raise ValueError(f"mesh axes {unused} (of {dict(mesh.shape)}) are none of token_axes={tuple(token_axes)}, "
                         f"expert_axis={expert_axis!r}, tensor_axis={tensor_axis!r}; name each mesh axis in one of "
                         "them (axes absent from the mesh are skipped)")
    token_axes = tuple(a for a in token_axes if a in names)
    ep_axis = expert_axis if expert_axis in names else None
    tp_axis = tensor_axis if tensor_axis in names and mesh.shape[tensor_axis] > 1 else None
    if tp_axis is not None and tp_axis in token_axes:
        raise ValueError(f"tensor_axis {tp_axis!r} is also in token_axes {token_axes}; the tensor axis splits the "
                         "experts' hidden width, so leave it out of token_axes")
    ep = mesh.shape[ep_axis] if ep_axis else 1
    tp = mesh.shape[tp_axis] if tp_axis else 1
    t = x_td.shape[0]
    e, d, two_f = w_gate_up.shape
    f = two_f // 2
    if e % ep:
        raise ValueError(f"{e} experts do not divide over expert axis {ep_axis!r} of size {ep}; choose an expert "
                         f"axis size that divides {e}")
    if f % tp:
        raise ValueError(f"d_ff={f} does not divide over tensor axis {tp_axis!r} of size {tp}; choose a tensor "
                         f"axis size that divides {f}")
    token_shards = math.prod(mesh.shape[a] for a in token_axes)
    if t % token_shards:
        raise ValueError(f"{t} tokens do not divide over token axes {token_axes} of total size {token_shards}; "
                         f"pad the tokens to a multiple of {token_shards}")
    if strategy != "all_gather" and ep_axis is not None and ep_axis not in token_axes:
        raise ValueError(f"strategy={strategy!r} needs the tokens split over expert axis {ep_axis!r}, but "
                         f"token_axes are {token_axes}; use strategy='all_gather' for tokens replicated over it")

    token_spec = P(token_axes or None)
    # [e, d, 2f] -> [e, d, 2, f] so that the gate and up halves split over the tensor axis alike.
    w_gate_up_ed2f = w_gate_up.reshape(e, d, 2, f)
    body = {"all_gather": _all_gather_body, "all_to_all": _all_to_all_body,
            "ragged_all_to_all": _ragged_all_to_all_body}[strategy]

    def local(x, w, ids, wgu_ed2f, wd):
        e_l, _, _, f_l = wgu_ed2f.shape
        y = body(x, w, ids, wgu_ed2f.reshape(e_l, d, 2 * f_l), wd, ep_axis=ep_axis, ep=ep,
                 tokens_split_over_ep=ep_axis in token_axes, implementation=implementation)
        if tp_axis is not None:
            y = lax.psum(y, tp_axis)
        return y.astype(x.dtype)

    in_specs = (token_spec, token_spec, token_spec, P(ep_axis, None, None, tp_axis), P(ep_axis, tp_axis, None))
    args = (x_td, weights_tk, experts_tk, w_gate_up_ed2f, w_down)
    if any(a == jax.sharding.AxisType.Explicit for a in mesh.axis_types):  # shard_map takes them only as specified
        args = tuple(jax.sharding.reshard(a, jax.sharding.NamedSharding(mesh, s)) for a, s in zip(args, in_specs))
    # check_vma=False: the "blocked" expert_ffn's backward starts its loop carry from zeros that carry no
    # varying-axes type, which check_vma rejects. The tests check every gradient against moe_ffn.
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=token_spec, check_vma=False)(*args)


def _local_expert_outputs(x_md, local_ids_m, w_gate_up, w_down, implementation):
    """Rows of x [m, d] through local expert local_ids_m[i] in [0, e_l), or zero where the id is e_l (the dummy
    group) -> float32 [m, d] in x's row order."""
    e_l = w_gate_up.shape[0]
    dispatch = route(local_ids_m[:, None], e_l + 1)
    out = expert_ffn(permute(x_md, dispatch), w_gate_up, w_down, dispatch.group_sizes_e[:e_l],
                     implementation=implementation)
    return unpermute(out, jnp.ones(local_ids_m.shape + (1,), jnp.float32), dispatch)


def _all_gather_body(x_td, weights_tk, experts_tk, w_gate_up, w_down, *, ep_axis, ep, tokens_split_over_ep,
                     implementation):
    del ep
    e_l = w_gate_up.shape[0]
    gather = ep_axis is not None and tokens_split_over_ep
    if gather:
        x_td, weights_tk, experts_tk = (lax.all_gather(a, ep_axis, tiled=True) for a in (x_td, weights_tk, experts_tk))
    first = lax.axis_index(ep_axis) * e_l if ep_axis is not None else 0
    local_tk = experts_tk.astype(jnp.int32) - first
    local_tk = jnp.where((local_tk >= 0) & (local_tk < e_l), local_tk, e_l)  # other shards' experts: dummy group
    dispatch = route(local_tk, e_l + 1)
    out_md = expert_ffn(permute(x_td, dispatch), w_gate_up, w_down, dispatch.group_sizes_e[:e_l],
                        implementation=implementation)
    y_td = unpermute(out_md, weights_tk, dispatch)  # float32; zero for copies of other shards' experts
    if gather:
        return lax.psum_scatter(y_td, ep_axis, scatter_dimension=0, tiled=True)
    return lax.psum(y_td, ep_axis) if ep_axis is not None else y_td


def _sorted_copies(x_td, experts_tk, num_experts):
    """The exchanges' start: (Dispatch, the token copies [t·k, d] sorted by global expert, hence by destination
    shard)."""
    dispatch = route(experts_tk, num_experts)
    return dispatch, permute(x_td, dispatch)


def _exchange_sizes(dispatch, ep_axis, ep, e_l):
    """-> (this shard's index, counts [sender, global expert], sizes [sender, receiver]) over the expert axis."""
    shard = lax.axis_index(ep_axis)
    counts_pe = lax.all_gather(dispatch.group_sizes_e, ep_axis)
    return shard, counts_pe, counts_pe.reshape(ep, ep, e_l).sum(-1)


def _all_to_all_body(x_td, weights_tk, experts_tk, w_gate_up, w_down, *, ep_axis, ep, tokens_split_over_ep,
                     implementation):
    del tokens_split_over_ep  # checked by the caller: always True when ep_axis is set
    e_l = w_gate_up.shape[0]
    dispatch, x_md = _sorted_copies(x_td, experts_tk, e_l * ep)
    m = x_md.shape[0]
    if ep_axis is None:
        out_md = expert_ffn(x_md, w_gate_up, w_down, dispatch.group_sizes_e, implementation=implementation)
        return unpermute(out_md, weights_tk, dispatch)
    shard, counts_pe, sizes_ee = _exchange_sizes(dispatch, ep_axis, ep, e_l)
    input_offsets, send_sizes, _, recv_sizes = all_to_all_params(sizes_ee, shard)

    # Send buffer [ep, m, d]: slot j holds the chunk for shard j at its start; m rows fit the worst case.
    row_m = jnp.arange(m)
    src_jm = input_offsets[:, None] + row_m
    valid_jm = row_m < send_sizes[:, None]
    send = jnp.where(valid_jm[..., None], x_md[jnp.minimum(src_jm, m - 1)], 0)
    recv = lax.all_to_all(send, ep_axis, 0, 0, tiled=True)  # slot i: the chunk from shard i

    # A received row's local expert: sender i's chunk is sorted by expert, with counts counts_pe[i, local].
    local_counts_pe = lax.dynamic_slice_in_dim(counts_pe, shard * e_l, e_l, axis=1)
    ends_pe = jnp.cumsum(local_counts_pe, axis=1)
    local_ids = jax.vmap(lambda ends: jnp.searchsorted(ends, row_m, side="right"))(ends_pe)  # e_l past the chunk
    out = _local_expert_outputs(recv.reshape(ep * m, -1), local_ids.reshape(ep * m), w_gate_up, w_down,
                                implementation)
    back = lax.all_to_all(out.reshape(ep, m, -1), ep_axis, 0, 0, tiled=True)  # slot j: results from shard j

    # Sorted copy r went to shard j_r at row r - input_offsets[j_r] of that chunk.
    dest_m = jnp.searchsorted(jnp.cumsum(send_sizes), row_m, side="right")
    out_md = back[dest_m, row_m - input_offsets[dest_m]]
    return unpermute(out_md, weights_tk, dispatch)


def _ragged_all_to_all_body(x_td, weights_tk, experts_tk, w_gate_up, w_down, *, ep_axis, ep, tokens_split_over_ep,
                            implementation):
    if ep_axis is None:  # one expert shard: nothing to exchange
        return _all_to_all_body(x_td, weights_tk, experts_tk, w_gate_up, w_down, ep_axis=None, ep=ep,
                                tokens_split_over_ep=tokens_split_over_ep, implementation=implementation)
    e_l = w_gate_up.shape[0]
    dispatch, x_md = _sorted_copies(x_td, experts_tk, e_l * ep)
    m, d = x_md.shape
    shard, counts_pe, sizes_ee = _exchange_sizes(dispatch, ep_axis, ep, e_l)
    input_offsets, send_sizes, output_offsets, recv_sizes = all_to_all_params(sizes_ee, shard)
    # Received: sender i's rows for this shard at [recv_starts[i], + recv_sizes[i]), senders in order; at most
    # ep * m rows (every shard sending all its copies here).
    recv = ragged_exchange(x_md, jnp.zeros((ep * m, d), x_md.dtype), input_offsets, send_sizes, output_offsets,
                           recv_sizes, axis_name=ep_axis)
    row_r = jnp.arange(ep * m)
    recv_ends = jnp.cumsum(recv_sizes)
    sender_r = jnp.minimum(jnp.searchsorted(recv_ends, row_r, side="right"), ep - 1)
    within_r = row_r - (recv_ends - recv_sizes)[sender_r]
    # A sender's chunk is sorted by expert: local expert j holds counts_pe[i, shard * e_l + j] of its rows.
    local_counts_pe = lax.dynamic_slice_in_dim(counts_pe, shard * e_l, e_l, axis=1)
    local_r = jax.vmap(lambda ends, row: jnp.searchsorted(ends, row, side="right"))(
        jnp.cumsum(local_counts_pe, axis=1)[sender_r], within_r)
    local_r = jnp.where(row_r < recv_ends[-1], local_r, e_l)  # rows past what arrived: the dummy group
    out = _local_expert_outputs(recv, local_r, w_gate_up, w_down, implementation).astype(x_md.dtype)
    # Back the same way: chunk i returns to sender i, at the offset where that sender's chunk for this shard began.
    back_offsets = (jnp.cumsum(sizes_ee, axis=1) - sizes_ee)[:, shard]
    out_md = ragged_exchange(out, jnp.zeros_like(x_md), recv_ends - recv_sizes, recv_sizes, back_offsets,
                             send_sizes, axis_name=ep_axis)
    return unpermute(out_md, weights_tk, dispatch)
