"""The task-based MoE table of experiments/mt/README.md (issue 18) from the runs' folders.

  python experiments/mt/task_moe_table.py runs/taskmoe-dense runs/taskmoe-moe runs/taskmoe-static \
      runs/taskmoe-dynamic runs/taskmoe-token
  python experiments/mt/task_moe_table.py runs/taskmoe-newtask-is-en runs/taskmoe-newtask-en-is

prints one Markdown row per run: the model (dense, MoE, or the task adapters' mode; the task a new-task run
trained), BLEU / chrF per test direction (sacrebleu's defaults; the columns are every direction of the given runs,
in order of appearance) and their mean over the row's own directions, the validation loss, the parameters and
the trained parameters, and the training speed. Speed comes from metrics.jsonl: the median over the logged
windows after the first (which holds compilation) of the seconds per step and of the tokens per second (all
tokens of the packed rows, padding excluded); with a single window (short runs) its figures, compilation included.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml


def model_label(config: dict, summary: dict) -> str:
    """'dense', 'MoE', 'task-MoE static' ...; for a model.init_from run, the task it trained and its start."""
    model, optim = config["model"], config["optim"]
    if optim.get("only_task") is not None:
        return f"new task {optim['only_task']} only (from {Path(model['init_from']).parent.name})"
    if model.get("init_from"):
        return f"from {Path(model['init_from']).parent.name}"
    moe = model.get("overrides", {}).get("moe", "preset")
    if moe is None or not summary.get("experts"):
        return "dense"
    adapters = moe.get("task_adapters") if isinstance(moe, dict) else None
    return "MoE" if adapters is None else f"task-MoE {adapters['mode']}"


def trained_parameters(run: Path, config: dict, summary: dict) -> int:
    """Every parameter, or with optim.only_task one task's row of each TaskParam (as `jaxmoe train` counts)."""
    if config["optim"].get("only_task") is None:
        return summary["parameters"]
    import jax
    from flax import nnx

    from jaxmoe import load_model
    from jaxmoe.moe.task_adapters import TaskParam

    leaves = jax.tree.leaves(nnx.state(load_model(run / "model"), TaskParam))
    return sum(x.size // x.shape[0] for x in leaves)


def speed(run: Path) -> tuple[float, float]:
    """(seconds per step, tokens per second) from metrics.jsonl's training windows (see the module docstring)."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [x for x in lines if x.get("split") == "train"]
    if not train:
        raise ValueError(f"{run / 'metrics.jsonl'} has no training lines; did the run log a step?")
    if len(train) == 1:
        summary = json.loads((run / "summary.json").read_text())
        return summary["train_seconds"] / train[0]["step"], train[0]["tokens_per_second"]
    windows = list(zip(train, train[1:]))
    seconds = statistics.median((b["time"] - a["time"]) / (b["step"] - a["step"]) for a, b in windows)
    return seconds, statistics.median(b["tokens_per_second"] for _, b in windows)


def read_run(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    config = yaml.safe_load((run / "run_config.yaml").read_text())
    seconds, tokens = speed(run)
    return {"run": run, "summary": summary, "label": model_label(config, summary), "test": summary.get("test", {}),
            "trained": trained_parameters(run, config, summary), "s_step": seconds, "tok_s": tokens}


def row(entry: dict, directions: list[str]) -> str:
    test, summary = entry["test"], entry["summary"]
    cells = [entry["run"].name, entry["label"]]
    cells += [f"{test[d]['bleu']:.2f} / {test[d]['chrf']:.2f}" if d in test else "-" for d in directions]
    cells.append(f"{summary['test_bleu']:.2f} / {summary['test_chrf']:.2f}" if test else "-")
    cells.append(f"{summary['valid_loss']:.4f}" if "valid_loss" in summary else "-")
    parameters, trained = summary["parameters"], entry["trained"]
    cells += [f"{parameters:,}", f"{trained:,} ({100 * trained / parameters:.3g}%)", str(summary["steps"]),
              f"{entry['s_step']:.2f}", f"{entry['tok_s']:,.0f}"]
    return "| " + " | ".join(cells) + " |"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of jaxmoe train (summary.json, "
                        "run_config.yaml, metrics.jsonl)")
    args = parser.parse_args(argv)
    entries = [read_run(run) for run in args.runs]
    directions = list(dict.fromkeys(d for e in entries for d in e["test"]))
    head = (["run", "model"] + [f"{d} BLEU / chrF" for d in directions]
            + ["mean BLEU / chrF", "valid loss", "parameters", "trained", "steps", "s/step", "tokens/s"])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for entry in entries:
        print(row(entry, directions))


if __name__ == "__main__":
    main()
