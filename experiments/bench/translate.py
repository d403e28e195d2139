"""`jaxmoe.mt.eval.translate` throughput with and without batch pruning, on a checkpoint and a source file.

Greedy decoding with ALMA's prompt, batches of --batch-size rows sorted by length, the same call with
`prune_every=None` (every row stays in the batch until the longest one ends) and with each --prune-every value.
One untimed pass of each setting first compiles every shape (prompt widths, pruned batch sizes). Reports
sentences/s and generated tokens/s (tokens up to each row's EOS) per setting and whether the outputs are
identical. The settings alternate within each repeat.

    python experiments/bench/translate.py --model runs/taskmoe-static/model \
        --src ../shared/data/gpt-mt/wmt-testset/deen/test.de-en.de --src-lang de --tgt-lang en --limit 2000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jaxmoe
from jaxmoe.io.tokenizer import Tokenizer
from jaxmoe.mt.eval import read_lines, translate
from jaxmoe.train.batches import ALMA_PROMPT, PromptFormat
from jaxmoe.train.tasks import TaskMap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--src", type=Path, required=True)
    parser.add_argument("--src-lang", required=True)
    parser.add_argument("--tgt-lang", required=True)
    parser.add_argument("--limit", type=int, default=2000, help="first N source lines")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prune-every", type=int, nargs="+", default=[8])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    model = jaxmoe.load_model(args.model)
    tokenizer = Tokenizer.from_folder(args.model)
    sources = read_lines(args.src, what="source file")[:args.limit]
    prompt = PromptFormat(ALMA_PROMPT)
    task_ids = None
    if (args.model / "tasks.json").is_file():
        task_ids = TaskMap.load(args.model).id_of(args.src_lang, args.tgt_lang)

    def run(prune_every, subset=sources):
        return translate(model, tokenizer, subset, prompt=lambda s: prompt.render(s, args.src_lang, args.tgt_lang),
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, task_ids=task_ids,
                         prune_every=prune_every)

    settings = [None, *args.prune_every]
    for setting in settings:  # one untimed pass compiles every shape (prompt widths, pruned batch sizes)
        run(setting)
    times = {s: [] for s in settings}
    outputs = {}
    for _ in range(args.repeats):
        for setting in settings:
            start = time.perf_counter()
            outputs[setting] = run(setting)
            times[setting].append(time.perf_counter() - start)
    tokens = sum(len(tokenizer.encode(text, add_special_tokens=False)) + 1 for text in outputs[None])
    base = statistics.median(times[None])
    for setting in settings:
        seconds = statistics.median(times[setting])
        print(json.dumps({"prune_every": setting, "sentences": len(sources), "batch": args.batch_size,
                          "seconds": round(seconds, 1), "sentences_per_s": round(len(sources) / seconds, 2),
                          "tokens_per_s": round(tokens / seconds, 1), "speedup": round(base / seconds, 2),
                          "same_output": outputs[setting] == outputs[None]}), flush=True)


if __name__ == "__main__":
    main()
