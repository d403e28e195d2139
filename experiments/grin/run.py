"""Issue 20's runs: every arm x seed of experiments/grin/configs/ trained with `jaxmoe train`, one after another.

  python experiments/grin/run.py                                  # 5 arms x seeds 0 1 2 -> runs/grin/<arm>-s<seed>
  python experiments/grin/run.py --arms sparsemixer-v2 dense --seeds 0 --steps 4 --runs runs/grin-smoke \
      --set eval.translate=8                                       # a smoke test

Seeds are the outer loop, so an interrupted sweep has every arm of its first seeds. A run whose folder holds
summary.json is finished and skipped; any other run is started, or resumed from its last checkpoint (the trainer's
own resume), so running the command again continues the sweep. A failed run (e.g. a diverged loss) is reported
and the sweep goes on; the exit status is 1 when any run failed. Each run's output goes to <run>/train.log, and
one JSON line per run attempt ({"run", "seconds", "returncode"}) to <runs>/sweep.jsonl.

The runs share one tfds folder, <runs>/tfds (the data are prepared once; tfds names them by the files' hash), and
one JAX compilation cache, <runs>/jax_cache (seeds of an arm compile the same programs).

--steps N rescales the step counts of the configs (optim.steps, optim.warmup_steps, eval.every, checkpoint.every,
log_every) by N / optim.steps, keeping their fractions of the run; --set KEY=VALUE passes any override on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

CONFIGS = Path(__file__).resolve().parent / "configs"
ARMS = ("sparsemixer-v2", "sparsemixer-v2star", "gshard-top2", "top2-jitter", "dense")
SEEDS = (0, 1, 2)


def run_dir(runs: Path, arm: str, seed: int) -> Path:
    """The folder of one run: <runs>/<arm>-s<seed>."""
    return runs / f"{arm}-s{seed}"


def step_overrides(config: dict, steps: int) -> list[str]:
    """`jaxmoe train` overrides that shorten (or lengthen) a config to `steps` steps, every step count scaled
    alike: warmup stays the same fraction of the run, validation and checkpoints come as often relative to it."""
    old = config["optim"]["steps"]

    def scaled(value: int) -> int:
        return max(1, round(value * steps / old))

    warmup = min(steps - 1, round(config["optim"]["warmup_steps"] * steps / old))
    return [f"optim.steps={steps}", f"optim.warmup_steps={warmup}", f"eval.every={scaled(config['eval']['every'])}",
            f"checkpoint.every={scaled(config['checkpoint']['every'])}", f"log_every={scaled(config['log_every'])}"]


def train_command(arm: str, seed: int, runs: Path, steps: int | None, extra: list[str]) -> list[str]:
    """The `jaxmoe train` command line of one run."""
    config_path = CONFIGS / f"{arm}.yaml"
    overrides = [f"run_dir={run_dir(runs, arm, seed)}", f"seed={seed}", f"data.data_dir={runs / 'tfds'}"]
    if steps is not None:
        overrides += step_overrides(yaml.safe_load(config_path.read_text()), steps)
    return [sys.executable, "-m", "jaxmoe.cli", "train", "--config", str(config_path), *overrides, *extra]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, metavar="ARM",
                        help=f"arms to run (default: all of {', '.join(ARMS)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="seeds (default: 0 1 2)")
    parser.add_argument("--runs", type=Path, default=Path("runs/grin"), help="folder of the run folders")
    parser.add_argument("--steps", type=int, default=None,
                        help="train this many steps instead of the configs' (smoke tests); see the module docstring")
    parser.add_argument("--set", dest="extra", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more `jaxmoe train` overrides for every run, e.g. eval.translate=8")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 2:
        parser.error(f"--steps={args.steps}; expected at least 2 (one warmup step and one more)")
    args.runs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(args.runs.absolute() / "jax_cache")}
    failed = []
    for seed in args.seeds:
        for arm in args.arms:
            folder = run_dir(args.runs, arm, seed)
            if (folder / "summary.json").exists():
                print(f"{folder}: finished, skipped", flush=True)
                continue
            folder.mkdir(parents=True, exist_ok=True)
            command = train_command(arm, seed, args.runs, args.steps, args.extra)
            print(f"{folder}: {' '.join(command[1:])}", flush=True)
            started = time.perf_counter()
            with open(folder / "train.log", "a", encoding="utf-8") as log:
                returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
            seconds = round(time.perf_counter() - started, 1)
            with open(args.runs / "sweep.jsonl", "a", encoding="utf-8") as sweep:
                sweep.write(json.dumps({"run": folder.name, "seconds": seconds, "returncode": returncode}) + "\n")
            if returncode:
                failed.append(folder)
                tail = (folder / "train.log").read_text(encoding="utf-8").splitlines()[-5:]
                print(f"{folder}: FAILED (exit {returncode}) after {seconds} s:\n  " + "\n  ".join(tail), flush=True)
            else:
                print(f"{folder}: done in {seconds} s", flush=True)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(str(f) for f in failed)}; see their train.log", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
