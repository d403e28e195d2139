"""jaxmoe's own checkpoint folder for (quantized) models: `save_quantized`, `load_quantized`.

A folder holds
  config.json        {"format": "jaxmoe", "format_version": 1, "architecture", "dtype" (compute), "param_dtype",
                      "config": every ModelConfig field, "quantization": {matrix path: {bits, group_size (an int,
                      or a list of one per expert), symmetric}}} (the plan is empty for a float model: `jaxmoe
                      convert` writes those)
  model.safetensors  (format "safetensors") every parameter by its path, "."-joined ("layers.0.mlp.w_down");
                     a quantized one as three tensors "<path>.codes" (uint8, packed), "<path>.scale" and, when
                     asymmetric, "<path>.zero"; the header metadata repeats the plan ("quantization", JSON)
  state/             (format "orbax") the same tensors, nested by path, written by orbax's StandardCheckpointer
Loading rebuilds the model's structure from config.json alone (`nnx.eval_shape` of the model, then
`apply_plan`), then checks every tensor's name, shape and dtype against it before placing any, so a tampered or
mismatched file fails with a message naming the tensor. Writes are atomic: everything goes to a temporary
sibling folder, renamed into place at the end. Nothing is ever pickled.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from pallas_kernels import MixedQuantizedWeight, QuantizedWeight
from safetensors import safe_open
from safetensors.flax import save_file

from jaxmoe.config import LongRoPE, ModelConfig, MoEConfig
from jaxmoe.io.hf import CheckpointError
from jaxmoe.io.atomic import OVERWRITE_ADVICE, atomic_folder, refuse_nonempty
from jaxmoe.io.safetensors_file import SafetensorsFile
from jaxmoe.models.phi3 import Phi3ForCausalLM
from jaxmoe.models.phimoe import PhimoeForCausalLM
from jaxmoe.quant.params import QuantizedParam
from jaxmoe.quant.qat import FakeQuantParam
from jaxmoe.quant.quantize import apply_plan, quantization_report

__all__ = ["FORMATS", "is_jaxmoe_checkpoint", "load_quantized", "save_quantized"]

FORMAT, FORMAT_VERSION = "jaxmoe", 1
FORMATS = ("safetensors", "orbax")
ARCHITECTURES = {cls.__name__: cls for cls in (Phi3ForCausalLM, PhimoeForCausalLM)}
_PARTS = ("codes", "scale", "zero")


# ------------------------------------------------------------------------------------------------ config


def config_to_dict(config: ModelConfig) -> dict:
    """Every ModelConfig field, JSON-ready (nested LongRoPE / MoEConfig as dicts)."""
    return dataclasses.asdict(config)


def _build(cls, values: dict, where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CheckpointError(f"{where} has unknown {cls.__name__} fields {unknown}; it was written by another "
                              "jaxmoe version or edited by hand")
    return cls(**values)


def config_from_dict(values: dict, where: str = "config.json") -> ModelConfig:
    """The inverse of `config_to_dict`."""
    values = dict(values)
    if values.get("longrope") is not None:
        lr = dict(values["longrope"])
        lr["short_factor"], lr["long_factor"] = tuple(lr["short_factor"]), tuple(lr["long_factor"])
        values["longrope"] = _build(LongRoPE, lr, where)
    if values.get("moe") is not None:
        values["moe"] = _build(MoEConfig, values["moe"], where)
    values["eos_token_id"] = tuple(values.get("eos_token_id", ()))
    return _build(ModelConfig, values, where)


# ------------------------------------------------------------------------------------------------ tensors


def _pure_params(model: nnx.Module) -> dict:
    """Nested {path key: array or QuantizedWeight} of every stored parameter."""
    return nnx.to_pure_dict(nnx.state(model, (nnx.Param, QuantizedParam)))


def _flatten(pure: dict, prefix: str = "") -> dict:
    """Nested pure dict -> {"a.b.c": leaf}, a QuantizedWeight as its "<name>.codes/.scale/.zero" arrays."""
    flat = {}
    for key, value in pure.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        elif isinstance(value, (QuantizedWeight, MixedQuantizedWeight)):
            flat.update({f"{name}.{part}": getattr(value, part) for part in _PARTS if getattr(value, part) is not None})
        else:
            flat[name] = value
    return flat


def _unflatten_like(abstract: dict, flat: dict, prefix: str = "") -> dict:
    """The nested pure dict of `abstract` with its leaves taken from `flat` (names as in `_flatten`)."""
    out = {}
    for key, value in abstract.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out[key] = _unflatten_like(value, flat, name + ".")
        elif isinstance(value, (QuantizedWeight, MixedQuantizedWeight)):
            out[key] = dataclasses.replace(value, **{part: None if getattr(value, part) is None else
                                                     flat[f"{name}.{part}"] for part in _PARTS})
        else:
            out[key] = flat[name]
    return out


def _nest(flat: dict) -> dict:
    """{"a.b.c": x} -> {"a": {"b": {"c": x}}} (orbax's tree)."""
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


# ------------------------------------------------------------------------------------------------ save


def _header(model: nnx.Module) -> dict:
    if type(model) not in ARCHITECTURES.values():
        raise ValueError(f"save_quantized writes {sorted(ARCHITECTURES)}; got a {type(model).__name__}")
    fake = [path for path, node in nnx.iter_graph(model) if isinstance(node, FakeQuantParam)]
    if fake:
        raise ValueError(f"save_quantized: this model is prepared for QAT ({'/'.join(map(str, fake[0]))} is a "
                         "FakeQuantParam); quantize it with its QAT settings first (jaxmoe.quantize), or keep "
                         "training checkpoints with the trainer")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": type(model).__name__,
            "dtype": jnp.dtype(model.dtype).name,
            "param_dtype": jnp.dtype(model.embed_tokens.embedding.get_value().dtype).name,
            "config": config_to_dict(model.config),
            "quantization": {m.path: m.settings() for m in quantization_report(model)}}


