"""A run config's training step at real model size, without weights: trainable parameters and per-device memory.

The config's model is replaced by a named preset at full size (`--preset`, default phi4-mini; the checkpoint a
fine-tuning recipe would start from), built abstractly (`nnx.eval_shape`: no weight is allocated) the way
`jaxmoe.train.trainer.build_model` builds it: float32 parameters, the config's `model.compute_dtype`, LoRA adapters
from `model.lora`, every field of the section (`jaxmoe.nn.lora.apply_lora`). The optimizer is the trainer's (`make_optimizer` with the
config's optim settings, `wrt=nnx.LoRAParam` with LoRA), and the step is the trainer's `train_step` on a packed
batch of the config's optim.batch_size x data.max_len (x optim.grad_accum micro-batches), AOT-compiled for one
device holding the whole model (one H100, one v5p chip), model and optimizer donated as the trainer does.

It prints one JSON line per case, then a table:
  params_total / params_trainable   every nnx.Param (adapters included) / the ones the optimizer updates
  argument / output / alias / temp  compiled.memory_analysis() of the step, bytes
  peak_bytes                        argument + output - alias + temp: what the device holds during the step
  h100 / v5p                        "fits" when peak_bytes <= the chip's HBM (H100 80GB: 81,559 MiB; v5p: 95 GiB)

Usage (from the repository root):
  python experiments/mt/dry_run.py --config experiments/configs/alma-stage2-lora.yaml
  python experiments/mt/dry_run.py --config CONFIG --batch-sizes 16,1 --full --base-dtype float32,bfloat16 \\
      model.compute_dtype=bfloat16 --remat layer       # KEY=VALUE overrides as for `jaxmoe train`

Notes:
- The memory figures come from XLA:CPU's compile (JAX_PLATFORMS defaults to cpu here): they approximate what the
  GPU or TPU compiler would allocate, which fuses, schedules and picks dot precisions differently. XLA:CPU runs
  bf16 dots in f32, so the weights' bf16 copies kept for the backward are f32 there: 12 of the 17.9 GiB temp of
  phi4-mini LoRA at 1 x 512 without remat or dropout (its buffer assignment), which a GPU compile would keep in
  bf16, half the bytes. With JAX_PLATFORMS=cuda (or tpu) on a machine with that chip the same script should report
  that compiler's figures (not tried).
- Of the config's model section only lora, compute_dtype and the memory settings remat and attention_impl (from
  model.overrides) are kept; the architecture and vocabulary are the preset's. `--remat` sets remat, also for
  init_from configs (they refuse model.overrides). The config's mesh is not used: every case is one device.
- `--base-dtype bfloat16` stores the frozen base weights of a LoRA run in bfloat16 (adapters stay float32). The
  trainer does not do this today (it keeps float32 masters); the case shows what it would save. Full fine-tuning
  always keeps float32 masters.
- JAX's GPU client preallocates 75% of the memory by default; a step that needs more needs
  XLA_PYTHON_CLIENT_MEM_FRACTION raised.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# As in experiments/tpu_pod/plan.py: XLA:CPU otherwise drops jax.checkpoint's optimization barriers before
# scheduling, and `--remat layer` would save nothing in the CPU compile's figures.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_disable_hlo_passes=cse_barrier_expander"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterator  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jaxmoe.config import PRESETS, ModelConfig, get_preset  # noqa: E402
from jaxmoe.models.phi3 import Phi3ForCausalLM  # noqa: E402
from jaxmoe.models.phimoe import PhimoeForCausalLM  # noqa: E402
from jaxmoe.nn.lora import LoRAConfig, apply_lora  # noqa: E402
from jaxmoe.train.loop import Batch, TrainConfig, make_optimizer, train_step  # noqa: E402
from jaxmoe.train.run_config import RunConfig, load_run_config  # noqa: E402

GIB = 2**30
# Per-chip HBM: an H100 SXM "80GB" reports 81,559 MiB (79.6 GiB) in nvidia-smi; a v5p chip has 95 GiB.
CHIPS = {"h100": 81559 * 2**20, "v5p": 95 * GIB}
MEMORY_FIELDS = ("remat", "attention_impl")  # model.overrides kept on top of the preset: memory, not architecture


def real_size_config(config: RunConfig, preset: str, *, remat: str | None = None) -> ModelConfig:
    """The preset at full size, with the config's memory settings (model.overrides.remat / attention_impl);
    `remat` ("none" or "layer") replaces the config's."""
    memory = {k: v for k, v in config.model.overrides.items() if k in MEMORY_FIELDS}
    if remat is not None:
        memory["remat"] = remat
    model_config = get_preset(preset).replace(**memory)
    if model_config.max_position_embeddings < config.data.max_len:
        raise ValueError(f"data.max_len={config.data.max_len} exceeds preset {preset!r}'s max_position_embeddings="
                         f"{model_config.max_position_embeddings}; lower data.max_len or pick a larger preset")
    return model_config


