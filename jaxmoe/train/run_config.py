"""The training run's configuration: YAML files with dotted `key=value` overrides, every key checked.

A run config has sections (model, tokenizer, data, optim, checkpoint, eval, mesh) of frozen dataclasses.
`load_run_config(path, overrides)` reads the YAML, applies overrides such as `optim.steps=200` or
`model.overrides.num_layers=4`, and rejects any unknown key with the list of valid ones at that level.
Presets live in experiments/configs/.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from jaxmoe.config import PRESETS, ModelConfig

__all__ = ["CPOSection", "CheckpointSection", "ConfigError", "DataSection", "EvalSection", "LoRASection",
           "MeshSection", "ModelSection", "OptimSection", "RunConfig", "TokenizerSection", "load_run_config",
           "parse_overrides", "run_config_from_dict"]


# ModelConfig fields a checkpoint's model may take from model.overrides: how it runs, not what it computes.
INIT_FROM_OVERRIDES = frozenset({"remat"})


class ConfigError(ValueError):
    """A run config that cannot be used as written: the message names the key and what is expected."""


@dataclasses.dataclass(frozen=True, slots=True)
class LoRASection:
    """Adapters of rank `rank` (update scaled by alpha / rank) on the linear layers named in `targets`, with
    dropout on the adapter's input in training (PEFT's lora_dropout). ALMA's stage 2: rank 16, alpha 32,
    dropout 0.05, targets [down_proj]."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    dropout: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSection:
    """preset: a name from jaxmoe.PRESETS; or init_from: a Hugging Face checkpoint folder to fine-tune.
    overrides: ModelConfig fields changed on top of the preset (with init_from only `remat`, e.g. {remat: layer}
    to recompute each layer in the backward: the checkpoint fixes the architecture). compute_dtype: float32 or
    bfloat16 (parameters always stay float32 masters)."""

    preset: str | None = "tiny-moe"
    init_from: str | None = None
    overrides: dict = dataclasses.field(default_factory=dict)
    compute_dtype: str = "float32"
    lora: LoRASection | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class TokenizerSection:
    """path: a folder with tokenizer.json (default: init_from's); or train a byte-level BPE of vocab_size on
    the training text (from-scratch runs; the vocabulary then sets the model's vocab_size)."""

    path: str | None = None
    bpe_vocab_size: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class DataSection:
    """A corpus per split. Parallel: `{src: FILE, tgt: FILE}` (line-aligned) or `{json: FILE}` (ALMA form), in
    the direction src_lang -> tgt_lang; several corpora with their own directions: `{pairs: [{src: FILE, tgt: FILE,
    src_lang: de, tgt_lang: en}, {json: FILE, src_lang: cs, tgt_lang: en}, ...], both_directions: true,
    max_pairs: N}` (each pair also reversed; N pairs drawn per corpus with the run's seed). Monolingual:
    `{text: FILE}`, or per language `{monolingual: {en: [FILE, ...], de: FILE, ...}}` (lines deduplicated per
    language), drawn by `language_sampling`: "alma" (ALMA's 0.17/0.22/0.14/0.19/0.08/0.20 for
    en/ru/cs/zh/is/de), "proportional" (by amount of text) or a mapping language -> probability. Preference
    triplets for `objective: cpo`: `{triplets: FILE}` (jaxmoe.train.cpo.read_triplets' layouts). Or
    `{tfds: NAME, split: SPLIT}` for a tensorflow-datasets name. Relative paths are relative to the config file.
    download: let tfds download and prepare a {tfds: NAME} split that data_dir lacks (needs internet).
    tasks: for a model with MoE task adapters (model.overrides.moe.task_adapters), each parallel example's task:
    lang_pair (de-en) or tgt_lang (en); ids follow task_names when given (e.g. [de-en, cs-en]: ids 0 and 1),
    else an init_from checkpoint's tasks.json, then the training data's other tasks in sorted order. The mapping
    is written to tasks.json in the run folder and beside the exported model (`jaxmoe.train.tasks.TaskMap`).
    Packed rows hold examples of one task (the model takes one task per row)."""

    train: dict = dataclasses.field(default_factory=dict)
    valid: dict | None = None
    test: dict | None = None
    src_lang: str | None = None
    tgt_lang: str | None = None
    prompt: str = "Translate this from {src_lang} to {tgt_lang}:\n{src_lang}: {src}\n{tgt_lang}:"
    data_dir: str | None = None
    download: bool = False
    max_len: int = 128
    pack: bool = True
    language_sampling: dict | str = "alma"
    tasks: str | None = None
    task_names: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class OptimSection:
    """AdamW with linear warmup then cosine or linear decay to final_lr_fraction x learning_rate, or inverse_sqrt
    (learning_rate x sqrt(warmup_steps / step) after warmup, transformers' and ALMA's; final_lr_fraction unused);
    global-norm clipping; grad_accum micro-batches of batch_size sequences (rows) per step.
    only_task: a task name (e.g. cs-en) or id of data.tasks: train only that task's rows of the MoE task
    adapters (its adapter or task embedding), every other parameter frozen (adding a task to a trained model:
    model.init_from its export, the task at an id it reserved; `jaxmoe.moe.task_adapters.new_task_optimizer`)."""

    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    schedule: str = "cosine"
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.98
    only_task: int | str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class CheckpointSection:
    """Save every `every` steps; keep the newest keep_last and the keep_best lowest in validation loss.
    export_best: at the end, restore the checkpoint lowest in validation loss (needs data.valid and keep_best >= 1)
    before the test translations and the export (ALMA's best checkpoint on validation)."""

    every: int = 100
    keep_last: int = 3
    keep_best: int = 1
    async_save: bool = True
    export_best: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class EvalSection:
    """every: validation loss every that many steps (0: only at the end); translate: sentences of the test
    split translated and scored (BLEU, chrF) at the end, per direction (0: none); num_beams 1 is greedy, more is
    beam search with length_penalty; cut_at_newline: each translation ends at its first newline (ALMA)."""

    every: int = 100
    translate: int = 200
    max_new_tokens: int = 64
    batch_size: int = 32
    num_beams: int = 1
    length_penalty: float = 1.0
    cut_at_newline: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class MeshSection:
    """Device mesh sizes (jaxmoe.sharding): the batch splits over data x fsdp x expert, parameters over fsdp,
    experts over expert (expert parallelism), expert and attention widths over tensor. All 1: one device."""

    data: int = 1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True, slots=True)
