"""MoE greedy decode: jaxmoe (fp32, int8 and int4 experts) against transformers' PhimoeForCausalLM, CPU.

Model (issue 19): a random 4-layer PhiMoE, hidden 512, intermediate 1024, 8 heads / 4 KV heads, 16 experts top-2,
vocabulary 8,192, fp32; saved with `save_pretrained` and read back with `jaxmoe.load_hf`, so both sides hold the
same weights. Greedy decode of 64 new tokens after 32-token random prompts (no EOS stop), at batch 1 and 8.
Tokens/s = batch * 64 / median end-to-end `generate` time (prefill included); the sides alternate call by call
after one warm-up call each (compile excluded). Quantized rows: `jaxmoe.quantize(target="experts")`, symmetric,
group size 128 (`--group-size`), against the fp32 jaxmoe model in the same run; `memory` lists bytes by parameter
group (`jaxmoe.quant.memory.bytes_by_group`). One JSON line per case.

    python experiments/bench/moe_decode.py [--repeats 5] [--batches 1 8] [--bits 8 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import jaxmoe  # noqa: E402
from jaxmoe.quant.memory import bytes_by_group  # noqa: E402

PROMPT, NEW_TOKENS, VOCAB = 32, 64, 8192


def hf_config() -> transformers.PhimoeConfig:
    return transformers.PhimoeConfig(
        vocab_size=VOCAB, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, num_local_experts=16, num_experts_per_tok=2, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=None, pad_token_id=0, attn_implementation="sdpa")


def median_seconds(fns: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each callable after one warm-up call each; the callables alternate call by call with a
    short pause between them, so slow drifts in the shared machine's speed hit every side alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(0.2)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--bits", type=int, nargs="*", default=[8, 4], help="expert bit widths to add (none: fp32)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--no-transformers", action="store_true", help="jaxmoe rows only")
    args = parser.parse_args()

    torch.manual_seed(0)
    hf = transformers.PhimoeForCausalLM(hf_config()).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        model = jaxmoe.load_hf(folder)
    models = {"fp32": model}
    for bits in args.bits:
        models[f"int{bits}"] = jaxmoe.quantize(model, bits=bits, group_size=args.group_size, target="experts")
    for name, m in models.items():
        groups = bytes_by_group(m)
        print(json.dumps({"case": "memory", "model": name,
                          **{f"{g.replace(' ', '_')}_mb": round(b / 2**20, 2) for g, b in groups.items()}}), flush=True)

    rng = np.random.default_rng(0)
    for batch in args.batches:
        ids = rng.integers(3, VOCAB, size=(batch, PROMPT))
        ids_pt = torch.tensor(ids)

        def jax_fn(m):
            return lambda: np.asarray(jaxmoe.generate(m, ids, max_new_tokens=NEW_TOKENS, eos_token_id=()))

        def run_torch():
            with torch.no_grad():
                return hf.generate(ids_pt, attention_mask=torch.ones_like(ids_pt), do_sample=False,
                                   max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, eos_token_id=None,
                                   pad_token_id=0).numpy()

        fns = {name: jax_fn(m) for name, m in models.items()}
        if not args.no_transformers:
            fns["transformers"] = run_torch
        reference = fns["fp32"]()
        same = {name: float((fn() == reference).mean()) for name, fn in fns.items() if name != "fp32"}
        seconds = median_seconds(fns, args.repeats)
        tok_s = {name: batch * NEW_TOKENS / s for name, s in seconds.items()}
        row = {"case": "decode", "batch": batch, **{f"{n}_tok_s": round(v, 1) for n, v in tok_s.items()}}
        if "transformers" in tok_s:
            row["fp32_vs_transformers"] = round(tok_s["fp32"] / tok_s["transformers"], 2)
        for name in models:
            if name != "fp32":
                row[f"{name}_vs_fp32"] = round(tok_s[name] / tok_s["fp32"], 2)
        row["same_tokens_as_fp32"] = same
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
