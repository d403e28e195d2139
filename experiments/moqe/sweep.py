"""MoQE / FineQuant at small scale: post-training weight-only quantization of a trained MoE translator and of its
dense twin of equal active size, scored on ALMA's de-en data.

Cells: for each model, the float32 baseline, then bits {8, 4, 3, 2} x granularity {per-channel, group 64,
adaptive}, quantizing the MoE's expert weights only (MoQE) or the dense twin's FFN only (the paper's
comparison), and 2-bit after quantization-aware fine-tuning (straight-through estimator). Each cell reports the
validation loss over all of ALMA's de-en validation pairs, BLEU and chrF on the first --test-sentences WMT'22
test pairs (greedy, sacrebleu 13a), and the bytes of the quantized matrices and of the whole model.

Train the two models first (about an hour each on 2 CPU cores), from the repository root:
  jaxmoe train --config experiments/configs/alma-deen-tiny-moe.yaml
  jaxmoe train --config experiments/moqe/dense-twin.yaml
then:
  python experiments/moqe/sweep.py --moe runs/alma-deen-tiny-moe --dense runs/alma-deen-tiny-dense \
      --out experiments/moqe/results.jsonl
  python experiments/moqe/sweep.py --table experiments/moqe/results.jsonl
One JSON line per cell; an interrupted sweep resumes, skipping cells already in --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxmoe
from jaxmoe.io.tokenizer import Tokenizer
from jaxmoe.mt.eval import score, translate
from jaxmoe.quant import apply_qat, quantization_report
from jaxmoe.train import batches as batch_lib
from jaxmoe.train import trainer
from jaxmoe.train.loop import Batch, TrainConfig, evaluate, make_optimizer, train_step
from jaxmoe.train.run_config import load_run_config

GRANULARITIES = {"per-channel": None, "g64": 64, "adaptive": "adaptive"}
# The matrices each model's cells quantize: the MoE's experts (MoQE), the dense twin's FFN (the comparison).
SCOPES = {"moe": {"target": "experts"},
          "dense": {"target": "linear", "rules": [(r"mlp/(gate_up|down)_proj", {}), (r".", {"bits": None})]}}


class Run:
    """A trained run folder: its model, tokenizer, validation batches and test pairs."""

    def __init__(self, run_dir: Path, test_sentences: int):
        self.config = load_run_config(run_dir / "run_config.yaml")
        records = trainer.load_records(self.config, run_dir / "tfds")
        self.tokenizer = Tokenizer.from_folder(run_dir / "model")
        self.model = jaxmoe.load_model(run_dir / "model", dtype=jnp.float32)
        d, o = self.config.data, self.config.optim
        self.prompt = batch_lib.PromptFormat(d.prompt)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        encode = trainer._encoder(self.config, self.tokenizer, parallel=True)
        self.valid = [Batch(**{k: jnp.asarray(v) for k, v in b.items()}) for b in batch_lib.eval_batches(
            [encode(r) for r in records["valid"]], batch_size=o.batch_size, max_len=d.max_len, pad_id=self.pad_id)]
        test = records["test"]
        n = min(test_sentences, len(test))
        self.sources = [test[i]["src"] for i in range(n)]
        self.references = [test[i]["tgt"] for i in range(n)]
        self.train_records = records["train"]
        self.encode = encode

    def score(self, model, max_new_tokens: int) -> dict:
        model.eval()
        valid = evaluate(model, self.valid)
        d = self.config.data
        hypotheses = translate(model, self.tokenizer, self.sources, max_new_tokens=max_new_tokens, batch_size=64,
                               prompt=lambda s: self.prompt.render(s, d.src_lang, d.tgt_lang))
        scores = score(hypotheses, self.references, lang_pair=f"{d.src_lang}-{d.tgt_lang}")
        return {"valid_loss": valid["loss"], "valid_accuracy": valid["accuracy"], "bleu": scores["bleu"],
                "chrf": scores["chrf"], "samples": hypotheses[:2]}

    def qat(self, model, *, steps: int, learning_rate: float, seed: int):
        """Fine-tunes `model` (a QAT model: fake-quantized forward, float parameters) on the training data."""
        o, d = self.config.optim, self.config.data
        stream = batch_lib.BatchStream(self.train_records, batch_size=o.batch_size, max_len=d.max_len,
                                       pad_id=self.pad_id, seed=seed, pack=d.pack, encode=self.encode)
        optimizer = make_optimizer(model, TrainConfig(learning_rate=learning_rate, warmup_steps=steps // 10,
                                                      total_steps=steps, final_lr_fraction=0.1))
        rngs = nnx.Rngs(seed)
        model.train()
        losses = []
        for _ in range(steps):
            batch = next(stream)
            batch = Batch(**{k: jnp.asarray(v)[None] for k, v in batch.items()})
            losses.append(float(train_step(model, optimizer, batch, rngs)["loss"]))
        model.eval()
        return losses


def _quantized_bytes(model) -> int:
    return sum(m.nbytes for m in quantization_report(model))


def cells(args) -> list[dict]:
    out = []
    for name in ("moe", "dense"):
        out.append({"model": name, "bits": None, "granularity": None, "qat": False})
        for bits in args.bits:
            for gran in args.granularities:
                out.append({"model": name, "bits": bits, "granularity": gran, "qat": False})
        out.append({"model": name, "bits": 2, "granularity": "g64", "qat": True})
    return out


def _key(cell: dict) -> tuple:
    return cell["model"], cell["bits"], cell["granularity"], cell["qat"]


def sweep(args) -> None:
    out = Path(args.out)
    done = set()
    if out.exists():
        done = {_key(json.loads(line)) for line in out.read_text().splitlines() if line.strip()}
    runs = {}
    for cell in cells(args):
        if _key(cell) in done or (args.only and cell["model"] != args.only):
            continue
        name = cell["model"]
        if name not in runs:
            runs[name] = Run(Path(getattr(args, name)), args.test_sentences)
        run = runs[name]
        started = time.perf_counter()
        scope = SCOPES[name]
        settings = {"bits": cell["bits"], "group_size": GRANULARITIES.get(cell["granularity"]),
                    "target": scope["target"], "rules": scope.get("rules")}
        model = run.model
        extra = {}
        if cell["qat"]:
            model = apply_qat(nnx.clone(run.model), **settings)
            losses = run.qat(model, steps=args.qat_steps, learning_rate=args.qat_lr, seed=args.seed)
            extra = {"qat_steps": args.qat_steps, "qat_lr": args.qat_lr, "qat_loss_first_last": [losses[0], losses[-1]]}
        if cell["bits"] is not None:
            model = jaxmoe.quantize(model, **settings)
        result = {**cell, **run.score(model, args.max_new_tokens), **extra,
                  "param_bytes": jaxmoe.param_bytes(model), "quantized_bytes": _quantized_bytes(model),
                  "test_sentences": len(run.sources), "seconds": round(time.perf_counter() - started, 1)}
        if cell["granularity"] == "adaptive":
            result["adaptive_group_sizes"] = _group_size_histogram(model)
        with out.open("a") as f:
            f.write(json.dumps(result, ensure_ascii=False) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "samples"}), flush=True)


def _group_size_histogram(model) -> dict:
    """{group size: matrices} of the sizes FineQuant's adaptive test chose (each expert of a stack a matrix)."""
    values, counts = np.unique([s for m in quantization_report(model) for s in m.group_sizes], return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts)}


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    base = {r["model"]: r for r in rows if r["bits"] is None}
    lines = ["| model | quantized | bits | granularity | valid loss (Δ) | BLEU (Δ) | chrF (Δ) | model MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base.get(r["model"])
        what = "—" if r["bits"] is None else ("experts" if r["model"] == "moe" else "dense FFN")
        gran = "—" if r["bits"] is None else r["granularity"] + (" + QAT" if r["qat"] else "")
        delta = (lambda k, fmt: f"{r[k]:{fmt}}" if b is None or r is b else f"{r[k]:{fmt}} ({r[k] - b[k]:+{fmt}})")
        lines.append(f"| {r['model']} | {what} | {r['bits'] or 'fp32'} | {gran} | {delta('valid_loss', '.3f')} | "
                     f"{delta('bleu', '.2f')} | {delta('chrf', '.2f')} | {r['param_bytes'] / 1e6:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moe", default="runs/alma-deen-tiny-moe", help="the MoE run folder")
    parser.add_argument("--dense", default="runs/alma-deen-tiny-dense", help="the dense twin's run folder")
    parser.add_argument("--out", default="experiments/moqe/results.jsonl")
    parser.add_argument("--only", choices=("moe", "dense"), help="run one model's cells")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    parser.add_argument("--granularities", nargs="+", default=list(GRANULARITIES), choices=list(GRANULARITIES))
    parser.add_argument("--test-sentences", type=int, default=300)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--qat-steps", type=int, default=300)
    parser.add_argument("--qat-lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--table", type=Path, help="print the Markdown table of a results file and exit")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    sweep(args)


if __name__ == "__main__":
    main()
