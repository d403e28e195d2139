"""The `jaxmoe` command line: help for every command, the demo end to end, generate against a saved model."""

import json
import math
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from flax import nnx

import jaxmoe
from jaxmoe.cli import main

WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away",
         "and", "then", "slept", "in", "sun", "red", "big", "small", "house", "tree", "bird", "sang", "all", "day",
         "night", "moon", "star", "sky"]


@pytest.mark.parametrize("argv, expected", [
    (["--help"], ["demo", "train", "eval-mt", "translate", "generate"]),
    (["demo", "--help"], ["--out", "--steps", "--seed"]),
    (["train", "--help"], ["--config", "KEY=VALUE"]),
    (["eval-mt", "--help"], ["--src", "--hyp", "--ref", "--lang-pair"]),
    (["translate", "--help"], ["--model", "--src", "--out", "--src-lang", "--tgt-lang", "--prompt",
                               "--max-new-tokens", "--batch-size"]),
    (["generate", "--help"], ["--model", "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p",
                              "--chat", "--dtype", "--seed"]),
])
def test_help_documents_every_flag(argv, expected, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: jaxmoe")
    for flag in expected:
        assert flag in out


def test_installed_console_script_runs():
    script = shutil.which("jaxmoe")
    assert script is not None, "the jaxmoe console script is not on PATH; run `pip install -e .`"
    result = subprocess.run([script, "generate", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--max-new-tokens" in result.stdout


@pytest.mark.parametrize("argv, message", [
    ([], "required: COMMAND"),
    (["transmogrify"], "invalid choice"),
    (["generate", "--prompt", "hi"], "required: --model"),
    (["generate", "--model", "x", "--prompt", "hi", "--dtype", "float16"], "invalid choice"),
    (["demo", "--steps", "0"], "expected an integer >= 1"),
    (["train", "optim.stepz=3", "data.train.text=x", "tokenizer.bpe_vocab_size=300"],
     "unknown config key 'optim.stepz'; valid keys in optim: steps"),
    (["train", "--config", "no_such.yaml"], "config file 'no_such.yaml' does not exist"),
    (["eval-mt", "--hyp", "no_such.hyp", "--ref", "no_such.ref"], "no_such.hyp"),
])
def test_usage_errors_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message in err


@pytest.mark.slow  # the real demo: a 20,000-pair corpus, 60 steps of an 8-expert model, 300 test translations
def test_demo_trains_a_moe_translator_and_writes_a_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["demo", "--steps", "60", "--out", str(out), "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "test BLEU untrained -> trained" in printed

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["experts"] == 8
    vocab = jaxmoe.Tokenizer.from_folder(out / "model").vocab_size
    assert summary["valid_loss"] < 0.6 * math.log(vocab)  # it trained: far below a uniform guess
    assert 0.0 <= summary["untrained_test_bleu"] <= summary["test_bleu"] + 1e-9
    for name in ("loss.png", "expert_load.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "test.hyp.txt").read_text().splitlines()) == summary["test_sentences"]

    model = jaxmoe.load_hf(out / "model")
    assert isinstance(model, jaxmoe.PhimoeForCausalLM)
    tokenizer = jaxmoe.Tokenizer.from_folder(out / "model")
    ids = jnp.asarray([tokenizer.encode("English: the king sees a bird\nZentish:")], jnp.int32)
    assert np.isfinite(np.asarray(model(ids).logits)).all()

    assert main(["demo", "--steps", "1", "--out", str(out)]) == 2  # refuses to overwrite the run
    assert "already exists" in capsys.readouterr().err


def test_demo_refuses_an_output_folder_that_is_not_empty(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    assert main(["demo", "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "already exists" in err and str(out) in err
    assert [p.name for p in out.iterdir()] == ["summary.json"]  # nothing written next to the old run


def test_eval_mt_prints_one_json_object(tmp_path, capsys):
    ref = tmp_path / "ref.txt"
    hyp = tmp_path / "hyp.txt"
    ref.write_text("the cat sat on the mat\na dog ran far away\n")
    hyp.write_text("the cat sat on a mat\na dog ran far away\n")
    assert main(["eval-mt", "--hyp", str(hyp), "--ref", str(ref), "--lang-pair", "de-en"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 < result["bleu"] < 100 and 0 < result["chrf"] < 100
    hyp.write_text("only one line\n")
    assert main(["eval-mt", "--hyp", str(hyp), "--ref", str(ref)]) == 2
    assert "has 1 lines" in capsys.readouterr().err


def test_translate_writes_one_line_per_source(checkpoint, tmp_path, capsys):
    src = tmp_path / "src.txt"
    src.write_text("the cat sat\na dog ran far\nthe sun\n")
    out = tmp_path / "out.txt"
    assert main(["translate", "--model", str(checkpoint), "--src", str(src), "--out", str(out), "--src-lang", "de",
                 "--tgt-lang", "en", "--prompt", "{src} and", "--max-new-tokens", "4", "--batch-size", "2"]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and all(set(line.split()) <= set(WORDS) for line in lines)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Phi-3 model saved with save_hf, plus a word-level tokenizer.json over its vocabulary."""
    folder = tmp_path_factory.mktemp("cli_model") / "model"
    config = jaxmoe.get_preset("tiny").replace(vocab_size=len(WORDS), bos_token_id=1, eos_token_id=(2,),
                                               pad_token_id=0)
    model = jaxmoe.Phi3ForCausalLM(config, rngs=nnx.Rngs(3))
    # Larger weights than the default init so that greedy decoding visits many different tokens.
    nnx.update(model, jax.tree.map(lambda p: p * 10.0 if p.ndim > 1 else p, nnx.state(model, nnx.Param)))
    jaxmoe.save_hf(model, folder)
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    raw.add_special_tokens(["<pad>", "<bos>", "<eos>", "<unk>"])
    raw.save(str(folder / "tokenizer.json"))
    chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                     "{% if add_generation_prompt %}then{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>",
                                                              "pad_token": "<pad>", "chat_template": chat_template}))
    return folder


def greedy_reference(folder, prompt, max_new_tokens):
    """Greedy decoding without a cache, one full forward pass per token, stopping at <eos>; decoded text."""
    model = jaxmoe.load_hf(folder)
    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tokenizer.encode(prompt).ids
    width = len(ids) + max_new_tokens
    # One fixed width, right-padded: causal attention keeps the padding out of every real position's logits.
    logits_of = nnx.jit(lambda m, x: m(x).logits)
    new = []
    for _ in range(max_new_tokens):
        seq = ids + new
        padded = jnp.asarray([seq + [0] * (width - len(seq))], jnp.int32)
        token = int(np.argmax(np.asarray(logits_of(model, padded))[0, len(seq) - 1]))
        if token == 2:
            break
        new.append(token)
    return tokenizer.decode(new)


def test_generate_streams_the_greedy_continuation(checkpoint, capsys):
    assert main(["generate", "--model", str(checkpoint), "--prompt", "the cat sat on", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    expected = greedy_reference(checkpoint, "the cat sat on", 8)
    assert len(expected.split()) >= 2  # a non-trivial continuation, or the comparison below proves little
    assert out == expected + "\n"


def test_generate_chat_wraps_the_prompt_in_the_template(checkpoint, capsys):
    assert main(["generate", "--model", str(checkpoint), "--prompt", "a bird", "--chat", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == greedy_reference(checkpoint, "a bird then", 6) + "\n"


def test_generate_samples_with_top_k_and_top_p(checkpoint, capsys):
    argv = ["generate", "--model", str(checkpoint), "--prompt", "a dog", "--max-new-tokens", "6", "--temperature",
            "1.5", "--top-k", "5", "--top-p", "0.9", "--seed", "7"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # the seed fixes the draw
    assert set(first.split()) <= set(WORDS[4:])


def test_generate_bad_model_path_exits_2(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    assert main(["generate", "--model", str(missing), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert str(missing) in err


def test_generate_without_tokenizer_exits_2(checkpoint, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint / name, bare / name)
    assert main(["generate", "--model", str(bare), "--prompt", "the cat"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err


def test_generate_checkpoint_error_exits_2(checkpoint, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(checkpoint / "tokenizer.json", broken / "tokenizer.json")
    assert main(["generate", "--model", str(broken), "--prompt", "the cat"]) == 2
    assert "config.json" in capsys.readouterr().err


