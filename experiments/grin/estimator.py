"""Issue 20: the bias and variance of router-gradient estimators on one small MoE layer, against the exact gradient.

  python experiments/grin/estimator.py     # writes experiments/grin/estimator_error.png, prints two tables

The layer (top-1, as GRIN states its estimators, docs/paper_methods.md §d): one token, E = 8 experts with fixed
outputs o_i in R^16, router logits z in [0, 2) (SparseMixer's mask, at jitter_eps 0.5, keeps every expert); the
layer outputs h = p_D o_D for the expert D it picks, and the loss is a softmax cross-entropy head on it,
f(h) = logsumexp(W h) - (W h)_0 (W [32, 16] fixed). The objective is the expected loss of the sampled layer,
    J(z) = E_{D ~ p}[f(p_D o_D)] = sum_i p_i f(p_i o_i),   p = softmax(z),
whose gradient dJ/dz is computed exactly by autodiff of that sum. The estimators, each a function of one draw:
  v2    SparseMixer-v2 (GRIN Alg. 1; `jaxmoe.sparsemixer(variant="v2")`, first pick only): D ~ p, the forward
        weight c p_D with Heun's coin c in {1, 1/3}, the backward d/dz = f'(c h_D) o_D p_D (e_D - p).
  v2*   SparseMixer-v2* (GRIN Alg. 2, variant="v2*"): the same with q = softmax(z/2), its own coin and twice the
        backward. Its layer gates with q, so its target is the gradient of J* = sum_i q_i f(q_i o_i) (GRIN's
        unbiasedness claim).
  ST    straight-through: D ~ p, the forward h = sum_i p_i m_i o_i with m = onehot(D) + p - stop_gradient(p):
        the value is the sampled expert's p_D o_D, and the backward treats the one-hot sample as if it were the
        softmax p (identity backward through the sample), on top of the gate's ordinary gradient.
  top-1 gating (GShard's router gradient, deterministic): D = argmax z, the pick a constant, the gradient through
        the gate p_D only; no sampling, so no variance, and a fixed bias.
For each sampled estimator the exact mean and covariance come from enumerating its outcomes (each pick D and, for
v2 and v2*, each side of the coin, forced through `noise`), so its bias |E g - dJ/dz| is exact; the relative RMS
error of the mean of N independent draws is then sqrt(bias^2 + tr Cov / N) / |dJ/dz|, drawn as lines, and checked
by Monte Carlo (points: the RMS over REPEATS independent N-draw means). The second table gives the exact bias over
several random layers, and v2 against what it is designed to estimate (`v2_design_target`). About 40 s on 2 CPU
cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from matplotlib.figure import Figure

from jaxmoe.moe.router import sparsemixer, sparsemixer_noise

EXPERTS, WIDTH, VOCAB = 8, 16, 32
JITTER = 0.5  # SparseMixer's mask keeps z_i with (max z - z_i) / max(|z_i|, max z) <= 2 * 0.5: every z_i >= 0
SAMPLES = [2**n for n in range(15)]  # N = 1 ... 16,384 draws per mean
REPEATS = 48  # independent N-draw means per point of the Monte-Carlo check
# Heun's coin (GRIN Alg. 1 / 2): the probability that a pick runs at full scale (c = 1) instead of c = 1/3.
FULL_SCALE = {"v2": 0.25, "v2*": 0.625}  # v2: always 1 for the argmax pick


def problem(seed: int):
    """(z [E], o [E, d], W [V, d]) float32: logits in [0, 2) (so the mask keeps every expert), outputs and head
    scaled so that f is far from linear over the h = p_D o_D the layer produces."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.0, 2.0, EXPERTS)
    o = 3.0 * rng.normal(size=(EXPERTS, WIDTH))
    w = rng.normal(size=(VOCAB, WIDTH)) / np.sqrt(WIDTH) * 2.0
    return tuple(jnp.asarray(x, jnp.float32) for x in (z, o, w))


def head_loss(h_nd, w):
    """f(h) per row: cross-entropy of the head W h against class 0. h [n, d] -> [n]."""
    logits = h_nd @ w.T
    return jax.nn.logsumexp(logits, axis=-1) - logits[:, 0]


def objective(z, o, w, scale: float):
    """J(z) = sum_i p_i f(p_i o_i) with p = softmax(scale * z): the sampled top-1 layer's expected loss."""
    p = jax.nn.softmax(scale * z)
    return jnp.sum(p * head_loss(p[:, None] * o, w))


def sparsemixer_gradients(z, o, w, noise, variant: str):
    """Per-row router gradients [n, E] of f(weight_1 o_{expert_1}) under `jaxmoe.sparsemixer` with the given draws
    (one row per draw; rows are independent, so the gradient of the sum holds each row's own)."""
    n = noise[0].shape[0]

    def loss(z_ne):
        weights, experts = sparsemixer(z_ne, jitter_eps=JITTER, training=True, noise=noise, variant=variant)
        return jnp.sum(head_loss(weights[:, :1] * o[experts[:, 0]], w))

    return jax.grad(loss)(jnp.tile(z, (n, 1)))


