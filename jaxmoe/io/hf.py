"""Hugging Face checkpoint folders <-> jaxmoe models (safetensors only; pickle files are never read).

`load_hf` streams one tensor at a time from (single or sharded) safetensors straight into the target dtype, so
peak host memory stays near one copy of the model. `save_hf` writes a folder that transformers'
`from_pretrained` loads, atomically: into a temporary sibling folder first, renamed into place at the end.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.flax import save_file

from jaxmoe import sharding
from jaxmoe.config import LongRoPE, ModelConfig, MoEConfig
from jaxmoe.io import families
from jaxmoe.io.atomic import OVERWRITE_ADVICE, atomic_folder, refuse_nonempty
from jaxmoe.io.names import ParamSpec, param_specs, tied_head
from jaxmoe.io.safetensors_file import SafetensorsFile
from jaxmoe.models.phi3 import Phi3ForCausalLM
from jaxmoe.models.phimoe import PhimoeForCausalLM
from jaxmoe.nn.multi_lora import base_param_dict

__all__ = ["CheckpointError", "config_from_hf", "config_to_hf", "load_hf", "save_hf"]

SUPPORTED_MODEL_TYPES = ("phi3", "phimoe")
DEFAULT_SHARD_BYTES = 5 * 1024**3  # save_hf's largest safetensors shard


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read as the model its config describes."""


# ---------------------------------------------------------------------------------------------- config.json