class CPOSection:
    """Contrastive Preference Optimization (ALMA-R) settings for `objective: cpo`: jaxmoe.train.cpo.CPOConfig."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class RunConfig:
    """objective: "lm" (next-token loss on the loss-masked tokens: pretraining, monolingual and translation
    fine-tuning) or "cpo" (preference triplets, the `cpo` section)."""

    run_dir: str = "runs/train"
    seed: int = 0
    log_every: int = 10
    progress: bool = True
    objective: str = "lm"
    model: ModelSection = ModelSection()
    tokenizer: TokenizerSection = TokenizerSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    checkpoint: CheckpointSection = CheckpointSection()
    eval: EvalSection = EvalSection()
    mesh: MeshSection = MeshSection()
    cpo: CPOSection = CPOSection()

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _coerce(value, annotation, where: str):
    """Checks `value` against a field's annotation (resolving dataclass sections); returns the typed value."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {[f.name for f in dataclasses.fields(annotation)]}, "
                              f"got {value!r}")
        return _build(annotation, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    if annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} at {where}")


def _build(cls, values: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; valid keys{' in ' + where if where else ''}: "
                          f"{', '.join(names)}")
    kwargs = {name: _coerce(values[name], hints[name], f"{where}.{name}" if where else name)
              for name in names if name in values}
    return cls(**kwargs)


