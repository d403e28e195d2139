"""Shared test setup: eight fake CPU devices for sharding tests, and tiny random transformers references.

transformers' PyTorch classes are the oracle (built here from tiny random configs, never downloaded).
"""

import dataclasses
import os

# The suite's tiny programs spend far longer compiling than running. Without LLVM's optimisation of the machine
# code (--xla_backend_optimization_level=0; XLA's own HLO passes, fusion included, still run) it takes about a
# quarter less time; results may differ from an optimised build in the last bits only.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import functools  # noqa: E402
import gc  # noqa: E402

import jax  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

import jaxmoe  # noqa: E402

@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drops every cached executable after each test module. XLA:CPU maps each live executable's machine code
    into memory; one process running the whole suite kept ~1,500 of them and crossed Linux's 65,530 memory-map
    limit (vm.max_map_count), at which point the next compile died with a segmentation fault. Cleared per
    module, the count stays near 1,200 maps; fixtures shared within a module keep their compiled functions."""
    yield
    jax.clear_caches()
    gc.collect()


# Tiny Phi-3 configs that between them cover GQA, partial rotary 0.75 and 1.0, LongRoPE with non-trivial short
# and long factors (original_max_position_embeddings=16, so a 40-token input takes the long factors), tied and
# untied embeddings, and a sliding window.
HF_CONFIGS = {
    "gqa_partial_longrope_tied": dict(
        num_attention_heads=6, num_key_value_heads=2, partial_rotary_factor=0.75, tie_word_embeddings=True,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.05, 1.1], "long_factor": [2.0, 5.0, 8.0]}),
    "mha_full_rotary_untied": dict(
        num_attention_heads=6, num_key_value_heads=6, partial_rotary_factor=1.0, tie_word_embeddings=False),
    "gqa_full_longrope_untied": dict(
        num_attention_heads=6, num_key_value_heads=3, partial_rotary_factor=1.0, tie_word_embeddings=False,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(4)],
                      "long_factor": [1.5 + 4.0 * i for i in range(4)]}),
    "gqa_sliding_window": dict(
        num_attention_heads=6, num_key_value_heads=2, partial_rotary_factor=0.75, tie_word_embeddings=True,
        sliding_window=7),
}


def hf_config(name: str):
    import transformers

    base = dict(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                max_position_embeddings=64, original_max_position_embeddings=16, pad_token_id=0, bos_token_id=1,
                eos_token_id=2, attn_implementation="eager")
    return transformers.Phi3Config(**{**base, **HF_CONFIGS[name]})


@functools.cache
def hf_model(name: str, seed: int = 0):
    """A transformers Phi3ForCausalLM with random weights large enough to give non-trivial logits."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.Phi3ForCausalLM(hf_config(name)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.3)
            else:
                p.uniform_(0.5, 1.5)
    return model


# Tiny PhiMoE configs: GRIN-like (plain RoPE, sliding window) and Phi-3.5-MoE-like (LongRoPE with mscale).
HF_MOE_CONFIGS = {
    "grin_like": dict(num_local_experts=4, sliding_window=11, rope_theta=10000.0),
    "phi35_moe_like": dict(
        num_local_experts=6, rope_theta=10000.0,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(4)],
                      "long_factor": [1.5 + 3.0 * i for i in range(4)], "short_mscale": 1.243163121016122,
                      "long_mscale": 1.243163121016122, "original_max_position_embeddings": 32}),
}


