"""group_size="adaptive" (FineQuant): the candidates, the range-collapse test against a NumPy recomputation, the
choice logged and recorded per matrix and per expert, and a user-supplied test."""

import logging

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from pallas_kernels import MixedQuantizedWeight, QuantizedWeight

from jaxmoe.moe import layer
from jaxmoe.quant import AdaptiveGroupSize, RangeCollapse, dequantize, quantization_report, quantize


def numpy_collapsed_fraction(w, w_hat, rows):
    g, k, n = w.shape
    pieces, pieces_hat = w.reshape(g, k // rows, rows, n), w_hat.reshape(g, k // rows, rows, n)
    before = pieces.max(axis=2) - pieces.min(axis=2)
    after = pieces_hat.max(axis=2) - pieces_hat.min(axis=2)
    return float(np.mean(after < 0.5 * before))


def numpy_choice(w, bits, symmetric, candidates, np_dequantize):
    """The adaptive rule recomputed with the NumPy quantizer: the first candidate with <= 0.1% collapsed pieces."""
    for size in candidates[:-1]:
        if numpy_collapsed_fraction(w, np_dequantize(w, bits, size, symmetric), candidates[-1]) <= 0.001:
            return size
    return candidates[-1]


def banded(rng, k, n, loud_rows, quiet=0.02):
    """[1, k, n]: rows in bands of `loud_rows`, alternating Gaussian sigma 1 and `quiet`. A group spanning a loud
    and a quiet band rounds the quiet one to zero at 4 bits (it collapses); a group inside one band does not."""
    sigma = np.where((np.arange(k) // loud_rows) % 2 == 0, 1.0, quiet)[:, None]
    return (rng.normal(size=(1, k, n)) * sigma).astype(np.float32)


@pytest.mark.parametrize("k,min_group_size,expected", [
    (4096, 64, [4096, 2048, 1024, 512, 256, 128, 64]), (96, 16, [96, 48, 24]), (100, 64, [100]), (64, 64, [64])])
def test_candidates_halve_from_per_channel_down_to_the_floor(k, min_group_size, expected):
    assert AdaptiveGroupSize(min_group_size=min_group_size).candidates(k) == expected


@pytest.mark.parametrize("loud_rows,bits,symmetric", [(32, 4, True), (64, 4, False), (16, 3, True)])
def test_adaptive_picks_the_size_the_numpy_recomputation_picks_and_logs_it(rng, tiny_model, np_dequantize, caplog,
                                                                           loud_rows, bits, symmetric):
    model = tiny_model("tiny")  # down_proj kernel [128, 64]
    kernel = banded(rng, 128, 64, loud_rows)
    model.layers[0].mlp.down_proj.kernel[...] = kernel[0]
    adaptive = AdaptiveGroupSize(min_group_size=16)
    expected = numpy_choice(kernel, bits, symmetric, adaptive.candidates(128), np_dequantize)
    assert expected == loud_rows  # the bands make the choice non-trivial: neither per-channel nor the floor
    with caplog.at_level(logging.INFO, logger="jaxmoe.quant"):
        quantized = quantize(model, bits=bits, group_size=adaptive, target="linear", symmetric=symmetric,
                             rules=[(r"down_proj", {}), (r".", {"bits": None})])
    [matrix] = quantization_report(quantized)
    assert (matrix.path, matrix.group_size) == ("layers/0/mlp/down_proj", expected)
    logged = [r.getMessage() for r in caplog.records if "adaptive group size" in r.getMessage()]
    assert len(logged) == 1 and f"layers/0/mlp/down_proj [1, 128, 64]: adaptive group size {expected}" in logged[0]


def test_gaussian_weights_keep_per_channel_and_the_string_adaptive_uses_a_floor_of_64(rng, tiny_model, caplog):
    model = tiny_model("tiny")  # gate_up_proj [64, 256], down_proj [128, 64]: Gaussian, no collapse at 4 bits
    with caplog.at_level(logging.INFO, logger="jaxmoe.quant"):
        quantized = quantize(model, bits=4, group_size="adaptive", target="linear")
    sizes = {m.path: m.group_size for m in quantization_report(quantized)}
    assert sizes["layers/0/mlp/down_proj"] == 128 and sizes["layers/0/mlp/gate_up_proj"] == 64
    assert sum("adaptive group size" in r.getMessage() for r in caplog.records) == len(sizes)


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_each_expert_gets_its_own_size_so_an_outlier_makes_only_its_expert_finer(tiny_model, np_dequantize, forward,
                                                                                  ids, caplog, monkeypatch):

    model = tiny_model("tiny-moe")  # w_gate_up [4, 64, 192], w_down [4, 96, 64]: Gaussian, sigma 0.2
    w_down = np.asarray(model.layers[0].mlp.w_down.get_value()).copy()
    w_down[2, 10, 5] = 10.0  # one outlier in expert 2, column 5: the rest of that column rounds to zero
    model.layers[0].mlp.w_down[...] = w_down
    adaptive = AdaptiveGroupSize(min_group_size=16)
    expected = tuple(numpy_choice(w_down[i:i + 1], 4, True, adaptive.candidates(96), np_dequantize) for i in range(4))
    assert expected == (96, 96, 24, 96)  # the outlier's expert the finest candidate, the others per-channel
    with caplog.at_level(logging.INFO, logger="jaxmoe.quant"):
        quantized = quantize(model, bits=4, group_size=adaptive, target="experts")
    sizes = {m.path: m.group_size for m in quantization_report(quantized)}
    assert sizes == {"layers/0/mlp/w_gate_up": 64, "layers/0/mlp/w_down": expected}  # one int when all agree
    logged = [r.getMessage() for r in caplog.records if "adaptive group size" in r.getMessage()]
    assert any("layers/0/mlp/w_down [4, 96, 64]: adaptive group sizes [96, 96, 24, 96] (per expert)" in line
               for line in logged)
    stored = quantized.layers[0].mlp.w_down.get_value()
    assert isinstance(stored, MixedQuantizedWeight)
    # Each expert is what the NumPy quantizer makes of it alone at its size, and its scales are stored once.
    dequantized = np.asarray(stored.dequantize(jnp.float32))
    for i, size in enumerate(expected):
        np.testing.assert_array_equal(dequantized[i:i + 1], np_dequantize(w_down[i:i + 1], 4, size, True))
    assert stored.nbytes == 4 * 48 * 64 + (1 + 1 + 4 + 1) * 64 * 2  # 4-bit codes, bf16 scale rows [7, 64]
    # The MoE block hands moe_ffn the packed uniform form (not a dequantized float stack), and the logits are the
    # dequantized twin's.
    passed_to_ffn, original = [], layer.moe_ffn

    def moe_ffn(x, weights, experts, w_gate_up, w_down, **kwargs):
        passed_to_ffn.extend([type(w_gate_up), type(w_down)])
        return original(x, weights, experts, w_gate_up, w_down, **kwargs)

    monkeypatch.setattr(layer, "moe_ffn", moe_ffn)
    actual = np.asarray(nnx.jit(lambda m, x: m(x).logits)(quantized, ids))
    assert passed_to_ffn == [QuantizedWeight, QuantizedWeight]
    twin = np.asarray(forward(dequantize(quantized), ids))
    # 20 tokens x top-2 take CPU's "decode_int8" expert path, whose activations go in as two int8 limbs (about
    # 16-bit: tests/quant/test_int8_decode.py); the weight-only paths match to 1e-5.
    assert np.abs(actual - twin).max() <= 2e-4 * np.abs(twin).max()


@pytest.mark.parametrize("verdict,expected", [(True, 128), (False, 16)])
def test_the_quality_test_is_pluggable(tiny_model, verdict, expected):
    seen = []

    def test(w, w_hat, rows):
        seen.append((w.shape, w_hat.shape, rows))
        return verdict, 0.0

    quantized = quantize(tiny_model("tiny"), bits=4, group_size=AdaptiveGroupSize(test=test, min_group_size=16),
                         target="linear", rules=[(r"down_proj", {}), (r".", {"bits": None})])
    assert quantization_report(quantized)[0].group_size == expected
    assert seen[0] == ((1, 128, 64), (1, 128, 64), 16) and len(seen) == (1 if verdict else 3)


@pytest.mark.parametrize("make,match", [
    (lambda: RangeCollapse(shrink=0.8), r"shrink=0.8"),
    (lambda: RangeCollapse(max_fraction=1.5), r"max_fraction=1.5"),
    (lambda: AdaptiveGroupSize(min_group_size=0), r"min_group_size=0"),
    (lambda: AdaptiveGroupSize(test="collapse"), r"test='collapse'"),
])
def test_bad_adaptive_settings_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()

