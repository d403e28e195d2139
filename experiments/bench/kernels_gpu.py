"""The "pallas_gpu" grouped matmul on one NVIDIA GPU (H100/H200) against what a user would otherwise run.

A prepared script, to run once, unattended, on a GPU machine (about 5-8 minutes); one JSON line per case on stdout
and in --out. Group sizes come from a router-like draw (uneven expert popularity, top-2), fixed by seed.

Cases:
  device        the card, jax version
  peak_matmul   bf16 [8192, 8192] @ [8192, 8192]: the card's achieved dense TFLOP/s
  peak_copy     y = x + 1 over 1 GiB of bf16: achieved HBM GB/s (bytes read + written)
  prefill       tokens 8192, top-2 (16384 rows), 16 experts, bf16: gate_up [16, 4096, 12800] and down
                [16, 6400, 4096]; pallas_gpu gmm (best of a small Tiling sweep), lax.ragged_dot, and one dense
                matmul of the same FLOPs ([16384, k] @ [k, n]); time, TFLOP/s, % of the dense matmul
  decode        tokens 16, 64, 256 (32, 128, 512 rows), gate_up [16, 4096, 12800]: pallas_gpu gmm over int8, int4
                and int2 weights (group 128) and bf16, against bf16 lax.ragged_dot; time and GB/s of the weight
                bytes of the experts that have rows (what any implementation must read)
  ragged_all_to_all  jaxmoe's expert-parallel exchange with lax.ragged_all_to_all against all_gather on a mesh of
                the local devices: equal outputs, time each (one device: the primitive runs, the time is a copy)
  summary       int4 gmm vs bf16 ragged_dot speedup per decode size (target >= 2.5x) and bf16 gmm vs dense at
                prefill (target >= 60%)
Lines with "sweep": true are single Tiling candidates; the case line reports the best.

Every kernel output (each sweep candidate) is compared with the XLA reference (pallas_kernels.grouped.reference); a
mismatch prints "CORRECTNESS MISMATCH" on stderr at once, the run goes on, and the script exits 1 at the end (also
when every candidate of a case fails to compile). Timing: compile and warm up, then the median of --repeats
samples, each `inner` back-to-back calls (enough for ~20 ms) ended by block_until_ready.

    python experiments/bench/kernels_gpu.py --out experiments/bench/kernels_gpu.jsonl
    python experiments/bench/kernels_gpu.py --smoke     # tiny shapes, interpret=True: runs every path on CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.grouped import gpu, reference
from pallas_kernels.quant import quantize_weight

T = gpu.Tiling
BF16 = jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class Config:
    prefill_tokens: int
    d: int
    f: int
    experts: int
    top_k: int
    decode_tokens: tuple[int, ...]
    quant_bits: tuple[int, ...]
    quant_group: int
    peak_matmul: int
    copy_elements: int
    prefill_tilings: tuple[gpu.Tiling, ...]
    decode_tilings: tuple[gpu.Tiling, ...]
    interpret: bool
    repeats: int
    tol_bf16: float = 2e-2


FULL = Config(
    prefill_tokens=8192, d=4096, f=6400, experts=16, top_k=2, decode_tokens=(16, 64, 256), quant_bits=(8, 4, 2),
    quant_group=128, peak_matmul=8192, copy_elements=2 ** 29, interpret=False, repeats=7,
    prefill_tilings=(T(64, 64, 128, 8, 4, 3), T(128, 64, 128, 8, 8, 3), T(128, 32, 128, 8, 4, 4),
                     T(128, 64, 256, 8, 8, 3), T(64, 64, 256, 8, 8, 4)),
    decode_tilings=(T(16, 64, 128, 8, 4, 3), T(16, 128, 64, 8, 4, 4), T(16, 64, 256, 8, 8, 3),
                    T(32, 64, 128, 8, 4, 5)),
)
SMOKE = Config(
    prefill_tokens=64, d=128, f=64, experts=4, top_k=2, decode_tokens=(4, 8), quant_bits=(8, 4, 2), quant_group=64,
    peak_matmul=256, copy_elements=2 ** 16, interpret=True, repeats=2,
    prefill_tilings=(T(16, 32, 32), T(32, 64, 64)), decode_tilings=(T(16, 32, 32),),
)


class Bench:
    """Holds the output file, the failures so far and the time budget."""

    def __init__(self, cfg: Config, out_path: str | None, budget_s: float):
        self.cfg = cfg
        self.out = open(out_path, "w") if out_path else None
        self.failures: list[str] = []
        self.deadline = time.monotonic() + budget_s

    def emit(self, **record) -> dict:
        line = json.dumps(record)
        print(line, flush=True)
        if self.out:
            self.out.write(line + "\n")
            self.out.flush()
        return record

    def check(self, name: str, got, want) -> float:
        got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
        err = float(jnp.max(jnp.abs(got - want)) / jnp.maximum(jnp.max(jnp.abs(want)), 1e-30))
        if not err <= self.cfg.tol_bf16:  # also catches NaN
            self.failures.append(f"{name}: max relative error {err:.3g} > {self.cfg.tol_bf16}")
            print(f"CORRECTNESS MISMATCH {self.failures[-1]}", file=sys.stderr, flush=True)
        return err

    def time(self, fn, *args) -> float:
        """Median seconds per call (compiles and warms up first)."""
        jax.block_until_ready(fn(*args))
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        inner = max(1, min(50, math.ceil(0.02 / max(time.perf_counter() - start, 1e-6))))
        samples = []
        for _ in range(self.cfg.repeats):
            start = time.perf_counter()
            for _ in range(inner):
                out = fn(*args)
            jax.block_until_ready(out)
            samples.append((time.perf_counter() - start) / inner)
        return statistics.median(samples)

    def sweep(self, case: dict, tilings, make_fn, args, want) -> dict | None:
        """Times each Tiling (after checking its output); -> the best candidate's record, or None if none ran."""
        best = None
        for i, tiling in enumerate(tilings):
            if i and time.monotonic() > self.deadline:
                self.emit(**case, sweep=True, skipped=f"time budget spent; {len(tilings) - i} tilings not tried")
                break
            tiling_d = dataclasses.asdict(tiling)
            try:
                fn = make_fn(tiling)
                err = self.check(f"{case['case']} {case.get('impl')} {tiling_d}", fn(*args), want)
                seconds = self.time(fn, *args)
            except Exception as e:  # a candidate Triton cannot compile (e.g. too much shared memory) is skipped
                self.emit(**case, sweep=True, tiling=tiling_d, error=f"{type(e).__name__}: {str(e)[:300]}")
                continue
            record = self.emit(**case, sweep=True, tiling=tiling_d, time_ms=seconds * 1e3, max_rel_err=err)
            if best is None or seconds < best["time_ms"] / 1e3:
                best = record
        if best is None:
            self.failures.append(f"{case}: no tiling ran")
        return best