def save_quantized(model: nnx.Module, path, *, format: str = "safetensors", overwrite: bool = False,
                   extra_files=()) -> Path:
    """Writes `model` (quantized or float Phi3ForCausalLM / PhimoeForCausalLM) to the folder `path` in
    `format` ("safetensors" or "orbax"); see the module docstring. `extra_files` (paths, e.g. tokenizer.json)
    are copied in before the folder appears. Refuses to replace a non-empty folder unless `overwrite=True`.
    Returns the folder."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}; expected one of {list(FORMATS)}")
    header = _header(model)
    tensors = _flatten(_pure_params(model))
    expected = _expected_tensors(header, "the model being saved")
    _check_tensors(tensors, expected, f"this {header['architecture']} (LoRA adapters? call merge_lora first)")
    target = Path(path)
    if not overwrite:
        refuse_nonempty(target, OVERWRITE_ADVICE)
    with atomic_folder(target) as tmp:
        (tmp / "config.json").write_text(json.dumps(header, indent=2))
        if format == "safetensors":
            save_file(tensors, str(tmp / "model.safetensors"),
                      metadata={"format": FORMAT, "quantization": json.dumps(header["quantization"], sort_keys=True)})
        else:
            checkpointer = ocp.StandardCheckpointer()
            checkpointer.save((tmp / "state").absolute(), _nest(tensors))
            checkpointer.wait_until_finished()
            checkpointer.close()
        for file in extra_files:
            shutil.copy2(file, tmp / Path(file).name)
    return target


# ------------------------------------------------------------------------------------------------ load


def is_jaxmoe_checkpoint(path) -> bool:
    """True when `path` is a folder whose config.json is jaxmoe's format (not a Hugging Face one)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def _read_header(folder: Path) -> dict:
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"no config.json in {str(folder)!r}; expected a folder written by save_quantized or "
                              "`jaxmoe quantize` / `jaxmoe convert`")
    try:
        header = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{folder / 'config.json'} is not valid JSON ({error})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        hint = (" It is a Hugging Face config: load it with jaxmoe.load_hf." if isinstance(header, dict)
                and "model_type" in header else "")
        raise CheckpointError(f"{folder / 'config.json'} is not a jaxmoe checkpoint config (no \"format\": "
                              f"\"{FORMAT}\").{hint}")
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder / 'config.json'} has format_version {header.get('format_version')!r}; this "
                              f"jaxmoe reads version {FORMAT_VERSION}")
    missing = [key for key in ("architecture", "dtype", "param_dtype", "config", "quantization") if key not in header]
    if missing or header["architecture"] not in ARCHITECTURES:
        raise CheckpointError(f"{folder / 'config.json'} lacks {missing} or names an unknown architecture "
                              f"{header.get('architecture')!r} (known: {sorted(ARCHITECTURES)})")
    return header


