"""Preference triplets for CPO from a model's own samples (issue 16, reproduction 2).

For each source: `--num-samples` translations sampled from the model (temperature 0.9, no nucleus filter by default,
cut at the first newline) plus the human reference, every candidate scored with sentence chrF against the reference (so the
reference scores 100): chosen = highest, rejected = lowest, the middle dropped when the file is read
(jaxmoe.train.cpo.read_triplets). ALMA-R scored reference, GPT-4 and ALMA outputs with reference-free
KIWI-XXL/XCOMET; a COMETkiwi model can replace chrF through `build_triplets(scorer=...)`.

Sources are `--per-pair` pairs (of at most 100 tokens a side) of each language pair's human-written training data (the stage-2 pairs' corpus, as
ALMA-R's FLORES triplets were part of ALMA's stage-2 data), drawn with `--seed`, each used in both directions;
validation triplets come from the valid split the same way. From the repository root:

  python experiments/mt/cpo_triplets.py --model runs/alma-stage2/model --out runs/alma-triplets

writes train.jsonl and valid.jsonl (jaxmoe's triplet layout) and stats.json (mean chrF of the samples, of the
chosen and of the rejected candidates, and how often the reference is the chosen one).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from jaxmoe.io.load import load_model
from jaxmoe.io.tokenizer import Tokenizer
from jaxmoe.train import cpo

ALMA = Path(__file__).resolve().parents[3] / "shared" / "data" / "alma"
MAX_SENTENCE_TOKENS = 100
PAIRS = {"de": ("deen/train.de-en.de", "deen/train.de-en.en", "deen/valid.de-en.json"),
         "cs": ("csen/train.cs-en.cs", "csen/train.cs-en.en", "csen/valid.cs-en.json")}


def read_pairs(lang: str, split: str) -> list[tuple[str, str]]:
    src_file, tgt_file, valid_file = PAIRS[lang]
    if split == "train":
        src = (ALMA / src_file).read_text(encoding="utf-8").split("\n")
        tgt = (ALMA / tgt_file).read_text(encoding="utf-8").split("\n")
        return [(s, t) for s, t in zip(src, tgt) if s.strip() and t.strip()]
    entries = json.loads((ALMA / valid_file).read_text(encoding="utf-8"))
    return [(e["translation"][lang], e["translation"]["en"]) for e in entries]


def build(model, tokenizer, split: str, per_pair: int, args) -> list[dict]:
    records = []
    for lang in PAIRS:
        # Pairs short enough for a CPO row (prompt + target within alma-cpo.yaml's max_len 256) either way round.
        pairs = [(a, b) for a, b in read_pairs(lang, split)
                 if max(len(tokenizer.encode(a)), len(tokenizer.encode(b))) <= MAX_SENTENCE_TOKENS]
        chosen = sorted(np.random.default_rng([args.seed, len(lang), ord(lang[0])]).permutation(len(pairs))[:per_pair])
        for src_lang, tgt_lang, flip in ((lang, "en", False), ("en", lang, True)):
            sources = [pairs[i][1] if flip else pairs[i][0] for i in chosen]
            references = [pairs[i][0] if flip else pairs[i][1] for i in chosen]
            started = time.perf_counter()
            records += cpo.build_triplets(model, tokenizer, sources, references, src_lang=src_lang, tgt_lang=tgt_lang,
                                          num_samples=args.num_samples, temperature=args.temperature,
                                          top_p=args.top_p, metric="chrf",
                                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                          seed=args.seed)
            print(f"{split} {src_lang}-{tgt_lang}: {len(sources)} sources in {time.perf_counter() - started:.0f} s",
                  flush=True)
    return records


def stats(records: list[dict]) -> dict:
    samples = [c["score"] for r in records for c in r["candidates"] if c["system"] == "sample"]
    best = [max(r["candidates"], key=lambda c: c["score"]) for r in records]
    worst = [min(r["candidates"], key=lambda c: c["score"])["score"] for r in records]
    return {"triplets": len(records), "sample_chrf_mean": float(np.mean(samples)),
            "chosen_chrf_mean": float(np.mean([c["score"] for c in best])),
            "rejected_chrf_mean": float(np.mean(worst)),
            "chosen_is_reference": float(np.mean([c["system"] == "reference" for c in best]))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model folder with its tokenizer (a run's model/)")
    parser.add_argument("--out", required=True, help="folder for train.jsonl, valid.jsonl, stats.json")
    parser.add_argument("--per-pair", type=int, default=300, help="training pairs per language pair (x2 directions)")
    parser.add_argument("--valid-per-pair", type=int, default=50)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--top-p", type=float, default=None,
                        help="nucleus filter (default: none; on CPU its two sorts over the vocabulary per step make "
                             "sampling about 5x slower at vocab 8,000)")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model), Tokenizer.from_folder(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for split, n in (("valid", args.valid_per_pair), ("train", args.per_pair)):
        records = build(model, tokenizer, split, n, args)
        cpo.write_triplets(out / f"{split}.jsonl", records)
        summary[split] = stats(records)
    summary["settings"] = vars(args)
    (out / "stats.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
