"""The tables of experiments/mt/README.md (issue 16) from the runs' summary.json files.

  python experiments/mt/recipe_table.py runs/alma-stage2-parallel-only runs/alma-stage2 runs/alma-stage2-lora

prints one Markdown row per run: BLEU / chrF per test direction (sacrebleu's defaults, WMT'22), their means,
the validation loss of the exported checkpoint and the steps. With --cpo it adds the CPO validation metrics
(reward margin, reward accuracy, chosen NLL) that `objective: cpo` runs write.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def row(run: Path, cpo: bool) -> str:
    summary = json.loads((run / "summary.json").read_text())
    test = summary.get("test", {})
    cells = [run.name] + [f"{test[d]['bleu']:.2f} / {test[d]['chrf']:.2f}" if d in test else "-"
                          for d in ("de-en", "en-de", "cs-en", "en-cs")]
    cells += [f"{summary['test_bleu']:.2f} / {summary['test_chrf']:.2f}", f"{summary.get('valid_loss', float('nan')):.4f}",
              str(summary.get("exported_step", summary["steps"]))]
    if cpo:
        cells += [f"{summary.get('valid_rewards_margins', float('nan')):.3f}",
                  f"{summary.get('valid_rewards_accuracies', float('nan')):.3f}",
                  f"{summary.get('valid_nll_loss', float('nan')):.4f}"]
    return "| " + " | ".join(cells) + " |"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--cpo", action="store_true", help="add the CPO validation columns")
    args = parser.parse_args(argv)
    head = ["run", "de-en BLEU / chrF", "en-de", "cs-en", "en-cs", "mean BLEU / chrF", "valid loss", "step"]
    if args.cpo:
        head += ["valid reward margin", "valid reward accuracy", "valid chosen NLL"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for run in args.runs:
        print(row(run, args.cpo))


if __name__ == "__main__":
    main()
