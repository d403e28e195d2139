"""`train(config)`: the main training job, from a RunConfig to a trained, evaluated, checkpointed model.

Data (tfds) -> tokenizer (a checkpoint's or a trained BPE) -> model (preset or Hugging Face checkpoint, full or
LoRA fine-tuning) -> AdamW steps with the MoE losses -> orbax checkpoints (async, keep-last-N plus best, exact
resume of parameters, optimizer state, step, RNG and data position) -> metrics (JSONL, TensorBoard, progress
bar, plots) -> at the end a Hugging Face export, validation loss and BLEU / chrF on the test split.

Run folder: run_config.yaml, tokenizer/, checkpoints/<step>/, metrics.jsonl, expert_load.jsonl, tb/, loss.png,
expert_load.png, model/ (save_hf + tokenizer; jaxmoe's format via save_quantized when transformers has no class for
the config: `jaxmoe.load_model` reads either), test.hyp.txt, summary.json; with data.tasks (MoE task adapters)
tasks.json, the task names in id order, in the run folder and in model/ (`jaxmoe.train.tasks.TaskMap`).

Several processes (multi-host, after `jax.distributed.initialize`): every process calls `train` with the same
config; the mesh spans all their devices, and run_dir must be on storage they all share. Each process builds only
its rows of every global batch (`batch_lib.host_rows`) and `jax.make_array_from_process_local_data` joins them, so
the batches, losses and evaluation are those of a one-process run on the same mesh. Process 0 alone prepares the
data, trains the tokenizer, writes the run's files (config, metrics, plots, translations, export, summary) and
logs; the others wait for it where they need its files. Checkpoints are saved and restored by all processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
import yaml
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmoe import sharding
from jaxmoe.config import MoEConfig, get_preset
from jaxmoe.io.bpe import save_tokenizer, train_bpe
from jaxmoe.io.hf import hf_problems, load_hf, save_hf
from jaxmoe.io.load import load_model
from jaxmoe.io.tokenizer import Tokenizer
from jaxmoe.quant.checkpoint import is_jaxmoe_checkpoint, save_quantized
from jaxmoe.models.phi3 import Phi3ForCausalLM
from jaxmoe.models.phimoe import PhimoeForCausalLM
from jaxmoe.mt.eval import score, translate
from jaxmoe.nn.lora import LoRAConfig, apply_lora, merge_lora
from jaxmoe.train import batches as batch_lib
from jaxmoe.train import data as data_lib
from jaxmoe.train.checkpoint import Checkpointer
from jaxmoe.train.hosts import any_process, gather_to_host, is_primary, sync_processes
from jaxmoe.train.loop import Batch, TrainConfig, evaluate, make_optimizer, train_step
from jaxmoe.train.metrics import MetricsLogger, plot_expert_load, plot_losses, read_expert_load
from jaxmoe.train.run_config import ConfigError, RunConfig, run_config_from_dict
from jaxmoe.train.tasks import TaskMap

__all__ = ["Preempted", "TrainingDivergedError", "train"]

CONFIG_FILE = "run_config.yaml"


class TrainingDivergedError(RuntimeError):
    """The loss or gradient became NaN or infinite; the checkpoints on disk stay as they were."""


class Preempted(RuntimeError):
    """SIGTERM arrived; the current step was checkpointed before stopping (`step` is the saved step)."""

    def __init__(self, step: int, directory: Path):
        super().__init__(f"stopped by SIGTERM after saving step {step} in {directory}; run the same command again "
                         "to resume from it")
        self.step = step


def _write_atomic(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text)
    os.replace(temp, path)


def _diff(old, new, prefix=""):
    """Dotted keys whose values differ between two nested dicts."""
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def _check_resume_config(run_dir: Path, config: RunConfig) -> None:
    """A run folder keeps the config it was started with; resuming with another model or tokenizer is refused."""
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.exists():
        return
    saved = yaml.safe_load(saved_path.read_text())
    new = config.to_dict()
    fixed = {k: saved.get(k) for k in ("model", "tokenizer")}
    changed = _diff(fixed, {k: new[k] for k in ("model", "tokenizer")})
    if changed:
        raise ConfigError(f"run folder {str(run_dir)!r} was started with another model or tokenizer "
                          f"({'; '.join(changed)}); its checkpoints only resume with the config they were saved "
                          "with: use that config or choose a new run_dir")


# --------------------------------------------------------------------------------------------------- data


_PAIR_KEYS = ({"src", "tgt", "src_lang", "tgt_lang"}, {"json", "src_lang", "tgt_lang"})


def _parallel_sources(spec: dict, config: RunConfig, what: str) -> list[data_lib.ParallelSource]:
    """The corpora of a parallel split spec: {src, tgt} / {json} in data.src_lang -> data.tgt_lang, or each entry
    of {pairs: [...]} with its own languages."""
    d = config.data
    if "pairs" not in spec:
        if not d.src_lang or not d.tgt_lang:
            raise ConfigError(f"data.{what} is a parallel corpus; set data.src_lang and data.tgt_lang (e.g. de, en), "
                              "or list corpora with their languages under pairs")
        return [data_lib.ParallelSource(src_lang=d.src_lang, tgt_lang=d.tgt_lang, src_path=spec.get("src"),
                                        tgt_path=spec.get("tgt"), json_path=spec.get("json"))]
    pairs = spec["pairs"]
    if not isinstance(pairs, list) or not pairs:
        raise ConfigError(f"data.{what}.pairs={pairs!r}; expected a non-empty list of {{src: FILE, tgt: FILE, "
                          "src_lang: L, tgt_lang: L}} or {json: FILE, src_lang: L, tgt_lang: L}")
    sources = []
    for k, entry in enumerate(pairs):
        if not isinstance(entry, dict) or set(entry) not in _PAIR_KEYS:
            raise ConfigError(f"data.{what}.pairs[{k}]={entry!r}; expected {{src: FILE, tgt: FILE, src_lang: L, "
                              "tgt_lang: L}} or {json: FILE, src_lang: L, tgt_lang: L}")
        sources.append(data_lib.ParallelSource(src_lang=entry["src_lang"], tgt_lang=entry["tgt_lang"],
                                               src_path=entry.get("src"), tgt_path=entry.get("tgt"),
                                               json_path=entry.get("json")))
    return sources


def _kind(spec, what: str) -> str:
    keys = set(spec) if isinstance(spec, dict) else None
    if keys in ({"src", "tgt"}, {"json"}) or (keys and "pairs" in keys and keys <= {"pairs", "both_directions",
                                                                                   "max_pairs"}):
        return "parallel"
    if keys in ({"text"}, {"monolingual"}):
        return "monolingual"
    if keys == {"tfds", "split"}:
        return "tfds"
    if keys == {"triplets"}:
        return "triplets"
    raise ConfigError(f"data.{what}={spec!r}; expected {{src: FILE, tgt: FILE}}, {{json: FILE}}, {{pairs: [...], "
                      "both_directions: BOOL, max_pairs: N}, {text: FILE}, {monolingual: {LANG: FILES}}, "
                      "{triplets: FILE} or {tfds: NAME, split: SPLIT}")


def _monolingual_sources(spec: dict, what: str) -> dict[str, data_lib.MonolingualSource]:
    """{"": source} for {text: FILE}; {lang: deduplicated source} for {monolingual: {lang: FILES}}."""
    if "text" in spec:
        return {"": data_lib.MonolingualSource(spec["text"])}
    languages = spec["monolingual"]
    if not isinstance(languages, dict) or not languages:
        raise ConfigError(f"data.{what}.monolingual={languages!r}; expected a mapping of language -> text file or "
                          "list of files, e.g. {en: [a.en, b.en], de: c.de}")
    for lang, files in languages.items():
        if not isinstance(lang, str) or not re.fullmatch(r"[A-Za-z]{2,3}(-[A-Za-z0-9]+)?", lang):
            raise ConfigError(f"data.{what}.monolingual has key {lang!r}; expected a language code such as en")
        if not (isinstance(files, str) or (isinstance(files, list) and files and
                                           all(isinstance(f, str) for f in files))):
            raise ConfigError(f"data.{what}.monolingual.{lang}={files!r}; expected a file or a list of files")
    return {lang: data_lib.MonolingualSource(files, deduplicate=True) for lang, files in languages.items()}


def _subset(n: int, max_pairs, seed: int, k: int, where: str) -> list[int] | None:
    """The indices of max_pairs pairs of n drawn with (seed, corpus k), ascending; None for all."""
    if max_pairs is None:
        return None
    if isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1:
        raise ConfigError(f"{where}.max_pairs={max_pairs!r}; expected an integer >= 1")
    if max_pairs > n:
        raise ConfigError(f"{where}.max_pairs={max_pairs} but corpus {k} has only {n} pairs; lower max_pairs")
    return sorted(np.random.default_rng([seed, k]).permutation(n)[:max_pairs].tolist())


def load_records(config: RunConfig, data_dir: Path) -> dict[str, Sequence]:
    """Prepares the configured splits with tfds (once) and returns each as random-access records: parallel splits
    as {"src", "tgt", "src_lang", "tgt_lang"} (`data_lib.DirectedRecords`), monolingual ones as {"text"} (one
    file list) or a `data_lib.LanguageMix` of {"text", "lang"}, triplet files as `jaxmoe.train.cpo.Triplet`s."""
    d = config.data
    specs = {name: spec for name, spec in (("train", d.train), ("valid", d.valid), ("test", d.test)) if spec}
    kinds = {name: _kind(spec, name) for name, spec in specs.items()}
    if {"parallel", "monolingual"} <= set(kinds.values()):
        raise ConfigError("data splits mix parallel and monolingual corpora; use one kind for all splits")
    records: dict[str, Sequence] = {}
    parallel = {name: _parallel_sources(specs[name], config, name) for name, k in kinds.items() if k == "parallel"}
    if parallel:
        builder = data_lib.prepare_parallel("jaxmoe_parallel", {f"{name}-{k}": source for name, sources in
                                                                parallel.items() for k, source in enumerate(sources)},
                                            data_dir=data_dir)
        for name, sources in parallel.items():
            spec = specs[name]
            parts = []
            for k, source in enumerate(sources):
                split = data_lib.load_split(builder, f"{name}-{k}")
                parts.append(data_lib.DirectedRecords(
                    split, src_lang=source.src_lang, tgt_lang=source.tgt_lang,
                    indices=_subset(len(split), spec.get("max_pairs"), config.seed, k, f"data.{name}"),
                    both_directions=bool(spec.get("both_directions", False))))
            records[name] = parts[0] if len(parts) == 1 else data_lib.ConcatRecords(parts)
    mono = {name: _monolingual_sources(specs[name], name) for name, k in kinds.items() if k == "monolingual"}
    for sources in mono.values():  # a bad sampling key is named before any data is prepared
        if "" not in sources:
            try:
                data_lib.sampling_probabilities(d.language_sampling, dict.fromkeys(sources, 1))
            except ValueError as e:
                raise ConfigError(str(e)) from None
    if mono:
        builder = data_lib.prepare_monolingual("jaxmoe_text", {f"{name}-{lang}" if lang else name: source for name,
                                                               sources in mono.items() for lang, source in
                                                               sources.items()}, data_dir=data_dir)
        for name, sources in mono.items():
            if "" in sources:
                records[name] = data_lib.load_split(builder, name)
                continue
            parts = {lang: data_lib.load_split(builder, f"{name}-{lang}") for lang in sources}
            try:
                records[name] = data_lib.LanguageMix(parts, data_lib.sampling_probabilities(
                    d.language_sampling, {lang: len(r) for lang, r in parts.items()}), seed=config.seed)
            except ValueError as e:
                raise ConfigError(str(e)) from None
    for name, kind in kinds.items():
        if kind == "tfds":
            spec = specs[name]
            records[name] = data_lib.load_split(spec["tfds"], spec["split"], data_dir=d.data_dir,
                                                download=d.download, src_lang=d.src_lang, tgt_lang=d.tgt_lang)
        elif kind == "triplets":
            from jaxmoe.train import cpo  # noqa: PLC0415 - only CPO runs need it
            records[name] = cpo.read_triplets(specs[name]["triplets"], src_lang=d.src_lang, tgt_lang=d.tgt_lang)
    return records


def _is_parallel(records) -> bool:
    return isinstance(records[0], dict) and "src" in records[0]


def _encoder(config: RunConfig, tokenizer: Tokenizer, parallel: bool) -> Callable[[dict], tuple]:
    if not parallel:
        return lambda record: batch_lib.encode_text(tokenizer, record["text"])
    prompt = batch_lib.PromptFormat(config.data.prompt)
    d = config.data
    return lambda record: batch_lib.encode_translation(
        tokenizer, prompt.render(record["src"], record.get("src_lang", d.src_lang), record.get("tgt_lang", d.tgt_lang)),
        record["tgt"])


def _tokenizer_texts(records) -> list[str]:
    """Every distinct text a tokenizer should be trained on: both sides of each pair, each monolingual line once
    (a language mix's underlying texts, not its draws)."""
    if isinstance(records, data_lib.LanguageMix):
        return [r["text"] for part in records.parts.values() for r in part]
    if _is_parallel(records):
        return [r["src"] for r in records] + [r["tgt"] for r in records]
    return [r["text"] for r in records]


def _directions(records, config: RunConfig) -> list[tuple[str, str]]:
    """The (src_lang, tgt_lang) directions of parallel records, read from their structure, not their texts."""
    if isinstance(records, data_lib.ConcatRecords):
        return list(dict.fromkeys(x for part in records.parts for x in _directions(part, config)))
    if isinstance(records, data_lib.DirectedRecords):
        return records.directions()
    return [(config.data.src_lang, config.data.tgt_lang)]


def _task_map(config: RunConfig, records: dict, model) -> TaskMap | None:
    """The task ids of data.tasks (None without), checked against the model's task adapters and every parallel
    split's directions."""
    d, m = config.data, config.model
    moe = getattr(model.config, "moe", None)
    adapters = None if moe is None else moe.task_adapters
    if d.tasks is None:
        if adapters is not None:
            raise ConfigError(f"the model has {adapters.mode!r} MoE task adapters for {adapters.num_tasks} tasks, "
                              "which take a task id per row: set data.tasks to lang_pair or tgt_lang")
        return None
    if adapters is None:
        raise ConfigError(f"data.tasks={d.tasks!r}, but the model has no MoE task adapters; set "
                          "model.overrides.moe.task_adapters (e.g. {mode: static, num_tasks: 4}) or remove data.tasks")
    if not all(_is_parallel(r) for r in records.values()):
        raise ConfigError(f"data.tasks={d.tasks!r} needs parallel data in every split (a task is a translation "
                          "direction); the monolingual splits have none")
    base = None if m.init_from is None else TaskMap.find(m.init_from)
    try:
        if d.task_names is not None:
            tasks = TaskMap(d.tasks, d.task_names)
            if base is not None and (base.by != tasks.by or tasks.names[:len(base.names)] != base.names):
                raise ConfigError(f"data.tasks={d.tasks!r}, data.task_names={list(d.task_names)}, but the checkpoint "
                                  f"{m.init_from!r} has tasks by {base.by!r} {list(base.names)}: keep its tasks at "
                                  "their ids and add new ones after them")
        else:
            tasks = TaskMap.from_directions(d.tasks, _directions(records["train"], config), base=base)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for split, split_records in records.items():
        try:
            tasks.ids_of(_directions(split_records, config))
        except ValueError as e:
            raise ConfigError(f"data.{split}: {e}") from None
    if len(tasks.names) > adapters.num_tasks:
        raise ConfigError(f"data.tasks gives {len(tasks.names)} tasks {list(tasks.names)}, but the model's "
                          f"moe.task_adapters.num_tasks={adapters.num_tasks}; raise num_tasks (a new model) or "
                          "train on fewer directions")
    return tasks


def _task_of(config: RunConfig, tasks: TaskMap | None) -> Callable[[dict], int] | None:
    """A parallel record -> its task id (None without tasks)."""
    if tasks is None:
        return None
    d = config.data
    return lambda record: tasks.id_of(record.get("src_lang", d.src_lang), record.get("tgt_lang", d.tgt_lang))


def _record_tasks(config: RunConfig, run_dir: Path, tasks: TaskMap | None) -> None:
    """Writes run_dir/tasks.json (process 0); a resumed run must find the ids it was started with."""
    if tasks is None:
        return
    saved = TaskMap.find(run_dir)
    if saved is not None and saved != tasks:
        raise ConfigError(f"run folder {str(run_dir)!r} was started with tasks {saved.to_dict()}, but the config and "
                          f"data now give {tasks.to_dict()}; its checkpoints only resume with the same task ids: "
                          "set data.task_names to the saved names or choose a new run_dir")
    if saved is None and is_primary():
        tasks.save(run_dir)


def _trained_task(config: RunConfig, tasks: TaskMap | None) -> int | None:
    """optim.only_task as an id (a task name looked up in `tasks`)."""
    only = config.optim.only_task
    if only is None:
        return None
    ids = dict(enumerate(tasks.names))
    if isinstance(only, str):
        if only not in tasks.names:
            raise ConfigError(f"optim.only_task={only!r} is not one of the tasks {ids}; name one of them (add a new "
                              "task to data.task_names)")
        return tasks.names.index(only)
    if not 0 <= only < len(tasks.names):
        raise ConfigError(f"optim.only_task={only} is not a task id of {ids}; use one of those ids or names")
    return only


# ------------------------------------------------------------------------------------------ model, tokenizer


def _tokenizer(config: RunConfig, run_dir: Path, records) -> Tokenizer:
    saved = run_dir / "tokenizer"
    if (saved / "tokenizer.json").exists():
        return Tokenizer.from_folder(saved)
    t = config.tokenizer
    if t.path is not None or config.model.init_from is not None:
        folder = Path(t.path or config.model.init_from)
        if not (folder / "tokenizer.json").exists():
            raise FileNotFoundError(f"no tokenizer.json in {str(folder)!r}; set tokenizer.path to a folder with one, "
                                    "or tokenizer.bpe_vocab_size to train a BPE")
        tokenizer = Tokenizer.from_folder(folder)
    else:
        tokenizer = train_bpe(_tokenizer_texts(records["train"]), vocab_size=t.bpe_vocab_size)
    save_tokenizer(tokenizer, saved)
    return tokenizer


def build_model(config: RunConfig, tokenizer: Tokenizer, mesh=None) -> Phi3ForCausalLM:
    """The model the config describes, in training mode; LoRA adapters added when configured. With `mesh`, the
    parameters are created (or read) directly in their shardings: no device ever holds the whole model."""
    m = config.model
    compute = jnp.dtype(m.compute_dtype)
    if m.init_from is not None and is_jaxmoe_checkpoint(m.init_from):
        # jaxmoe's own format: e.g. a model with MoE task adapters this trainer exported (placed on the mesh later,
        # by train's shard_model).
        model = load_model(m.init_from)
        saved = jnp.dtype(model.dtype).name
        if saved != compute.name:
            raise ConfigError(f"model.compute_dtype={m.compute_dtype} but the checkpoint {m.init_from!r} computes in "
                              f"{saved}; set model.compute_dtype to {saved}")
    elif m.init_from is not None:
        model = load_hf(m.init_from, dtype=jnp.float32, compute_dtype=compute, mesh=mesh)
        if m.overrides:  # settings of how the checkpoint's architecture runs, not of what it is (see _check)
            model.config = model.config.replace(**m.overrides)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but the checkpoint {m.init_from!r} has "
                              f"vocab_size={model.config.vocab_size}; the tokenizer does not belong to the checkpoint")
    else:
        preset = get_preset(m.preset)
        overrides = dict(m.overrides)
        if isinstance(overrides.get("moe"), dict):  # e.g. {num_experts: 8}: changes on top of the preset's MoE
            overrides["moe"] = dataclasses.replace(preset.moe or MoEConfig(), **overrides["moe"])
        model_config = preset.replace(
            vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id, **overrides)
        model_class = Phi3ForCausalLM if model_config.moe is None else PhimoeForCausalLM

        def make():
            return model_class(model_config, dtype=compute, param_dtype=jnp.float32, rngs=nnx.Rngs(config.seed))
        model = make() if mesh is None else _make_sharded(make, mesh)
    needed = config.data.max_len
    if model.config.max_position_embeddings < needed:
        raise ConfigError(f"data.max_len={needed} exceeds the model's max_position_embeddings="
                          f"{model.config.max_position_embeddings}; lower data.max_len or raise "
                          "model.overrides.max_position_embeddings")
    if m.lora is not None:
        apply_lora(model, LoRAConfig(rank=m.lora.rank, alpha=m.lora.alpha, targets=m.lora.targets,
                                     dropout=m.lora.dropout), rngs=nnx.Rngs(config.seed + 1))
    model.train()
    return model


