"""PEFT LoRA adapter folders: `load_peft_adapter` reads one into a model's mixture of LoRAs
(`jaxmoe.nn.multi_lora`) as a named adapter, `save_peft_adapter` writes one back.

A folder holds `adapter_config.json` and `adapter_model.safetensors`, as peft's `save_pretrained` writes them.
The config must have peft_type "LORA", a positive integer `r`, a positive `lora_alpha`, optionally
`use_rslora` (scale lora_alpha / sqrt(r) instead of lora_alpha / r), and `target_modules`: a list of module
names (each matching a Hugging Face module name or its last dotted components) or a regex matched against the
whole name; `exclude_modules` takes the same forms. The weights file holds, for every targeted layer,
`base_model.model.<module>.lora_A.weight` [r, in] and `base_model.model.<module>.lora_B.weight` [out, r].
Module names are the Hugging Face names of the models jaxmoe knows (Phi-3, PhiMoE, Phi-4-multimodal).
`save_peft_adapter` writes the same layout (target_modules as a regex over layer indices where that names
exactly the adapted layers), atomically, in the adapter's stored dtype.

`load_peft_adapter` refuses, with a ValueError or FileNotFoundError naming the option, tensor or file: peft
types other than LoRA; PEFT options beyond plain LoRA (DoRA, bias other than 'none', layers_to_transform,
rank_pattern, alpha_pattern, modules_to_save, layer_replication, ...); target_modules 'all-linear'; targets that
name no linear layer of the model or lie outside the language model's decoder layers (adapters live only there;
in a multimodal model, in its `language_model`); missing, unexpected or wrongly shaped tensors; pickled
`adapter_model.bin` weights (never loaded); an adapter name already on the model; and models carrying single
LoRA adapters (`jaxmoe.nn.lora.apply_lora`). `save_peft_adapter` refuses a non-empty destination unless
overwrite=True, an adapter name the model lacks, and an adapter whose layers differ in rank, alpha or rsLoRA.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax.numpy as jnp
from flax import nnx
from safetensors.flax import save_file

from jaxmoe.io import families
from jaxmoe.io.atomic import OVERWRITE_ADVICE, atomic_folder, refuse_nonempty
from jaxmoe.io.safetensors_file import SafetensorsFile
from jaxmoe.nn.lora import UNSUPPORTED_TARGETS
from jaxmoe.nn.multi_lora import MultiLoRALinear, adapter_names, adapter_scope, wrap_linear

__all__ = ["load_peft_adapter", "save_peft_adapter"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def _hf_linears(model: nnx.Module) -> dict[str, tuple]:
    """Hugging Face module name (e.g. 'model.layers.0.self_attn.qkv_proj') -> our module path, for every linear
    layer stored as one Hub tensor."""
    family = families.for_model(model)
    if family is None:
        known = ", ".join(c.__name__ for f in families.registered() for c in f.model_classes)
        raise TypeError(f"PEFT adapters: jaxmoe knows the Hugging Face layer names of {known}, not of "
                        f"{type(model).__name__}")
    linears = {}
    for spec in family.param_specs(model.config):
        if spec.path[-1] == "kernel" and len(spec.pieces) == 1 and spec.pieces[0].transpose is True:
            name = spec.pieces[0].name
            if name.endswith(".weight"):
                linears[name[:-len(".weight")]] = spec.path[:-1]
    return linears


def _adaptable(path: tuple, scope_path: tuple) -> bool:
    return path[:len(scope_path)] == scope_path and path[-1] not in UNSUPPORTED_TARGETS


def _node(model: nnx.Module, path: tuple):
    for key in path:
        model = model[key] if isinstance(key, int) else getattr(model, key)
    return model


def _matches(patterns, module: str) -> bool:
    """PEFT's rule: a string is a regex matched against the whole name; a list entry matches the name itself
    or its last dotted components."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module) is not None
    return any(module == p or module.endswith("." + p) for p in patterns)


# adapter_config.json keys that do not change an adapter's output at inference.
_HARMLESS = {"task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
             "lora_dropout", "init_lora_weights", "megatron_config", "megatron_core", "qalora_group_size",
             "eva_config", "ensure_weight_tying"}
_HANDLED = {"peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules"}


