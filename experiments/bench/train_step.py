"""One full training step, jaxmoe vs transformers, on the same random weights (fp32, CPU).

Models (issue 15): a 2-layer PhiMoE (hidden 512, intermediate 1024, 8 heads / 4 KV heads, 16 experts, top-2,
LayerNorm, attention and LM-head biases) and a 2-layer dense Phi-3 of the same sizes (RMSNorm, SwiGLU, no biases),
each at vocabulary 512 and 32,064, built in transformers under `torch.manual_seed(0)`, saved with
`save_pretrained` and read back with `jaxmoe.load_hf`.

The step, on both sides: a training-mode forward over 2 x 1,024 tokens (PhiMoE: SparseMixer sampling and input
jitter on), the mean next-token cross-entropy (+ 0.01 x the load-balancing loss for PhiMoE), backward, global-norm
clipping to 1.0 and an AdamW update (`TrainConfig()`'s learning-rate schedule, betas and weight decay, decay on
matrices only).

Cases (one JSON line each):
  jaxmoe                   jaxmoe.train.train_step (jitted); `first_step_seconds` is its first call, compile
                           included, and `compile_seconds` that minus the median step
  transformers_eager       *ForCausalLM with sdpa attention (PhiMoE: experts_implementation="eager", the
                           per-expert loop), torch.optim.AdamW
  transformers_grouped_mm  PhiMoE only: experts_implementation="grouped_mm" (what from_pretrained picks)

Every case runs once to warm up; then the cases alternate call by call (0.2 s pause between calls) and the median
of --repeats steps is reported, with tokens/s = 2 * 1024 / median. `first_loss` is each case's first timed step
(PhiMoE's sides draw different routing samples, so it only shows that both are near ln(vocab)).

    python experiments/bench/train_step.py [--model moe dense] [--vocab 512 32064] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

import jaxmoe  # noqa: E402
from jaxmoe.train import Batch, TrainConfig, learning_rate_schedule, make_optimizer, train_step  # noqa: E402

BATCH, LENGTH, AUX_LOSS_COEF = 2, 1024, 0.01
SIZES = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=4096, bos_token_id=1, eos_token_id=None, pad_token_id=0,
             use_cache=False, attn_implementation="sdpa")


def hf_model(kind: str, vocab: int):
    """A random transformers model of the benchmark's sizes."""
    if kind == "moe":
        config = transformers.PhimoeConfig(
            vocab_size=vocab, num_local_experts=16, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True,
            router_jitter_noise=0.01, input_jitter_noise=0.01, output_router_logits=True,
            router_aux_loss_coef=AUX_LOSS_COEF, experts_implementation="eager", **SIZES)
        return transformers.PhimoeForCausalLM(config)
    config = transformers.Phi3Config(vocab_size=vocab, original_max_position_embeddings=4096, rope_scaling=None,
                                     tie_word_embeddings=False, **SIZES)
    return transformers.Phi3ForCausalLM(config)


