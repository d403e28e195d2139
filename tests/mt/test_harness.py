"""The GPT-MT evaluation harness without a model: prompts (byte for byte against fixtures written from GPT-MT's
template), shot selection, document windows and doc-BLEU, hybrid routing, and scoring a folder of outputs.

Oracles: the fixture prompt files, the sacrebleu command line (subprocess) for BLEU, chrF and doc-BLEU on
documents joined by hand, and the paper's released shot files in ../shared/data/gpt-mt.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sacrebleu.metrics import BLEU

from jaxmoe.cli import main
from jaxmoe.io.tokenizer import Tokenizer
from jaxmoe.mt.documents import read_docids, translate_documents, windows
from jaxmoe.mt.eval import doc_bleu, score_files
from jaxmoe.mt.hybrid import RoundTripChrF, max_routing, threshold_routing
from jaxmoe.mt.prompts import Shot, TranslationPrompt
from jaxmoe.mt.shots import (CharNgramSimilarity, as_document_shot, document_shots, paper_shots, random_shots,
                             read_pool, read_shot_file, similar_shots)
from jaxmoe.mt.suite import (available_pairs, format_table, hybrid_rows, hypothesis_path, load_testset,
                             score_hypothesis_dir, select_shots)

GPT_MT = Path("/work/shared/data/gpt-mt")
FIXTURES = Path(__file__).parent.parent / "fixtures" / "gpt_mt"


def lines_of(path):
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def write_lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --- Prompts --------------------------------------------------------------------------------------------------

def test_gpt_mt_five_shot_prompt_equals_the_fixture_byte_for_byte():
    shots = paper_shots(GPT_MT / "data-shots", "QR", 5, "de-en")
    source = lines_of(GPT_MT / "wmt-testset/deen/test.de-en.de")[0]
    prompt = TranslationPrompt("gpt-mt").render(source, "de", "en", shots)
    assert prompt.encode("utf-8") == (FIXTURES / "qr5.de-en.line0.prompt.txt").read_bytes()


def test_gpt_mt_zero_shot_prompt_equals_the_fixture_byte_for_byte():
    source = lines_of(GPT_MT / "wmt-testset/ende/test.en-de.en")[0]
    assert TranslationPrompt().render(source, "en", "de").encode("utf-8") == \
        (FIXTURES / "zero-shot.en-de.line0.prompt.txt").read_bytes()


def test_alma_user_jinja_and_chat_templates():
    shots = [Shot("Hallo Welt", "Hello world")]
    alma = TranslationPrompt("alma").render("Guten Tag", "de", "en", shots)
    assert alma == ("Translate this from German to English:\nGerman: Hallo Welt\nEnglish: Hello world\n\n"
                    "Translate this from German to English:\nGerman: Guten Tag\nEnglish:")
    user = TranslationPrompt("{src_lang} -> {tgt_lang}: {src} =").render("Guten Tag", "de", "en", shots)
    assert user == "German -> English: Hallo Welt = Hello world\n\nGerman -> English: Guten Tag ="
    jinja = TranslationPrompt("{% for s in shots %}{{ s.source }} => {{ s.target }}\n{% endfor %}"
                              "[{{ src_code }}>{{ tgt_code }}] {{ src }} =>")
    assert jinja.render("Guten Tag", "de", "en", shots) == "Hallo Welt => Hello world\n[de>en] Guten Tag =>"
    import tokenizers
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    chat = Tokenizer(raw, chat_template="{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}"
                                        "{% if add_generation_prompt %}<a>{% endif %}")
    wrapped = TranslationPrompt("gpt-mt", chat=chat)
    assert wrapped.render("Hallo", "de", "en") == "<u>Translate this into 1. English:\n\nHallo\n\n1.</u><a>"
    assert not wrapped.add_special_tokens and TranslationPrompt().add_special_tokens


@pytest.mark.parametrize("template,message", [
    ("Translate {text}", "does not format"),
    ("Translate this", "no {src} placeholder"),
    ("{{ src }", "not valid Jinja"),
])
def test_bad_prompt_templates_are_named(template, message):
    with pytest.raises(ValueError, match=message):
        TranslationPrompt(template)


# --- Shots ----------------------------------------------------------------------------------------------------

def test_released_shot_files_are_read_as_the_paper_left_them():
    qr = paper_shots(GPT_MT / "data-shots", "QR", 5, "de-en")
    raw = json.loads((GPT_MT / "data-shots/QR/5-shot/shots.de-en.json").read_text())
    assert qr == [Shot(r["source"], r["target"]) for r in raw]
    qs = read_shot_file(GPT_MT / "data-shots/QS/5-shot/shots.de-en.json")
    # One set per test line; the paper found fewer than 5 similar pairs for 3 lines (those are used as released).
    assert len(qs) == 1984 and sorted(len(s) for s in qs) == [0] * 3 + [5] * 1981
    with pytest.raises(FileNotFoundError, match="QR files present: .*QR/1-shot/shots.cs-en.json"):
        paper_shots(GPT_MT / "data-shots", "QR", 3, "de-en")
    with pytest.raises(ValueError, match="shot type 'XX' is unknown; expected one of RR, QR, QS, DF, DR"):
        paper_shots(GPT_MT / "data-shots", "XX", 5, "de-en")


POOL = [Shot(f"Der Hund {i} bellt laut.", f"The dog {i} barks loudly.") for i in range(10)] + [
    Shot("Die Katze schläft auf dem Sofa.", "The cat sleeps on the sofa."),
    Shot("Morgen regnet es in Berlin.", "Tomorrow it rains in Berlin."),
    Shot("Die Katze schläft.", "The cat sleeps."),
]


def test_random_shots_are_seeded_distinct_and_k_is_checked():
    first = random_shots(POOL, 5, seed=3)
    assert first == random_shots(POOL, 5, seed=3) and len(set(first)) == 5 and set(first) <= set(POOL)
    assert random_shots(POOL, 5, seed=4) != first
    with pytest.raises(ValueError, match="k=14 shots asked but the pool has only 13"):
        random_shots(POOL, 14)


def test_qs_picks_the_most_similar_sources_and_never_the_test_sentence_itself():
    picked = similar_shots(POOL, ["Die Katze schläft.", "Morgen regnet es in Hamburg."], 2)
    assert picked[0][0] == Shot("Die Katze schläft auf dem Sofa.", "The cat sleeps on the sofa.")
    assert Shot("Die Katze schläft.", "The cat sleeps.") not in picked[0]
    assert picked[1][0] == Shot("Morgen regnet es in Berlin.", "Tomorrow it rains in Berlin.")
    similarity = CharNgramSimilarity().fit([p.source for p in POOL])
    scores = similarity(["Die Katze schläft auf dem Sofa."])
    assert np.isclose(scores[0, 10], 1.0) and scores[0].argmax() == 10


def test_document_shots_df_are_consecutive_in_one_document_and_dr_random():
    pool = [Shot(f"s{i}", f"t{i}") for i in range(9)]
    docids = ["a", "a", "b", "b", "b", "b", "c", "c", "c"]
    # Documents b and c have 3 or more pairs; a has 2. A DF set starts at a document's first pair.
    drawn = {tuple(document_shots(pool, docids, 3, "DF", seed=seed)) for seed in range(20)}
    assert drawn == {tuple(pool[2:5]), tuple(pool[6:9])}
    df = document_shots(pool, docids, 3, "DF", seed=0)
    assert as_document_shot(df) == Shot("\n".join(s.source for s in df), "\n".join(s.target for s in df))
    with pytest.raises(ValueError, match="no pool document has 5 consecutive pairs"):
        document_shots(pool, docids, 5, "DF")
    assert len(set(document_shots(pool, None, 4, "DR", seed=1))) == 4


def test_read_pool_takes_the_paper_format_and_alma_json_lines(tmp_path):
    paper = tmp_path / "pool.json"
    paper.write_text(json.dumps([{"source": "a", "target": "b"}]))
    assert read_pool(paper) == [Shot("a", "b")]
    alma = tmp_path / "pool.jsonl"
    alma.write_text('{"translation": {"de": "Hallo", "en": "Hello"}}\n{"translation": {"de": "Ja", "en": "Yes"}}\n')
    assert read_pool(alma, "de-en") == [Shot("Hallo", "Hello"), Shot("Ja", "Yes")]
    assert read_pool(alma, "en-de") == [Shot("Hello", "Hallo"), Shot("Yes", "Ja")]
    with pytest.raises(ValueError, match="pass lang_pair"):
        read_pool(alma)


def test_missing_optional_scorers_are_named():
    from jaxmoe.mt.eval import score
    from jaxmoe.mt.hybrid import CometScorer, comet_available

    import importlib.util

    if importlib.util.find_spec("MeCab") is None:
        with pytest.raises(ValueError, match=r"ja-mecab tokenizer, which is not installed; pip install 'sacrebleu\[ja\]'"):
            score(["今日は"], ["今日は"], lang_pair="en-ja")
    if not comet_available():
        with pytest.raises(ImportError, match=r"pip install 'jaxmoe\[comet\]'"):
            CometScorer("/nonexistent")


# --- Documents and doc-BLEU -----------------------------------------------------------------------------------

# Three documents; the second's lines are not contiguous in the file.
DOC_REFS = ["The cat sat on the mat.", "It was happy.", "Stocks fell sharply on Monday.", "The dog barked.",
            "Investors were worried.", "Rain is expected tomorrow.", "Bring an umbrella."]
DOC_HYPS = ["The cat sat on a mat.", "It was glad.", "Stocks fell on Monday.", "A dog barked.",
            "Investors worried.", "Rain expected tomorrow.", "Take an umbrella."]
DOC_IDS = ["d1", "d1", "d2", "d1", "d2", "d3", "d3"]


def test_doc_bleu_equals_corpus_bleu_of_documents_joined_by_hand(tmp_path):
    hand_hyp = ["The cat sat on a mat. It was glad. A dog barked.", "Stocks fell on Monday. Investors worried.",
                "Rain expected tomorrow. Take an umbrella."]
    hand_ref = ["The cat sat on the mat. It was happy. The dog barked.",
                "Stocks fell sharply on Monday. Investors were worried.",
                "Rain is expected tomorrow. Bring an umbrella."]
    expected = BLEU().corpus_score(hand_hyp, [hand_ref]).score
    assert doc_bleu(DOC_HYPS, DOC_REFS, DOC_IDS, lang_pair="de-en") == pytest.approx(expected, abs=1e-12)
    cli = subprocess.run([sys.executable, "-m", "sacrebleu", str(write_lines(tmp_path / "r", hand_ref)), "-i",
                          str(write_lines(tmp_path / "h", hand_hyp)), "-m", "bleu", "-w", "4", "-b"],
                         capture_output=True, text=True, check=True)
    assert round(expected, 4) == float(cli.stdout)
    result = score_files(None, write_lines(tmp_path / "hyp", DOC_HYPS), write_lines(tmp_path / "ref", DOC_REFS),
                         lang_pair="de-en", docs=write_lines(tmp_path / "docs", DOC_IDS))
    assert result["doc_bleu"] == pytest.approx(expected, abs=1e-12) and result["documents"] == 3


def test_eval_mt_docs_flag_adds_doc_bleu_and_checks_the_line_count(tmp_path, capsys):
    hyp, ref = write_lines(tmp_path / "hyp", DOC_HYPS), write_lines(tmp_path / "ref", DOC_REFS)
    assert main(["eval-mt", "--hyp", str(hyp), "--ref", str(ref), "--lang-pair", "de-en", "--docs",
                 str(write_lines(tmp_path / "docs", DOC_IDS))]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["doc_bleu"] == pytest.approx(doc_bleu(DOC_HYPS, DOC_REFS, DOC_IDS))
    assert main(["eval-mt", "--hyp", str(hyp), "--ref", str(ref), "--docs",
                 str(write_lines(tmp_path / "short", DOC_IDS[:5]))]) == 2
    assert "has 5 document ids but --ref file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="has 5 document ids but the test set has 7 lines"):
        read_docids(tmp_path / "short", lines=7)


def test_windows_cover_each_document_in_order():
    assert windows(DOC_IDS, 2) == [[0, 1], [3], [2, 4], [5, 6]]
    assert windows(DOC_IDS, 32) == [[0, 1, 3], [2, 4], [5, 6]]
    with pytest.raises(ValueError, match="window size 33"):
        windows(DOC_IDS, 33)


def test_document_windows_split_back_and_retry_a_window_whose_line_count_differs():
    sources = [f"s{i}" for i in range(7)]
    calls = []

    def translate(texts):
        calls.append(list(texts))
        # A window holding s2 comes back with its lines merged into one: that window is retried line by line.
        return [t.replace("s", "t").replace("\n", " ") if "s2" in t else t.replace("s", "t") for t in texts]

    out = translate_documents(translate, sources, DOC_IDS, window=2)
    assert list(out) == [f"t{i}" for i in range(7)]
    assert out.stats() == {"windows": 4, "retried_windows": 1, "retried_sentences": 2}
    assert calls == [["s0\ns1", "s3", "s2\ns4", "s5\ns6"], ["s2", "s4"]]


# --- Hybrid routing -------------------------------------------------------------------------------------------

SOURCES = ["eins", "zwei", "drei", "vier"]
SYSTEM_A = ["one", "to", "three", "for"]
SYSTEM_B = ["one!", "two", "three!", "four"]


def prefers_b(sources, hypotheses):
    """A QE scorer in (0, 1) that scores system B's outputs 0.9 and anything else 0.2."""
    return [0.9 if h in SYSTEM_B else 0.2 for h in hypotheses]


