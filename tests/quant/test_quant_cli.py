"""`jaxmoe quantize` and `jaxmoe convert` through the command-line entry point: flags, the bytes report, the
folders they write, and one-line errors with exit code 2."""

import numpy as np
import pytest
from flax import nnx

import jaxmoe
from jaxmoe.cli import main
from jaxmoe.quant import bytes_by_group, load_quantized, quantization_report, quantize


@pytest.fixture
def hf_folder(tmp_path, tiny_model):
    """A one-layer tiny-moe saved as a Hugging Face folder, with a tokenizer file beside it."""
    folder = tmp_path / "hf"
    jaxmoe.save_hf(tiny_model("tiny-moe"), folder)
    (folder / "tokenizer.json").write_text('{"stand-in": "tokenizer"}')
    return folder


@pytest.mark.parametrize("argv,flags", [
    (["quantize", "--help"], ["--model", "--out", "--bits", "--group-size", "per-channel", "adaptive", "--target",
                              "--asymmetric", "--dtype", "--format"]),
    (["convert", "--help"], ["--src", "--out", "--to", "--dtype"]),
    (["--help"], ["quantize", "convert"]),
])
def test_help_documents_every_flag(argv, flags, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    for flag in flags:
        assert flag in out


def test_quantize_prints_bytes_per_group_and_writes_a_loadable_folder(hf_folder, tmp_path, forward, ids, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(hf_folder), "--out", str(out), "--bits", "4", "--group-size", "32",
                 "--target", "experts"]) == 0
    printed = capsys.readouterr().out
    source = jaxmoe.load_hf(hf_folder)
    expected = quantize(source, bits=4, group_size=32, target="experts")
    loaded = load_quantized(out)
    np.testing.assert_array_equal(forward(loaded, ids), forward(expected, ids))
    before, after = bytes_by_group(source), bytes_by_group(loaded)
    rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines()[1:] if line.split()[0] in before}
    assert set(rows) == set(before)
    for group in before:
        assert rows[group][:2] == [f"{before[group]:,}", f"{after[group]:,}"]
    assert float(rows["experts"][2]) == pytest.approx(after["experts"] / before["experts"], abs=1e-3)
    assert after["experts"] < 0.2 * before["experts"]  # 4-bit codes + bf16 scales against float32
    assert rows["attention"][0] == rows["attention"][1]  # experts only: attention untouched
    assert (out / "tokenizer.json").read_text() == (hf_folder / "tokenizer.json").read_text()


def test_quantize_per_channel_asymmetric_linear_to_orbax(hf_folder, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(hf_folder), "--out", str(out), "--bits", "2", "--group-size",
                 "per-channel", "--target", "linear", "--asymmetric", "--format", "orbax"]) == 0
    report = quantization_report(load_quantized(out))
    assert (out / "state").is_dir() and len(report) == 5
    assert all(m.bits == 2 and not m.symmetric and m.group_size == m.shape[1] for m in report)


def test_convert_goes_from_hugging_face_to_orbax_and_back(hf_folder, tmp_path):
    orbax, back = tmp_path / "orbax", tmp_path / "back"
    assert main(["convert", "--src", str(hf_folder), "--out", str(orbax)]) == 0
    assert (orbax / "state").is_dir() and (orbax / "tokenizer.json").is_file()
    assert main(["convert", "--src", str(orbax), "--out", str(back)]) == 0
    original, restored = jaxmoe.load_hf(hf_folder), jaxmoe.load_hf(back)
    assert restored.config == original.config
    for (path, a), (_, b) in zip(sorted_params(original), sorted_params(restored)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=path)
    assert (back / "tokenizer.json").is_file()


def sorted_params(model):
    return sorted((("/".join(map(str, p)), v.get_value()) for p, v in nnx.iter_graph(model)
                   if isinstance(v, nnx.Param)), key=lambda item: item[0])


@pytest.mark.parametrize("extra,message", [
    (["--group-size", "abc", "--target", "experts"], "expected a positive integer, 'per-channel' or 'adaptive'"),
    (["--group-size", "64", "--target", "experts"], "group_size=64 does not divide the input dimension k=96 of "
                                                    "'layers/0/mlp/w_down'"),
    (["--group-size", "32", "--target", "attention"], "invalid choice: 'attention'"),
])
def test_quantize_usage_errors_exit_2_with_one_line(hf_folder, tmp_path, capsys, extra, message):
    argv = ["quantize", "--model", str(hf_folder), "--out", str(tmp_path / "q"), "--bits", "4"] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "q").exists()


def test_experts_target_on_a_dense_checkpoint_and_converting_a_quantized_model_are_refused(tmp_path, tiny_model,
                                                                                           capsys):
    dense = tmp_path / "dense"
    jaxmoe.save_hf(tiny_model("tiny"), dense)
    assert main(["quantize", "--model", str(dense), "--out", str(tmp_path / "q"), "--bits", "4", "--group-size",
                 "32", "--target", "experts"]) == 2
    assert "target='experts' matches no parameter" in capsys.readouterr().err
    assert main(["quantize", "--model", str(dense), "--out", str(tmp_path / "q"), "--bits", "8", "--group-size",
                 "per-channel", "--target", "linear"]) == 0
    capsys.readouterr()
    assert main(["convert", "--src", str(tmp_path / "q"), "--out", str(tmp_path / "hf")]) == 2
    assert "holds a quantized model" in capsys.readouterr().err
    assert main(["convert", "--src", str(dense), "--out", str(tmp_path / "q")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
