"""Issue 20's report from the run folders of experiments/grin/run.py: plots and Markdown tables.

  python experiments/grin/report.py                         # runs/grin/<arm>-s<seed> -> experiments/grin/*.png
  python experiments/grin/report.py --runs runs/grin-smoke --out-dir /tmp/grin-smoke

Writes valid_loss.png (every arm in one plot: the mean over seeds of the validation loss at each evaluation,
the band from the seeds' min to max, an inset on the second half of the run) and expert_load_cv.png (the MoE
arms' expert-load imbalance over training, mean and min-max band over seeds), and prints:
  - the results table: per arm, the finished seeds, the final validation loss, test BLEU and chrF (de->en,
    sacrebleu's defaults, as the trainer scores them), mean [min, max] over seeds; the expert-load coefficient of
    variation and the busiest expert's share over the uniform one, averaged over layers and over the logged
    windows of training; tokens/s and s/step;
  - the verdict numbers: at each evaluation step, the paired difference (same seed) of the validation loss of each
    MoE arm minus GShard top-2's and of SparseMixer-v2 minus dense, mean [min, max] over seeds, and each arm's
    seed spread (max - min); the same paired differences of the test BLEU and chrF. Pairing matters: a seed fixes
    the data order, the 50 validation pairs drawn and (in the four MoE arms alike) the initial weights.
Only finished runs (summary.json) count; unfinished ones are named and left out.

Expert load is what the trainer logs in expert_load.jsonl: each expert's share of its layer's routed token slots,
averaged over the steps of a logging window, for the experts the training forward used (SparseMixer's sampled
picks, the top-k of the top-k routers). CV = std / mean over a layer's experts (0 = balanced; one busy expert of
E gives sqrt(E - 1)). Speed: from metrics.jsonl's training windows (tokens of the packed rows, padding excluded),
the median over the windows after the first (which holds compilation) that do not follow a validation (whose
time falls into the next window; a run that validates at every log takes them all); s/step likewise, from the
windows' wall-clock times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from jaxmoe.train.metrics import read_expert_load, read_metrics

from run import ARMS  # this script's folder, first on sys.path when run as a script

BASELINE = "gshard-top2"
LABELS = {"sparsemixer-v2": "SparseMixer-v2", "sparsemixer-v2star": "SparseMixer-v2*", "gshard-top2": "GShard top-2",
          "top2-jitter": "top-2 + input jitter", "dense": "dense (MoE's active FLOPs)"}
COLORS = {"sparsemixer-v2": "tab:blue", "sparsemixer-v2star": "tab:cyan", "gshard-top2": "tab:red",
          "top2-jitter": "tab:orange", "dense": "tab:gray"}


def read_run(folder: Path) -> dict:
    """One finished run: its validation curve, summary, speed and expert-load imbalance over training."""
    records = read_metrics(folder)
    summary = json.loads((folder / "summary.json").read_text())
    valid = sorted((r["step"], r["loss"]) for r in records if r["split"] == "valid")
    train = sorted((r for r in records if r["split"] == "train"), key=lambda r: r["step"])
    validated = {step for step, _ in valid}
    windows = list(zip(train, train[1:]))
    if not windows:
        raise ValueError(f"{folder / 'metrics.jsonl'}: {len(train)} training window(s); the speed needs two or more "
                         "(set log_every below optim.steps / 2)")
    windows = [(a, b) for a, b in windows if a["step"] not in validated] or windows  # short runs: every one
    run = {"valid": dict(valid), "summary": summary,
           "tokens_per_second": statistics.median(b["tokens_per_second"] for _, b in windows),
           "seconds_per_step": statistics.median((b["time"] - a["time"]) / (b["step"] - a["step"]) for a, b in windows)}
    if summary.get("experts"):
        load = read_expert_load(folder)
        run["load_steps"] = [step for step, _ in load]
        shares = np.stack([share for _, share in load])  # [windows, layers, experts]
        run["load_cv"] = (shares.std(-1) / shares.mean(-1)).mean(-1)  # [windows], mean over layers
        run["load_busiest"] = (shares.max(-1) * shares.shape[-1]).mean(-1)
    return run


def read_arms(runs: Path, arms) -> dict[str, dict[int, dict]]:
    """{arm: {seed: run}} for the finished runs under `runs`; unfinished ones are named on stderr."""
    out = {}
    for arm in arms:
        for folder in sorted(runs.glob(f"{arm}-s*")):
            seed = folder.name.removeprefix(f"{arm}-s")
            if not seed.isdigit():
                continue
            if not (folder / "summary.json").exists():
                print(f"{folder}: not finished (no summary.json), left out", file=sys.stderr)
                continue
            out.setdefault(arm, {})[int(seed)] = read_run(folder)
    if not out:
        raise SystemExit(f"no finished run under {runs}; run experiments/grin/run.py first")
    return out


def spread(values) -> str:
    """'mean [min, max]' of a list of numbers."""
    values = np.asarray(values, np.float64)
    return f"{values.mean():.4g} [{values.min():.4g}, {values.max():.4g}]"


def _seeds(seeds: dict) -> str:
    return f"{len(seeds)} seed{'' if len(seeds) == 1 else 's'}"


def curve(seeds: dict[int, dict], key: str, steps_key: str | None = None):
    """(steps, [seeds, steps] values) of a per-run series at the steps every seed has."""
    if steps_key is None:
        steps = sorted(set.intersection(*(set(run[key]) for run in seeds.values())))
        return np.asarray(steps), np.array([[run[key][s] for s in steps] for run in seeds.values()])
    steps = sorted(set.intersection(*(set(run[steps_key]) for run in seeds.values())))
    return np.asarray(steps), np.array([[dict(zip(run[steps_key], run[key]))[s] for s in steps]
                                        for run in seeds.values()])


def results_table(arms: dict) -> list[str]:
    head = ["arm", "seeds", "final valid loss", "test BLEU de-en", "test chrF de-en", "expert-load CV",
            "busiest / uniform", "tokens/s", "s/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, seeds in arms.items():
        runs = list(seeds.values())
        test = [next(iter(run["summary"]["test"].values())) for run in runs if run["summary"].get("test")]
        cells = [LABELS[arm], ", ".join(map(str, seeds)), spread([run["summary"]["valid_loss"] for run in runs]),
                 spread([t["bleu"] for t in test]) if test else "-", spread([t["chrf"] for t in test]) if test else "-"]
        if "load_cv" in runs[0]:
            cells += [spread([run["load_cv"].mean() for run in runs]),
                      spread([run["load_busiest"].mean() for run in runs])]
        else:
            cells += ["-", "-"]
        cells += [spread([run["tokens_per_second"] for run in runs]), spread([run["seconds_per_step"] for run in runs])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def comparisons(arms: dict) -> list[tuple[str, str]]:
    """(arm, reference) pairs of the verdict: every MoE arm against GShard top-2, SparseMixer-v2 against dense."""
    pairs = [(arm, BASELINE) for arm in arms if arm not in (BASELINE, "dense") and BASELINE in arms]
    if "sparsemixer-v2" in arms and "dense" in arms:
        pairs.append(("sparsemixer-v2", "dense"))
    return pairs


def paired(arms: dict, a: str, b: str, value) -> str:
    """'mean [min, max]' over the seeds both arms finished of value(run of a) - value(run of b): same seed, same
    data order, validation pairs and (between MoE arms) initial weights, so the seed's own effect cancels."""
    seeds = sorted(set(arms[a]) & set(arms[b]))
    if not seeds:
        return "-"
    diffs = np.array([value(arms[a][seed]) - value(arms[b][seed]) for seed in seeds])
    return f"{diffs.mean():+.4f} [{diffs.min():+.4f}, {diffs.max():+.4f}] (n={len(seeds)})"