def abstract_training_state(model_config: ModelConfig, config: RunConfig, *, lora: bool, base_dtype: str
                            ) -> tuple[nnx.Module, nnx.Optimizer]:
    """(model, optimizer) as trainer.train builds them, every array a ShapeDtypeStruct. lora: add the config's
    model.lora adapters and train only them; base_dtype: the dtype of the parameters the adapters leave frozen."""
    m, o = config.model, config.optim
    model_class = Phi3ForCausalLM if model_config.moe is None else PhimoeForCausalLM
    train_config = TrainConfig(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps, total_steps=o.steps,
                               final_lr_fraction=o.final_lr_fraction, weight_decay=o.weight_decay,
                               clip_norm=o.clip_norm, b1=o.b1, b2=o.b2, schedule=o.schedule)

    def make():
        model = model_class(model_config, dtype=jnp.dtype(m.compute_dtype), param_dtype=jnp.dtype(base_dtype),
                            rngs=nnx.Rngs(config.seed))
        if lora:
            # Every field of the section (rank, alpha, targets and whatever else it carries) as LoRAConfig's.
            apply_lora(model, LoRAConfig(**dataclasses.asdict(m.lora)), rngs=nnx.Rngs(config.seed + 1))
        model.train()
        return model, make_optimizer(model, train_config, wrt=nnx.LoRAParam if lora else nnx.Param)

    return nnx.eval_shape(make)


def _size(tree) -> tuple[int, int]:
    """(elements, bytes) of every array in a tree of ShapeDtypeStructs."""
    leaves = jax.tree.leaves(tree)
    return sum(x.size for x in leaves), sum(x.size * x.dtype.itemsize for x in leaves)


def count_parameters(model: nnx.Module, *, lora: bool) -> tuple[int, int]:
    """(every nnx.Param, adapters included; the trained ones: nnx.LoRAParam with LoRA, else all), as the trainer
    counts them."""
    return _size(nnx.state(model, nnx.Param))[0], _size(nnx.state(model, nnx.LoRAParam if lora else nnx.Param))[0]


def compile_step(model: nnx.Module, optimizer: nnx.Optimizer, batch_shape: tuple[int, ...]):
    """The trainer's `train_step` for packed int32 batches of `batch_shape` ([b, t] or [micro, b, t]), lowered on
    the abstract model and optimizer and compiled for the default device. Returns the compiled step."""
    graphdef, state = nnx.split((model, optimizer))

    def step(state, batch, key):
        model, optimizer = nnx.merge(graphdef, state)
        metrics = train_step(model, optimizer, batch, nnx.Rngs(key))
        return nnx.state((model, optimizer)), metrics

    ids = jax.ShapeDtypeStruct(batch_shape, jnp.int32)
    # BatchStream's packed rows fill every [b, t] field; task_ids stay None (no task adapters here)
    batch = Batch(input_ids=ids, loss_mask=ids, attention_mask=ids, segment_ids=ids, positions=ids)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    return jax.jit(step, donate_argnums=0).lower(state, batch, key).compile()


def dry_run_case(config: RunConfig, preset: str, *, batch_size: int, lora: bool, base_dtype: str,
                 remat: str | None = None) -> dict:
    """One case: counts and the compiled step's memory, as the JSON row printed (compile_s: wall seconds of the
    abstract build, lowering and compile)."""
    model_config = real_size_config(config, preset, remat=remat)
    started = time.perf_counter()
    model, optimizer = abstract_training_state(model_config, config, lora=lora, base_dtype=base_dtype)
    total, trainable = count_parameters(model, lora=lora)
    _, param_bytes = _size(nnx.state(model, nnx.Param))
    _, opt_bytes = _size(nnx.state(optimizer))
    o, seq = config.optim, config.data.max_len
    shape = (batch_size, seq) if o.grad_accum == 1 else (o.grad_accum, batch_size, seq)
    mem = compile_step(model, optimizer, shape).memory_analysis()
    seconds = time.perf_counter() - started
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
    lo = config.model.lora
    return {
        "preset": preset,
        "tuning": f"lora r{lo.rank} a{lo.alpha:g} {'+'.join(lo.targets)}" if lora else "full",
        "base_dtype": base_dtype, "compute_dtype": config.model.compute_dtype, "remat": model_config.remat,
        "attention_impl": model_config.attention_impl,
        "batch": batch_size, "seq": seq, "grad_accum": o.grad_accum, "tokens_per_step": batch_size * seq * o.grad_accum,
        "params_total": total, "params_trainable": trainable, "trainable_percent": 100 * trainable / total,
        "params_bytes": param_bytes, "opt_state_bytes": opt_bytes,
        "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes, "peak_bytes": peak,
        **{chip: "fits" if peak <= capacity else "does not fit" for chip, capacity in CHIPS.items()},
        "backend": jax.default_backend(), "compile_s": round(seconds, 1),
    }


