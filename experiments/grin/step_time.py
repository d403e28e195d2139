"""Issue 20's step times: each arm's training step at its config's batch, the arms alternating call by call.

  python experiments/grin/step_time.py                  # every arm, 6 timed steps each (about 3 min)
  python experiments/grin/step_time.py --arms sparsemixer-v2 dense --steps 4

For budgeting the sweep (README.md, Budget). Each arm's model is built as `jaxmoe train` builds it (seed 0, the
configs' model section; a vocabulary of tokenizer.bpe_vocab_size ids), and trains on one synthetic batch of the
config's optim.batch_size rows x data.max_len random tokens, packed as 4 sequences per row. After one step each
(compilation), the arms take turns step by step, so that every arm sees the same load on a shared machine. One JSON
line per arm: the median and minimum wall seconds per step, the median CPU seconds per step (all threads; about
the same whatever else runs, where wall time is not), tokens/s at the median, and the first step's seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.train.loop import Batch, TrainConfig, make_optimizer, train_step
from jaxmoe.train.run_config import load_run_config
from jaxmoe.train.trainer import build_model

from run import ARMS, CONFIGS  # this script's folder, first on sys.path when run as a script

SEQUENCES_PER_ROW = 4


def synthetic_batch(rows: int, length: int, vocab: int) -> Batch:
    """rows x length random token ids in [3, vocab), every token a target, SEQUENCES_PER_ROW packed per row."""
    piece = length // SEQUENCES_PER_ROW
    segment_ids = np.minimum(np.arange(length) // piece, SEQUENCES_PER_ROW - 1)
    positions = np.arange(length) - segment_ids * piece
    ids = np.random.default_rng(0).integers(3, vocab, (rows, length))
    ones = jnp.ones((rows, length), jnp.int32)
    return Batch(input_ids=jnp.asarray(ids, jnp.int32), loss_mask=ones, attention_mask=ones,
                 segment_ids=jnp.asarray(np.tile(segment_ids, (rows, 1)), jnp.int32),
                 positions=jnp.asarray(np.tile(positions, (rows, 1)), jnp.int32))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, metavar="ARM")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per arm, after the first")
    args = parser.parse_args(argv)
    cases = {}
    for arm in args.arms:
        config = load_run_config(CONFIGS / f"{arm}.yaml")
        vocab = config.tokenizer.bpe_vocab_size
        tokenizer = types.SimpleNamespace(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = build_model(config, tokenizer)
        optimizer = make_optimizer(model, TrainConfig(learning_rate=config.optim.learning_rate, warmup_steps=1,
                                                      total_steps=args.steps + 2))
        batch = synthetic_batch(config.optim.batch_size, config.data.max_len, vocab)
        started = time.perf_counter()
        jax.block_until_ready(train_step(model, optimizer, batch, nnx.Rngs(0)))
        cases[arm] = {"step": (model, optimizer, batch), "first_step_s": time.perf_counter() - started,
                      "wall": [], "cpu": []}
    for step in range(args.steps):
        for case in cases.values():
            wall, cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(train_step(*case["step"], nnx.Rngs(step + 1)))
            case["wall"].append(time.perf_counter() - wall)
            case["cpu"].append(time.process_time() - cpu)
    for arm, case in cases.items():
        _, _, batch = case["step"]
        median = statistics.median(case["wall"])
        print(json.dumps({"arm": arm, "batch": list(batch.input_ids.shape), "s_per_step": round(median, 3),
                          "min_s_per_step": round(min(case["wall"]), 3),
                          "cpu_s_per_step": round(statistics.median(case["cpu"]), 3),
                          "tokens_per_s": round(batch.input_ids.size / median),
                          "first_step_s": round(case["first_step_s"], 1)}), flush=True)


if __name__ == "__main__":
    main()
