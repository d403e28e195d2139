"""jaxmoe.mt.eval: scores equal the sacrebleu command line's on real test data, and batched translation equals
one-sentence-at-a-time greedy decoding.

The sacrebleu CLI (run as a subprocess) is the oracle for scoring; `jaxmoe.generate` on one unpadded prompt at
a time is the oracle for `translate`.
"""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import tokenizers
from flax import nnx
from sacrebleu.metrics import BLEU
from sacrebleu.utils import smart_open

import jaxmoe
from jaxmoe.mt import eval as eval_module
from jaxmoe.mt.eval import read_lines, score, score_files, translate, translate_file

ALMA = "/work/shared/data/alma"
PAIRS = 200


def alma_pairs(path, src_lang, tgt_lang, n=PAIRS):
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)[:n]
    return [r["translation"][src_lang] for r in rows], [r["translation"][tgt_lang] for r in rows]


def perturb_words(text, i):
    """Drops every fourth word from the second on, and swaps the first two words of every third segment."""
    words = [w for j, w in enumerate(text.split()) if j % 4 != 1]
    if i % 3 == 0 and len(words) > 1:
        words[0], words[1] = words[1], words[0]
    return " ".join(words)


def perturb_chars(text, i):
    """Drops every fifth character from the third on, and reverses the first three characters of every third."""
    chars = [c for j, c in enumerate(text) if j % 5 != 2]
    if i % 3 == 0:
        chars[:3] = chars[:3][::-1]
    return "".join(chars)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def sacrebleu_cli(ref, hyp, lang_pair):
    """{metric name: (score, signature)} from `python -m sacrebleu` with four decimals, as JSON."""
    result = subprocess.run([sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyp), "-m", "bleu", "chrf",
                             "-l", lang_pair, "-w", "4", "--format", "json"],
                            capture_output=True, text=True, check=True)
    return {m["name"]: (m["score"], m["signature"]) for m in json.loads(result.stdout)}


@pytest.mark.parametrize("file,src_lang,tgt_lang,perturb", [
    (f"{ALMA}/deen/test.de-en.json", "de", "en", perturb_words),
    (f"{ALMA}/zhen/test.en-zh.json", "en", "zh", perturb_chars),
])
def test_score_files_matches_sacrebleu_cli(tmp_path, file, src_lang, tgt_lang, perturb):
    sources, references = alma_pairs(file, src_lang, tgt_lang)
    hypotheses = [perturb(ref, i) for i, ref in enumerate(references)]
    src = write_lines(tmp_path / "src.txt", sources)
    hyp = write_lines(tmp_path / "hyp.txt", hypotheses)
    ref = write_lines(tmp_path / "ref.txt", references)
    lang_pair = f"{src_lang}-{tgt_lang}"

    got = score_files(src, hyp, ref, lang_pair=lang_pair)
    cli = sacrebleu_cli(ref, hyp, lang_pair)

    assert json.loads(json.dumps(got)) == got
    assert got["segments"] == PAIRS and got["lang_pair"] == lang_pair
    assert 5 < got["bleu"] < 95 and 5 < got["chrf"] < 95  # neither trivial extreme
    assert abs(got["bleu"] - cli["BLEU"][0]) <= 0.5e-4 + 1e-9
    assert abs(got["chrf"] - cli["chrF2"][0]) <= 0.5e-4 + 1e-9
    assert got["bleu_signature"] == cli["BLEU"][1]
    assert got["chrf_signature"] == cli["chrF2"][1]


def test_chinese_target_uses_zh_tokenizer_which_changes_bleu(tmp_path):
    _, references = alma_pairs(f"{ALMA}/zhen/test.en-zh.json", "en", "zh")
    hypotheses = [perturb_chars(ref, i) for i, ref in enumerate(references)]
    got = score(hypotheses, references, lang_pair="en-zh")
    assert got["bleu_tokenizer"] == "zh" and "tok:zh" in got["bleu_signature"]
    with_13a = BLEU(tokenize="13a").corpus_score(hypotheses, [references]).score
    assert abs(got["bleu"] - with_13a) > 1.0  # so scoring with the default tokenizer would fail the CLI test
    assert score(hypotheses, references)["bleu"] == pytest.approx(with_13a)  # no lang pair: sacrebleu's 13a