def verdict_tables(arms: dict) -> list[str]:
    """Per evaluation step: the paired differences of each comparison's validation loss, and each arm's seed spread
    (max - min); then the paired differences of the final test BLEU and chrF."""
    pairs = comparisons(arms)
    steps = sorted(set.intersection(*(set(run["valid"]) for seeds in arms.values() for run in seeds.values())))
    head = ["step"] + [f"{LABELS[a]} - {LABELS[b]}" for a, b in pairs] + [f"spread {LABELS[a]}" for a in arms]
    lines = ["Validation loss: paired difference mean [min, max] over seeds; seed spread = max - min", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for step in steps:
        cells = [str(step)] + [paired(arms, a, b, lambda run: run["valid"][step]) for a, b in pairs]
        cells += [f"{np.ptp([run['valid'][step] for run in arms[arm].values()]):.4f}" for arm in arms]
        lines.append("| " + " | ".join(cells) + " |")

    def test(metric):
        return lambda run: next(iter(run["summary"]["test"].values()))[metric]

    lines += ["", "Test de-en: paired difference mean [min, max] over seeds", "",
              "| comparison | BLEU | chrF |", "|---|---|---|"]
    for a, b in pairs:
        lines.append(f"| {LABELS[a]} - {LABELS[b]} | {paired(arms, a, b, test('bleu'))} | "
                     f"{paired(arms, a, b, test('chrf'))} |")
    return lines


def plot_valid_loss(arms: dict, out: Path) -> Path:
    fig = Figure(figsize=(9, 6), layout="constrained")
    ax = fig.subplots()
    last = max(int(curve(seeds, "valid")[0][-1]) for seeds in arms.values())
    inset = ax.inset_axes([0.45, 0.42, 0.52, 0.45])
    for arm, seeds in arms.items():
        steps, values = curve(seeds, "valid")
        for axes in (ax, inset):
            axes.plot(steps, values.mean(0), "o-", ms=3, color=COLORS[arm], label=f"{LABELS[arm]} ({_seeds(seeds)})")
            axes.fill_between(steps, values.min(0), values.max(0), color=COLORS[arm], alpha=0.2, lw=0)
    second_half = np.concatenate([values[:, steps >= last / 2].ravel()
                                  for steps, values in (curve(seeds, "valid") for seeds in arms.values())])
    inset.set_xlim(last / 2, last * 1.02)
    if second_half.size:
        margin = 0.05 * (second_half.max() - second_half.min() + 1e-3)
        inset.set_ylim(second_half.min() - margin, second_half.max() + margin)
    inset.set_title("second half", fontsize=9)
    inset.grid(True, alpha=0.3)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats / target token)")
    ax.set_title("GRIN reproduced small: validation loss, mean over seeds, band = min to max over seeds")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.savefig(out, dpi=120)
    return out


