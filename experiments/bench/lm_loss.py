"""The LM head + next-token cross-entropy of a training step, fused (`jaxmoe.nn.lm_loss.fused_cross_entropy`, by
chunk size) vs what train_step did before: the model's whole [b, t, vocab] fp32 logits, then `next_token_stats`
(optax's cross-entropy and the greedy hits on logits[:, :-1]), differentiated by autodiff (fp32, CPU).

Shapes (issue 15's step): hidden states [2, 1024, 512], an untied head [512, v] with a bias, vocabularies 512 and
32,064; a tenth of the tokens are masked out of the loss. Each case is `jax.jit(jax.grad(loss_sum, (x, W, b),
has_aux=True))` with the accuracy count as aux, as train_step differentiates it; the fused cases take the flat
[b * t, d] hidden states with targets and weights shifted as `next_token_stats_from_hidden` does.

Every case runs once to compile (and is checked against the logits path's gradients); the cases then alternate
call by call and the median of --repeats is reported, one JSON line per case with `speedup_vs_logits`.

    python experiments/bench/lm_loss.py [--vocab 512 32064] [--chunks 128 256 512 1024 2048] [--repeats 7]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.nn.lm_loss import OutputHead, fused_cross_entropy
from jaxmoe.train import Batch, next_token_stats

BATCH, LENGTH, HIDDEN = 2, 1024, 512


def logits_path(x_btd, head: OutputHead, batch: Batch):
    return next_token_stats(head.logits(x_btd), batch)


def fused_path(x_btd, head: OutputHead, batch: Batch, *, chunk: int):
    b, t, d = x_btd.shape
    targets = jnp.pad(batch.input_ids[:, 1:], ((0, 0), (0, 1))).reshape(-1)
    weights = jnp.pad(batch.loss_mask[:, 1:].astype(jnp.float32), ((0, 0), (0, 1))).reshape(-1)
    return fused_cross_entropy(x_btd.reshape(b * t, d), head, targets, weights, chunk=chunk)


def gradient_fn(stats_fn):
    def loss(x, w, b, batch):
        stats = stats_fn(x, OutputHead(w, b, "dv"), batch)
        return stats["loss_sum"], stats["correct"]

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", nargs="+", type=int, default=[512, 32064])
    parser.add_argument("--chunks", nargs="+", type=int, default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for vocab in args.vocab:
        batch = Batch(jnp.asarray(rng.integers(0, vocab, (BATCH, LENGTH)), jnp.int32),
                      jnp.asarray(rng.random((BATCH, LENGTH)) > 0.1, jnp.int32))
        inputs = (jnp.asarray(rng.normal(size=(BATCH, LENGTH, HIDDEN)), jnp.float32),
                  jnp.asarray(rng.normal(size=(HIDDEN, vocab)) * HIDDEN ** -0.5, jnp.float32),
                  jnp.asarray(rng.normal(size=(vocab,)) * 0.1, jnp.float32), batch)
        cases = {"logits": gradient_fn(logits_path)}
        for chunk in args.chunks:
            cases[f"fused_{chunk}"] = gradient_fn(functools.partial(fused_path, chunk=chunk))
        reference = jax.block_until_ready(cases["logits"](*inputs))
        for name, fn in cases.items():  # compile, and check each case against the logits path
            (dx, dw, db), correct = jax.block_until_ready(fn(*inputs))
            (rx, rw, rb), rcorrect = reference
            assert float(correct) == float(rcorrect), name
            for a, r in ((dx, rx), (dw, rw), (db, rb)):
                assert float(jnp.abs(a - r).max()) <= 1e-4 * float(jnp.abs(r).max()), name
        times = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, fn in cases.items():
                time.sleep(0.1)
                start = time.perf_counter()
                jax.block_until_ready(fn(*inputs))
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["logits"])
        for name, t in times.items():
            print(json.dumps({"vocab": vocab, "tokens": BATCH * LENGTH, "hidden": HIDDEN, "case": name,
                              "ms": round(1e3 * statistics.median(t), 1), "min_ms": round(1e3 * min(t), 1),
                              "speedup_vs_logits": round(base / statistics.median(t), 2),
                              "repeats": args.repeats}), flush=True)


if __name__ == "__main__":
    main()