def _read_peft_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not folder.is_dir() or not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {str(folder)!r}; expected a PEFT adapter folder "
                                f"({CONFIG_FILE} plus {WEIGHTS_FILE}, as peft's save_pretrained writes)")
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {cfg.get('peft_type')!r}; jaxmoe loads LoRA adapters only "
                         "(peft_type 'LORA')")
    unsupported = {key: value for key, value in cfg.items() if key not in _HARMLESS | _HANDLED
                   and value not in (None, False, {}, [], "none")}
    if unsupported:
        key, value = next(iter(unsupported.items()))
        raise ValueError(f"{path}: {key}={value!r} is a PEFT option jaxmoe does not implement (it loads plain LoRA: "
                         "no DoRA, bias='none', no layers_to_transform / rank_pattern / alpha_pattern / "
                         "modules_to_save / layer_replication); retrain or convert the adapter without it"
                         + (f" (also set: {sorted(unsupported)[1:]})" if len(unsupported) > 1 else ""))
    r = cfg.get("r")
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"{path}: r is {r!r}; expected a positive integer rank")
    if not isinstance(cfg.get("lora_alpha"), (int, float)) or not cfg["lora_alpha"] > 0:
        raise ValueError(f"{path}: lora_alpha is {cfg.get('lora_alpha')!r}; expected a positive number")
    targets = cfg.get("target_modules")
    if targets == "all-linear" or not isinstance(targets, (str, list)) or not targets:
        raise ValueError(f"{path}: target_modules is {targets!r}; expected a list of module names or a regex "
                         "(jaxmoe does not expand 'all-linear')")
    return cfg


def load_peft_adapter(model: nnx.Module, folder, name: str, *, dtype=jnp.float32) -> int:
    """Reads the PEFT LoRA adapter in `folder` into the model, in place, as adapter `name` (stored in `dtype`).

    Tensors `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]; the update is
    scaled by lora_alpha / r (lora_alpha / sqrt(r) with use_rslora). Raises ValueError, naming the tensor or
    option, when the adapter does not fit the model: a rank that does not match the tensors, target_modules that
    name layers the model does not have, missing or unexpected tensors, or PEFT options beyond plain LoRA.
    Returns the number of layers adapted.
    """
    _, scope_path = adapter_scope(model, name, caller="load_peft_adapter")
    folder = Path(folder)
    cfg = _read_peft_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {str(folder)!r}"
                                + (f" (it has {pickled}: jaxmoe never loads pickle files; re-save the adapter with "
                                   "safe_serialization=True)" if pickled else ""))
    linears = _hf_linears(model)
    targets, excluded = cfg["target_modules"], cfg.get("exclude_modules") or []
    if isinstance(targets, list):
        unknown = [t for t in targets if not any(_matches([t], m) for m in linears)]
        if unknown:
            leaves = sorted({m.rsplit(".", 1)[-1] for m, p in linears.items() if _adaptable(p, scope_path)})
            raise ValueError(f"{folder / CONFIG_FILE}: target_modules {unknown} name no linear layer of this "
                             f"{type(model).__name__}; its adaptable layers are {leaves}. The adapter was made for "
                             "another architecture")
    wanted = {m for m in linears if _matches(targets, m) and not _matches(excluded, m)}
    if not wanted:
        raise ValueError(f"{folder / CONFIG_FILE}: target_modules {targets!r} match no linear layer of this "
                         f"{type(model).__name__}; the adapter was made for another architecture")

    outside = sorted(m for m in wanted if not _adaptable(linears[m], scope_path))
    if outside:
        raise ValueError(
            f"{folder / CONFIG_FILE}: target_modules {targets!r} also name {outside[0]!r} ({len(outside)} such "
            "layers), outside the language model's decoder layers, and jaxmoe adapts only those (qkv_proj, o_proj, "
            "gate_up_proj, down_proj of model.layers.N). Restrict target_modules to them, e.g. "
            r"'model\.layers\.\d+\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj)'")

    r, alpha, rslora = cfg["r"], float(cfg["lora_alpha"]), bool(cfg.get("use_rslora", False))
    key_re = re.compile(re.escape(_PEFT_PREFIX) + r"(.+)\.lora_([AB])\.weight")
    with SafetensorsFile(weights) as f:
        found: dict[str, dict[str, str]] = {}
        for key in f.keys():
            match = key_re.fullmatch(key)
            if match is None or match.group(1) not in wanted:
                why = ("is not a LoRA matrix jaxmoe reads" if match is None else
                       "belongs to a layer that target_modules does not name" if match.group(1) in linears else
                       "names no linear layer of this model")
                raise ValueError(f"{weights}: unexpected tensor {key!r} (it {why}); expected only "
                                 f"'{_PEFT_PREFIX}<layer>.lora_A.weight' / '.lora_B.weight' for the target_modules")
            found.setdefault(match.group(1), {})[match.group(2)] = key
        missing = sorted(f"{_PEFT_PREFIX}{m}.lora_{ab}.weight" for m in wanted for ab in "AB"
                         if ab not in found.get(m, {}))
        if missing:
            raise ValueError(f"{weights}: tensor {missing[0]!r} is missing ({len(missing)} in all): target_modules "
                             f"{targets!r} names that layer but the file has no matrix for it; the folder is "
                             "incomplete or its adapter_config.json does not belong to it")
        for module in sorted(wanted):
            node = _node(model, linears[module])
            base = node.base if isinstance(node, MultiLoRALinear) else node
            for ab, want in (("A", (r, base.in_features)), ("B", (base.out_features, r))):
                if f.shape(found[module][ab]) != want:
                    raise ValueError(f"{weights}: {found[module][ab]} has shape {list(f.shape(found[module][ab]))}; "
                                     f"with r={r} from {CONFIG_FILE} this layer needs {list(want)}. Fix r in "
                                     f"{CONFIG_FILE} or use the adapter made for this model")
        for module in sorted(wanted):
            path = linears[module]
            adapter = wrap_linear(_node(model, path[:-1]), path[-1]).add(name, rank=r, alpha=alpha, use_rslora=rslora,
                                                                        dtype=dtype, rngs=nnx.Rngs(0))
            adapter.lora_a[...] = jnp.asarray(f.array(found[module]["A"]).T, dtype)
            adapter.lora_b[...] = jnp.asarray(f.array(found[module]["B"]).T, dtype)
    return len(wanted)