def _rope_dict(hf: dict) -> dict:
    """The rope settings, from either transformers v5 `rope_parameters` or legacy top-level keys."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    merged = {**scaling, **params}
    # transformers' own defaults when config.json leaves rope_theta out: PhimoeConfig 1e6, Phi3Config 1e4.
    merged.setdefault("rope_theta", hf.get("rope_theta", 1e6 if hf.get("model_type") == "phimoe" else 10000.0))
    merged.setdefault("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if "original_max_position_embeddings" in hf:
        merged.setdefault("original_max_position_embeddings", hf["original_max_position_embeddings"])
    merged["rope_type"] = merged.get("rope_type", merged.get("type", "default"))
    return merged


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a `model_type: phi3` config.json dict."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"unknown model_type {model_type!r} in config.json; jaxmoe reads {', '.join(SUPPORTED_MODEL_TYPES)}")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    absent = [key for key in required if key not in hf]
    if absent:
        raise CheckpointError(f"config.json lacks {', '.join(absent)}; a {model_type} config needs "
                              f"{', '.join(required)}")
    rope = _rope_dict(hf)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    max_pos = hf.get("max_position_embeddings", 4096)
    longrope = None
    if rope["rope_type"] in ("longrope", "su", "yarn"):
        # PhiMoE scales cos/sin by fixed short/long "mscale"s instead of the derived attention factor.
        longrope = LongRoPE.from_lengths(
            rope["short_factor"], rope["long_factor"], max_position_embeddings=max_pos,
            original_max_position_embeddings=rope.get("original_max_position_embeddings", max_pos),
            factor=rope.get("factor"), attention_factor=rope.get("short_mscale", rope.get("attention_factor")))
        if rope.get("long_mscale") not in (None, longrope.attention_factor):
            longrope = dataclasses.replace(longrope, long_attention_factor=float(rope["long_mscale"]))
    elif rope["rope_type"] != "default":
        raise CheckpointError(
            f"unsupported rope type {rope['rope_type']!r} in config.json; expected 'default' or 'longrope'")
    eos = hf.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    moe = None
    if model_type == "phimoe":
        if "num_local_experts" not in hf:
            raise CheckpointError("config.json of a phimoe model lacks num_local_experts")
        moe = MoEConfig(num_experts=hf["num_local_experts"], top_k=hf.get("num_experts_per_tok", 2),
                        router_jitter_noise=hf.get("router_jitter_noise", 0.01),
                        input_jitter_noise=hf.get("input_jitter_noise", 0.0),
                        aux_loss_coef=hf.get("router_aux_loss_coef", 0.0))
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim, rms_norm_eps=hf.get("rms_norm_eps", 1e-5), rope_theta=float(rope["rope_theta"]),
        partial_rotary_factor=float(rope["partial_rotary_factor"]), longrope=longrope,
        max_position_embeddings=max_pos, sliding_window=hf.get("sliding_window"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos, pad_token_id=hf.get("pad_token_id"), norm="layer" if moe else "rms",
        attention_bias=bool(hf.get("attention_bias", False)) if moe else False,
        lm_head_bias=bool(hf.get("lm_head_bias", False)) if moe else False, moe=moe,
    )


def hf_problems(c: ModelConfig) -> str | None:
    """Why transformers has no class for this configuration (saving it as phi3/phimoe would change outputs), or
    None when `save_hf` can write it."""
    if c.moe is None:
        problems = [f"{name}={getattr(c, name)!r}" for name, ok in
                    (("norm", c.norm == "rms"), ("attention_bias", not c.attention_bias),
                     ("lm_head_bias", not c.lm_head_bias)) if not ok]
        target = "Phi3ForCausalLM (RMSNorm, no biases)"
    else:
        problems = [f"{name}={value!r}" for name, value, ok in
                    (("norm", c.norm, c.norm == "layer"), ("moe.router", c.moe.router, c.moe.router == "sparsemixer"),
                     ("moe.sparsemixer_variant", c.moe.sparsemixer_variant, c.moe.sparsemixer_variant == "v2"),
                     ("moe.capacity_factor", c.moe.capacity_factor, c.moe.capacity_factor < 0),
                     ("moe.task_adapters", c.moe.task_adapters, c.moe.task_adapters is None),
                     ("partial_rotary_factor", c.partial_rotary_factor, c.partial_rotary_factor == 1.0),
                     ("tie_word_embeddings", c.tie_word_embeddings, not c.tie_word_embeddings)) if not ok]
        target = ("PhimoeForCausalLM (LayerNorm, SparseMixer-v2 top-2, dropless, full rotary, untied head)")
    return f"{', '.join(problems)} has no counterpart in {target}" if problems else None


def _check_representable(c: ModelConfig) -> None:
    problem = hf_problems(c)
    if problem:
        raise ValueError(f"this model cannot be saved as a transformers checkpoint: {problem}; save it in jaxmoe's "
                         "own format instead (jaxmoe.save_quantized, which also writes float models), or change "
                         "the config")


def config_to_hf(config: ModelConfig, *, dtype=jnp.float32) -> dict:
    """A config.json dict that transformers reads back as the same architecture (phi3 or phimoe)."""
    c = config
    _check_representable(c)
    hf = {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "partial_rotary_factor": c.partial_rotary_factor,
        "max_position_embeddings": c.max_position_embeddings, "sliding_window": c.sliding_window,
        "tie_word_embeddings": c.tie_word_embeddings, "bos_token_id": c.bos_token_id,
        "eos_token_id": (c.eos_token_id[0] if len(c.eos_token_id) == 1 else list(c.eos_token_id)) or None,
        "pad_token_id": c.pad_token_id, "attention_dropout": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "torch_dtype": jnp.dtype(dtype).name, "rope_scaling": None,
    }
    if c.longrope is not None:
        lr = c.longrope
        hf["original_max_position_embeddings"] = lr.original_max_position_embeddings
        hf["rope_scaling"] = {"type": "longrope", "short_factor": list(lr.short_factor),
                              "long_factor": list(lr.long_factor)}
        derived = LongRoPE.from_lengths(lr.short_factor, lr.long_factor,
                                        max_position_embeddings=c.max_position_embeddings,
                                        original_max_position_embeddings=lr.original_max_position_embeddings)
        if c.moe is not None:
            long_scale = lr.attention_factor if lr.long_attention_factor is None else lr.long_attention_factor
            hf["rope_scaling"].update(short_mscale=lr.attention_factor, long_mscale=long_scale,
                                      original_max_position_embeddings=lr.original_max_position_embeddings)
        elif not np.isclose(derived.attention_factor, lr.attention_factor, rtol=0, atol=1e-12):
            hf["rope_scaling"]["attention_factor"] = lr.attention_factor
    if c.moe is not None:
        del hf["partial_rotary_factor"], hf["resid_pdrop"], hf["embd_pdrop"]
        hf.update(architectures=["PhimoeForCausalLM"], model_type="phimoe", num_local_experts=c.moe.num_experts,
                  num_experts_per_tok=c.moe.top_k, router_jitter_noise=c.moe.router_jitter_noise,
                  input_jitter_noise=c.moe.input_jitter_noise, router_aux_loss_coef=c.moe.aux_loss_coef,
                  attention_bias=c.attention_bias, lm_head_bias=c.lm_head_bias)
    return hf


# ------------------------------------------------------------------------------------------------- names


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


# ------------------------------------------------------------------------------------------------- load


def read_config(folder: Path) -> dict:
    """config.json of a Hugging Face folder as a dict, with generation_config.json's eos_token_id where it has
    one; CheckpointError when the folder or its config.json is missing."""
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {str(folder)!r} does not exist or is not a folder")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"no config.json in {str(folder)!r}; expected a Hugging Face checkpoint folder (config.json plus "
            "model.safetensors or model.safetensors.index.json)")
    with open(path) as f:
        hf = json.load(f)
    # transformers' generate stops on generation_config.json's eos ids (Phi-4-mini lists two there).
    generation = folder / "generation_config.json"
    if generation.is_file():
        with open(generation) as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            hf["eos_token_id"] = eos
    return hf


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        absent = sorted({file for file in weight_map.values() if not (folder / file).is_file()})
        if absent:
            raise CheckpointError(f"{index.name} in {str(folder)!r} names shard {absent[0]!r}, which is not in the "
                                  f"folder ({len(absent)} missing in all); download or copy the complete checkpoint")
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        with SafetensorsFile(single) as f:
            return {name: single for name in f.keys()}
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = (f" It has {', '.join(pickled)}: jaxmoe never loads pickle files; convert them to safetensors with "
            "transformers (`model.save_pretrained(path, safe_serialization=True)`).") if pickled else ""
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {str(folder)!r}.{hint}")


def _piece_shape(piece, param_shape: tuple) -> tuple:
    """The Hub tensor's shape for `piece` of a parameter of `param_shape`."""
    shape = np.broadcast_to(np.empty((), np.bool_), param_shape)[piece.region].shape  # zero-stride view, no buffer
    return piece.hub_shape(shape)