def _make_sharded(make: Callable[[], nnx.Module], mesh) -> nnx.Module:
    """make() compiled with its parameters constrained to jaxmoe.sharding's layout, so each device initialises
    only its shards; MoE blocks set to run expert-parallel."""
    shardings = sharding.param_shardings(nnx.eval_shape(make), mesh)

    @nnx.jit
    def create():
        model = make()
        nnx.update(model, jax.lax.with_sharding_constraint(nnx.state(model, nnx.Param), shardings))
        return model

    model = create()
    sharding.use_mesh_for_experts(model, mesh)
    return model


# ------------------------------------------------------------------------------------------------ the loop


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[threading.Event]:
    """An Event set on SIGTERM (TPU preemption) while the block runs; the loop saves and stops at the next step."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _mesh(config: RunConfig):
    """The configured device mesh (jaxmoe.sharding's four axes), or None for one device."""
    sizes = dataclasses.asdict(config.mesh)
    n = math.prod(sizes.values())
    if jax.process_count() > 1 and n != jax.device_count():
        raise ConfigError(f"mesh {sizes} uses {n} devices, but the {jax.process_count()} processes have "
                          f"{jax.device_count()}; a run over several processes needs a mesh of all their devices: "
                          f"choose sizes whose product is {jax.device_count()}")
    if n == 1:
        return None
    if n > jax.device_count():
        raise ConfigError(f"mesh {sizes} needs {n} devices but only {jax.device_count()} are visible")
    return sharding.make_mesh(**sizes, devices=jax.devices()[:n])


def _place(tree, mesh, spec):
    return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, spec))