def dry_run(config: RunConfig, preset: str = "phi4-mini", *, batch_sizes: tuple[int, ...] = (),
            full: bool = False, base_dtypes: tuple[str, ...] = ("float32",), remat: str | None = None
            ) -> Iterator[dict]:
    """Yields the row of every case, one compile each: batch_sizes (default: optim.batch_size) x the config's
    tuning (LoRA, or full without model.lora; `full` adds full fine-tuning beside LoRA) x base_dtypes (LoRA cases
    only: full fine-tuning keeps float32 masters)."""
    if not set(base_dtypes) <= {"float32", "bfloat16"}:
        raise ValueError(f"base_dtypes={base_dtypes!r}; expected float32 and/or bfloat16")
    with_lora = [True] if config.model.lora is not None else []
    tunings = with_lora + ([False] if full or not with_lora else [])
    for batch_size in batch_sizes or (config.optim.batch_size,):
        for lora in tunings:
            for base_dtype in base_dtypes if lora else ("float32",):
                yield dry_run_case(config, preset, batch_size=batch_size, lora=lora, base_dtype=base_dtype,
                                   remat=remat)


def format_table(rows: list[dict]) -> str:
    """A markdown table of the rows; bytes in GiB."""
    head = ("| tuning | base | batch x seq | params | trainable | argument GiB | output GiB | alias GiB | "
            "temp GiB | peak GiB | H100 80GB | v5p | compile s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        gib = [f"{r[k] / GIB:.2f}" for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes",
                                              "peak_bytes")]
        lines.append(f"| {r['tuning']} | {r['base_dtype']} | {r['batch']} x {r['seq']}"
                     f"{' x ' + str(r['grad_accum']) if r['grad_accum'] > 1 else ''} | {r['params_total']:,} | "
                     f"{r['params_trainable']:,} ({r['trainable_percent']:.3f}%) | {' | '.join(gib)} | "
                     f"{r['h100']} | {r['v5p']} | {r['compile_s']} |")
    return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
    """"16,1" -> (16, 1): a list option that the positional KEY=VALUE overrides cannot be mistaken for."""
    values = tuple(int(v) for v in text.split(","))
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}; expected positive integers, e.g. 16,1")
    return values


def _dtypes(text: str) -> tuple[str, ...]:
    values = tuple(text.split(","))
    if not set(values) <= {"float32", "bfloat16"}:
        raise argparse.ArgumentTypeError(f"{text!r}; expected float32, bfloat16 or float32,bfloat16")
    return values


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="YAML run config (jaxmoe train's format)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.max_len=512")
    parser.add_argument("--preset", default="phi4-mini", choices=sorted(PRESETS), help="the model at real size")
    parser.add_argument("--batch-sizes", type=_ints, default=(), help="e.g. 16,1 (default: the config's "
                        "optim.batch_size)")
    parser.add_argument("--full", action="store_true", help="add full fine-tuning cases beside the config's LoRA")
    parser.add_argument("--base-dtype", type=_dtypes, default=("float32",),
                        help="float32 (the trainer's), bfloat16 or both, comma-separated: the frozen base weights' "
                             "dtype in LoRA cases")
    parser.add_argument("--remat", choices=["none", "layer"], default=None,
                        help="recompute each decoder layer in the backward (default: the config's, else none)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON lines to this file")
    args = parser.parse_args(argv)
    config = load_run_config(args.config, args.overrides)
    rows = []
    for row in dry_run(config, args.preset, batch_sizes=args.batch_sizes, full=args.full,
                       base_dtypes=args.base_dtype, remat=args.remat):
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out is not None:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"\n{args.preset}, compute {config.model.compute_dtype}, remat {rows[0]['remat']}, one device, memory "
          f"from the {jax.default_backend()} compile:\n")
    print(format_table(rows))
    if jax.default_backend() == "cpu":
        print("\nThe memory figures are XLA:CPU's: they approximate a GPU or TPU compile of the same step.")
    return rows


if __name__ == "__main__":
    main()
