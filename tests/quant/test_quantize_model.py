"""jaxmoe.quantize on whole models: weights against a NumPy quantizer, logits against the dequantized twin, what
each target and rule selects, that the input model is untouched, and every bad input's message. fp32 on CPU."""

import numpy as np
import pytest
from flax import nnx

import jaxmoe
from jaxmoe.quant import QuantizedLinear, QuantizedParam, dequantize, quantization_report, quantize

# The quantized forward and its twin (the same dequantized weights through the float code paths) differ only by
# fp32 rounding: at most this times the largest |logit|.
TWIN_RTOL = 1e-5

MOE_LINEARS = {"layers/0/self_attn/qkv_proj", "layers/0/self_attn/o_proj", "lm_head"}
EXPERTS = {"layers/0/mlp/w_gate_up", "layers/0/mlp/w_down"}
DENSE_LINEARS = {"layers/0/self_attn/qkv_proj", "layers/0/self_attn/o_proj", "layers/0/mlp/gate_up_proj",
                 "layers/0/mlp/down_proj"}


def float_weight(model, path):
    """The float [g, k, n] weight at a matrix path (a linear kernel gets g = 1)."""
    node = model
    for key in path.split("/"):
        node = node[int(key)] if key.isdigit() else getattr(node, key)
    return np.asarray(node.kernel.get_value())[None] if isinstance(node, nnx.Linear) else np.asarray(node.get_value())


def assert_twin_equal(actual, expected):
    err, scale = np.abs(np.asarray(actual) - np.asarray(expected)).max(), np.abs(np.asarray(expected)).max()
    assert err <= TWIN_RTOL * scale, f"max |diff| {err:.3g} > {TWIN_RTOL} x max |logit| {scale:.3g}"


@pytest.mark.parametrize("bits,group_size,symmetric", [
    (8, None, True), (4, 32, True), (4, 16, False), (3, None, False), (3, 32, True), (2, 32, True), (2, 8, False)])
def test_every_quantized_matrix_equals_the_numpy_quantizer(tiny_model, np_dequantize, bits, group_size, symmetric):
    model = tiny_model("tiny-moe")
    quantized = quantize(model, bits=bits, group_size=group_size, target="linear", symmetric=symmetric)
    report = quantization_report(quantized)
    assert {m.path for m in report} == MOE_LINEARS | EXPERTS
    twin = dequantize(quantized)
    for matrix in report:
        expected = np_dequantize(float_weight(model, matrix.path), bits, group_size, symmetric)
        np.testing.assert_array_equal(float_weight(twin, matrix.path), expected, err_msg=matrix.path)
        assert (matrix.bits, matrix.symmetric) == (bits, symmetric)
        assert matrix.group_size == (matrix.shape[1] if group_size is None else group_size)


@pytest.mark.parametrize("preset,bits,group_size,symmetric", [
    ("tiny-moe", 4, 32, True), ("tiny-moe", 2, None, False), ("tiny", 3, 16, True), ("tiny", 8, None, False)])
def test_quantized_logits_equal_the_dequantized_twin_run_in_fp32(tiny_model, forward, ids, preset, bits, group_size,
                                                                 symmetric):
    # The weight-only expert path: CPU's default for a few tokens, "decode_int8", also rounds activations (to within
    # 1e-4: tests/quant/test_int8_decode.py).
    model = tiny_model(preset, expert_implementation="decode")
    quantized = quantize(model, bits=bits, group_size=group_size, target="linear", symmetric=symmetric)
    twin = dequantize(quantized)
    assert not quantization_report(twin)
    assert_twin_equal(forward(quantized, ids), forward(twin, ids))
    # Quantization did something: the float model's logits differ by far more than the twin's.
    assert np.abs(np.asarray(forward(model, ids)) - np.asarray(forward(quantized, ids))).max() > 1e-3


def test_experts_target_quantizes_only_the_experts_and_leaves_attention_float(tiny_model):
    model = tiny_model("tiny-moe")
    quantized = quantize(model, bits=4, group_size=32, target="experts")
    assert {m.path for m in quantization_report(quantized)} == EXPERTS
    block = quantized.layers[0].mlp
    assert isinstance(block.w_gate_up, QuantizedParam) and isinstance(block.w_down, QuantizedParam)
    for path in MOE_LINEARS:
        np.testing.assert_array_equal(float_weight(quantized, path), float_weight(model, path))
    attention = quantized.layers[0].self_attn
    assert type(attention.qkv_proj) is nnx.Linear and type(attention.o_proj) is nnx.Linear


def test_linear_target_quantizes_every_linear_layer_but_embeddings_and_router(tiny_model):
    moe = quantize(tiny_model("tiny-moe"), bits=8, group_size=None, target="linear")
    assert {m.path for m in quantization_report(moe)} == MOE_LINEARS | EXPERTS
    assert type(moe.layers[0].mlp.router) is nnx.Linear and type(moe.embed_tokens) is nnx.Embed
    assert isinstance(moe.lm_head, QuantizedLinear) and moe.lm_head.bias is not None
    dense = quantize(tiny_model("tiny"), bits=8, group_size=None, target="linear")  # tied: no lm_head
    assert {m.path for m in quantization_report(dense)} == DENSE_LINEARS


