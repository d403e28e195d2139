"""Bytes of Phi-3.5-MoE (bf16) against the same model with its experts quantized (MoQE), computed abstractly.

No weight is materialised: the model and its quantized copies are built under `nnx.eval_shape` (shapes and
dtypes only) and `jaxmoe.param_bytes` counts what they would store. Packed codes, bf16 scales (and zero points
when asymmetric) are all counted. From the repository root:

    python experiments/moqe/memory_table.py                 # the table in docs/quantization.md
    python experiments/moqe/memory_table.py --preset tiny-moe --asymmetric
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
from flax import nnx

import jaxmoe
from jaxmoe.quant import bytes_by_group

GIB = 1024**3


def abstract_model(config, *, bits=None, group_size=None, symmetric=True):
    """The bf16 model (bits None) or its copy with bits-bit experts, as shapes only."""
    def build():
        model = jaxmoe.PhimoeForCausalLM(config, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        if bits is None:
            return model
        return jaxmoe.quantize(model, bits=bits, group_size=group_size, target="experts", symmetric=symmetric)
    return nnx.eval_shape(build)


def rows(config, *, symmetric=True, group_sizes=(64, None)):
    """[(label, experts bytes, total bytes)]: bf16 first, then each bit width and group size."""
    base = bytes_by_group(abstract_model(config))
    out = [("bf16 (no quantization)", base["experts"], base["total"])]
    for bits in (8, 4, 3, 2):
        for group_size in group_sizes:
            sizes = bytes_by_group(abstract_model(config, bits=bits, group_size=group_size, symmetric=symmetric))
            label = f"int{bits} experts, {'per-channel' if group_size is None else f'group {group_size}'}"
            out.append((label, sizes["experts"], sizes["total"]))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="phi3.5-moe", help="a jaxmoe MoE preset (default: %(default)s)")
    parser.add_argument("--asymmetric", action="store_true", help="min-max scales with zero points")
    args = parser.parse_args(argv)
    config = jaxmoe.get_preset(args.preset)
    table = rows(config, symmetric=not args.asymmetric)
    base_total = table[0][2]
    print(f"{args.preset}, {'asymmetric' if args.asymmetric else 'symmetric'}; float parameters in bf16, scales "
          "in bf16; GiB = 2^30 bytes")
    print("| model | expert bytes | total bytes | total GiB | x bf16 |")
    print("|---|---:|---:|---:|---:|")
    for label, experts, total in table:
        print(f"| {label} | {experts:,} | {total:,} | {total / GIB:.2f} | {total / base_total:.3f} |")


if __name__ == "__main__":
    main()
