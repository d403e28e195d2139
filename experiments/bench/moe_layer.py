"""The MoE feed-forward block, forward + backward, fp32 on CPU: jaxmoe `moe_ffn` against what a user would use
instead. T=4096 tokens, d=512, f=1024, 16 experts, top-2; routing from a softmax router (softmax + top_k),
fixed across cases; loss sum(y · R), gradients w.r.t. x and both expert weight tensors.

Cases (one JSON line each, in one run):
  jaxmoe_auto         moe_ffn(implementation="auto"), i.e. "blocked" on CPU
  dense_equivalent    the same FLOPs as plain matmuls: x repeated k times [T·k, d] @ [d, 2f], SwiGLU, @ [f, d]
                      with ONE expert's weights (no routing, no permutation; 6 MB of weights instead of 96 MB)
  transformers_eager  transformers' PhimoeExperts.forward(hidden, top_k_index, top_k_weights), the per-expert loop
                      that a bare PhimoeSparseMoeBlock runs; same weights and routing
  transformers_grouped_mm  the same module with experts_implementation="grouped_mm" (what from_pretrained picks)
  jaxmoe_xla_ragged   moe_ffn(implementation="xla_ragged"), i.e. lax.ragged_dot
With --alternatives, also the formulations the blocked path was chosen over (see BENCHMARKS.md).

Every case runs once to compile / warm up; then the cases alternate call by call (0.2 s pause between calls) and
the median of --repeats calls is reported (ragged_dot: --ragged-repeats, it takes seconds per call).

    python experiments/bench/moe_layer.py [--repeats 7] [--alternatives]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from jax import lax  # noqa: E402
from pallas_kernels.grouped import tiles  # noqa: E402
from transformers.models.phimoe.modeling_phimoe import PhimoeExperts  # noqa: E402

from jaxmoe.moe import experts as experts_module  # noqa: E402
from jaxmoe.moe.dispatch import permute, route, unpermute  # noqa: E402
from jaxmoe.moe.experts import moe_ffn  # noqa: E402

T, D, F, E, K = 4096, 512, 1024, 16, 2


def make_problem(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(T, D)).astype(np.float32)
    router = (rng.normal(size=(D, E)) * 0.1).astype(np.float32)
    weights, experts = lax.top_k(jax.nn.softmax(jnp.asarray(x) @ router, axis=-1), K)
    return dict(x=x, weights=np.array(weights), experts=np.array(experts, np.int32),  # writable, for torch
                w_gate_up=(rng.normal(size=(E, D, 2 * F)) * 0.02).astype(np.float32),
                w_down=(rng.normal(size=(E, F, D)) * 0.02).astype(np.float32),
                r=rng.normal(size=(T, D)).astype(np.float32))


def jax_grad_case(ffn, p):
    """A callable that runs jit(grad of sum(ffn(x, weights, experts, w_gate_up, w_down) · R)) to completion."""
    grad = jax.jit(jax.grad(lambda x, wgu, wd, w, ex, r: jnp.sum(ffn(x, w, ex, wgu, wd) * r), argnums=(0, 1, 2)))
    args = [jnp.asarray(p[n]) for n in ("x", "w_gate_up", "w_down", "weights", "experts", "r")]
    return lambda: jax.block_until_ready(grad(*args))


def dense_equivalent_case(p):
    def loss(x2, wgu, wd, r2):
        h = x2 @ wgu
        return jnp.sum((jax.nn.silu(h[:, :F]) * h[:, F:]) @ wd * r2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    args = (jnp.asarray(np.repeat(p["x"], K, axis=0)), jnp.asarray(p["w_gate_up"][0]), jnp.asarray(p["w_down"][0]),
            jnp.asarray(np.repeat(p["r"], K, axis=0)))
    return lambda: jax.block_until_ready(grad(*args))


def transformers_experts(p, implementation: str | None) -> PhimoeExperts:
    config = transformers.PhimoeConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                                       num_experts_per_tok=K, hidden_act="silu")
    config._experts_implementation = implementation
    module = PhimoeExperts(config)
    with torch.no_grad():  # transformers stores [out, in]: gate_up_proj[e] = w_gate_up[e].T, down_proj[e] = w_down[e].T
        module.gate_up_proj.copy_(torch.from_numpy(p["w_gate_up"]).transpose(1, 2))
        module.down_proj.copy_(torch.from_numpy(p["w_down"]).transpose(1, 2))
    return module


def transformers_case(p, implementation: str | None):
    module = transformers_experts(p, implementation)
    index, weights, r = (torch.from_numpy(p[n]) for n in ("experts", "weights", "r"))
    x = torch.from_numpy(p["x"]).requires_grad_(True)

    def run():
        module.zero_grad(set_to_none=True)
        x.grad = None
        (module(x, index.long(), weights) * r).sum().backward()
        return x.grad

    return run


def blocks_with_gathered_weights(x, weights, experts, w_gate_up, w_down, block: int = 128):
    """Alternative: pad each expert's copies to a multiple of `block`, one batched einsum over [blocks, block, d]
    with each block's expert weight gathered ([blocks, d, 2f]); autodiff backward."""
    dispatch = route(experts, E)
    sizes = dispatch.group_sizes_e
    padded = (sizes + block - 1) // block * block
    start = jnp.cumsum(sizes) - sizes
    rows = (T * K + E * (block - 1)) // block * block
    sorted_expert = jnp.repeat(jnp.arange(E), sizes, total_repeat_length=T * K)
    pos = (jnp.cumsum(padded) - padded)[sorted_expert] + jnp.arange(T * K) - start[sorted_expert]
    buf = jnp.zeros((rows, D), x.dtype).at[pos].set(permute(x, dispatch), unique_indices=True)
    block_expert = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded), jnp.arange(0, rows, block), side="right"), E - 1)
    h = jnp.einsum("nbd,ndf->nbf", buf.reshape(rows // block, block, D), w_gate_up[block_expert])
    out = jnp.einsum("nbf,nfd->nbd", experts_module._swiglu(h), w_down[block_expert])
    return unpermute(out.reshape(rows, D)[pos], weights, dispatch)


def _tiled_matmul(lhs, rhs, sizes, transpose_rhs=False):
    dims = ((1,), (1,)) if transpose_rhs else ((1,), (0,))

    def tile(out, w, e, start, rows, valid):
        y = experts_module._matmul(lax.dynamic_slice_in_dim(lhs, start, rows), w, dims)
        return tiles.write_rows(out, start, y, valid)

    out = jnp.zeros((lhs.shape[0], rhs.shape[1] if transpose_rhs else rhs.shape[2]), lhs.dtype)
    return tiles.fold_group_tiles(tile, out, sizes, num_rows=lhs.shape[0], heights=experts_module.TILE_ROWS,
                                  per_group=lambda e: rhs[e])


def _tiled_weight_grad(lhs, dout, sizes):
    def tile(acc, _, e, start, rows, valid):
        x = lax.dynamic_slice_in_dim(lhs, start, rows)
        if valid is not None:
            x = jnp.where(valid[:, None], x, 0)
        g = experts_module._matmul(x, lax.dynamic_slice_in_dim(dout, start, rows), ((0,), (0,)))
        return tiles.add_to_group(acc, e, g)

    acc = jnp.zeros((E, lhs.shape[1], dout.shape[1]), jnp.float32)
    return tiles.fold_group_tiles(tile, acc, sizes, num_rows=lhs.shape[0], heights=experts_module.TILE_ROWS)


@jax.custom_vjp
def tiled_grouped_matmul(lhs, rhs, sizes):
    """Alternative: the same row tiles as "blocked", as a plain grouped matmul (gmm / tgmm custom VJP), called
    twice with SwiGLU between, so [m, 2f] and [m, f] activations and their gradients are materialised."""
    return _tiled_matmul(lhs, rhs, sizes)


tiled_grouped_matmul.defvjp(
    lambda lhs, rhs, sizes: (_tiled_matmul(lhs, rhs, sizes), (lhs, rhs, sizes)),
    lambda res, g: (_tiled_matmul(g, res[1], res[2], transpose_rhs=True), _tiled_weight_grad(res[0], g, res[2]),
                    None))


def tile_rows_case(tile_rows: tuple[int, ...], p):
    """Alternative: moe_ffn "blocked" with other tile heights. TILE_ROWS is read when the forward and the custom
    VJP's backward are traced, both inside jit's trace on the first call, so it is swapped for that call."""
    run = jax_grad_case(lambda *args: moe_ffn(*args, implementation="blocked"), p)
    saved, experts_module.TILE_ROWS = experts_module.TILE_ROWS, tile_rows
    try:
        run()
    finally:
        experts_module.TILE_ROWS = saved
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ragged-repeats", type=int, default=3)
    parser.add_argument("--alternatives", action="store_true")
    args = parser.parse_args()
    if min(args.repeats, args.ragged_repeats) < 1:
        parser.error("--repeats and --ragged-repeats must be at least 1")

    p = make_problem()
    cases = {
        "jaxmoe_auto": jax_grad_case(moe_ffn, p),
        "dense_equivalent": dense_equivalent_case(p),
        "transformers_eager": transformers_case(p, None),
        "transformers_grouped_mm": transformers_case(p, "grouped_mm"),
        "jaxmoe_xla_ragged": jax_grad_case(lambda *a: moe_ffn(*a, implementation="xla_ragged"), p),
    }
    if args.alternatives:
        two_gmms = experts_module._two_grouped_matmuls(tiled_grouped_matmul)
        cases["alt_two_tiled_grouped_matmuls"] = jax_grad_case(
            lambda x, w, ex, wgu, wd: unpermute(two_gmms(permute(x, d := route(ex, E)), wgu, wd, d.group_sizes_e),
                                                w, d), p)
        cases["alt_blocks_gathered_weights_128"] = jax_grad_case(blocks_with_gathered_weights, p)
        for tile_rows in ((128,), (512,), (1024, 512, 256, 128, 64), (256, 128, 64)):
            cases["alt_tile_rows_" + "_".join(map(str, tile_rows))] = tile_rows_case(tile_rows, p)

    # The jaxmoe and transformers outputs and x-gradients agree (checked once, outside the timing).
    y_jax, vjp = jax.vjp(lambda x: moe_ffn(x, p["weights"], p["experts"], p["w_gate_up"], p["w_down"]),
                         jnp.asarray(p["x"]))
    module = transformers_experts(p, None)
    x_pt = torch.from_numpy(p["x"]).requires_grad_(True)
    y_pt = module(x_pt, torch.from_numpy(p["experts"]).long(), torch.from_numpy(p["weights"]))
    (y_pt * torch.from_numpy(p["r"])).sum().backward()
    agreement = dict(max_abs_diff_y=float(np.abs(np.asarray(y_jax) - y_pt.detach().numpy()).max()),
                     max_abs_diff_dx=float(np.abs(np.asarray(vjp(jnp.asarray(p["r"]))[0]) - x_pt.grad.numpy()).max()))

    for run in cases.values():
        run()
    times = {name: [] for name in cases}
    for i in range(args.repeats):
        for name, run in cases.items():
            if name == "jaxmoe_xla_ragged" and i >= args.ragged_repeats:
                continue
            time.sleep(0.2)
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        line = dict(case=name, seconds=round(median[name], 4), min_seconds=round(min(ts), 4), repeats=len(ts),
                    vs_dense_equivalent=round(median[name] / median["dense_equivalent"], 3),
                    speedup_vs_transformers_eager=round(median["transformers_eager"] / median[name], 2),
                    speedup_vs_transformers_grouped_mm=round(median["transformers_grouped_mm"] / median[name], 2))
        if name == "jaxmoe_auto":
            line.update(agreement)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