def test_read_lines_splits_and_strips_lines_as_the_sacrebleu_cli_does(tmp_path):
    path = tmp_path / "odd.txt"
    path.write_bytes("a b\r\n  c d \t\nx\u2028y\x0cz\n\nlast  ".encode())
    expected = [line.rstrip() for line in smart_open(str(path))]
    assert read_lines(path, what="--hyp file") == expected == ["a b", "  c d", "x\u2028y\x0cz", "", "last"]


def test_misaligned_files_name_each_file_and_its_line_count(tmp_path):
    src = write_lines(tmp_path / "src.txt", ["a", "b", "c"])
    hyp = write_lines(tmp_path / "hyp.txt", ["a", "b"])
    ref = write_lines(tmp_path / "ref.txt", ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"--src file .*src\.txt' has 3 lines, --hyp file .*hyp\.txt' has 2 lines, "
                                         r"--ref file .*ref\.txt' has 3 lines"):
        score_files(src, hyp, ref)
    with pytest.raises(ValueError, match=r"2 hypotheses but 3 references"):
        score(["a", "b"], ["a", "b", "c"])


def test_source_file_is_optional(tmp_path):
    ref = write_lines(tmp_path / "ref.txt", ["the cat sat on the mat", "a dog ran in the park"])
    assert score_files(None, ref, ref)["bleu"] == pytest.approx(100.0)


def test_missing_file_is_named(tmp_path):
    ref = write_lines(tmp_path / "ref.txt", ["a"])
    with pytest.raises(FileNotFoundError, match=r"--hyp file .*nope\.txt' does not exist"):
        score_files(None, tmp_path / "nope.txt", ref)


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "hyp.txt").write_text("")
    ref = write_lines(tmp_path / "ref.txt", ["a"])
    with pytest.raises(ValueError, match=r"--hyp file .*hyp\.txt' is empty"):
        score_files(None, tmp_path / "hyp.txt", ref)


@pytest.mark.parametrize("lang_pair", ["de", "deen", "de_en", "de-en-fr", "DE-EN", "", 3])
def test_bad_lang_pair_says_the_expected_form(lang_pair):
    with pytest.raises(ValueError, match=r"expected the form xx-yy"):
        score(["a b"], ["a b"], lang_pair=lang_pair)


# A word-level tokenizer that prepends <bos>, and a tiny random Phi-3 over its vocabulary.
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
WORDS = SPECIAL + ["<to>"] + [f"w{i}" for i in range(40)]
# Short prompts (5 tokens) and long ones (19, wider than 16) interleaved, so that sorting by length reorders them
# and batches of 3 give two prompt widths (16 and 32) and a last batch filled up with repeated rows.
SHORT = ["w1 w2 w3", "w9 w30 w5", "w22 w23 w12", "w11 w33 w17"]
LONG = [" ".join(f"w{(7 * i + k) % 40}" for k in range(17)) for i in range(3)]
SOURCES = [SHORT[0], LONG[0], SHORT[1], SHORT[2], LONG[1], SHORT[3], LONG[2]]
MAX_NEW = 10


def to_prompt(source):
    return f"{source} <to>"