def straight_through_gradients(z, o, w, picks_n):
    """Per-row straight-through router gradients [n, E] for the picks D (int [n]); see the module docstring."""
    def loss(z_ne):
        p = jax.nn.softmax(z_ne, axis=-1)
        sample = jax.nn.one_hot(picks_n, EXPERTS) + p - jax.lax.stop_gradient(p)
        return jnp.sum(head_loss((p * sample) @ o, w))

    return jax.grad(loss)(jnp.tile(z, (picks_n.shape[0], 1)))


def forced_noise(picks, full_scale):
    """SparseMixer draws that force round one's pick D and its coin: Exp(1) draws of 1 except 1e-30 at D (the
    Gumbel-max then picks D whatever the logits), u = 0.999 (full scale) or 0.001 (1/3)."""
    n = len(picks)
    exp1 = np.ones((n, EXPERTS), np.float32)
    exp1[np.arange(n), picks] = 1e-30
    u1 = np.where(np.asarray(full_scale), 0.999, 0.001).astype(np.float32)[:, None]
    return exp1, u1, np.ones((n, EXPERTS), np.float32), np.full((n, 1), 0.5, np.float32)


def exact_moments(z, o, w, estimator: str):
    """(mean [E], covariance trace) of one draw of a sampled estimator, by enumerating its outcomes."""
    if estimator == "ST":
        probabilities = np.asarray(jax.nn.softmax(z), np.float64)
        gradients = straight_through_gradients(z, o, w, jnp.arange(EXPERTS))
    else:
        p = np.asarray(jax.nn.softmax(z * (0.5 if estimator == "v2*" else 1.0)), np.float64)
        argmax = int(np.argmax(np.asarray(z)))
        full = np.array([1.0 if (estimator == "v2" and i == argmax) else FULL_SCALE[estimator]
                         for i in range(EXPERTS)])
        picks = np.repeat(np.arange(EXPERTS), 2)
        coins = np.tile([True, False], EXPERTS)
        probabilities = p[picks] * np.where(coins, full[picks], 1.0 - full[picks])
        gradients = sparsemixer_gradients(z, o, w, forced_noise(picks, coins), estimator)
    g = np.asarray(gradients, np.float64)
    mean = probabilities @ g
    return mean, float(probabilities @ np.sum((g - mean) ** 2, axis=1))


def monte_carlo_errors(z, o, w, estimator: str, target, seed: int) -> np.ndarray:
    """The relative RMS error |mean of N draws - target| / |target| over REPEATS means, for each N in SAMPLES."""
    n = REPEATS * SAMPLES[-1]
    noise = sparsemixer_noise(nnx.Rngs(router=seed), n, EXPERTS)
    if estimator == "ST":  # the same Gumbel-max draw as SparseMixer's first round: argmax z - log Exp(1)
        g = straight_through_gradients(z, o, w, jnp.argmax(z - jnp.log(noise[0]), axis=-1))
    else:
        g = sparsemixer_gradients(z, o, w, noise, estimator)
    g = np.asarray(g, np.float64).reshape(REPEATS, SAMPLES[-1], EXPERTS)
    norm = np.linalg.norm(target)
    return np.array([np.sqrt(np.mean(np.sum((g[:, :k].mean(1) - target) ** 2, axis=1))) / norm for k in SAMPLES])


def v2_design_target(z, o, w):
    """What SparseMixer-v2's expectation is built to equal [E] (GRIN Alg. 1; tests/moe/test_router.py checks it
    for cubic f): the sampling part of dJ/dz, sum_{i != a} (f(h_i) - f(0)) dp_i/dz by Heun's rule, with the
    first-order h_a f'(h_a) dp_a/dz at the argmax a (h_i = p_i o_i). It leaves out the gate's direct term
    sum_i p_i f'(h_i) o_i dp_i/dz, which v2* (twice the backward) adds back."""
    p = jax.nn.softmax(z)
    h = p[:, None] * o
    f = head_loss(h, w) - head_loss(jnp.zeros((1, WIDTH)), w)
    slope = jax.vmap(jax.grad(lambda x: head_loss(x[None], w)[0]))(h)
    a = jnp.argmax(z)
    weight = jax.lax.stop_gradient(f.at[a].set(jnp.sum(slope[a] * h[a])))
    return np.asarray(jax.grad(lambda s: jnp.sum(jax.nn.softmax(s) * weight))(z), np.float64)


