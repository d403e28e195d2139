"""The pod-plan table: reads plan.py's JSON lines and extrapolates each figure to the full 32 layers linearly
from the two largest layer counts compiled for that case, X(32) = X(hi) + (32 - hi) * (X(hi) - X(lo)) / (hi - lo),
printing a Markdown table. A case compiled at three or more depths also gets a check line: its deepest compile
against the prediction from the next two.

Usage: python experiments/tpu_pod/plan.py --layers 1 2 --strategies auto all_to_all > plan.jsonl
       python experiments/tpu_pod/table.py plan.jsonl
"""

from __future__ import annotations

import json
import sys

LAYERS = 32
GB = 1e9
HBM_GB = {"v5p": 95, "H100": 80}
FIGURES = ("params_bytes_per_device", "opt_state_bytes_per_device", "temp_bytes",
           "collective_bytes_per_device_per_step", "collective_bytes_per_token", "all_to_all_bytes_per_token")


def extrapolate(lo: int, x_lo: float, hi: int, x_hi: float, layers: int = LAYERS) -> float:
    return x_hi + (layers - hi) * (x_hi - x_lo) / (hi - lo)


def figures(row: dict) -> dict:
    return {**{name: row[name] for name in FIGURES},
            "all_to_all_bytes": row["collective_bytes_per_device"]["all-to-all"]}


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.startswith("{")]
    cases = {}
    for row in rows:
        if "error" in row:
            print(f"error: {row}")
            continue
        # Rows from before the memory options were no-remat, dense-attention compiles.
        key = (json.dumps(row["mesh"]), row["strategy_resolved"], row.get("remat", "none"),
               row.get("attention", "dense"))
        cases.setdefault(key, {})[row["layers"]] = figures(row) | {"compile_s": row["compile_s"]}
    print("| mesh | MoE exchange | remat | attention | layers compiled | params GB/dev | opt state GB/dev | "
          "temp GB/dev | total GB/dev | fits 95 / 80 GB | collectives GB/dev/step | of which all-to-all | "
          "all-to-all KB/token | collectives KB/token | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    checks = []
    for (mesh, strategy, remat, attention), by_layers in cases.items():
        depths = sorted(by_layers)
        if len(depths) < 2:
            continue
        lo, hi = depths[-2:]
        x = {name: extrapolate(lo, by_layers[lo][name], hi, by_layers[hi][name]) for name in by_layers[hi]
             if name != "compile_s"}
        total = x["params_bytes_per_device"] + x["opt_state_bytes_per_device"] + x["temp_bytes"]
        fits = " / ".join("yes" if total <= hbm * GB else "no" for hbm in HBM_GB.values())
        mesh_text = ", ".join(f"{k}={v}" for k, v in json.loads(mesh).items())
        compile_s = " / ".join(str(by_layers[d]["compile_s"]) for d in depths)
        print(f"| {mesh_text} | {strategy} | {remat} | {attention} | {', '.join(map(str, depths))} | "
              f"{x['params_bytes_per_device'] / GB:.2f} | {x['opt_state_bytes_per_device'] / GB:.2f} | "
              f"{x['temp_bytes'] / GB:.1f} | {total / GB:.1f} | {fits} | "
              f"{x['collective_bytes_per_device_per_step'] / GB:.1f} | {x['all_to_all_bytes'] / GB:.1f} | "
              f"{x['all_to_all_bytes_per_token'] / 1e3:.0f} | {x['collective_bytes_per_token'] / 1e3:.0f} | "
              f"{compile_s} |")
        if len(depths) >= 3:
            a, b, c = depths[-3:]
            predicted = extrapolate(a, by_layers[a]["temp_bytes"], b, by_layers[b]["temp_bytes"], layers=c)
            checks.append(f"check {mesh_text}, {strategy}, remat={remat}, attention={attention}: temp at {c} layers "
                          f"{by_layers[c]['temp_bytes'] / GB:.2f} GB measured, {predicted / GB:.2f} GB predicted "
                          f"from {a} and {b}")
    for line in checks:
        print(f"\n{line}")


if __name__ == "__main__":
    main(sys.argv[1])