def torch_step_fn(model, train: TrainConfig, ids: torch.Tensor):
    """A callable running one training step of `model` on `ids`; returns the loss."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # As jaxmoe's make_optimizer: weight decay on matrices only.
    groups = [{"params": [p for p in params if p.ndim > 1]},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=train.learning_rate, betas=(train.b1, train.b2),
                                  weight_decay=train.weight_decay)
    # jaxmoe's warmup + cosine schedule, tabulated so that no jax call runs inside the torch step.
    rates = np.asarray(learning_rate_schedule(train)(np.arange(train.total_steps + 1))) / train.learning_rate
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: float(rates[min(step, train.total_steps)]))

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss  # labels are shifted inside; PhiMoE adds its aux loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train.clip_norm)
        optimizer.step()
        scheduler.step()
        return loss.item()

    return step


def jax_step_fn(model, train: TrainConfig, ids: np.ndarray):
    """A callable running one jitted jaxmoe training step of `model` on `ids`; returns the loss."""
    model.train()
    optimizer = make_optimizer(model, train)
    batch = Batch(jnp.asarray(ids, jnp.int32), jnp.ones(ids.shape, jnp.int32))
    rngs = nnx.Rngs(router=1, jitter=2)
    return lambda: float(jax.block_until_ready(train_step(model, optimizer, batch, rngs))["loss"])


def median_seconds(steps: dict, repeats: int) -> dict[str, dict]:
    """Per case: median and min seconds, the first (warm-up) call's seconds and the first timed step's loss; the
    cases alternate call by call."""
    first = {}
    for name, step in steps.items():
        start = time.perf_counter()
        step()
        first[name] = time.perf_counter() - start
    times, first_loss = {name: [] for name in steps}, {}
    for _ in range(repeats):
        for name, step in steps.items():
            time.sleep(0.2)  # so that no side's worker threads are still spinning when the next one starts
            start = time.perf_counter()
            loss = step()
            times[name].append(time.perf_counter() - start)
            first_loss.setdefault(name, loss)
    return {name: {"seconds": statistics.median(t), "min_seconds": min(t), "first_step_seconds": first[name],
                   "first_loss": first_loss[name]} for name, t in times.items()}


def run(kind: str, vocab: int, repeats: int) -> None:
    torch.manual_seed(0)
    hf_eager = hf_model(kind, vocab)
    with tempfile.TemporaryDirectory() as folder:
        hf_eager.save_pretrained(folder)
        hf_grouped = None
        if kind == "moe":
            hf_grouped = transformers.PhimoeForCausalLM.from_pretrained(
                folder, dtype=torch.float32, attn_implementation="sdpa", experts_implementation="grouped_mm")
            assert hf_grouped.config._experts_implementation == "grouped_mm"
        model = jaxmoe.load_hf(folder)
    if kind == "moe":
        assert model.config.moe.aux_loss_coef == AUX_LOSS_COEF, model.config.moe  # read from router_aux_loss_coef

    ids = np.random.default_rng(0).integers(3, vocab, size=(BATCH, LENGTH))
    with torch.no_grad():  # the same weights: eval-mode logits agree before any step
        hf_eager.eval()
        diff = float(np.abs(np.asarray(model(jnp.asarray(ids[:1, :64])).logits)
                            - hf_eager(torch.tensor(ids[:1, :64])).logits.numpy()).max())

    train = TrainConfig()
    ids_pt = torch.tensor(ids)
    steps = {"jaxmoe": jax_step_fn(model, train, ids), "transformers_eager": torch_step_fn(hf_eager, train, ids_pt)}
    if hf_grouped is not None:
        steps["transformers_grouped_mm"] = torch_step_fn(hf_grouped, train, ids_pt)
    results = median_seconds(steps, repeats)
    for name, r in results.items():
        line = {"model": kind, "vocab": vocab, "case": name, "seconds": round(r["seconds"], 4),
                "min_seconds": round(r["min_seconds"], 4), "tok_s": round(BATCH * LENGTH / r["seconds"], 1),
                "first_loss": round(r["first_loss"], 4), "repeats": repeats,
                "first_step_seconds": round(r["first_step_seconds"], 2)}
        for other in results:
            if other.startswith("transformers"):
                line[f"speedup_vs_{other}"] = round(results[other]["seconds"] / r["seconds"], 2)
        if name == "jaxmoe":
            line["compile_seconds"] = round(r["first_step_seconds"] - r["seconds"], 2)
            line["max_abs_diff_eval_logits"] = diff
        print(json.dumps(line), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", nargs="+", choices=("moe", "dense"), default=["moe", "dense"])
    parser.add_argument("--vocab", nargs="+", type=int, default=[512, 32064])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    for kind in args.model:
        for vocab in args.vocab:
            run(kind, vocab, args.repeats)


if __name__ == "__main__":
    main()