def _batch_sharding(mesh, grad_accum: int = 1) -> NamedSharding:
    """Where a step's batch arrays go: [b, t] split over the mesh's batch axes, or [grad_accum, b, t] likewise."""
    spec = sharding.batch_spec(mesh)
    return NamedSharding(mesh, P(None, *spec) if grad_accum > 1 else spec)


def _global_batch(local: dict[str, np.ndarray], shape: tuple[int, ...], where: NamedSharding | None) -> Batch:
    """A Batch of arrays of global `shape` from this process's rows of them (`batch_lib.host_rows` of `where`;
    all rows when `where` is None, one device)."""
    if where is None:
        return Batch(**{k: jnp.asarray(v) for k, v in local.items()})

    def place(v):  # task_ids lack the time axis: their layout is the batch's without it
        at = where if v.ndim == len(shape) else NamedSharding(where.mesh, P(*where.spec[:v.ndim]))
        return jax.make_array_from_process_local_data(at, v, shape[:v.ndim])
    return Batch(**{k: place(v) for k, v in local.items()})


def _next_batch(stream: batch_lib.BatchStream, grad_accum: int, mesh) -> Batch:
    """The next step's global batch on the device(s): [b, t] arrays, or [grad_accum, b, t] to accumulate; the
    stream yields this process's rows."""
    if not isinstance(stream, batch_lib.BatchStream):  # preference pairs (objective: cpo): one device
        batch = next(stream)
        return batch._replace(**{k: jnp.asarray(v) for k, v in batch._asdict().items()})
    micro = [next(stream) for _ in range(grad_accum)]
    arrays = {k: np.stack([m[k] for m in micro]) if grad_accum > 1 else micro[0][k] for k in micro[0]}
    shape = (stream.batch_size, stream.max_len)
    return _global_batch(arrays, shape if grad_accum == 1 else (grad_accum, *shape),
                         None if mesh is None else _batch_sharding(mesh, grad_accum))


