"""Expert-parallel MoE feed-forward, forward + backward, fp32 on 8 fake CPU devices: `moe_ffn_sharded` against the
single-device `moe_ffn`, and the communication volume per token of each sharded layout.

T=2048 tokens, d=512, f=1024, 16 experts, top-2; loss sum(y · R), gradients w.r.t. x, the routing weights,
w_gate_up and w_down. Two routings, fixed across cases:
  random  softmax top-2 of standard-normal logits (about 1/16 of the copies per expert)
  skewed  90% of the tokens get +10 on the logits of experts 0 and 1, so about 90% of the copies go to those two
          experts, which both live on expert shard 0 of either mesh (the worst case for expert parallelism)

Cases (one JSON line each, in one run):
  single_device     moe_ffn(implementation="auto") on device 0
  sharded           moe_ffn_sharded on meshes (expert=8) and (data=2, expert=4), strategies "all_gather" and
                    "all_to_all"; x, routing and R split over the token axes (data, expert), the expert weights
                    over the expert axis (replicated over data), as the shard_map expects them
  dense_equivalent  the same FLOPs as plain matmuls on device 0: x repeated k times [T·k, d] @ [d, 2f], SwiGLU,
                    @ [f, d] with ONE expert's weights (as in moe_layer.py); routing-independent, printed once

Communication: the compiled per-device HLO (`jit(grad).lower(...).compile().as_text()`) is scanned for all-to-all,
all-gather, reduce-scatter, all-reduce and collective-permute ops; the result bytes of each (tuple results summed;
`-start`/`-done` pairs counted once, by the `-done`'s result) times the device count, divided by T, is reported
per kind as bytes per token per step. Every collective appears once in the program (none sits inside a loop;
`collectives_in_loops` says so).

On fake CPU devices all eight "devices" share the same 2 cores and the same memory, so the sharded times measure
the overhead of the sharded program (collectives as memory copies, per-shard routing work, padding), not a speedup.

Every case runs once to compile / warm up; then the cases alternate call by call (0.2 s pause between calls) and
the median of --repeats calls is reported.

    python experiments/bench/moe_parallel.py [--repeats 7]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxmoe.moe.experts import moe_ffn  # noqa: E402
from jaxmoe.moe.parallel import moe_ffn_sharded  # noqa: E402
from jaxmoe.sharding import make_mesh  # noqa: E402

T, D, F, E, K = 2048, 512, 1024, 16, 2
MESHES = {"expert=8": dict(expert=8), "data=2,expert=4": dict(data=2, expert=4)}
STRATEGIES = ("all_gather", "all_to_all")
COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
SKEW_FRACTION = 0.9
BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
         "s8": 1, "u8": 1, "pred": 1}


def make_problem(routing: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(T, D)).astype(np.float32)
    logits = rng.normal(size=(T, E)).astype(np.float32)
    if routing == "skewed":
        logits[rng.random(T) < SKEW_FRACTION, :2] += 10.0
    weights, experts = lax.top_k(jax.nn.softmax(jnp.asarray(logits), axis=-1), K)
    return dict(x=x, weights=np.asarray(weights), experts=np.asarray(experts, np.int32),
                w_gate_up=(rng.normal(size=(E, D, 2 * F)) * 0.02).astype(np.float32),
                w_down=(rng.normal(size=(E, F, D)) * 0.02).astype(np.float32),
                r=rng.normal(size=(T, D)).astype(np.float32))


def grad_fn(ffn):
    """jit(grad of sum(ffn(x, weights, experts, w_gate_up, w_down) · R)) w.r.t. x, weights, w_gate_up, w_down."""
    return jax.jit(jax.grad(lambda x, w, wgu, wd, ex, r: jnp.sum(ffn(x, w, ex, wgu, wd) * r), argnums=(0, 1, 2, 3)))


def placed_args(p, mesh=None):
    """(x, weights, w_gate_up, w_down, experts, r): on device 0, or on `mesh` with tokens split over data and
    expert and the expert weights over expert."""
    names = ("x", "weights", "w_gate_up", "w_down", "experts", "r")
    if mesh is None:
        return tuple(jax.device_put(p[n], jax.devices()[0]) for n in names)
    tokens, experts = NamedSharding(mesh, P(("data", "expert"))), NamedSharding(mesh, P("expert"))
    return tuple(jax.device_put(p[n], experts if n.startswith("w_") else tokens) for n in names)


def _group_size(line: str) -> int | None:
    """The size of the replica groups of an HLO collective, or None when the line does not say."""
    if m := re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", line):
        return max(len([n for n in g.split(",") if n]) for g in re.findall(r"\{([\d,]*)\}", m.group(1)))
    if m := re.search(r"replica_groups=\[([\d,]+)\]<=", line):  # iota form [groups, size]
        return int(m.group(1).split(",")[-1])
    return None


def collective_bytes(hlo: str, devices: int) -> tuple[dict[str, float], dict[str, int], bool]:
    """Per kind: result bytes of the collectives in the per-device HLO × devices / T; op counts; whether any
    collective sits in a while loop's body. Collectives over groups of one device (the transposes of psums over
    mesh axes of size 1) move nothing and are skipped."""
    loop_bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    per_token = dict.fromkeys(COLLECTIVES, 0.0)
    counts = dict.fromkeys(COLLECTIVES, 0)
    in_loop = False
    computation = None
    op = re.compile(r"=\s+(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start|-done)?\(")
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            continue
        m = op.search(line)
        if m is None or m.group(3) == "-start" or _group_size(line) == 1:
            continue
        shape, kind = m.group(1), m.group(2)
        size = sum(BYTES[dtype] * int(np.prod([int(n) for n in dims.split(",") if n] or [1]))
                   for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape))
        per_token[kind] += size * devices / T
        counts[kind] += 1
        in_loop |= computation in loop_bodies
    return per_token, counts, in_loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    assert len(jax.devices()) == 8, jax.devices()

    cases, info = {}, {}
    single = grad_fn(moe_ffn)
    for routing in ("random", "skewed"):
        p = make_problem(routing)
        share = np.bincount(p["experts"].ravel(), minlength=E) / (T * K)
        base = placed_args(p)
        reference = [np.asarray(g) for g in single(*base)]
        name = f"single_device/{routing}"
        cases[name] = (single, base)
        info[name] = dict(case="single_device", routing=routing, mesh=None, strategy=None,
                          copies_on_busiest_2_experts=round(float(np.sort(share)[-2:].sum()), 3))
        for mesh_name, sizes in MESHES.items():
            mesh = make_mesh(**sizes)
            placed = placed_args(p, mesh)
            for strategy in STRATEGIES:
                fn = grad_fn(lambda *a, mesh=mesh, strategy=strategy: moe_ffn_sharded(*a, mesh=mesh, strategy=strategy))
                hlo = fn.lower(*placed).compile().as_text()
                per_token, counts, in_loop = collective_bytes(hlo, mesh.devices.size)
                grads = fn(*placed)
                name = f"sharded/{routing}/{mesh_name}/{strategy}"
                cases[name] = (fn, placed)
                info[name] = dict(
                    case="sharded", routing=routing, mesh=mesh_name, strategy=strategy,
                    comm_bytes_per_token=round(sum(per_token.values())),
                    comm_bytes_per_token_by_kind={k: round(v) for k, v in per_token.items() if counts[k]},
                    collective_ops={k: v for k, v in counts.items() if v}, collectives_in_loops=in_loop,
                    max_abs_diff_grads=float(max(np.abs(np.asarray(g) - r).max() for g, r in zip(grads, reference))))

    p = make_problem("random")

    def dense_loss(x2, wgu, wd, r2):
        h = x2 @ wgu
        return jnp.sum((jax.nn.silu(h[:, :F]) * h[:, F:]) @ wd * r2)

    cases["dense_equivalent"] = (jax.jit(jax.grad(dense_loss, argnums=(0, 1, 2))),
                                 tuple(jax.device_put(a, jax.devices()[0]) for a in (
                                     np.repeat(p["x"], K, axis=0), p["w_gate_up"][0], p["w_down"][0],
                                     np.repeat(p["r"], K, axis=0))))
    info["dense_equivalent"] = dict(case="dense_equivalent", routing=None, mesh=None, strategy=None)

    for fn, fn_args in cases.values():
        jax.block_until_ready(fn(*fn_args))
    times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, (fn, fn_args) in cases.items():
            time.sleep(0.2)
            start = time.perf_counter()
            jax.block_until_ready(fn(*fn_args))
            times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        routing = info[name]["routing"]
        line = dict(info[name], seconds=round(median[name], 4), min_seconds=round(min(ts), 4), repeats=len(ts),
                    vs_dense_equivalent=round(median[name] / median["dense_equivalent"], 3))
        if routing is not None:
            line["vs_single_device"] = round(median[name] / median[f"single_device/{routing}"], 3)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