def _target_regex(adapted: set[str], candidates: set[str]) -> str | list[str]:
    """A regex naming exactly the adapted layers (layer indices generalised to \\d+), or their full names where
    the adapter covers only some layers of a kind."""
    templates = sorted({re.sub(r"\.\d+\.", ".<N>.", m) for m in adapted})
    regex = "|".join(re.escape(t).replace("<N>", r"\d+") for t in templates)
    if {m for m in candidates if re.fullmatch(regex, m)} == adapted:
        return regex
    return sorted(adapted)


def save_peft_adapter(model: nnx.Module, name: str, folder, *, overwrite: bool = False) -> Path:
    """Writes adapter `name` as a PEFT LoRA folder that peft's `PeftModel.from_pretrained` (on the transformers
    model that `save_hf` writes) and `load_peft_adapter` read. Tensors are saved in their stored dtype."""
    target = Path(folder)
    if not overwrite:
        refuse_nonempty(target, OVERWRITE_ADVICE)
    linears = _hf_linears(model)
    tensors, settings = {}, set()
    for module, path in linears.items():
        node = _node(model, path)
        if isinstance(node, MultiLoRALinear) and name in node.adapters:
            adapter = node.adapters[name]
            settings.add((adapter.rank, adapter.alpha, adapter.use_rslora))
            tensors[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = adapter.lora_a[...].T
            tensors[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = adapter.lora_b[...].T
    if not tensors:
        raise ValueError(f"save_peft_adapter: the model has no adapter named {name!r}; its adapters are "
                         f"{list(adapter_names(model))}")
    if len(settings) > 1:
        raise ValueError(f"save_peft_adapter: adapter {name!r} has layers with different (rank, alpha, rslora) "
                         f"{sorted(settings)}; a PEFT folder holds one rank and alpha")
    (rank, alpha, rslora), = settings
    adapted = {k[len(_PEFT_PREFIX):-len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
              "target_modules": _target_regex(adapted, set(linears)), "bias": "none", "lora_dropout": 0.0,
              "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None, "inference_mode": True,
              "init_lora_weights": True, "base_model_name_or_path": None}
    with atomic_folder(target) as tmp:
        with open(tmp / CONFIG_FILE, "w") as f:
            json.dump(config, f, indent=2)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    return target