def _cpo_parts(config: RunConfig, records, tokenizer: Tokenizer, pad_id: int, mesh):
    """For `objective: cpo`: the preference batch stream, the validation batches (or None), the step and the
    evaluation (jaxmoe.train.cpo)."""
    from jaxmoe.train import cpo  # noqa: PLC0415 - only CPO runs need it
    if mesh is not None or config.optim.grad_accum != 1:
        raise ConfigError(f"objective: cpo runs on one device without accumulation (mesh "
                          f"{dataclasses.asdict(config.mesh)}, optim.grad_accum={config.optim.grad_accum}); set the "
                          "mesh sizes to 1 and grad_accum to 1")
    try:
        settings = cpo.CPOConfig(**dataclasses.asdict(config.cpo))
    except ValueError as e:
        raise ConfigError(f"cpo: {e}") from None
    o, d = config.optim, config.data
    prompt = batch_lib.PromptFormat(d.prompt)
    stream = cpo.PreferenceStream(records["train"], tokenizer, prompt=prompt, batch_size=o.batch_size,
                                  max_len=d.max_len, pad_id=pad_id, seed=config.seed)
    valid = None
    if "valid" in records:
        if not isinstance(records["valid"][0], cpo.Triplet):
            raise ConfigError("objective: cpo validates on preference triplets: set data.valid to {triplets: FILE}")
        valid = [jax.tree.map(jnp.asarray, b) for b in cpo.preference_eval_batches(
            records["valid"], tokenizer, prompt=prompt, batch_size=o.batch_size, max_len=d.max_len, pad_id=pad_id)]

    def run_step(model, optimizer, batch, rngs):
        return cpo.cpo_train_step(model, optimizer, batch, rngs, config=settings)

    def run_eval(model, batches):
        return cpo.cpo_evaluate(model, batches, config=settings)
    return stream, valid, run_step, run_eval


