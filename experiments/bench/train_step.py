"""One full training step of a tiny random PhiMoE, jaxmoe vs transformers, on the same weights (fp32, CPU).

The step, on both sides: a training-mode forward over 8 x 256 tokens (SparseMixer sampling and input jitter on),
the mean next-token cross-entropy + 0.01 x the load-balancing loss, backward, global-norm clipping to 1.0 and an
AdamW update (`TrainConfig()`'s learning-rate schedule, betas and weight decay, decay on matrices only).

Cases (one JSON line each, in one run):
  jaxmoe                   jaxmoe.train.train_step (jitted; compile time excluded)
  transformers_eager       PhimoeForCausalLM, experts_implementation="eager" (the per-expert loop), sdpa attention,
                           torch.optim.AdamW
  transformers_grouped_mm  the same with experts_implementation="grouped_mm" (what from_pretrained picks)

Every case runs once to warm up; then the cases alternate call by call (0.2 s pause between calls) and the median
of --repeats steps is reported, with tokens/s = 8 * 256 / median. `first_loss` is the loss of each case's first
timed step (the sides draw different random routing samples, so it only shows that both are near ln(32064) = 10.4).

    python experiments/bench/train_step.py [--repeats 7]
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

BATCH, LENGTH, AUX_LOSS_COEF = 8, 256, 0.01


def hf_config() -> transformers.PhimoeConfig:
    return transformers.PhimoeConfig(
        vocab_size=32064, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, num_local_experts=16, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True,
        router_jitter_noise=0.01, input_jitter_noise=0.01, max_position_embeddings=4096, output_router_logits=True,
        router_aux_loss_coef=AUX_LOSS_COEF, use_cache=False, bos_token_id=1, eos_token_id=None, pad_token_id=0,
        attn_implementation="sdpa", experts_implementation="eager")


def torch_step_fn(model: transformers.PhimoeForCausalLM, train: TrainConfig, ids: torch.Tensor):
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
        loss = model(ids, labels=ids).loss  # labels are shifted inside; the aux loss is added (output_router_logits)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train.clip_norm)
        optimizer.step()
        scheduler.step()
        return loss.item()

    return step


def jax_step_fn(model: jaxmoe.PhimoeForCausalLM, train: TrainConfig, ids: np.ndarray):
    """A callable running one jitted jaxmoe training step of `model` on `ids`; returns the loss."""
    model.train()
    optimizer = make_optimizer(model, train)
    batch = Batch(jnp.asarray(ids, jnp.int32), jnp.ones(ids.shape, jnp.int32))
    rngs = nnx.Rngs(router=1, jitter=2)
    return lambda: float(jax.block_until_ready(train_step(model, optimizer, batch, rngs))["loss"])


def median_seconds(steps: dict, repeats: int) -> dict[str, tuple[float, float, float]]:
    """Per case: (median seconds, min seconds, loss of the first timed step), cases alternating call by call."""
    for step in steps.values():
        step()
    times, first_loss = {name: [] for name in steps}, {}
    for _ in range(repeats):
        for name, step in steps.items():
            time.sleep(0.2)  # so that no side's worker threads are still spinning when the next one starts
            start = time.perf_counter()
            loss = step()
            times[name].append(time.perf_counter() - start)
            first_loss.setdefault(name, loss)
    return {name: (statistics.median(t), min(t), first_loss[name]) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    torch.manual_seed(0)
    hf_eager = transformers.PhimoeForCausalLM(hf_config())
    with tempfile.TemporaryDirectory() as folder:
        hf_eager.save_pretrained(folder)
        hf_grouped = transformers.PhimoeForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="sdpa", experts_implementation="grouped_mm")
        model = jaxmoe.load_hf(folder)
    assert hf_grouped.config._experts_implementation == "grouped_mm"
    assert model.config.moe.aux_loss_coef == AUX_LOSS_COEF, model.config.moe  # read from router_aux_loss_coef

    ids = np.random.default_rng(0).integers(3, 32064, size=(BATCH, LENGTH))
    with torch.no_grad():  # the same weights: eval-mode logits agree before any step
        hf_eager.eval()
        diff = float(np.abs(np.asarray(model(jnp.asarray(ids[:1, :64])).logits)
                            - hf_eager(torch.tensor(ids[:1, :64])).logits.numpy()).max())

    train = TrainConfig()
    ids_pt = torch.tensor(ids)
    results = median_seconds({"jaxmoe": jax_step_fn(model, train, ids),
                              "transformers_eager": torch_step_fn(hf_eager, train, ids_pt),
                              "transformers_grouped_mm": torch_step_fn(hf_grouped, train, ids_pt)}, args.repeats)
    for name, (seconds, min_seconds, loss) in results.items():
        print(json.dumps({
            "case": name, "seconds": round(seconds, 4), "min_seconds": round(min_seconds, 4),
            "tok_s": round(BATCH * LENGTH / seconds, 1), "first_loss": round(loss, 4), "repeats": args.repeats,
            "speedup_vs_transformers_eager": round(results["transformers_eager"][0] / seconds, 2),
            "speedup_vs_transformers_grouped_mm": round(results["transformers_grouped_mm"][0] / seconds, 2),
            **({"max_abs_diff_eval_logits": diff} if name == "jaxmoe" else {})}), flush=True)


if __name__ == "__main__":
    main()