def router_group_sizes(tokens: int, experts: int, top_k: int, seed: int) -> np.ndarray:
    """int32 [experts]: top-k counts of random logits plus a per-expert popularity offset (uneven, like a router)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(tokens, experts)) + 0.7 * rng.normal(size=experts)
    chosen = np.argsort(-logits, axis=1)[:, :top_k]
    return np.bincount(chosen.ravel(), minlength=experts).astype(np.int32)


def gmm_fn(interpret: bool, tiling: gpu.Tiling):
    return jax.jit(functools.partial(gpu.gmm, group_offset=jnp.int32(0), transpose_rhs=False, out_dtype=BF16,
                                     interpret=interpret, tiling=tiling))


reference_fn = jax.jit(functools.partial(reference.gmm, transpose_rhs=False, out_dtype=BF16))
ragged_dot_fn = jax.jit(lambda x, w, sizes: lax.ragged_dot(x, w, sizes))
dense_fn = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(BF16))


def bench_peak(b: Bench) -> dict:
    n = b.cfg.peak_matmul
    keys = jax.random.split(jax.random.key(0), 3)
    x, w = (jax.random.normal(k, (n, n), BF16) for k in keys[:2])
    seconds = b.time(dense_fn, x, w)
    matmul = b.emit(case="peak_matmul", shape=[n, n, n], time_ms=seconds * 1e3, tflops=2 * n ** 3 / seconds / 1e12)
    y = jax.random.normal(keys[2], (b.cfg.copy_elements,), BF16)
    seconds = b.time(jax.jit(lambda y: y + jnp.ones((), BF16)), y)
    b.emit(case="peak_copy", bytes=2 * y.nbytes, time_ms=seconds * 1e3, gbps=2 * y.nbytes / seconds / 1e9)
    return matmul


def bench_prefill(b: Bench, name: str, k: int, n: int, seed: int) -> dict | None:
    cfg = b.cfg
    sizes = jnp.asarray(router_group_sizes(cfg.prefill_tokens, cfg.experts, cfg.top_k, seed))
    m = int(sizes.sum())
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), BF16)
    w = (jax.random.normal(kw, (cfg.experts, k, n), jnp.float32) / math.sqrt(k)).astype(BF16)
    flops = 2 * m * k * n
    want = reference_fn(x, w, sizes, group_offset=jnp.int32(0))
    case = dict(case=f"prefill_{name}", m=m, k=k, n=n, experts=cfg.experts, group_sizes=sizes.tolist())

    dense_s = b.time(dense_fn, x, w[0])
    b.emit(**case, impl="dense_matmul", time_ms=dense_s * 1e3, tflops=flops / dense_s / 1e12, pct_of_dense=100.0)
    b.check(f"prefill_{name} ragged_dot", ragged_dot_fn(x, w, sizes), want)
    ragged_s = b.time(ragged_dot_fn, x, w, sizes)
    b.emit(**case, impl="ragged_dot", time_ms=ragged_s * 1e3, tflops=flops / ragged_s / 1e12,
           pct_of_dense=100 * dense_s / ragged_s)
    best = b.sweep(dict(case, impl="pallas_gpu"), cfg.prefill_tilings,
                   lambda t: gmm_fn(cfg.interpret, t), (x, w, sizes), want)
    if best is None:
        return None
    gmm_s = best["time_ms"] / 1e3
    return b.emit(**case, impl="pallas_gpu", tiling=best["tiling"], time_ms=best["time_ms"],
                  tflops=flops / gmm_s / 1e12, pct_of_dense=100 * dense_s / gmm_s,
                  speedup_vs_ragged_dot=ragged_s / gmm_s, max_rel_err=best["max_rel_err"])


def bench_decode(b: Bench, tokens: int, w, quantized: dict) -> dict:
    """-> {impl: seconds} for one decode size."""
    cfg = b.cfg
    sizes_np = router_group_sizes(tokens, cfg.experts, cfg.top_k, seed=tokens)
    sizes = jnp.asarray(sizes_np)
    m = int(sizes_np.sum())
    active = int((sizes_np > 0).sum())
    x = jax.random.normal(jax.random.key(tokens), (m, w.shape[1]), BF16)
    case = dict(case=f"decode_{tokens}", tokens=tokens, m=m, k=w.shape[1], n=w.shape[2], experts=cfg.experts,
                active_experts=active, group_sizes=sizes_np.tolist())
    per_expert_bf16 = w.nbytes // cfg.experts
    times = {}

    want = reference_fn(x, w, sizes, group_offset=jnp.int32(0))
    b.check(f"decode_{tokens} ragged_dot", ragged_dot_fn(x, w, sizes), want)
    times["ragged_dot_bf16"] = b.time(ragged_dot_fn, x, w, sizes)
    b.emit(**case, impl="ragged_dot_bf16", time_ms=times["ragged_dot_bf16"] * 1e3,
           weight_gbps=active * per_expert_bf16 / times["ragged_dot_bf16"] / 1e9)
    for impl, rhs in [("pallas_gpu_bf16", w)] + [(f"pallas_gpu_int{bits}", q) for bits, q in quantized.items()]:
        want = reference_fn(x, rhs, sizes, group_offset=jnp.int32(0))
        per_expert = rhs.nbytes // cfg.experts
        best = b.sweep(dict(case, impl=impl), cfg.decode_tilings, lambda t: gmm_fn(cfg.interpret, t),
                       (x, rhs, sizes), want)
        if best is None:
            continue
        times[impl] = best["time_ms"] / 1e3
        b.emit(**case, impl=impl, tiling=best["tiling"], time_ms=best["time_ms"], weight_bytes=active * per_expert,
               weight_gbps=active * per_expert / times[impl] / 1e9,
               speedup_vs_ragged_dot=times["ragged_dot_bf16"] / times[impl], max_rel_err=best["max_rel_err"])
    return times


def bench_ragged_exchange(b: Bench, *, smoke: bool) -> dict | None:
    """jaxmoe's expert-parallel "ragged_all_to_all" strategy against "all_gather" on a mesh of every local device
    (expert axis; 2048 tokens, d 1024, 16 experts of f 2048, bf16): same outputs, time each. With one device the
    exchange is a copy, so this only shows the primitive runs; the timing means something from 2 devices up. XLA:CPU
    has no kernel for it, so --smoke skips the case."""
    from jaxmoe.moe.parallel import moe_ffn_sharded

    if smoke:
        return b.emit(case="ragged_all_to_all", skipped="XLA:CPU does not run lax.ragged_all_to_all")
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
    t, d, e, f = 2048, 1024, 16, 2048
    keys = jax.random.split(jax.random.key(5), 4)
    x = jax.random.normal(keys[0], (t, d), BF16)
    logits = jax.random.normal(keys[1], (t, e))
    weights, experts = jax.lax.top_k(jax.nn.softmax(logits), 2)
    w_gate_up = (jax.random.normal(keys[2], (e, d, 2 * f)) / math.sqrt(d)).astype(BF16)
    w_down = (jax.random.normal(keys[3], (e, f, d)) / math.sqrt(f)).astype(BF16)
    fns = {s: jax.jit(functools.partial(moe_ffn_sharded, mesh=mesh, strategy=s))
           for s in ("all_gather", "ragged_all_to_all")}
    args = (x, weights, experts.astype(jnp.int32), w_gate_up, w_down)
    try:
        want = fns["all_gather"](*args)
        err = b.check("ragged_all_to_all vs all_gather", fns["ragged_all_to_all"](*args), want)
        times = {s: b.time(fn, *args) * 1e3 for s, fn in fns.items()}
    except Exception as exc:  # noqa: BLE001 - reported, and counted as a failure
        b.failures.append(f"ragged_all_to_all: {type(exc).__name__}: {str(exc)[:300]}")
        return b.emit(case="ragged_all_to_all", error=b.failures[-1])
    return b.emit(case="ragged_all_to_all", devices=len(devices), max_rel_err=err,
                  **{f"{s}_ms": round(ms, 3) for s, ms in times.items()})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the JSON lines to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpret=True (runs on CPU)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="after this many seconds each remaining sweep tries its first tiling only")
    args = parser.parse_args()
    cfg = SMOKE if args.smoke else FULL
    b = Bench(cfg, args.out, args.budget_s)
    device = jax.devices()[0]
    if not args.smoke and device.platform != "gpu":
        print(f"kernels_gpu.py needs a GPU (found {device.platform}); use --smoke on CPU", file=sys.stderr)
        return 2
    b.emit(case="device", device_kind=device.device_kind, platform=device.platform, jax=jax.__version__,
           smoke=args.smoke)

    peak = bench_peak(b)
    prefill = [bench_prefill(b, "gate_up", cfg.d, 2 * cfg.f, seed=1), bench_prefill(b, "down", cfg.f, cfg.d, seed=2)]

    kw = jax.random.key(3)
    w = (jax.random.normal(kw, (cfg.experts, cfg.d, 2 * cfg.f), jnp.float32) / math.sqrt(cfg.d)).astype(BF16)
    quantize = jax.jit(quantize_weight, static_argnames=("bits", "group_size"))
    quantized = {bits: quantize(w, bits=bits, group_size=cfg.quant_group) for bits in cfg.quant_bits}
    decode = {tokens: bench_decode(b, tokens, w, quantized) for tokens in cfg.decode_tokens}

    bench_ragged_exchange(b, smoke=args.smoke)

    int4_speedup = {t: d["ragged_dot_bf16"] / d["pallas_gpu_int4"] for t, d in decode.items() if "pallas_gpu_int4" in d}
    pct_dense = {p["case"]: p["pct_of_dense"] for p in prefill if p is not None}
    b.emit(case="summary", peak_tflops=peak["tflops"], int4_vs_ragged_dot_speedup=int4_speedup,
           int4_target_met=bool(int4_speedup) and min(int4_speedup.values()) >= 2.5,
           bf16_gmm_pct_of_dense=pct_dense, dense_target_met=bool(pct_dense) and min(pct_dense.values()) >= 60,
           failures=b.failures)
    if b.failures:
        print(f"FAILED: {len(b.failures)} correctness/compile failure(s):\n  " + "\n  ".join(b.failures),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