def _check(config: RunConfig) -> RunConfig:
    m, o, d = config.model, config.optim, config.data
    if m.init_from is None and m.preset not in PRESETS:
        raise ConfigError(f"model.preset={m.preset!r}; expected one of {sorted(PRESETS)} (or set model.init_from "
                          "to a checkpoint folder)")
    if m.init_from is not None and set(m.overrides) - INIT_FROM_OVERRIDES:
        raise ConfigError(f"model.overrides={m.overrides!r} with model.init_from={m.init_from!r}: the checkpoint "
                          f"fixes the architecture; remove the overrides (only {sorted(INIT_FROM_OVERRIDES)}, how it "
                          "runs, may be set)")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(m.overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown config key {'model.overrides.' + unknown[0]!r}; valid keys in model.overrides "
                          f"(ModelConfig fields): {', '.join(sorted(fields))}")
    if m.compute_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.compute_dtype={m.compute_dtype!r}; expected float32 or bfloat16")
    if o.schedule not in ("cosine", "linear", "inverse_sqrt"):
        raise ConfigError(f"optim.schedule={o.schedule!r}; expected cosine, linear or inverse_sqrt")
    if o.schedule == "inverse_sqrt" and o.warmup_steps < 1:
        raise ConfigError("optim.schedule=inverse_sqrt with optim.warmup_steps=0; the decay is sqrt(warmup_steps / "
                          "step): set warmup_steps >= 1")
    if config.objective not in ("lm", "cpo"):
        raise ConfigError(f"objective={config.objective!r}; expected lm (next-token loss) or cpo (preference "
                          "triplets)")
    if (config.objective == "cpo") != (set(d.train) == {"triplets"}):
        raise ConfigError(f"objective={config.objective!r} with data.train={d.train!r}: objective cpo trains on "
                          "{triplets: FILE} and only cpo does; set both or neither")
    if config.objective == "cpo" and m.init_from is None and config.tokenizer.path is None:
        raise ConfigError("objective: cpo fine-tunes a trained model: set model.init_from (a checkpoint folder with "
                          "its tokenizer) or tokenizer.path")
    if d.tasks is not None and d.tasks not in ("lang_pair", "tgt_lang"):
        raise ConfigError(f"data.tasks={d.tasks!r}; expected lang_pair (one task per language pair, e.g. de-en) or "
                          "tgt_lang (one per target language)")
    if d.tasks is None and d.task_names is not None:
        raise ConfigError(f"data.task_names={list(d.task_names)} without data.tasks; set data.tasks to lang_pair or "
                          "tgt_lang to say what the names are")
    if d.task_names is not None and (not d.task_names or len(set(d.task_names)) != len(d.task_names)):
        raise ConfigError(f"data.task_names={list(d.task_names)}; expected distinct task names, id i for entry i")
    if d.tasks is not None and config.objective == "cpo":
        raise ConfigError("data.tasks with objective: cpo; task ids are passed by the lm objective only: remove "
                          "data.tasks or train with objective: lm")
    if o.only_task is not None and (d.tasks is None or m.lora is not None):
        raise ConfigError(f"optim.only_task={o.only_task!r} needs data.tasks (the task of each example) and no "
                          "model.lora (it picks the trained parameters itself)")
    if m.lora is not None and not 0 <= m.lora.dropout < 1:
        raise ConfigError(f"model.lora.dropout={m.lora.dropout}; expected a number in [0, 1)")
    if config.eval.num_beams < 1:
        raise ConfigError(f"eval.num_beams={config.eval.num_beams}; expected an integer >= 1 (1: greedy)")
    if config.checkpoint.export_best and (d.valid is None or config.checkpoint.keep_best < 1):
        raise ConfigError("checkpoint.export_best=true needs a validation split (data.valid) and "
                          f"checkpoint.keep_best >= 1 (it is {config.checkpoint.keep_best}) to pick the best step")
    for name in ("steps", "batch_size", "grad_accum"):
        if getattr(o, name) < 1:
            raise ConfigError(f"optim.{name}={getattr(o, name)}; expected an integer >= 1")
    if not 0 <= o.warmup_steps < o.steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} with optim.steps={o.steps}; expected "
                          "0 <= warmup_steps < steps")
    if not o.learning_rate > 0:
        raise ConfigError(f"optim.learning_rate={o.learning_rate}; expected a positive number")
    if not d.train:
        raise ConfigError("data.train is empty; give {src: FILE, tgt: FILE}, {json: FILE}, {text: FILE} or "
                          "{tfds: NAME, split: SPLIT}")
    if d.max_len < 8:
        raise ConfigError(f"data.max_len={d.max_len}; expected at least 8 tokens")
    minimums = {"checkpoint.every": (config.checkpoint.every, 1), "checkpoint.keep_last": (config.checkpoint.keep_last, 1),
                "checkpoint.keep_best": (config.checkpoint.keep_best, 0), "log_every": (config.log_every, 1),
                "eval.every": (config.eval.every, 0), "eval.translate": (config.eval.translate, 0),
                "eval.max_new_tokens": (config.eval.max_new_tokens, 1), "eval.batch_size": (config.eval.batch_size, 1)}
    if m.lora is not None:
        minimums["model.lora.rank"] = (m.lora.rank, 1)
    for name, (value, least) in minimums.items():
        if value < least:
            raise ConfigError(f"{name}={value}; expected an integer >= {least}")
    mesh = config.mesh
    batch_devices = mesh.data * mesh.fsdp * mesh.expert
    if min(dataclasses.astuple(mesh)) < 1 or o.batch_size % batch_devices:
        raise ConfigError(f"mesh.data x mesh.fsdp x mesh.expert = {batch_devices} with optim.batch_size="
                          f"{o.batch_size}; expected mesh sizes >= 1 whose batch axes divide the batch size")
    if m.init_from is None and config.tokenizer.path is None and config.tokenizer.bpe_vocab_size is None:
        raise ConfigError("no tokenizer: set tokenizer.path (a folder with tokenizer.json), "
                          "tokenizer.bpe_vocab_size (train one), or model.init_from (use the checkpoint's)")
    return config