@pytest.fixture(scope="module")
def tiny():
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    raw.add_special_tokens(SPECIAL)
    raw.post_processor = tokenizers.processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tokenizer = jaxmoe.Tokenizer(raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    # A second config EOS id (w7) that the model emits, so rows end at either id. No LongRoPE: its switch to the
    # long factors follows the padded buffer width, which padding moves.
    config = jaxmoe.get_preset("tiny").replace(vocab_size=len(WORDS), longrope=None, bos_token_id=1,
                                               eos_token_id=(2, WORDS.index("w7")), pad_token_id=0)
    model = jaxmoe.Phi3ForCausalLM(config, rngs=nnx.Rngs(2))
    # Larger weights than the default init so that greedy decoding visits many different tokens.
    nnx.update(model, jax.tree.map(lambda p: p * 10.0 if p.ndim > 1 else p, nnx.state(model, nnx.Param)))
    return model, tokenizer


def one_at_a_time(model, tokenizer, source):
    """Greedy decoding of one unpadded prompt, cut at the first EOS id (tokenizer's or config's)."""
    ids = np.asarray(tokenizer.encode(to_prompt(source)), np.int32)[None]
    eos = [tokenizer.eos_token_id, *model.config.eos_token_id]
    new = np.asarray(jaxmoe.generate(model, ids, max_new_tokens=MAX_NEW, eos_token_id=eos))[0, ids.shape[1]:]
    ends = np.flatnonzero(np.isin(new, eos))
    return tokenizer.decode(new[:ends[0]] if ends.size else new).strip(), bool(ends.size)


def test_translate_equals_one_sentence_at_a_time_greedy_decoding_in_input_order(tiny):
    model, tokenizer = tiny
    expected, stopped = zip(*(one_at_a_time(model, tokenizer, s) for s in SOURCES))
    got = translate(model, tokenizer, SOURCES, prompt=to_prompt, max_new_tokens=MAX_NEW, batch_size=3)
    assert got == list(expected)
    assert len(set(expected)) == len(SOURCES)  # distinct outputs, so a wrong order would show
    assert any(stopped) and not all(stopped)  # EOS cuts some rows, others run to max_new_tokens


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_translate_with_batch_pruning_gives_the_same_translations(tiny):
    model, tokenizer = tiny
    kwargs = dict(prompt=to_prompt, max_new_tokens=MAX_NEW, batch_size=4)
    assert (translate(model, tokenizer, SOURCES, prune_every=2, **kwargs)
            == translate(model, tokenizer, SOURCES, **kwargs))


def test_translate_file_writes_one_line_per_source(tiny, tmp_path):
    model, tokenizer = tiny
    src = write_lines(tmp_path / "src.txt", SOURCES)
    out = tmp_path / "hyp.txt"
    got = translate_file(model, tokenizer, src, out, prompt=to_prompt, max_new_tokens=MAX_NEW, batch_size=3)
    assert got == translate(model, tokenizer, SOURCES, prompt=to_prompt, max_new_tokens=MAX_NEW, batch_size=3)
    assert out.read_text(encoding="utf-8").split("\n") == [*got, ""]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hyp.txt", "src.txt"]  # no temporary file left


def test_a_killed_translate_file_resumes_and_writes_the_same_file(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    src = write_lines(tmp_path / "src.txt", SOURCES)
    kwargs = dict(prompt=to_prompt, max_new_tokens=MAX_NEW, batch_size=2)
    expected = translate_file(model, tokenizer, src, tmp_path / "whole.txt", **kwargs)
    calls, real_generate = [], eval_module.generate

    def dies_on_the_third_batch(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill between batches
        return real_generate(*args, **kw)

    monkeypatch.setattr(eval_module, "generate", dies_on_the_third_batch)
    out = tmp_path / "hyp.txt"
    with pytest.raises(KeyboardInterrupt):
        translate_file(model, tokenizer, src, out, **kwargs)
    progress = tmp_path / "hyp.txt.progress.jsonl"
    assert not out.exists() and len(progress.read_text().splitlines()) == 1 + 4  # header + two batches of two
    calls.clear()
    calls.extend([1, 1, 1])  # no more deaths
    assert translate_file(model, tokenizer, src, out, **kwargs) == expected
    assert len(calls) == 3 + 2  # only the 3 missing sources were translated, in 2 batches
    assert out.read_text() == (tmp_path / "whole.txt").read_text() and not progress.exists()
    # A progress file of other settings is not mixed in.
    progress.write_text(json.dumps({"settings": {"max_new_tokens": 3}}) + "\n")
    with pytest.raises(ValueError, match="belongs to another run"):
        translate_file(model, tokenizer, src, out, **kwargs)


def test_translate_checks_its_arguments(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"batch_size=0; expected an integer >= 1"):
        translate(model, tokenizer, SOURCES, prompt=to_prompt, max_new_tokens=4, batch_size=0)
    with pytest.raises(ValueError, match=r"max_new_tokens=0; expected an integer >= 1"):
        translate(model, tokenizer, SOURCES, prompt=to_prompt, max_new_tokens=0)
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"source 1 becomes a prompt of 19 tokens, which with max_new_tokens={limit} "
                                         rf"needs {limit + 19} positions, more than the model's "
                                         rf"max_position_embeddings={limit}"):
        translate(model, tokenizer, SOURCES, prompt=to_prompt, max_new_tokens=limit)
