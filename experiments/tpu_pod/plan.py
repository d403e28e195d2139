"""The pod plan of issue 5, computed: per-device memory and collective traffic of one GRIN-MoE training step on
candidate 64-device meshes, from XLA's own compile of the step on 64 fake CPU devices.

For each mesh (and each MoE exchange strategy) this builds an `num_layers`-layer slice of the `grin-moe` preset
abstractly (`nnx.eval_shape`: no weight is ever allocated), places parameters by `jaxmoe.sharding.param_shardings`
and the batch by `batch_spec`, and AOT-compiles one full training step: forward, backward, global-norm clipping
and AdamW (the optax chain `jaxmoe.train.loop.make_optimizer` builds), parameters and optimizer state donated.
It prints one JSON line per case with
  memory_analysis()  per-device argument / output / alias / temp bytes as XLA reports them,
  params / opt       per-device bytes of the fp32 parameters and of the optimizer state, from their shardings,
  collectives        per-device bytes of each collective's result in the compiled HLO, summed by kind.

Usage (from the repository root):
  python experiments/tpu_pod/plan.py                     # all meshes, 2 layers, 64 x 4096 tokens
  python experiments/tpu_pod/plan.py --layers 1 2 --meshes fsdp=4,expert=16 --strategies all_gather all_to_all
  python experiments/tpu_pod/plan.py --layers 1 2 --remat none layer --attention dense blocked   # memory options

Notes:
- Routing runs in training mode (SparseMixer sampling and input jitter, from a step key), as in `train_step`.
- Compute dtype bfloat16, parameters float32 masters (the trainer's `model.compute_dtype: bfloat16`).
- `--remat` and `--attention` set `ModelConfig.remat` ("none": every layer's activations kept for the backward;
  "layer": each layer recomputed in the backward) and `ModelConfig.attention_impl` ("dense": the fp32
  [heads, t, t] scores; "blocked": online softmax over key blocks). Each case is compiled for every combination.
- On CPU "auto" resolves to "all_gather"; `lax.ragged_all_to_all` does not run on XLA:CPU and is not implemented
  in jaxmoe. "all_to_all" (padded to the worst case) is selected through the config (`MoEConfig.expert_parallel`).
- The collective byte counts are static: each collective in the HLO counted once. Collectives inside a `while`
  body run once per trip; the script reports how many bytes sit in while bodies (`in_loops`) so that can be
  judged. The HLO is the CPU compile: a TPU/GPU compile may fuse or schedule collectives differently.
"""

from __future__ import annotations

import os

# cse_barrier_expander: XLA:CPU removes optimization barriers before scheduling (the GPU compiler only after it),
# and jax.checkpoint's barrier is what keeps a rematerialised forward in the backward pass; without it XLA:CPU
# runs the recomputation next to the original forward (or merges the two) and remat saves nothing. The flag keeps
# the barriers to code generation; a program without jax.checkpoint has none and compiles the same.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=64"
                           " --xla_disable_hlo_passes=cse_barrier_expander")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jaxmoe  # noqa: E402
from jaxmoe.models.phimoe import PhimoeForCausalLM  # noqa: E402
from jaxmoe.sharding import batch_spec, check_batch, make_mesh, param_shardings, use_mesh_for_experts  # noqa: E402
from jaxmoe.train.loop import Batch, TrainConfig, make_optimizer, next_token_loss  # noqa: E402

MESHES = ("fsdp=4,expert=16", "data=4,expert=16", "fsdp=8,expert=8", "data=2,fsdp=2,expert=16",
          "expert=16,tensor=4")
COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


def parse_mesh(text: str) -> dict[str, int]:
    """"fsdp=4,expert=16" -> {"fsdp": 4, "expert": 16}."""
    sizes = {}
    for item in text.split(","):
        name, _, size = item.partition("=")
        sizes[name.strip()] = int(size)
    return sizes