def hf_moe_config(name: str):
    import transformers

    base = dict(vocab_size=128, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2, attention_bias=True,
                lm_head_bias=True, router_jitter_noise=0.01, input_jitter_noise=0.01, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    return transformers.PhimoeConfig(**{**base, **HF_MOE_CONFIGS[name]})


@functools.cache
def hf_moe_model(name: str, seed: int = 0):
    """A transformers PhimoeForCausalLM with random weights (biases too) in eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.PhimoeForCausalLM(hf_moe_config(name)).eval()
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if "layernorm" in name_ or name_.startswith("model.norm"):
                p.uniform_(0.5, 1.5) if name_.endswith("weight") else p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """name -> folder with the transformers model saved by `save_pretrained` (cached per session)."""
    folders = {}

    def get(name: str):
        if name not in folders:
            folder = tmp_path_factory.mktemp(f"hf_{name}")
            (hf_moe_model(name) if name in HF_MOE_CONFIGS else hf_model(name)).save_pretrained(folder)
            folders[name] = folder
        return folders[name]

    return get


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---------------------------------------------------------------------- quantization tests (tests/quant)
# An independent NumPy quantizer (the formulas of pallas_kernels/README.md, written out again here), tiny random
# models, a jitted forward, token ids.

def numpy_dequantize(w_gkn: np.ndarray, bits: int, group_size: int | None, symmetric: bool) -> np.ndarray:
    """float32 [g, k, n] -> its bits-bit round trip: scales per group of rows rounded to bfloat16, round half to
    even, symmetric absmax (zero point 2^(bits-1)) or asymmetric min-max over the range widened to contain 0, with
    an integer zero point."""
    g, k, n = w_gkn.shape
    size = k if group_size is None else group_size
    w = np.asarray(w_gkn, np.float32).reshape(g, k // size, size, n)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (np.abs(w).max(axis=2, keepdims=True) / np.float32(qmax)).astype(ml_dtypes.bfloat16)
        scale = np.where(scale == 0, 1, scale).astype(np.float32)
        q = np.clip(np.round(w / scale), -qmax, qmax)
        out = scale * q
    else:
        top = 2 ** bits - 1
        lo = np.minimum(w.min(axis=2, keepdims=True), np.float32(0))  # the range always contains 0
        hi = np.maximum(w.max(axis=2, keepdims=True), np.float32(0))
        scale = ((hi - lo) / np.float32(top)).astype(ml_dtypes.bfloat16).astype(np.float32)
        scale = np.where(scale == 0, np.float32(1), scale)
        zero = np.clip(np.round(-lo / scale), 0, top)
        codes = np.clip(np.round(w / scale) + zero, 0, top)
        out = scale * (codes - zero)
    return out.reshape(g, k, n).astype(np.float32)


def tiny(name: str, seed: int = 0, **overrides):
    """A jaxmoe preset ("tiny" dense, tied; "tiny-moe": 4 experts, untied lm_head with bias) with one layer by
    default (compile time), random float32 weights, in eval mode. Weights are scaled up from the 0.02 init so
    the logits are far from zero. expert_implementation="decode" (say) sets an MoE preset's
    `MoEConfig.expert_implementation`."""
    implementation = overrides.pop("expert_implementation", None)  # an MoE preset's experts; a dense one has none
    config = jaxmoe.get_preset(name).replace(**{"num_layers": 1, **overrides})
    if implementation is not None and config.moe is not None:
        config = config.replace(moe=dataclasses.replace(config.moe, expert_implementation=implementation))
    cls = jaxmoe.Phi3ForCausalLM if config.moe is None else jaxmoe.PhimoeForCausalLM
    model = cls(config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for _, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Param) and variable.get_value().ndim >= 2:
            variable[...] = rng.normal(0.0, 0.2, variable.get_value().shape).astype(np.float32)
    model.eval()
    return model


@nnx.jit
def logits(model, ids):
    return model(ids).logits


@pytest.fixture
def np_dequantize():
    """numpy_dequantize(w [g, k, n], bits, group_size, symmetric) -> float32 round trip."""
    return numpy_dequantize


@pytest.fixture
def tiny_model():
    """tiny_model(preset, seed=0, **config overrides) -> a one-layer random model in eval mode."""
    return tiny


@pytest.fixture
def forward():
    """forward(model, ids) -> float32 logits [b, t, vocab], jitted."""
    return logits


@pytest.fixture
def ids(rng):
    """int32 token ids [2, 10] inside the tiny presets' vocabulary of 512."""
    return rng.integers(3, 512, (2, 10)).astype(np.int32)