def top1_gating(z, o, w):
    """GShard's router gradient for top-1 [E]: the argmax pick a constant, d f(p_a o_a) / dz through p_a."""
    a = jnp.argmax(z)
    return np.asarray(jax.grad(lambda s: head_loss(jax.nn.softmax(s)[a] * o[a][None], w)[0])(z), np.float64)


def exact_bias(z, o, w) -> dict[str, tuple[float, float, float]]:
    """{estimator vs target: (|E g - t| / |t|, |E g| / |t|, cosine(E g, t))}, every expectation exact."""
    t1 = np.asarray(jax.grad(objective)(z, o, w, 1.0), np.float64)
    t_half = np.asarray(jax.grad(objective)(z, o, w, 0.5), np.float64)
    means = {name: exact_moments(z, o, w, name)[0] for name in ("v2", "v2*", "ST")}
    pairs = {"v2 vs dJ/dz": (means["v2"], t1), "v2 vs its design target": (means["v2"], v2_design_target(z, o, w)),
             "v2* vs dJ*/dz": (means["v2*"], t_half), "ST vs dJ/dz": (means["ST"], t1),
             "top-1 gating (GShard) vs dJ/dz": (top1_gating(z, o, w), t1)}
    out = {}
    for name, (g, t) in pairs.items():
        norm = np.linalg.norm(t)
        out[name] = (np.linalg.norm(g - t) / norm, np.linalg.norm(g) / norm, float(g @ t / (np.linalg.norm(g) * norm)))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the plotted layer (logits, outputs, head)")
    parser.add_argument("--layers", type=int, default=16, help="random layers (seeds 0 ...) in the bias table")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "estimator_error.png")
    args = parser.parse_args(argv)
    z, o, w = problem(args.seed)
    targets = {scale: np.asarray(jax.grad(objective)(z, o, w, scale), np.float64) for scale in (1.0, 0.5)}
    shown = [SAMPLES.index(k) for k in (1, 64, 4096)]
    print(f"Layer seed {args.seed}: relative RMS error of the mean of N draws (exact / Monte Carlo, {REPEATS} "
          "repeats)\n")
    print("| estimator | target | relative bias | relative std (1 draw) | "
          + " | ".join(f"N={SAMPLES[i]}" for i in shown) + " |")
    print("|" + "---|" * (4 + len(shown)))
    curves = {}
    for index, estimator in enumerate(("v2", "v2*", "ST")):
        target = targets[0.5 if estimator == "v2*" else 1.0]
        mean, trace = exact_moments(z, o, w, estimator)
        norm = np.linalg.norm(target)
        bias = np.linalg.norm(mean - target) / norm
        exact = np.sqrt(bias**2 + trace / norm**2 / np.asarray(SAMPLES))
        measured = monte_carlo_errors(z, o, w, estimator, target, seed=1 + index)
        curves[estimator] = (exact, measured)
        cells = " | ".join(f"{exact[i]:.4f} / {measured[i]:.4f}" for i in shown)
        print(f"| {estimator} | {'dJ*/dz' if estimator == 'v2*' else 'dJ/dz'} | {bias:.4f} | "
              f"{np.sqrt(trace) / norm:.4f} | {cells} |")
    top1 = top1_gating(z, o, w)
    gating = np.linalg.norm(top1 - targets[1.0]) / np.linalg.norm(targets[1.0])
    print(f"| top-1 gating (GShard, deterministic) | dJ/dz | {gating:.4f} | 0 | "
          + " | ".join(f"{gating:.4f}" for _ in shown) + " |")

    per_layer = [exact_bias(*problem(seed)) for seed in range(args.layers)]
    print(f"\nExact bias over {args.layers} random layers (seeds 0-{args.layers - 1}): median [min, max]\n")
    print("| estimator vs target | relative bias | norm ratio abs(E g) / abs(target) | cosine(E g, target) |")
    print("|---|---|---|---|")
    for name in per_layer[0]:
        values = np.array([layer[name] for layer in per_layer])
        cells = " | ".join(f"{np.median(v):.4f} [{v.min():.4f}, {v.max():.4f}]" for v in values.T)
        print(f"| {name} | {cells} |")

    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.subplots()
    for (name, (exact, measured)), color in zip(curves.items(), ("tab:blue", "tab:orange", "tab:green")):
        ax.plot(SAMPLES, exact, color=color, label=f"{name} (exact)")
        ax.plot(SAMPLES, measured, "o", color=color, ms=4, label=f"{name} (Monte Carlo, {REPEATS} repeats)")
    ax.axhline(gating, color="tab:red", ls="--", label="top-1 gating gradient (GShard; no sampling)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("draws N averaged")
    ax.set_ylabel("relative RMS error |mean - target| / |target|")
    ax.set_title(f"Router-gradient estimators, one top-1 token, {EXPERTS} experts (layer seed {args.seed})\n"
                 "target: dJ/dz of J = sum_i p_i f(p_i o_i) (v2*: its own J*, p = softmax(z/2))")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