def _stop_diverged(step: int, loss: float, grad_norm: float, checkpointer: Checkpointer) -> None:
    """Raises TrainingDivergedError naming the step and the last good checkpoint, once pending saves are on disk;
    nothing of the diverged step is saved."""
    checkpointer.wait()
    saved = checkpointer.steps()
    last = (f"the last good checkpoint is step {saved[-1]} in {checkpointer.directory}" if saved
            else "no checkpoint was saved before it")
    checkpointer.close()
    raise TrainingDivergedError(
        f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm}; {last}, left as it was. "
        "Lower optim.learning_rate or raise optim.warmup_steps, then resume or start over")


def _validation(model, batches, run_eval=evaluate) -> dict[str, float]:
    model.eval()
    try:
        result = run_eval(model, batches)
    finally:
        model.train()
    return result


def prepare(config: RunConfig, *, log: Callable[[str], None] = print) -> tuple[dict, Tokenizer]:
    """Checks the run folder against the config (a resumed run keeps its model), records the config, prepares
    the data with tfds (once; data.data_dir or run_dir/tfds) and the tokenizer (run_dir/tokenizer).
    Returns (records per split, tokenizer). With several processes, process 0 writes and prepares, then the
    others read what it made."""
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_resume_config(run_dir, config)
    primary = is_primary()
    if primary:
        _write_atomic(run_dir / CONFIG_FILE, config.to_yaml())
    sync_processes("jaxmoe train: run config written")
    if any_process(not (run_dir / CONFIG_FILE).exists()):
        raise ConfigError(f"run_dir {str(run_dir)!r}: process 0 wrote {CONFIG_FILE} there, but not every process "
                          "sees it; with several processes run_dir must be on storage that all of them share "
                          "(NFS, Filestore, a gcsfuse-mounted bucket)")
    data_dir = Path(config.data.data_dir) if config.data.data_dir else run_dir / "tfds"
    tfds.disable_progress_bar()
    if primary:  # the others wait, then find the tfds folders prepared (or prepare their own if data_dir is local)
        records, tokenizer = _records_and_tokenizer(config, run_dir, data_dir)
    sync_processes("jaxmoe train: data and tokenizer prepared")
    if not primary:
        records, tokenizer = _records_and_tokenizer(config, run_dir, data_dir)
    log(f"data: {', '.join(f'{name} {len(r):,}' for name, r in records.items())} examples; tokenizer "
        f"{tokenizer.vocab_size:,} ids")
    return records, tokenizer