def _load_params(folder: Path, specs: list[ParamSpec], abstract: dict, dtype, *, place, ignore=tied_head) -> dict:
    """Every parameter read into a host buffer and handed to `place(path, host)` (device placement) one by one.
    Tensors of the folder that no spec reads are refused unless `ignore(name)` (default: a tied lm_head)."""
    files = _tensor_files(folder)
    pieces = {piece.name: (spec, piece) for spec in specs for piece in spec.pieces}
    missing = sorted(set(pieces) - set(files))
    if missing:
        spec, piece = pieces[missing[0]]
        shape = _piece_shape(piece, _get(abstract, spec.path).shape)
        raise CheckpointError(
            f"tensor {missing[0]!r} (expected shape {list(shape)}) is missing from {str(folder)!r}"
            + (f", and {len(missing) - 1} more" if len(missing) > 1 else "")
            + "; the checkpoint does not match its config.json")
    unexpected = sorted(name for name in set(files) - set(pieces) if not ignore(name))
    if unexpected:
        raise CheckpointError(
            f"unexpected tensor {unexpected[0]!r} in {str(folder)!r} ({len(unexpected)} in all); the config.json "
            "describes a model without it (wrong num_hidden_layers, num_local_experts or model_type?)")
    params = jax.tree.map(lambda x: None, abstract)
    opened: dict[Path, SafetensorsFile] = {}
    try:
        for spec in specs:
            want = _get(abstract, spec.path).shape
            # One host buffer per parameter, filled piece by piece straight out of the memory maps.
            host = np.empty(want, dtype)
            for piece in spec.pieces:
                file = files[piece.name]
                if file not in opened:
                    if len(opened) >= 2:  # keep few files mapped: mapped pages count as resident memory
                        opened.pop(next(iter(opened))).close()
                    opened[file] = SafetensorsFile(file)
                f = opened[file]
                expected = _piece_shape(piece, want)
                if f.shape(piece.name) != expected:
                    raise CheckpointError(
                        f"tensor {piece.name!r} in {file.name} has shape {list(f.shape(piece.name))}; the config "
                        f"expects {list(expected)}. The checkpoint does not match its config.json")
                view = f.array(piece.name)
                np.copyto(host[piece.region], piece.to_ours(view), casting="unsafe")
                del view
            _set(params, spec.path, place(spec.path, host))
            del host
    finally:
        for f in opened.values():
            f.close()
    return params


def load_hf(path, *, dtype=jnp.float32, mesh=None, compute_dtype=None) -> Phi3ForCausalLM:
    """Reads a Hugging Face `phi3`, `phimoe` or `phi4_multimodal` checkpoint folder; returns Phi3ForCausalLM,
    PhimoeForCausalLM or Phi4MultimodalForCausalLM in eval mode (the family registered for config.json's
    `model_type` in `jaxmoe.io.families` reads it: this module or `jaxmoe.io.phi4mm`), parameters in `dtype`,
    computing in `compute_dtype` (default: `dtype`; e.g. float32 master weights with bfloat16 compute for
    fine-tuning).

    mesh: a `jax.sharding.Mesh` with axes from data, fsdp, expert, tensor (`jaxmoe.sharding.make_mesh`, or
    `jax.make_mesh` with Explicit or Auto axes): each parameter goes to its devices by `jaxmoe.sharding`'s rules
    as soon as it is read (one parameter at a time on the host), and MoE blocks run expert-parallel over the
    `expert` axis. The model then takes plain arrays, eagerly or under `nnx.jit` (see `jaxmoe.sharding` on
    axis types)."""
    folder = Path(path)
    hf = read_config(folder)
    family = families.for_model_type(hf.get("model_type"))
    if family is None:
        raise CheckpointError(f"unknown model_type {hf.get('model_type')!r} in config.json of {str(folder)!r}; "
                              f"jaxmoe reads {', '.join(t for f in families.registered() for t in f.model_types)}")
    return family.load(folder, hf, dtype=dtype, mesh=mesh, compute_dtype=compute_dtype)


