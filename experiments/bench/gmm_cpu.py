"""`pallas_kernels.gmm` on CPU, forward + backward (fp32) and int4/int8 forward (decode-sized), against what a
user would use instead: `lax.ragged_dot` (the "xla" backend), and one dense matmul of the same FLOPs.

Cases (one JSON line each, in one run), lhs [m, k] rows sorted over G groups, rhs [G, k, n]:
  prefill  m=8192 token copies, k=512, n=1024, G=16, uneven group sizes; jit(grad) of sum(gmm(x, w) * R) in x, w:
           backends "cpu" (auto on CPU) and "xla", and dense: x @ w[0] with its gradients (same FLOPs).
  decode   m=16 / 64 / 256 copies, k=2048, n=2048, G=16; forward only: fp32 weights through "cpu" and "xla",
           int8 and int4 group-64 weights through "cpu", and a plain matmul per expert that has rows (the same
           FLOPs, unrolled at trace time for this one routing) in fp32; weight bytes counted for the experts with
           rows (what a grouped kernel must read).
Every case runs once to compile; the cases then alternate call by call and the median of --repeats is reported.

    python experiments/bench/gmm_cpu.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk

G = 16


def group_sizes(m: int, rng) -> np.ndarray:
    """Uneven sizes summing to m (a Dirichlet draw), one group left empty."""
    p = rng.dirichlet(np.full(G, 0.7))
    p[3] = 0.0
    sizes = np.floor(p / p.sum() * m).astype(np.int32)
    sizes[0] += m - sizes.sum()
    return sizes


def timed(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def prefill_cases(rng):
    m, k, n = 8192, 512, 1024
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(G, k, n)) * 0.02, jnp.float32)
    r = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
    sizes = jnp.asarray(group_sizes(m, rng))
    flops = 3 * 2 * m * k * n  # forward + two backward matmuls
    cases = {}
    for backend in ("cpu", "xla"):
        grad = jax.jit(jax.grad(lambda x, w, b=backend: jnp.sum(pk.gmm(x, w, sizes, backend=b) * r), argnums=(0, 1)))
        cases[f"prefill_grad_{backend}"] = (lambda g=grad: g(x, w), flops)
    dense = jax.jit(jax.grad(lambda x, w: jnp.sum((x @ w[0]) * r), argnums=(0, 1)))
    cases["prefill_grad_dense_same_flops"] = (lambda: dense(x, w), flops)
    return cases


def decode_cases(rng, m: int):
    k = n = 2048
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(G, k, n)) * 0.02, jnp.float32)
    sizes_np = group_sizes(m, rng)
    sizes = jnp.asarray(sizes_np)
    active = int((sizes_np > 0).sum())
    flops = 2 * m * k * n
    cases = {}
    for backend in ("cpu", "xla"):
        f = jax.jit(lambda x, w, b=backend: pk.gmm(x, w, sizes, backend=b))
        cases[f"decode{m}_fp32_{backend}"] = (lambda f=f: f(x, w), flops, w.nbytes * active // G)
    for bits in (8, 4):
        q = pk.quantize_weight(w, bits=bits, group_size=64)
        f = jax.jit(lambda x, q: pk.gmm(x, q, sizes, backend="cpu"))
        cases[f"decode{m}_int{bits}_g64_cpu"] = (lambda f=f, q=q: f(x, q), flops, q.nbytes * active // G)
    per_expert = jax.jit(lambda x, w: [x[:int(s)] @ w[i] for i, s in enumerate(sizes_np) if s > 0])
    cases[f"decode{m}_fp32_dense_per_active_expert"] = (lambda: per_expert(x, w), flops, active * k * n * 4)
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    groups = [prefill_cases(rng)] + [decode_cases(rng, m) for m in (16, 64, 256)]
    for cases in groups:
        for fn, *_ in cases.values():
            jax.block_until_ready(fn())
        times = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, (fn, *_) in cases.items():
                times[name].append(timed(fn, 1))
        for name, (fn, flops, *rest) in cases.items():
            seconds = statistics.median(times[name])
            line = {"case": name, "ms": round(seconds * 1e3, 2), "gflops": round(flops / seconds / 1e9, 1)}
            if rest:
                line["weight_mb_read"] = round(rest[0] / 1e6, 1)
                line["weight_gb_per_s"] = round(rest[0] / seconds / 1e9, 2)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