def _records_and_tokenizer(config: RunConfig, run_dir: Path, data_dir: Path) -> tuple[dict, Tokenizer]:
    records = load_records(config, data_dir)
    return records, _tokenizer(config, run_dir, records)


def train(config: RunConfig | dict, *, log: Callable[[str], None] = print) -> dict:
    """Runs (or resumes) the training job `config` describes; returns the summary written to summary.json.

    Raises TrainingDivergedError on a NaN/inf loss or gradient (nothing saved for that step), Preempted after
    saving on SIGTERM, ConfigError / data_lib.DataError / FileNotFoundError for bad configs and inputs.
    With several processes every one calls it alike (see the module docstring); only process 0 calls `log`.
    """
    if isinstance(config, dict):
        config = run_config_from_dict(config)
    log = log if is_primary() else (lambda _: None)
    started = time.perf_counter()
    run_dir = Path(config.run_dir)
    records, tokenizer = prepare(config, log=log)
    parallel = _is_parallel(records["train"])
    mesh = _mesh(config)
    model = build_model(config, tokenizer, mesh)
    tasks = _task_map(config, records, model)
    _record_tasks(config, run_dir, tasks)
    task_of = _task_of(config, tasks)
    encode = _encoder(config, tokenizer, parallel)
    o, d = config.optim, config.data
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if mesh is not None:
        sharding.check_batch(o.batch_size, mesh)
    where = None if mesh is None else _batch_sharding(mesh)  # the batches' layout
    rows = list(range(o.batch_size) if where is None else batch_lib.host_rows(where, (o.batch_size, d.max_len)))
    valid = None
    if config.objective == "cpo":
        stream, valid, run_step, run_eval = _cpo_parts(config, records, tokenizer, pad_id, mesh)
    else:
        stream = batch_lib.BatchStream(records["train"], batch_size=o.batch_size, max_len=d.max_len, pad_id=pad_id,
                                      seed=config.seed, pack=d.pack, encode=encode, rows=rows,  # this process's rows
                                      task=task_of)
        if "valid" in records:
            valid_examples = [encode(r) for r in records["valid"]]
            valid_tasks = None if task_of is None else [task_of(r) for r in records["valid"]]
            valid = [_global_batch({k: v[rows] for k, v in b.items()}, b["input_ids"].shape, where)
                     for b in batch_lib.eval_batches(valid_examples, batch_size=o.batch_size, max_len=d.max_len,
                                                     pad_id=pad_id, task_ids=valid_tasks)]
        run_step, run_eval = train_step, evaluate
    if valid is not None and not valid:
        raise data_lib.DataError(f"no validation example fits data.max_len={d.max_len}")

    if mesh is not None:  # before the optimizer, whose moments then take the parameters' shardings (LoRA too)
        sharding.shard_model(model, mesh)
    wrt = nnx.LoRAParam if config.model.lora is not None else nnx.Param
    only_task = _trained_task(config, tasks)
    optimizer = make_optimizer(model, TrainConfig(
        learning_rate=o.learning_rate, warmup_steps=o.warmup_steps, total_steps=o.steps,
        final_lr_fraction=o.final_lr_fraction, weight_decay=o.weight_decay, clip_norm=o.clip_norm, b1=o.b1, b2=o.b2,
        schedule=o.schedule), wrt=wrt, only_task=only_task)
    wrt = optimizer.wrt
    if mesh is not None:
        # Moments follow their parameters' shardings; the rest (step counts, the scheduled rate) is replicated,
        # so that a restore puts every array back on the mesh.
        nnx.update(optimizer, jax.tree.map(
            lambda x: x if isinstance(x.sharding, NamedSharding) else _place(x, mesh, P()), nnx.state(optimizer)))
    c = config.checkpoint
    checkpointer = Checkpointer(run_dir / "checkpoints", keep_last=c.keep_last, keep_best=c.keep_best,
                                best_metric="valid_loss", async_save=c.async_save)
    restored = checkpointer.restore_latest(model, optimizer)
    start = 0
    if restored is not None:
        start = restored.step
        if start > o.steps:
            checkpointer.close()
            raise ConfigError(f"run folder {str(run_dir)!r} holds step {start}, past optim.steps={o.steps}; set "
                              f"optim.steps >= {start} to finish it, or choose a new run_dir")
        stream.restore(restored["data"])
        log(f"resumed from step {start} in {checkpointer.directory}")

    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    trained = jax.tree.leaves(nnx.state(model, wrt))
    # optim.only_task trains one row (axis 0: the tasks) of each TaskParam.
    n_trained = sum(x.size // (x.shape[0] if only_task is not None else 1) for x in trained)
    log(f"model {model.config.model_type}: {n_params:,} parameters ({n_trained:,} trained); "
        f"{len(records['train']):,} training examples; steps {start}->{o.steps} of {o.batch_size}x{o.grad_accum} "
        f"rows of {d.max_len} tokens; run folder {run_dir}")
    base_key = jax.random.key(config.seed)
    is_moe = model.config.moe is not None
    load_sum, load_count = None, 0
    final_valid = None  # the last step's validation, reused by the summary
    primary = is_primary()
    logging = (MetricsLogger(run_dir, total_steps=o.steps, start_step=start, progress=config.progress) if primary
               else contextlib.nullcontext())  # the other processes compute the same metrics and write nothing
    with logging as logger, _sigterm_flag() as sigterm:
        window_tokens, window_start = 0, time.perf_counter()
        for step in range(start + 1, o.steps + 1):
            batch = _next_batch(stream, o.grad_accum, mesh)
            metrics = run_step(model, optimizer, batch, nnx.Rngs(jax.random.fold_in(base_key, step)))
            loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                _stop_diverged(step, loss, grad_norm, checkpointer)
            window_tokens += int(jnp.sum(batch.attention_mask))  # the global batch's, whatever this process holds
            load = gather_to_host(metrics["expert_load"]) if is_moe else None
            if load is not None:
                load_sum = load if load_sum is None else load_sum + load
                load_count += 1
            elapsed = time.perf_counter() - window_start
            if primary:
                logger.progress_update(step, loss=loss, tokens_per_second=window_tokens / max(elapsed, 1e-9),
                                       learning_rate=float(metrics["learning_rate"]), expert_load_le=load)
            if step % config.log_every == 0 or step == o.steps:
                scalars = {k: float(v) for k, v in metrics.items() if k != "expert_load"}
                scalars["tokens_per_second"] = window_tokens / max(elapsed, 1e-9)
                if primary:
                    logger.log(step, scalars)
                    if load_sum is not None:
                        logger.log_expert_load(step, load_sum / load_count)
                load_sum, load_count = None, 0
                window_tokens, window_start = 0, time.perf_counter()
            evaluated = {}
            if valid is not None and ((config.eval.every and step % config.eval.every == 0) or step == o.steps):
                result = final_valid = _validation(model, valid, run_eval)
                evaluated = {"valid_loss": result["loss"]}
                if primary:
                    logger.log(step, {k: v for k, v in result.items() if k != "pairs"}, split="valid")
            # Preemption signals reach the hosts at slightly different times: all stop after the same step.
            stop = any_process(sigterm.is_set())
            if step % c.every == 0 or step == o.steps or stop:
                checkpointer.save(step, model, optimizer, {"data": stream.state(), "seed": config.seed},
                                  metrics=evaluated)
            if stop:
                checkpointer.close()
                raise Preempted(step, checkpointer.directory)
    exported = {}
    if c.export_best:  # ALMA's best checkpoint on validation, for the test translations and the export
        checkpointer.wait()
        best = checkpointer.restore_best(model, optimizer)
        if best is None:
            raise RuntimeError(f"checkpoint.export_best: no readable checkpoint with a validation loss in "
                               f"{checkpointer.directory}")
        exported = {"exported_step": best.step}
        final_valid = _validation(model, valid, run_eval)
        log(f"restored step {best.step}, the lowest validation loss ({final_valid['loss']:.4f}), for the export")
    checkpointer.close()
    train_seconds = time.perf_counter() - started
    if valid is not None and final_valid is None:  # resumed at the last step: no step ran
        final_valid = _validation(model, valid, run_eval)
    return _finish(config, run_dir, model, tokenizer, records, final_valid, train_seconds, log, exported, tasks)


def _test_translations(config: RunConfig, run_dir: Path, model, tokenizer: Tokenizer, test, primary: bool,
                       tasks: TaskMap | None) -> dict:
    """Translates the first eval.translate sentences of each direction in the test split (greedy, or beam search
    with eval.num_beams), writes test.hyp.txt (one direction) or test.SRC-TGT.hyp.txt (several), and returns the
    summary's test entries: per direction sentences, BLEU, chrF and sacrebleu's signature under "test", and
    test_bleu / test_chrf (the mean over the directions). With `tasks`, each direction is translated with its
    task id."""
    d, e = config.data, config.eval
    directions: dict[tuple[str, str], list[dict]] = {}
    for i in range(len(test)):
        record = test[i]
        key = (record.get("src_lang", d.src_lang), record.get("tgt_lang", d.tgt_lang))
        if len(directions.setdefault(key, [])) < e.translate:
            directions[key].append(record)
    prompt = batch_lib.PromptFormat(d.prompt)
    results, samples = {}, []
    for (src_lang, tgt_lang), chosen in directions.items():
        sources, references = [r["src"] for r in chosen], [r["tgt"] for r in chosen]
        task = {} if tasks is None else {"task_ids": tasks.id_of(src_lang, tgt_lang)}
        hypotheses = translate(model, tokenizer, sources,
                               prompt=lambda s, a=src_lang, b=tgt_lang: prompt.render(s, a, b), max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, num_beams=e.num_beams,
                               length_penalty=e.length_penalty, cut_at_newline=e.cut_at_newline, **task)
        name = f"{src_lang}-{tgt_lang}"
        if primary:
            file = "test.hyp.txt" if len(directions) == 1 else f"test.{name}.hyp.txt"
            _write_atomic(run_dir / file, "".join(h.replace("\n", " ") + "\n" for h in hypotheses))
        scores = score(hypotheses, references, lang_pair=name)
        results[name] = {"sentences": len(chosen), "bleu": scores["bleu"], "chrf": scores["chrf"],
                         "bleu_signature": scores["bleu_signature"]}
        samples += [{"direction": name, "source": s, "hypothesis": h, "reference": r}
                    for s, h, r in list(zip(sources, hypotheses, references))[:3]]
    out = {"test": results, "test_sentences": sum(r["sentences"] for r in results.values()),
           "test_bleu": float(np.mean([r["bleu"] for r in results.values()])),
           "test_chrf": float(np.mean([r["chrf"] for r in results.values()])),
           "decoding": {"num_beams": e.num_beams, "length_penalty": e.length_penalty,
                        "cut_at_newline": e.cut_at_newline, "max_new_tokens": e.max_new_tokens},
           "samples": samples}
    if len(results) == 1:
        out["bleu_signature"] = next(iter(results.values()))["bleu_signature"]
    return out


def _finish(config: RunConfig, run_dir: Path, model, tokenizer: Tokenizer, records, valid_result, train_seconds,
            log, exported: dict, tasks: TaskMap | None) -> dict:
    """Export, plots, test scores, summary.json (with the final validation result, when there is one). With
    several processes all translate (the model is split between them) and process 0 writes the files. `tasks`
    (data.tasks) goes beside the export as tasks.json."""
    model.eval()
    primary = is_primary()
    summary = {"run_dir": str(run_dir), "steps": config.optim.steps, "train_seconds": round(train_seconds, 1),
               "parameters": sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))),
               "experts": model.config.moe.num_experts if model.config.moe is not None else 0, **exported}
    if tasks is not None:
        summary["tasks"] = tasks.to_dict()
    if valid_result is not None:
        summary.update({f"valid_{k.replace('/', '_')}": v for k, v in valid_result.items() if k != "pairs"})
    if primary:
        plot_losses(run_dir)
        history = read_expert_load(run_dir) if model.config.moe is not None else None
        if history:
            plot_expert_load(np.mean([load for _, load in history], axis=0), run_dir / "expert_load.png",
                             title="Expert load per layer, averaged over training")
    if "test" in records and config.eval.translate and _is_parallel(records["test"]):
        summary.update(_test_translations(config, run_dir, model, tokenizer, records["test"], primary, tasks))
    export = run_dir / "model"
    if config.model.lora is not None:
        merge_lora(model)
    if jax.process_count() > 1:  # save_hf reads whole arrays: gather each parameter from the processes
        nnx.update(model, jax.tree.map(gather_to_host, nnx.state(model, nnx.Param)))
    if primary:
        problem = hf_problems(model.config)
        if problem is None:
            save_hf(model, export, overwrite=True)
        else:  # no transformers class for it: jaxmoe's own format, which jaxmoe.load_model reads
            log(f"exporting {export} in jaxmoe's format: {problem}")
            save_quantized(model, export, overwrite=True)
        save_tokenizer(tokenizer, export)
        if tasks is not None:
            tasks.save(export)
        _write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    sync_processes("jaxmoe train: finished")  # every process returns once the run's files are written
    log(f"done: {json.dumps({k: v for k, v in summary.items() if k != 'samples'}, ensure_ascii=False)}")
    return summary