def test_rules_give_mixed_precision_and_express_dense_ffn_only(tiny_model):
    model = tiny_model("tiny")
    ffn_only = quantize(model, bits=4, group_size=32, target="linear",
                        rules=[(r"mlp/(gate_up|down)_proj", {}), (r".", {"bits": None})])
    assert {m.path for m in quantization_report(ffn_only)} == {"layers/0/mlp/gate_up_proj", "layers/0/mlp/down_proj"}
    mixed = quantize(model, bits=4, group_size=32, target="linear",
                     rules=[(r"down_proj", {"bits": 8, "group_size": None}), (r"self_attn", {"symmetric": False})])
    by_path = {m.path: m for m in quantization_report(mixed)}
    assert (by_path["layers/0/mlp/down_proj"].bits, by_path["layers/0/mlp/down_proj"].group_size) == (8, 128)
    assert not by_path["layers/0/self_attn/o_proj"].symmetric and by_path["layers/0/mlp/gate_up_proj"].symmetric
    assert by_path["layers/0/mlp/gate_up_proj"].bits == 4


def test_the_input_model_is_left_unchanged(tiny_model, forward, ids):
    model = tiny_model("tiny-moe")
    before = jaxmoe_params(model)
    logits = np.asarray(forward(model, ids))
    quantize(model, bits=2, group_size=32, target="linear")
    assert not quantization_report(model) and type(model.lm_head) is nnx.Linear
    after = jaxmoe_params(model)
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    np.testing.assert_array_equal(forward(model, ids), logits)


def jaxmoe_params(model):
    return {"/".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.iter_graph(model)
            if isinstance(v, nnx.Param)}


def test_quantized_parameters_are_not_nnx_params(tiny_model):
    quantized = quantize(tiny_model("tiny-moe"), bits=4, group_size=32, target="experts")
    params = nnx.state(quantized, nnx.Param).flat_state()
    assert not any(path[-1] in ("w_gate_up", "w_down") for path, _ in params)
    assert len(nnx.state(quantized, QuantizedParam).flat_state()) == 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=5), r"bits=5; expected one of \[8, 4, 3, 2\]"),
    (dict(bits=1), r"bits=1; expected one of"),
    (dict(group_size=64), r"group_size=64 does not divide the input dimension k=96 of 'layers/0/mlp/w_down'.*"
                          r"\[8, 16, 24, 32, 48, 96\]"),
    (dict(group_size=0), r"group_size=0; expected a positive int"),
    (dict(group_size="coarse"), r"group_size='coarse'"),
    (dict(target="mlp"), r"target='mlp'; expected one of \['experts', 'linear'\]"),
    (dict(rules=[(r"w_dwn", {"bits": 8})]), r"\['w_dwn'\] match none of the 2 matrices.*layers/0/mlp/w_gate_up"),
    (dict(rules=[(r"w_down", {"bitz": 8})]), r"rule 0 \('w_down'\) has settings .*bitz"),
    (dict(rules=[(r"w_down", {"bits": 6})]), r"bits=6 in rule 0 \('w_down'\)"),
    (dict(rules=[(r".", {"bits": None})]), r"nothing to quantize"),
])
def test_bad_arguments_raise_value_errors_naming_the_value(tiny_model, kwargs, match):
    args = dict(bits=4, group_size=32, target="experts") | kwargs
    with pytest.raises(ValueError, match=match):
        quantize(tiny_model("tiny-moe"), **args)


def test_experts_target_on_a_dense_model_says_which_models_have_experts(tiny_model):
    with pytest.raises(ValueError, match=r"target='experts' matches no parameter: this Phi3ForCausalLM has no MoE "
                                         r"expert weights.*phimoe.*tiny-moe.*target='linear'"):
        quantize(tiny_model("tiny"), bits=4, group_size=32, target="experts")


def test_quantizing_a_quantized_model_is_refused(tiny_model):
    once = quantize(tiny_model("tiny-moe"), bits=4, group_size=32, target="experts")
    with pytest.raises(ValueError, match=r"already quantized \(2 matrices, e\.g\. 'layers/0/mlp/w_down' at 4 bits"):
        quantize(once, bits=2, group_size=32, target="linear")
    assert quantization_report(quantize(dequantize(once), bits=2, group_size=32, target="experts"))


def test_quantize_traces_so_a_quantized_model_can_be_sized_without_weights():
    config = jaxmoe.get_preset("tiny-moe")
    abstract = nnx.eval_shape(lambda: quantize(jaxmoe.PhimoeForCausalLM(config, rngs=nnx.Rngs(0)), bits=4,
                                               group_size=32, target="experts"))
    concrete = quantize(jaxmoe.PhimoeForCausalLM(config, rngs=nnx.Rngs(0)), bits=4, group_size=32, target="experts")
    assert jaxmoe.param_bytes(abstract) == jaxmoe.param_bytes(concrete)
    with pytest.raises(ValueError, match=r"'adaptive' for 'layers/0/mlp/w_gate_up' needs the weight's values"):
        nnx.eval_shape(lambda: quantize(jaxmoe.PhimoeForCausalLM(config, rngs=nnx.Rngs(0)), bits=4,
                                        group_size="adaptive", target="experts"))
