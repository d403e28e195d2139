"""jaxmoe.generate vs transformers' generate on the same random Phi-3 weights (fp32, CPU).

Model: a random 4-layer Phi-3 (hidden 512, intermediate 1536, 8 heads / 4 KV heads), at each vocabulary of
--vocab (default 4,096 and 32,064). Cases: greedy decode of 128 new tokens after a 64-token prompt at batch 1
and 8 (no EOS stop on either side), and a prefill forward over 8 x 256 tokens. Decode tokens/s = batch * 128 / (median end-to-end
generate time, the 64-token prefill included); prefill tokens/s = 8 * 256 / median forward time. Compile
time is excluded (one warm-up call per case); the two sides alternate call by call. One JSON line per case.

    python experiments/bench/generate.py [--vocab 4096 32064] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

import jaxmoe  # noqa: E402

PROMPT, NEW_TOKENS, PREFILL_BATCH, PREFILL_LEN = 64, 128, 8, 256


def hf_config(vocab: int) -> transformers.Phi3Config:
    return transformers.Phi3Config(
        vocab_size=vocab, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=4096, original_max_position_embeddings=4096,
        rope_scaling=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=None, pad_token_id=0,
        attn_implementation="sdpa")


def median_seconds(fn_jax, fn_torch, repeats: int) -> tuple[float, float]:
    """Median wall times of the two sides after one warm-up call each (the jaxmoe one compiles).

    The sides alternate call by call, with a short pause in between so neither side's worker threads are still
    spinning when the other starts: slow drifts in the shared machine's speed then hit both sides alike.
    """
    fn_jax(), fn_torch()
    times = ([], [])
    for _ in range(repeats):
        for fn, out in zip((fn_jax, fn_torch), times):
            time.sleep(0.2)
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def report(vocab: int, case: str, batch: int, tokens: int, seconds: tuple[float, float], **extra) -> None:
    jax_s, torch_s = seconds
    jax_tok_s, torch_tok_s = tokens / jax_s, tokens / torch_s
    print(json.dumps({"vocab": vocab, "case": case, "batch": batch, "jaxmoe_tok_s": round(jax_tok_s, 1),
                      "transformers_tok_s": round(torch_tok_s, 1), "speedup": round(jax_tok_s / torch_tok_s, 2),
                      **extra}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", nargs="+", type=int, default=[4096, 32064])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    for vocab in args.vocab:
        run(vocab, args.repeats)


def run(vocab: int, repeats: int) -> None:
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(hf_config(vocab)).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        model = jaxmoe.load_hf(folder)
    rng = np.random.default_rng(0)

    for batch in (1, 8):
        ids = rng.integers(3, vocab, size=(batch, PROMPT))
        ids_pt = torch.tensor(ids)

        def run_jax():
            return np.asarray(jaxmoe.generate(model, ids, max_new_tokens=NEW_TOKENS, eos_token_id=()))

        def run_torch():
            with torch.no_grad():
                return hf.generate(ids_pt, attention_mask=torch.ones_like(ids_pt), do_sample=False,
                                   max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, eos_token_id=None,
                                   pad_token_id=0).numpy()

        same = bool((run_jax() == run_torch()).all())
        report(vocab, "decode", batch, batch * NEW_TOKENS, median_seconds(run_jax, run_torch, repeats),
               prompt=PROMPT, new_tokens=NEW_TOKENS, same_tokens=same)

    ids = rng.integers(3, vocab, size=(PREFILL_BATCH, PREFILL_LEN))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).logits)
    ids_jax, ids_pt = jnp.asarray(ids, jnp.int32), torch.tensor(ids)

    def prefill_torch():
        with torch.no_grad():
            return hf(ids_pt).logits

    report(vocab, "prefill", PREFILL_BATCH, PREFILL_BATCH * PREFILL_LEN,
           median_seconds(lambda: forward(state, ids_jax).block_until_ready(), prefill_torch, repeats),
           length=PREFILL_LEN)


if __name__ == "__main__":
    main()