def collective_bytes(hlo: str) -> dict:
    """Per-device bytes of every collective's result in compiled HLO text, by kind; `in_loops` the part inside
    computations that are while bodies. `-start` ops are counted (their result tuple's last element is the
    output), `-done` ops are not, so async pairs count once."""
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    totals = {k: 0 for k in COLLECTIVES}
    counts = {k: 0 for k in COLLECTIVES}
    in_loops = 0
    computation = None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header and not line.startswith(" "):
            computation = header.group(1)
            continue
        m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (.+?) ([\w\-]+)\(", line)
        if not m:
            continue
        shape_text, op = m.groups()
        kind = op[:-len("-start")] if op.endswith("-start") else op
        if kind not in totals:
            continue
        shapes = re.findall(r"(\w+)\[([\d,]*)\]", shape_text)
        if op.endswith("-start") and len(shapes) > 1:
            shapes = shapes[len(shapes) // 2:]  # (operands..., outputs...)
        nbytes = sum(_BYTES[dt] * math.prod(int(s) for s in dims.split(",") if s) for dt, dims in shapes
                     if dt in _BYTES)
        totals[kind] += nbytes
        counts[kind] += 1
        if computation in bodies:
            in_loops += nbytes
    return {"bytes": totals, "count": counts, "in_loops": in_loops}


def abstract_model(layers: int, strategy: str, mesh, *, remat: str = "none", attention: str = "dense"):
    """The `layers`-layer grin-moe slice as ShapeDtypeStructs placed on `mesh`: (graphdef, params, rest,
    param NamedShardings)."""
    preset = jaxmoe.get_preset("grin-moe")
    config = preset.replace(num_layers=layers, moe=dataclasses.replace(preset.moe, expert_parallel=strategy),
                            remat=remat, attention_impl=attention)
    model = nnx.eval_shape(lambda: PhimoeForCausalLM(config, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                                                     rngs=nnx.Rngs(0)))
    model.train()
    use_mesh_for_experts(model, mesh)  # what shard_model does, minus device_put of real weights
    shardings = nnx.to_pure_dict(param_shardings(model, mesh))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
    return graphdef, params, rest, shardings


def optimizer_shardings(opt_state, param_sh, mesh):
    """Each optimizer-state leaf whose key path ends with a parameter's path (AdamW's mu and nu) gets that
    parameter's sharding; the rest (step count, learning rate) is replicated."""
    by_path = {tuple(str(k) for k in path): s for path, s in jax.tree_util.tree_flatten_with_path(param_sh)[0]}
    depth = max(map(len, by_path))

    def sharding(path, leaf):
        keys = tuple(str(k) for k in path)
        for n in range(min(depth, len(keys)), 0, -1):
            if keys[-n:] in by_path:
                return by_path[keys[-n:]]
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(sharding, opt_state)


def per_device_bytes(tree) -> int:
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def plan_case(mesh_sizes: dict, layers: int, strategy: str, batch: int, seq: int, *, remat: str = "none",
              attention: str = "dense") -> dict:
    mesh = make_mesh(**mesh_sizes)
    check_batch(batch, mesh)
    graphdef, params, rest, param_sh = abstract_model(layers, strategy, mesh, remat=remat, attention=attention)
    # The optax chain of jaxmoe.train.loop.make_optimizer (AdamW + global-norm clipping + scheduled rate).
    tx = make_optimizer(_TinyParams(), TrainConfig()).tx
    opt_state = jax.eval_shape(tx.init, params)
    opt_sh = optimizer_shardings(opt_state, param_sh, mesh)
    opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_state, opt_sh)
    data_sh = NamedSharding(mesh, batch_spec(mesh))
    batch_args = Batch(input_ids=jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=data_sh),
                       loss_mask=jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=data_sh))
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, P()))

    def step(params, opt_state, batch, key):
        def objective(params):
            model = nnx.merge(graphdef, _as_state(params), rest)
            return next_token_loss(model, batch, nnx.Rngs(key))
        (loss, stats), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        params = jax.lax.with_sharding_constraint(params, param_sh)
        return params, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    started = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1), out_shardings=(param_sh, opt_sh, None)).lower(
        params, opt_state, batch_args, key)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - started
    mem = compiled.memory_analysis()
    coll = collective_bytes(compiled.as_text())
    per_device_step = sum(coll["bytes"].values())
    tokens = batch * seq
    return {
        "mesh": mesh_sizes, "layers": layers, "strategy": strategy,
        "strategy_resolved": "all_gather" if strategy == "auto" else strategy, "remat": remat, "attention": attention,
        "batch": batch, "seq": seq, "tokens_per_step": tokens, "tokens_per_device": tokens // mesh.size,
        "compile_s": round(compile_s, 1),
        "params_bytes_per_device": per_device_bytes(params),
        "opt_state_bytes_per_device": per_device_bytes(opt_state),
        "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
        "collective_bytes_per_device": coll["bytes"], "collective_count": coll["count"],
        "collective_bytes_in_loops": coll["in_loops"],
        "collective_bytes_per_device_per_step": per_device_step,
        # All devices' traffic divided by the tokens of the step.
        "collective_bytes_per_token": per_device_step * mesh.size / tokens,
        "all_to_all_bytes_per_token": coll["bytes"]["all-to-all"] * mesh.size / tokens,
    }


class _TinyParams(nnx.Module):
    """Only there to let `make_optimizer` build its optax chain (its `.tx`) without touching the real model."""

    def __init__(self):
        self.w = nnx.Param(jnp.zeros((1, 1)))


def _as_state(pure: dict):
    """A pure dict of arrays -> an nnx.State of Params for `nnx.merge`."""
    return jax.tree.map(lambda x: nnx.Param(x), pure, is_leaf=lambda x: not isinstance(x, dict))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--meshes", nargs="+", default=list(MESHES), help="e.g. fsdp=4,expert=16")
    parser.add_argument("--layers", nargs="+", type=int, default=[2])
    parser.add_argument("--strategies", nargs="+", default=["auto"], choices=["auto", "all_gather", "all_to_all"])
    parser.add_argument("--batch", type=int, default=64, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=4096, help="tokens per sequence")
    parser.add_argument("--remat", nargs="+", default=["none"], choices=["none", "layer"])
    parser.add_argument("--attention", nargs="+", default=["dense"], choices=["dense", "blocked"])
    args = parser.parse_args()
    assert jax.device_count() == 64, jax.devices()
    for text, remat, attention, layers, strategy in itertools.product(args.meshes, args.remat, args.attention,
                                                                       args.layers, args.strategies):
        try:
            row = plan_case(parse_mesh(text), layers, strategy, args.batch, args.seq, remat=remat,
                            attention=attention)
        except Exception as error:  # one failing case must not hide the others
            row = {"mesh": parse_mesh(text), "layers": layers, "strategy": strategy, "remat": remat,
                   "attention": attention, "error": f"{type(error).__name__}: {str(error)[:400]}"}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