def run_config_from_dict(values: dict) -> RunConfig:
    """Builds and checks a RunConfig from nested dicts; raises ConfigError naming the first bad key."""
    if not isinstance(values, dict):
        raise ConfigError(f"a run config is a mapping of {[f.name for f in dataclasses.fields(RunConfig)]}; "
                          f"got {type(values).__name__}")
    return _check(_build(RunConfig, values, ""))


def _scalar(text: str):
    """A YAML scalar, with exponent floats such as 1e-3 read as numbers (YAML 1.1 reads them as strings)."""
    value = yaml.safe_load(text) if text else ""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_overrides(overrides: list[str]) -> dict:
    """["optim.steps=200", "data.pack=false"] -> nested dict; values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}; expected KEY=VALUE, e.g. optim.steps=200")
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[leaf] = _scalar(text)
    return nested


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve_paths(values: dict, folder: Path) -> dict:
    """Makes data file paths and folders relative to the config file absolute."""
    values = dict(values)
    data = dict(values.get("data") or {})
    for split in ("train", "valid", "test"):
        if isinstance(data.get(split), dict):
            data[split] = _resolve_spec(data[split], folder)
    if isinstance(data.get("data_dir"), str):
        data["data_dir"] = str(folder / data["data_dir"])
    if data:
        values["data"] = data
    for section, key in (("model", "init_from"), ("tokenizer", "path")):
        sub = values.get(section)
        if isinstance(sub, dict) and isinstance(sub.get(key), str):
            values[section] = {**sub, key: str(folder / sub[key])}
    return values


def _resolve_spec(spec: dict, folder: Path) -> dict:
    """A data split spec with its file paths made absolute (also inside `pairs` and `monolingual`)."""
    def path(v):
        return str(folder / v) if isinstance(v, str) else [path(x) for x in v] if isinstance(v, list) else v
    out = {k: path(v) if k in ("src", "tgt", "json", "text", "triplets") else v for k, v in spec.items()}
    if isinstance(spec.get("pairs"), list):
        out["pairs"] = [_resolve_spec(p, folder) if isinstance(p, dict) else p for p in spec["pairs"]]
    if isinstance(spec.get("monolingual"), dict):
        out["monolingual"] = {lang: path(v) for lang, v in spec["monolingual"].items()}
    return out


def load_run_config(path: Path | str | None, overrides: list[str] = ()) -> RunConfig:
    """Reads a YAML run config (None: defaults only) and applies `key=value` overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist; see experiments/configs/ for presets")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a YAML mapping at the top level, got {type(loaded).__name__}")
        values = _resolve_paths(loaded or {}, path.parent.absolute())
    return run_config_from_dict(_merge(values, parse_overrides(list(overrides))))
