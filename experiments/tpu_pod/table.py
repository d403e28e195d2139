"""The pod-plan table: reads plan.py's JSON lines (run with --layers 1 2) and extrapolates each figure to the
full 32 layers linearly, X(32) = X(2) + 30 * (X(2) - X(1)), printing a Markdown table.

Usage: python experiments/tpu_pod/plan.py --layers 1 2 --strategies auto all_to_all > plan.jsonl
       python experiments/tpu_pod/table.py plan.jsonl
"""

from __future__ import annotations

import json
import sys

LAYERS = 32
GB = 1e9


def extrapolate(one: float, two: float) -> float:
    return two + (LAYERS - 2) * (two - one)


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.startswith("{")]
    cases = {}
    for row in rows:
        if "error" in row:
            print(f"error: {row}")
            continue
        key = (json.dumps(row["mesh"]), row["strategy_resolved"])
        cases.setdefault(key, {})[row["layers"]] = row
    print("| mesh | MoE exchange | params GB/dev | opt state GB/dev | temp GB/dev | total GB/dev | "
          "collectives GB/dev/step | of which all-to-all | all-to-all KB/token | collectives KB/token | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (mesh, strategy), by_layers in cases.items():
        if not {1, 2} <= set(by_layers):
            continue
        one, two = by_layers[1], by_layers[2]
        x = {name: extrapolate(one[name], two[name]) for name in (
            "params_bytes_per_device", "opt_state_bytes_per_device", "temp_bytes",
            "collective_bytes_per_device_per_step", "collective_bytes_per_token", "all_to_all_bytes_per_token")}
        a2a = extrapolate(one["collective_bytes_per_device"]["all-to-all"],
                          two["collective_bytes_per_device"]["all-to-all"])
        total = x["params_bytes_per_device"] + x["opt_state_bytes_per_device"] + x["temp_bytes"]
        mesh_text = ", ".join(f"{k}={v}" for k, v in json.loads(mesh).items())
        print(f"| {mesh_text} | {strategy} | {x['params_bytes_per_device'] / GB:.2f} | "
              f"{x['opt_state_bytes_per_device'] / GB:.2f} | {x['temp_bytes'] / GB:.1f} | {total / GB:.1f} | "
              f"{x['collective_bytes_per_device_per_step'] / GB:.1f} | {a2a / GB:.1f} | "
              f"{x['all_to_all_bytes_per_token'] / 1e3:.0f} | {x['collective_bytes_per_token'] / 1e3:.0f} | "
              f"{one['compile_s']} / {two['compile_s']} |")


if __name__ == "__main__":
    main(sys.argv[1])
