"""param_bytes and bytes_by_group: exact on a hand-counted tiny model, float and quantized, abstract or not; and
the MoQE memory acceptance on the real Phi-3.5-MoE shapes, computed without materialising a weight."""

import jax.numpy as jnp
import pytest
from flax import nnx

import jaxmoe
from jaxmoe.quant import bytes_by_group, param_bytes, quantize
from jaxmoe.quant.quantize import apply_plan

# tiny-moe with one layer: vocab 512, d 64, experts 4 of f 96, 4 query + 2 kv heads of 16, LayerNorm with bias,
# biased attention and lm_head. Counted by hand, in float32 values:
EMBED = 512 * 64
NORMS = 3 * (64 + 64)                      # input, post-attention and final LayerNorm (weight + bias)
ATTENTION = 64 * 128 + 128 + 64 * 64 + 64  # qkv_proj (4 x 16 + 2 x 2 x 16 = 128 outputs) and o_proj, with biases
ROUTER = 64 * 4
EXPERTS = 4 * 64 * 192 + 4 * 96 * 64       # w_gate_up [e, d, 2f] and w_down [e, f, d]
LM_HEAD = 64 * 512 + 512


def tiny_moe():
    return jaxmoe.PhimoeForCausalLM(jaxmoe.get_preset("tiny-moe").replace(num_layers=1), rngs=nnx.Rngs(0))


def test_float_model_bytes_equal_the_hand_count():
    model = tiny_moe()
    assert param_bytes(model) == 4 * (EMBED + NORMS + ATTENTION + ROUTER + EXPERTS + LM_HEAD)
    assert bytes_by_group(model) == {
        "embeddings": 4 * EMBED, "attention": 4 * ATTENTION, "router": 4 * ROUTER, "experts": 4 * EXPERTS,
        "norms": 4 * NORMS, "lm_head": 4 * LM_HEAD, "total": param_bytes(model)}


@pytest.mark.parametrize("bits,symmetric,expert_bytes", [
    # w_gate_up: codes [4, 64 * bits / 8, 192] uint8 + bf16 scales [4, 64 / 32, 192] (+ zeros when asymmetric);
    # w_down: codes [4, 96 * bits / 8, 64] + scales [4, 96 / 32, 64].
    (4, True, 4 * 32 * 192 + 2 * 4 * 2 * 192 + 4 * 48 * 64 + 2 * 4 * 3 * 64),
    (4, False, 4 * 32 * 192 + 2 * 2 * 4 * 2 * 192 + 4 * 48 * 64 + 2 * 2 * 4 * 3 * 64),
    (3, True, 4 * 24 * 192 + 2 * 4 * 2 * 192 + 4 * 36 * 64 + 2 * 4 * 3 * 64),
    (2, True, 4 * 16 * 192 + 2 * 4 * 2 * 192 + 4 * 24 * 64 + 2 * 4 * 3 * 64),
    (8, True, 4 * 64 * 192 + 2 * 4 * 2 * 192 + 4 * 96 * 64 + 2 * 4 * 3 * 64),
])
def test_quantized_experts_count_as_packed_codes_plus_scales(bits, symmetric, expert_bytes):
    quantized = quantize(tiny_moe(), bits=bits, group_size=32, target="experts", symmetric=symmetric)
    groups = bytes_by_group(quantized)
    assert groups["experts"] == expert_bytes
    assert param_bytes(quantized) == 4 * (EMBED + NORMS + ATTENTION + ROUTER + LM_HEAD) + expert_bytes
    block = quantized.layers[0].mlp
    assert groups["experts"] == block.w_gate_up.get_value().nbytes + block.w_down.get_value().nbytes


def test_per_expert_group_sizes_count_each_expert_s_scales_once():
    quantized = apply_plan(tiny_moe(), {"layers/0/mlp/w_down": {"bits": 4, "group_size": (96, 48, 24, 96),
                                                                "symmetric": False}})
    # w_down: codes [4, 48, 64] + bf16 scales and zero points of 1 + 2 + 4 + 1 rows of 64; w_gate_up stays float.
    expert_bytes = 4 * 4 * 64 * 192 + 4 * 48 * 64 + 2 * 2 * (1 + 2 + 4 + 1) * 64
    assert bytes_by_group(quantized)["experts"] == expert_bytes
    assert param_bytes(quantized) == 4 * (EMBED + NORMS + ATTENTION + ROUTER + LM_HEAD) + expert_bytes


def test_abstract_models_count_the_same_bytes_without_any_buffer():
    config = jaxmoe.get_preset("tiny-moe")
    abstract = nnx.eval_shape(lambda: quantize(jaxmoe.PhimoeForCausalLM(config, param_dtype=jnp.bfloat16,
                                                                        rngs=nnx.Rngs(0)),
                                               bits=2, group_size=None, target="linear"))
    concrete = quantize(jaxmoe.PhimoeForCausalLM(config, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), bits=2,
                        group_size=None, target="linear")
    assert bytes_by_group(abstract) == bytes_by_group(concrete)


@pytest.mark.slow  # 31 s: the default tier's 8-minute budget
def test_phi35_moe_with_low_bit_experts_meets_the_moqe_memory_targets():
    """Acceptance (issue 7): int4 experts with group 64 and bf16 scales <= 0.30x, int2 <= 0.21x the bf16 model."""
    config = jaxmoe.get_preset("phi3.5-moe")

    def total(bits=None):
        def build():
            model = jaxmoe.PhimoeForCausalLM(config, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
            return model if bits is None else quantize(model, bits=bits, group_size=64, target="experts")
        return param_bytes(nnx.eval_shape(build))

    d, f, e, vocab, layers = 4096, 6400, 16, 32064, 32
    per_layer = (d * 6144 + 6144 + d * d + d  # qkv (32 + 2 x 8 heads of 128) and o_proj, with biases
                 + 4 * d + d * e + e * (d * 2 * f + f * d))  # two LayerNorms, router, experts
    bf16 = total()
    assert bf16 == 2 * (layers * per_layer + vocab * d + d * vocab + vocab + 2 * d)  # 41.9B parameters
    assert total(4) <= 0.30 * bf16
    assert total(2) <= 0.21 * bf16