def test_max_routing_with_a_scorer_that_prefers_one_system_gives_that_system():
    routed = max_routing(SOURCES, [SYSTEM_A, SYSTEM_B], prefers_b)
    assert routed.outputs == SYSTEM_B and routed.shares() == [0.0, 1.0]
    assert max_routing(SOURCES, [SYSTEM_B, SYSTEM_A], prefers_b).outputs == SYSTEM_B


def test_threshold_routing_zero_gives_a_and_one_gives_b():
    assert threshold_routing(SOURCES, SYSTEM_A, SYSTEM_B, prefers_b, 0.0).outputs == SYSTEM_A
    assert threshold_routing(SOURCES, SYSTEM_A, SYSTEM_B, prefers_b, 1.0).outputs == SYSTEM_B
    mixed = threshold_routing(SOURCES, SYSTEM_B, SYSTEM_A, lambda s, h: [0.1, 0.5, 0.3, 0.7], 0.4)
    assert mixed.outputs == ["one", "two", "three", "four"] and list(mixed.choice) == [1, 0, 1, 0]
    with pytest.raises(ValueError, match="system 1 has 3 outputs for 4 sources"):
        threshold_routing(SOURCES, SYSTEM_A, SYSTEM_B[:3], prefers_b, 0.5)


def test_round_trip_chrf_scores_the_back_translation_against_the_source():
    back = {"one": "eins", "to": "zu", "three": "drei", "for": "für"}
    scorer = RoundTripChrF(lambda texts: [back[t] for t in texts])
    scores = scorer(SOURCES, SYSTEM_A)
    assert scores[0] == pytest.approx(1.0) and scores[2] == pytest.approx(1.0) and scores[1] < 0.5


