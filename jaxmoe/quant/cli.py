"""`jaxmoe quantize` and `jaxmoe convert`: their flags (added to the main parser by jaxmoe/cli.py) and runners.

quantize: a checkpoint folder (Hugging Face, or jaxmoe's own from `jaxmoe convert`) -> a quantized jaxmoe
folder (jaxmoe.quant.checkpoint), printing the bytes of each parameter group before and after.
convert: a Hugging Face folder <-> a jaxmoe orbax folder (float models; the direction follows the source).
Errors are ValueErrors / CheckpointErrors, which `jaxmoe.cli.main` prints as one line and exits 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path


from jaxmoe.io.atomic import refuse_nonempty
from jaxmoe.io.hf import save_hf
from jaxmoe.io.load import load_model
from jaxmoe.quant.checkpoint import FORMATS, is_jaxmoe_checkpoint, save_quantized
from jaxmoe.quant.memory import bytes_by_group
from jaxmoe.quant.plan import BITS, TARGETS
from jaxmoe.quant.quantize import quantization_report, quantize

__all__ = ["add_convert_parser", "add_quantize_parser", "run_convert", "run_quantize"]

# Files besides the weights that travel with a checkpoint (tokenizer and generation settings).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "generation_config.json")


def _group_size(text: str):
    if text in ("per-channel", "adaptive"):
        return None if text == "per-channel" else text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, 'per-channel' or 'adaptive', got {text!r}")
    return value


def add_quantize_parser(commands) -> None:
    q = commands.add_parser(
        "quantize", help="weight-only quantization of a checkpoint (MoQE experts or all linear layers)",
        description="Loads --model (a Hugging Face folder, or a jaxmoe folder from `jaxmoe convert`), quantizes "
                    "its weights (jaxmoe.quantize; docs/quantization.md), prints the bytes of each parameter group "
                    "(attention, dense ffn, router, experts, embeddings, norms, lm_head, total) before and after, "
                    "and writes a jaxmoe checkpoint folder that jaxmoe.load_quantized reads.")
    q.add_argument("--model", type=Path, required=True, help="checkpoint folder to quantize")
    q.add_argument("--out", type=Path, required=True, help="output folder (must not exist or be empty)")
    q.add_argument("--bits", type=int, choices=BITS, required=True, help="bits per weight")
    q.add_argument("--group-size", type=_group_size, required=True, metavar="G|per-channel|adaptive",
                   help="input rows per scale (must divide each matrix's input dimension), 'per-channel' (one scale "
                        "per column) or 'adaptive' (FineQuant: per matrix, the coarsest passing size down to 64)")
    q.add_argument("--target", choices=TARGETS, required=True,
                   help="'experts': MoE expert weights only (MoQE); 'linear': every linear layer but the router")
    q.add_argument("--asymmetric", action="store_true", help="min-max scales with zero points (default: absmax)")
    q.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the weights as loaded, which the parameters left float keep (default: %(default)s)")
    q.add_argument("--format", choices=FORMATS, default="safetensors",
                   help="safetensors (packed codes, scales, zeros as tensors) or orbax (default: %(default)s)")


def add_convert_parser(commands) -> None:
    c = commands.add_parser(
        "convert", help="convert a checkpoint: Hugging Face folder <-> jaxmoe orbax folder",
        description="Converts --src to --out: a Hugging Face folder (config.json + safetensors) becomes a jaxmoe "
                    "orbax folder (config.json + state/), and a jaxmoe folder (orbax or safetensors, float) becomes "
                    "a Hugging Face folder that transformers loads. Tokenizer files travel along.")
    c.add_argument("--src", type=Path, required=True, help="source checkpoint folder")
    c.add_argument("--out", type=Path, required=True, help="output folder (must not exist or be empty)")
    c.add_argument("--to", choices=("orbax", "hf"), default=None,
                   help="output format (default: orbax for a Hugging Face source, hf for a jaxmoe source)")
    c.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="parameter dtype when reading a Hugging Face source (default: %(default)s)")


def _side_files(folder: Path) -> list[Path]:
    return [folder / name for name in SIDE_FILES if (folder / name).is_file()]


def _load(folder: Path, dtype: str):
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a folder; expected a checkpoint folder with config.json")
    return load_model(folder, dtype=None if is_jaxmoe_checkpoint(folder) else dtype)


def format_report(before: dict[str, int], after: dict[str, int]) -> str:
    """A table of bytes per parameter group, before and after, with the ratio."""
    lines = [f"{'group':<12} {'before (bytes)':>16} {'after (bytes)':>16} {'after/before':>13}"]
    for group, old in before.items():
        new = after.get(group, 0)
        lines.append(f"{group:<12} {old:>16,} {new:>16,} {new / old if old else 1.0:>13.3f}")
    return "\n".join(lines)


def _check_out(target: Path) -> None:
    """Fail before any work when the output folder is taken."""
    refuse_nonempty(target, "choose another folder", label="--out")


def run_quantize(args) -> int:
    _check_out(args.out)
    model = _load(args.model, args.dtype)
    quantized = quantize(model, bits=args.bits, group_size=args.group_size, target=args.target,
                         symmetric=not args.asymmetric)
    print(format_report(bytes_by_group(model), bytes_by_group(quantized)))
    report = quantization_report(quantized)
    sizes = sorted({size for m in report for size in m.group_sizes})
    print(f"{len(report)} matrices at {args.bits} bits, group sizes {sizes}")
    if args.group_size == "adaptive":
        for matrix in report:
            print(f"  {matrix.path} {list(matrix.shape)}: group size {matrix.group_size}")
    save_quantized(quantized, args.out, format=args.format, extra_files=_side_files(args.model))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _save_hf_with(model, target: Path, files: list[Path]) -> None:
    """save_hf, with `files` copied in before the folder appears (one rename publishes both)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_hf(model, tmp)
        for file in files:
            shutil.copy2(file, tmp / file.name)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run_convert(args) -> int:
    _check_out(args.out)
    source_is_jaxmoe = is_jaxmoe_checkpoint(args.src)
    to = args.to or ("hf" if source_is_jaxmoe else "orbax")
    model = _load(args.src, args.dtype)
    if to == "hf":
        if quantization_report(model):
            raise ValueError(f"{str(args.src)!r} holds a quantized model; Hugging Face folders store float weights. "
                             "Dequantize it in Python (jaxmoe.quant.dequantize) and save_hf that, or keep it in the "
                             "jaxmoe format")
        _save_hf_with(model, args.out, _side_files(args.src))
    else:
        save_quantized(model, args.out, format="orbax", extra_files=_side_files(args.src))
    print(f"wrote {args.out} ({to})", file=sys.stderr)
    return 0