def plot_expert_load(arms: dict, out: Path) -> Path | None:
    moe = {arm: seeds for arm, seeds in arms.items() if "load_cv" in next(iter(seeds.values()))}
    if not moe:
        return None
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.subplots()
    for arm, seeds in moe.items():
        steps, values = curve(seeds, "load_cv", "load_steps")
        ax.plot(steps, values.mean(0), color=COLORS[arm], label=f"{LABELS[arm]} ({_seeds(seeds)})")
        ax.fill_between(steps, values.min(0), values.max(0), color=COLORS[arm], alpha=0.2, lw=0)
    ax.set_xlabel("step")
    ax.set_ylabel("CV of expert load (std / mean over experts), mean over layers")
    ax.set_title("Expert load imbalance over training (0 = balanced), mean over seeds, band = min to max")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(out, dpi=120)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/grin"), help="folder of the run folders")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent, help="where the PNGs go")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, metavar="ARM", help="arms to report")
    args = parser.parse_args(argv)
    arms = read_arms(args.runs, args.arms)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    print("\n".join(results_table(arms)))
    print()
    print("\n".join(verdict_tables(arms)))
    print()
    print(f"plot: {plot_valid_loss(arms, args.out_dir / 'valid_loss.png')}")
    load_plot = plot_expert_load(arms, args.out_dir / "expert_load_cv.png")
    if load_plot is not None:
        print(f"plot: {load_plot}")


if __name__ == "__main__":
    main()