# --- A folder of outputs on a WMT'22-layout data folder -------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """GPT-MT's layout with the first 12 lines of de-en and en-de (real WMT'22 lines; three documents each) and
    the real released QR shots."""
    root = tmp_path_factory.mktemp("gptmt")
    for pair in ("de-en", "en-de"):
        src, tgt = pair.split("-")
        for lang in (src, tgt):
            name = f"wmt-testset/{src}{tgt}/test.{pair}.{lang}"
            write_lines(root / name, lines_of(GPT_MT / name)[:12])
        write_lines(root / f"wmt-testset-docids/{src}{tgt}/test.{pair}.docids",
                    ["a"] * 5 + ["b"] * 4 + ["c"] * 3)
        for k in (1, 5):
            name = f"data-shots/QR/{k}-shot/shots.{pair}.json"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes((GPT_MT / name).read_bytes())
    return root


def perturbed(words_of_line):
    return [" ".join(words[:-1]) if i % 3 else " ".join(reversed(words)) for i, words in enumerate(words_of_line)]


@pytest.fixture(scope="module")
def system(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("system")
    for pair in ("de-en", "en-de"):
        refs = lines_of(data / f"wmt-testset/{pair.replace('-', '')}/test.{pair}.{pair[3:]}")
        write_lines(hypothesis_path(folder, pair), perturbed([r.split() for r in refs]))
    return folder


def test_scoring_a_hypothesis_folder_equals_the_sacrebleu_cli(data, system):
    rows = score_hypothesis_dir(system, data, ["de-en", "en-de"])
    for row in rows:
        pair = row["pair"]
        ref = data / f"wmt-testset/{pair.replace('-', '')}/test.{pair}.{pair[3:]}"
        cli = subprocess.run([sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hypothesis_path(system, pair)),
                              "-m", "bleu", "chrf", "-l", pair, "-w", "4", "--format", "json"],
                             capture_output=True, text=True, check=True)
        expected = {m["name"]: m["score"] for m in json.loads(cli.stdout)}
        assert round(row["bleu"], 4) == expected["BLEU"] and round(row["chrf"], 4) == expected["chrF2"]
        hyps, refs = lines_of(hypothesis_path(system, pair)), lines_of(ref)
        joined = [(" ".join(hyps[a:b]), " ".join(refs[a:b])) for a, b in ((0, 5), (5, 9), (9, 12))]
        assert row["doc_bleu"] == pytest.approx(
            BLEU(trg_lang=pair[3:]).corpus_score([h for h, _ in joined], [[r for _, r in joined]]).score)
    table = format_table(rows)
    assert table.splitlines()[0] == "| pair | BLEU | chrF | doc-BLEU | sentences |" and "| de-en |" in table


def test_suite_cli_scores_a_hypothesis_folder_and_writes_results(data, system, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval-mt", "--suite", "wmt22", "--data", str(data), "--hyp-dir", str(system), "--pairs",
                 "de-en,en-de", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "| de-en |" in printed.out and "| en-de |" in printed.out and "COMET" in printed.err
    results = json.loads((out / "results.json").read_text())
    assert [r["pair"] for r in results["rows"]] == ["de-en", "en-de"]


def test_hybrid_rows_route_between_two_folders(data, system, tmp_path):
    other = tmp_path / "b"
    for pair in ("de-en", "en-de"):
        refs = lines_of(data / f"wmt-testset/{pair.replace('-', '')}/test.{pair}.{pair[3:]}")
        write_lines(hypothesis_path(other, pair), refs)  # system B: the references themselves
    refs_of = {pair: set(lines_of(data / f"wmt-testset/{pair.replace('-', '')}/test.{pair}.{pair[3:]}"))
               for pair in ("de-en", "en-de")}
    rows = hybrid_rows(data, ["de-en", "en-de"], system, other,
                       lambda pair: (lambda s, h: [0.9 if x in refs_of[pair] else 0.1 for x in h]),
                       out_dir=tmp_path / "hybrid")
    assert all(row["share_a"] == 0.0 and row["bleu"] == pytest.approx(100.0) for row in rows)
    assert lines_of(hypothesis_path(tmp_path / "hybrid", "de-en")) == \
        lines_of(data / "wmt-testset/deen/test.de-en.en")


def test_bad_suite_inputs_are_named(data, system, tmp_path, capsys):
    assert available_pairs(data) == ["de-en", "en-de"]
    with pytest.raises(ValueError, match="language pair 'fr-de' has no test set .*known pairs: de-en, en-de"):
        load_testset(data, "fr-de")
    assert main(["eval-mt", "--suite", "wmt22", "--data", str(data), "--hyp-dir", str(system), "--pairs",
                 "de-en,xx-yy"]) == 2
    assert "unknown pair(s) xx-yy; known pairs" in capsys.readouterr().err
    assert main(["eval-mt", "--suite", "wmt22", "--data", str(data), "--hyp-dir", str(system), "--shots",
                 "ZZ", "--model", str(tmp_path)]) == 2
    assert "takes one of --model (translate) and --hyp-dir" in capsys.readouterr().err
    partial = tmp_path / "partial"
    write_lines(hypothesis_path(partial, "de-en"), ["x"] * 12)
    with pytest.raises(FileNotFoundError, match=r"missing 1 pair\(s\): .*ende/test.en-de.de"):
        score_hypothesis_dir(partial, data, ["de-en", "en-de"])
    write_lines(hypothesis_path(partial, "en-de"), ["x"] * 13)
    with pytest.raises(ValueError, match=r"test.en-de.de' has 13 lines but the en-de test set has 12; expected one"):
        score_hypothesis_dir(partial, data, ["en-de"])
    with pytest.raises(ValueError, match=r"has 13 lines but the en-de test set has 12 \(first 4 with the limit\)"):
        hybrid_rows(data, ["en-de"], partial, partial, lambda pair: None, limit=4)
    assert [r["segments"] for r in score_hypothesis_dir(system, data, ["de-en"], limit=4)] == [4]  # whole file, cut
    write_lines(hypothesis_path(partial, "en-de"), ["x"] * 3)
    with pytest.raises(ValueError, match=r"has 3 lines but the en-de test set has 12 \(first 4 with the limit\)"):
        score_hypothesis_dir(partial, data, ["en-de"], limit=4)
    testset = load_testset(data, "de-en")
    with pytest.raises(ValueError, match="shot type 'ZZ' is unknown; expected none or one of RR, QR, QS, DF, DR"):
        select_shots(testset, "ZZ", 5, data=data)
    with pytest.raises(ValueError, match="k=20 shots asked but the pool has only 13"):
        select_shots(testset, "QR", 20, pool=POOL)
    with pytest.raises(FileNotFoundError, match="no released QR 3-shot file"):
        select_shots(testset, "QR", 3, data=data)
    bad_docs = data.parent / "bad_docs"
    for path in data.rglob("*"):
        if path.is_file():
            target = bad_docs / path.relative_to(data)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    write_lines(bad_docs / "wmt-testset-docids/deen/test.de-en.docids", ["a"] * 11)
    with pytest.raises(ValueError, match="has 11 document ids but the test set has 12 lines"):
        load_testset(bad_docs, "de-en")


# --- Suite mode with a model ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory):
    """A tiny random Phi-3 (no LongRoPE, 2,048 positions) with a byte-level BPE trained on the fixture's test
    lines and shots, saved as a checkpoint folder."""
    import jax
    from flax import nnx

    import jaxmoe
    from jaxmoe.io.bpe import save_tokenizer, train_bpe

    texts = [line for path in sorted(data.rglob("test.*-*.??")) for line in lines_of(path)]
    tokenizer = train_bpe(texts, vocab_size=384)
    folder = tmp_path_factory.mktemp("suite_model") / "model"
    config = jaxmoe.get_preset("tiny").replace(vocab_size=tokenizer.vocab_size, longrope=None,
                                               max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=(tokenizer.eos_token_id,),
                                               pad_token_id=tokenizer.pad_token_id)
    model = jaxmoe.Phi3ForCausalLM(config, rngs=nnx.Rngs(5))
    nnx.update(model, jax.tree.map(lambda p: p * 4.0 if p.ndim > 1 else p, nnx.state(model, nnx.Param)))
    jaxmoe.save_hf(model, folder)
    save_tokenizer(tokenizer, folder)
    return folder


def greedy_first_line(folder, prompt, max_new_tokens):
    """The oracle: jaxmoe.generate on one unpadded prompt, cut at EOS, decoded, stripped, first line."""
    import jaxmoe

    tokenizer, model = Tokenizer.from_folder(folder), jaxmoe.load_hf(folder)
    ids = np.asarray(tokenizer.encode(prompt), np.int32)[None]
    new = np.asarray(jaxmoe.generate(model, ids, max_new_tokens=max_new_tokens,
                                     eos_token_id=tokenizer.eos_token_id))[0, ids.shape[1]:]
    ends = np.flatnonzero(new == tokenizer.eos_token_id)
    text = tokenizer.decode(new[:ends[0]] if ends.size else new).strip()
    return text.split("\n", 1)[0].rstrip()


def test_suite_translates_with_the_paper_shots_and_rescoring_its_outputs_agrees(data, checkpoint, tmp_path,
                                                                                capsys):
    out = tmp_path / "qr1"
    assert main(["eval-mt", "--suite", "wmt22", "--data", str(data), "--model", str(checkpoint), "--pairs",
                 "de-en", "--shots", "QR", "--k", "1", "--limit", "2", "--max-new-tokens", "6",
                 "--batch-size", "2", "--out", str(out)]) == 0
    assert "| de-en |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["shots"] == "QR" and results["settings"]["shot_source"] == "paper"
    shot = paper_shots(data / "data-shots", "QR", 1, "de-en")
    sources = lines_of(data / "wmt-testset/deen/test.de-en.de")[:2]
    hyps = lines_of(hypothesis_path(out, "de-en"))
    assert len(hyps) == 2
    for source, hyp in zip(sources, hyps):
        expected = greedy_first_line(checkpoint, TranslationPrompt().render(source, "de", "en", shot), 6)
        assert hyp == " ".join(expected.split())
    rescored = score_hypothesis_dir(out, data, ["de-en"], limit=2)
    for row, again in zip(results["rows"], rescored):
        assert (row["bleu"], row["chrf"], row["doc_bleu"]) == (again["bleu"], again["chrf"], again["doc_bleu"])


@pytest.mark.slow
def test_suite_document_windows_qs_from_a_pool_and_round_trip_hybrid(data, checkpoint, tmp_path, capsys):
    docs = tmp_path / "doc"
    assert main(["eval-mt", "--suite", "wmt22", "--data", str(data), "--model", str(checkpoint), "--pairs",
                 "de-en", "--doc-window", "2", "--limit", "6", "--max-new-tokens", "12", "--batch-size", "4",
                 "--out", str(docs)]) == 0
    row = json.loads((docs / "results.json").read_text())["rows"][0]
    assert row["windows"] == 4 and row["retried_windows"] <= 2  # lines 0-5: windows a0-1, a2-3, a4, b5
    assert row["retried_sentences"] >= row["retried_windows"]
    assert len(lines_of(hypothesis_path(docs, "de-en"))) == 6
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps([{"source": s.source, "target": s.target} for s in POOL]))
    qs = tmp_path / "qs"
    assert main(["eval-mt", "--suite", "wmt22", "--data", str(data), "--model", str(checkpoint), "--pairs",
                 "de-en", "--shots", "QS", "--k", "2", "--shot-pool", str(pool), "--similarity", "model",
                 "--limit", "3", "--max-new-tokens", "4", "--out", str(qs), "--hybrid-with", str(docs)]) == 0
    printed = capsys.readouterr().out
    assert "hybrid: max routing by round-trip chrF" in printed
    results = json.loads((qs / "results.json").read_text())
    assert results["settings"]["similarity"] == "model" and results["rows"][-1]["system"] == "hybrid"
    assert len(lines_of(hypothesis_path(qs / "hybrid", "de-en"))) == 3