def _abstract_model(header: dict, where: str) -> nnx.Module:
    """The model config.json describes, quantized by its plan, with no weights materialised."""
    config = config_from_dict(header["config"], where)
    cls = ARCHITECTURES[header["architecture"]]
    try:
        return nnx.eval_shape(lambda: apply_plan(cls(config, dtype=jnp.dtype(header["dtype"]),
                                                     param_dtype=jnp.dtype(header["param_dtype"]),
                                                     rngs=nnx.Rngs(0)), header["quantization"]))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: the quantization plan does not fit the model ({error})") from None


def _expected_tensors(header: dict, where: str) -> dict:
    return _flatten(_pure_params(_abstract_model(header, where)))


def _check_tensors(found: dict, expected: dict, where: str) -> None:
    """found / expected: {name: anything with .shape and .dtype}; raises CheckpointError naming the first
    missing, unexpected or misshapen tensor."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        raise CheckpointError(f"tensor {missing[0]!r} (shape {list(expected[missing[0]].shape)}) is missing from "
                              f"{where} ({len(missing)} missing in all); the tensors do not match config.json")
    if extra:
        raise CheckpointError(f"unexpected tensor {extra[0]!r} in {where} ({len(extra)} in all); config.json "
                              "describes a model without it")
    for name, want in expected.items():
        got = found[name]
        if tuple(got.shape) != tuple(want.shape) or jnp.dtype(got.dtype) != jnp.dtype(want.dtype):
            raise CheckpointError(f"tensor {name!r} in {where} is {jnp.dtype(got.dtype).name} {list(got.shape)}; "
                                  f"config.json (with its quantization plan) expects {jnp.dtype(want.dtype).name} "
                                  f"{list(want.shape)}. The file does not belong to this config, or was modified")


def _read_safetensors(file: Path, header: dict, expected: dict) -> dict:
    try:
        with safe_open(str(file), framework="numpy") as f:
            metadata = f.metadata() or {}
    except Exception as error:  # noqa: BLE001 - safetensors raises its own types for a broken header
        raise CheckpointError(f"{file} is not a readable safetensors file ({error})") from None
    if metadata.get("format") != FORMAT or "quantization" not in metadata:
        raise CheckpointError(f"{file} has no jaxmoe quantization metadata; it was not written by save_quantized")
    if json.loads(metadata["quantization"]) != header["quantization"]:
        raise CheckpointError(f"the quantization settings in {file.name}'s metadata differ from config.json's; "
                              "the two files do not belong together")
    with SafetensorsFile(file) as f:
        found = {name: jax.ShapeDtypeStruct(f.shape(name), f.array(name).dtype) for name in f.keys()}
        _check_tensors(found, expected, file.name)
        return {name: jnp.asarray(f.array(name)) for name in expected}


def _read_orbax(folder: Path, expected: dict) -> dict:
    checkpointer = ocp.StandardCheckpointer()
    try:
        saved = checkpointer.metadata(folder.absolute()).item_metadata.tree
        found = {".".join(str(getattr(k, "key", k)) for k in path): leaf
                 for path, leaf in jax.tree_util.tree_leaves_with_path(saved)}
        _check_tensors(found, expected, f"{folder.name}/")
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = _nest({name: jax.ShapeDtypeStruct(want.shape, want.dtype, sharding=sharding)
                        for name, want in expected.items()})
        restored = checkpointer.restore(folder.absolute(), target)
    finally:
        checkpointer.close()
    return _flatten(restored)


def load_quantized(path) -> nnx.Module:
    """Reads a folder written by `save_quantized` (either format) and returns the model, quantized exactly as
    saved, in eval mode. Raises CheckpointError for a folder that is not such a checkpoint, or whose tensors do
    not match its config.json."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {str(folder)!r} does not exist or is not a folder")
    header = _read_header(folder)
    abstract = _abstract_model(header, str(folder / "config.json"))
    pure = _pure_params(abstract)
    expected = _flatten(pure)
    if (folder / "model.safetensors").is_file():
        arrays = _read_safetensors(folder / "model.safetensors", header, expected)
    elif (folder / "state").is_dir():
        arrays = _read_orbax(folder / "state", expected)
    else:
        raise CheckpointError(f"{str(folder)!r} has config.json but neither model.safetensors nor an orbax state/ "
                              "folder")
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, _unflatten_like(pure, arrays))
    model = nnx.merge(graphdef, state)
    model.eval()
    return model

