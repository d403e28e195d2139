"""Where a jitted jaxmoe training step (or greedy decode) spends its time on CPU: a `jax.profiler` trace, per-op
durations grouped by the jaxmoe source line each XLA op came from.

The trace (`jax.profiler.trace(..., create_perfetto_trace=True)`) holds one event per XLA:CPU thunk (a fusion, a
dot, a loop). The compiled HLO gives every op a `stack_frame_id` into its FileNames / FunctionNames /
FileLocations / StackFrames tables, the Python stack of the jax call that made it; this script joins the two, sums the time of each op over the
traced steps, divides by the step count, and groups the result into the parts of the step named in issue 15:
attention, router, dispatch/combine, experts, MLP, norms, RoPE, embeddings / LM head, loss, optimizer. A while
loop's or conditional's own event covers its body's ops, so only leaf ops are counted. It lowers the step's
private jitted function (`loop._train_step`, `generate._generate_compiled`) to read the compiled HLO: a
profiling aid, tied to those internals. The host-side time per step is the wall time
of a step minus the device-side sum.

    python experiments/bench/profile_step.py train --model moe --vocab 512 [--steps 3] [--top 25]
    python experiments/bench/profile_step.py decode --vocab 32064 --batch 8

Figures depend on the machine: run it where the benchmark runs (BENCHMARKS.md, issue 15).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

import jaxmoe  # noqa: E402
from jaxmoe.train import Batch, TrainConfig, make_optimizer, train_step  # noqa: E402

# (category, regex on "file:function" of a stack frame). Each op's stack is walked from the innermost frame
# outwards and the first frame matching any pattern names its category (so a LayerNorm inside a decoder layer is
# "norms", a Linear inside attention is "attention projections").
CATEGORIES = [
    ("optimizer", r"optax/|flax/nnx/training/optimizer\.py"),
    ("norms", r"nn/norms\.py|flax/nnx/nn/normalization\.py"),
    ("embeddings", r"flax/nnx/nn/linear\.py:Embed\."),
    ("rope", r"jaxmoe/nn/rope\.py"),
    ("attention projections", r"jaxmoe/nn/attention\.py:Attention\.__call__$"),
    ("attention core", r"jaxmoe/nn/attention\.py"),
    ("router", r"jaxmoe/moe/router\.py|pallas_kernels/router/|jaxmoe/moe/layer\.py:SparseMoeBlock\.__call__$"),
    ("dispatch/combine", r"jaxmoe/moe/dispatch\.py"),
    ("experts", r"jaxmoe/moe/experts\.py|pallas_kernels/grouped/"),
    ("mlp", r"jaxmoe/nn/mlp\.py"),
    ("loss + metrics", r"jaxmoe/train/loop\.py:(next_token_stats|_objective|target_weights)|nn/tokens\.py|optax/losses"),
    ("aux losses", r"jaxmoe/models/phi3\.py:routing_losses$"),
    ("lm head + model glue", r"jaxmoe/models/phi3\.py"),
    ("optimizer", r"jaxmoe/train/loop\.py:_train_step$"),
    ("decode loop", r"jaxmoe/infer/generate\.py"),
]


def hlo_sources(hlo_text: str) -> dict[str, tuple[list[str], str]]:
    """op name -> (its stack as "file:function:line" strings, innermost first; its op_name), from the compiled
    HLO's metadata and the module's FileNames / FunctionNames / FileLocations / StackFrames tables."""
    tables, section = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}, None
    ops = {}
    for line in hlo_text.splitlines():
        if line.strip() in tables:
            section = line.strip()
            continue
        if section and re.match(r"\d+ ", line):
            key, _, value = line.partition(" ")
            tables[section][int(key)] = value
            continue
        section = None
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*metadata=\{([^}]*)\}", line)
        if m:
            frame = re.search(r"stack_frame_id=(\d+)", m.group(2))
            op = re.search(r'op_name="([^"]*)"', m.group(2))
            ops[m.group(1)] = (int(frame.group(1)) if frame else None, op.group(1) if op else "")

    def field(text, name):
        return int(re.search(rf"{name}=(\d+)", text).group(1))

    def location(loc_id):
        loc = tables["FileLocations"][loc_id]
        path = tables["FileNames"][field(loc, "file_name_id")].strip('"')
        function = tables["FunctionNames"][field(loc, "function_name_id")].strip('"')
        return f"{path}:{function}:{field(loc, 'line')}"

    def stack(frame_id):
        frames, seen = [], set()
        while frame_id and frame_id not in seen and frame_id in tables["StackFrames"]:
            seen.add(frame_id)
            text = tables["StackFrames"][frame_id]
            frames.append(location(field(text, "file_location_id")))
            frame_id = field(text, "parent_frame_id")
        return frames

    return {name: (stack(frame), op) for name, (frame, op) in ops.items()}


def categorise(frames: list[str]) -> str:
    for frame in frames:
        key = frame.rpartition(":")[0]
        for name, pattern in CATEGORIES:
            if re.search(pattern, key):
                return name
    return "other"


def short(frame: str) -> str:
    return re.sub(r".*/(site-packages|main)/", "", frame)


def trace_events(folder: str) -> list[dict]:
    files = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(files[0]) as f:
        trace = json.load(f)
    return [e for e in trace["traceEvents"] if e.get("ph") == "X"]


def profile(fn, compiled_hlo: str, steps: int, top: int) -> None:
    """Traces `steps` calls of fn (already warm) and prints the breakdown."""
    sources = hlo_sources(compiled_hlo)
    walls = []
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(steps):
                start = time.perf_counter()
                fn()
                walls.append(time.perf_counter() - start)
        events = trace_events(folder)
    per_op = collections.Counter()
    for e in events:
        name = e["name"]
        if name in sources:
            per_op[name] += e["dur"] / 1e3 / steps  # ms per step
    # A loop or conditional op's event spans its body's: count only ops whose body is not also traced.
    containers = {n for n in per_op if re.match(r"(while|conditional|cond|call)\b", n)}
    by_category, by_source = collections.Counter(), collections.Counter()
    for name, ms in per_op.items():
        if name in containers:
            continue
        frames, _ = sources[name]
        by_category[categorise(frames)] += ms
        project = [f for f in frames if "jaxmoe/" in f or "pallas_kernels/" in f]
        by_source[short((project or frames or ["?"])[0])] += ms
    wall = 1e3 * float(np.median(walls))
    device = sum(by_category.values())
    print(f"step wall {wall:.1f} ms (median of {steps}); traced ops {device:.1f} ms; outside ops "
          f"{wall - device:.1f} ms (host work, dispatch, and loop/thunk overhead)")
    print("\nby part:")
    for name, ms in by_category.most_common():
        print(f"  {name:24s} {ms:8.1f} ms  {100 * ms / device:5.1f}%")
    print(f"\ntop {top} source lines:")
    for name, ms in by_source.most_common(top):
        print(f"  {ms:8.1f} ms  {name}")
    print(f"\ntop {top} ops:")
    for name, ms in per_op.most_common(top + len(containers)):
        if name not in containers:
            frames, op = sources[name]
            print(f"  {ms:8.1f} ms  {name:22s} {categorise(frames):22s} {short(frames[0]) if frames else '?'}  "
                  f"{op.rpartition('/')[2][:40]}")


def train(args) -> None:
    from train_step import BATCH, LENGTH, hf_model

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        hf_model(args.model, args.vocab).save_pretrained(folder)
        model = jaxmoe.load_hf(folder)
    model.train()
    optimizer = make_optimizer(model, TrainConfig())
    ids = np.random.default_rng(0).integers(3, args.vocab, size=(BATCH, LENGTH))
    batch = Batch(jnp.asarray(ids, jnp.int32), jnp.ones(ids.shape, jnp.int32))
    rngs = nnx.Rngs(router=1, jitter=2)
    step = lambda: jax.block_until_ready(train_step(model, optimizer, batch, rngs))  # noqa: E731
    start = time.perf_counter()
    step()
    print(f"first step (compile included): {time.perf_counter() - start:.2f} s")
    step()
    from jaxmoe.train import loop
    hlo = loop._train_step.lower(model, optimizer, batch, rngs, None).compile().as_text()
    profile(step, hlo, args.steps, args.top)


def decode(args) -> None:
    from generate import NEW_TOKENS, PROMPT, hf_config
    import transformers

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        transformers.Phi3ForCausalLM(hf_config(args.vocab)).save_pretrained(folder)
        model = jaxmoe.load_hf(folder)
    ids = np.random.default_rng(0).integers(3, args.vocab, size=(args.batch, PROMPT))
    run = lambda: jax.block_until_ready(jaxmoe.generate(model, ids, max_new_tokens=NEW_TOKENS, eos_token_id=()))  # noqa: E731
    run()
    from jaxmoe.infer import generate as gen
    graphdef, state = nnx.split(model)
    hlo = gen._generate_compiled.lower(
        graphdef, state, jnp.asarray(ids, jnp.int32), jnp.ones(ids.shape, jnp.int32), jax.random.key(0),
        jnp.float32(0), jnp.float32(1), jnp.full((8,), -1, jnp.int32), jnp.int32(0), max_new_tokens=NEW_TOKENS,
        cache_len=PROMPT + NEW_TOKENS, greedy=True, top_k=None, use_top_p=False, stream=False).compile().as_text()
    profile(run, hlo, args.steps, args.top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("--model", choices=("moe", "dense"), default="moe")
    t.add_argument("--vocab", type=int, default=512)
    d = sub.add_parser("decode")
    d.add_argument("--vocab", type=int, default=32064)
    d.add_argument("--batch", type=int, default=8)
    for p in (t, d):
        p.add_argument("--steps", type=int, default=3)
        p.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    train(args) if args.what == "train" else decode(args)


if __name__ == "__main__":
    main()