def _load_text(folder: Path, hf: dict, *, dtype, mesh, compute_dtype) -> Phi3ForCausalLM:
    """`load_hf` for model_type phi3 and phimoe."""
    config = config_from_hf(hf)
    model_class = Phi3ForCausalLM if config.moe is None else PhimoeForCausalLM
    model = load_into(lambda: model_class(config, dtype=compute_dtype, param_dtype=dtype, rngs=nnx.Rngs(0)),
                      folder, list(param_specs(config)), dtype, place=placer(mesh))
    if mesh is not None:
        sharding.use_mesh_for_experts(model, mesh)
    model.eval()
    return model


def placer(mesh, sharded=lambda path: path):
    """`place(path, host)` for `_load_params`: onto the default device, or with `mesh` onto
    `jaxmoe.sharding.auto_mesh(mesh)` by its rules for the parameter path `sharded(path)` (None: replicated)."""
    if mesh is None:
        return lambda path, host: jnp.asarray(host)
    sharding.check_mesh(mesh)
    mesh = sharding.auto_mesh(mesh)

    def place(path, host):
        logical = sharded(path)
        spec = (PartitionSpec() if logical is None else
                sharding.partition_spec(sharding.logical_axes(logical, host.shape), host.shape, mesh))
        return jax.device_put(host, NamedSharding(mesh, spec))
    return place


def load_into(make, folder: Path, specs: list[ParamSpec], dtype, *, place, ignore=tied_head) -> nnx.Module:
    """The model `make()` builds (abstractly: no weights materialised) with every parameter read from `folder`."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    params = _load_params(folder, specs, nnx.to_pure_dict(state), dtype, place=place, ignore=ignore)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------------------- save


def _shards(tensors: dict[str, jax.Array], max_bytes: int) -> list[dict[str, jax.Array]]:
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        if current and size + tensor.nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += tensor.nbytes
    return shards + [current]


def save_hf(model: Phi3ForCausalLM, path, *, overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
    """Writes config.json and safetensors weights that transformers' `Phi3ForCausalLM` (dense),
    `PhimoeForCausalLM` (MoE) or `Phi4MultimodalForCausalLM` `from_pretrained` loads, with Hub tensor names
    (`jaxmoe.io.names`). Mixture-of-LoRA adapters (`jaxmoe.nn.multi_lora`) are left out.

    Refuses to replace an existing non-empty folder unless `overwrite=True`; the write is atomic either way.
    """
    family = families.for_model(model)
    if family is None:
        raise TypeError(f"save_hf: model is a {type(model).__name__}; jaxmoe writes Hugging Face folders for "
                        f"{', '.join(c.__name__ for f in families.registered() for c in f.model_classes)}")
    return family.save(model, path, overwrite=overwrite, max_shard_bytes=max_shard_bytes)


def _save_text(model: Phi3ForCausalLM, path, *, overwrite: bool, max_shard_bytes: int) -> Path:
    """`save_hf` for Phi3ForCausalLM and PhimoeForCausalLM."""
    config = model.config
    return write_checkpoint(path, param_specs(config), base_param_dict(model),
                            lambda dtype: config_to_hf(config, dtype=dtype), overwrite=overwrite,
                            max_shard_bytes=max_shard_bytes)


def write_checkpoint(path, specs, pure: dict, hf_config, *, overwrite: bool, max_shard_bytes: int) -> Path:
    """A Hugging Face folder from `pure` (nnx.to_pure_dict of the parameters) cut into Hub tensors by `specs`:
    config.json (`hf_config(dtype)`, dtype the embedding's) plus one or more safetensors shards (with an index),
    written atomically. Refuses a non-empty folder unless `overwrite`."""
    target = Path(path)
    if not overwrite:
        refuse_nonempty(target, OVERWRITE_ADVICE)
    tensors = {}
    for spec in specs:
        value = jnp.asarray(_get(pure, spec.path))
        for piece in spec.pieces:
            tensors[piece.name] = piece.to_hub(value[piece.region])
    hf_config = hf_config(tensors["model.embed_tokens.weight"].dtype)
    with atomic_folder(target) as tmp:
        with open(tmp / "config.json", "w") as f:
            json.dump(hf_config, f, indent=2)
        shards = _shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / file), metadata={"format": "pt"})
                weight_map.update({name: file for name in shard})
            total = sum(t.nbytes for t in tensors.values())
            with open(tmp / "model.safetensors.index.json", "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return target


families.register(families.Family(model_types=SUPPORTED_MODEL_TYPES,
                                  model_classes=(Phi3ForCausalLM, PhimoeForCausalLM), param_specs=param_specs,
                                  load=_load_text, save=_save_text))
