"""The data pipeline (jaxmoe.train.data and jaxmoe.train.batches): text files prepare into tfds datasets that read back in file order, prepare once per content,
fail with messages that name the problem; encodings mask the prompt; BatchStream is deterministic, resumable and
packs whole sequences."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from jaxmoe.io.tokenizer import Tokenizer
from jaxmoe.train.batches import BatchStream, PromptFormat, encode_text, encode_translation, eval_batches, tokens_in
from jaxmoe.train.data import DataError, MonolingualSource, ParallelSource, load_split, prepare_monolingual, prepare_parallel

ALMA_VALID = Path("/work/shared/data/alma/deen/valid.de-en.json")
GERMAN = ["Der Hund läuft schnell.", "Ich trinke gern Kaffee am Morgen.", "Zürich ist schön im Sommer.",
          "Wir fahren morgen nach Berlin.", "Das Buch liegt auf dem Tisch."]
ENGLISH = ["The dog runs fast.", "I like to drink coffee in the morning.", "Zurich is beautiful in summer.",
           "We are driving to Berlin tomorrow.", "The book is on the table."]


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained on the test sentences, with <bos> added by the post-processor."""
    raw = tokenizers.Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(GERMAN + ENGLISH + [PromptFormat().render("", "de", "en")], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<bos>", "<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                       special_tokens=[("<bos>", raw.token_to_id("<bos>"))])
    return Tokenizer(raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_alma_json(path: Path, pairs, src="de", tgt="en") -> Path:
    path.write_text(json.dumps([{"translation": {src: s, tgt: t}} for s, t in pairs], ensure_ascii=False),
                    encoding="utf-8")
    return path


def text_source(tmp_path, german=GERMAN, english=ENGLISH) -> ParallelSource:
    return ParallelSource("de", "en", src_path=write_lines(tmp_path / "train.de", german),
                          tgt_path=write_lines(tmp_path / "train.en", english))


def pairs_of(records):
    return [(r["src"], r["tgt"]) for r in records]


def prepared_files(builder):
    return {p: p.stat().st_mtime_ns for p in Path(builder.data_dir).iterdir()}


# --- Preparing and reading back --------------------------------------------------------------------------------

def test_prepare_parallel_reads_back_every_line_aligned_pair_in_file_order(tmp_path):
    builder = prepare_parallel("toy_deen", {"train": text_source(tmp_path)}, data_dir=tmp_path / "tfds")
    assert pairs_of(load_split(builder, "train")) == list(zip(GERMAN, ENGLISH))


def test_prepare_parallel_reads_back_an_alma_json_file_in_order(tmp_path):
    many = [(f"Satz {i} ä", f"sentence {i}") for i in range(40)]  # enough that a hash-shuffled order would show
    source = ParallelSource("de", "en", json_path=write_alma_json(tmp_path / "valid.json", many))
    builder = prepare_parallel("toy_json", {"validation": source}, data_dir=tmp_path / "tfds")
    assert pairs_of(load_split(builder, "validation")) == many


def test_prepare_parallel_reads_back_the_real_alma_de_en_validation_set(tmp_path):
    if not ALMA_VALID.is_file():
        pytest.skip(f"{ALMA_VALID} is not present")
    entries = json.loads(ALMA_VALID.read_text(encoding="utf-8"))
    expected = [(e["translation"]["de"], e["translation"]["en"]) for e in entries]
    builder = prepare_parallel("alma_deen", {"validation": ParallelSource("de", "en", json_path=ALMA_VALID)},
                               data_dir=tmp_path / "tfds")
    records = load_split(builder, "validation")
    assert len(records) == len(expected)
    assert pairs_of(records) == expected


def test_second_prepare_of_the_same_files_reuses_the_prepared_data(tmp_path, monkeypatch):
    splits = {"train": text_source(tmp_path)}
    first = prepare_parallel("toy_deen", splits, data_dir=tmp_path / "tfds")
    files = prepared_files(first)

    def read_again(self):
        raise AssertionError("the source files were read again")

    monkeypatch.setattr(ParallelSource, "read", read_again)
    second = prepare_parallel("toy_deen", splits, data_dir=tmp_path / "tfds")
    assert second.data_dir == first.data_dir
    assert prepared_files(second) == files
    assert pairs_of(load_split(second, "train")) == list(zip(GERMAN, ENGLISH))


def test_changed_files_are_prepared_again_and_read_back_new(tmp_path):
    first = prepare_parallel("toy_deen", {"train": text_source(tmp_path)}, data_dir=tmp_path / "tfds")
    changed_english = ENGLISH[:-1] + ["The book lies on the table."]  # same line count, one word differs
    second = prepare_parallel("toy_deen", {"train": text_source(tmp_path, english=changed_english)},
                              data_dir=tmp_path / "tfds")
    assert second.data_dir != first.data_dir
    assert pairs_of(load_split(second, "train")) == list(zip(GERMAN, changed_english))


def test_prepare_monolingual_reads_back_the_lines_of_all_files_in_order(tmp_path):
    source = MonolingualSource((write_lines(tmp_path / "a.txt", GERMAN), write_lines(tmp_path / "b.txt", ENGLISH)))
    builder = prepare_monolingual("toy_text", {"train": source}, data_dir=tmp_path / "tfds")
    assert [r["text"] for r in load_split(builder, "train")] == GERMAN + ENGLISH


def test_empty_lines_are_skipped_and_counted_in_a_warning(tmp_path):
    german, english = GERMAN[:2] + [""] + GERMAN[3:], ENGLISH[:4] + ["  "]
    with pytest.warns(UserWarning, match=r"skipped 2 of 5 lines.*first at line 3"):
        builder = prepare_parallel("toy_deen", {"train": text_source(tmp_path, german, english)},
                                   data_dir=tmp_path / "tfds")
    assert pairs_of(load_split(builder, "train")) == [(GERMAN[i], ENGLISH[i]) for i in (0, 1, 3)]


def test_load_split_renames_wmt_style_language_keys_to_src_and_tgt(tmp_path):
    class FakeWmt(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="de-en")]

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.Translation(languages=["de", "en"]),
                                         disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"validation": self._generate_examples()}

        def _generate_examples(self):
            for i, (de, en) in enumerate(zip(GERMAN, ENGLISH)):
                yield i, {"de": de, "en": en}

    FakeWmt(config="de-en", data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    records = load_split("fake_wmt/de-en", "validation", data_dir=tmp_path, src_lang="en", tgt_lang="de")
    assert records[-1] == {"src": ENGLISH[-1], "tgt": GERMAN[-1]}
    assert pairs_of(records) == list(zip(ENGLISH, GERMAN))


def test_load_split_of_an_absent_public_dataset_without_download_says_it_is_not_prepared(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'wmt19_translate/de-en' is not prepared in .*internet"):
        load_split("wmt19_translate/de-en", "validation", data_dir=tmp_path, download=False)


# --- Errors that name the problem -------------------------------------------------------------------------------

def test_missing_file_error_names_the_path_and_what_it_is(tmp_path):
    english = write_lines(tmp_path / "train.en", ENGLISH)
    with pytest.raises(FileNotFoundError, match=r"source-language \(de\) text file '.*nope\.de' does not exist"):
        ParallelSource("de", "en", src_path=tmp_path / "nope.de", tgt_path=english)
    with pytest.raises(FileNotFoundError, match=r"ALMA JSON file '.*nope\.json'"):
        ParallelSource("de", "en", json_path=tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match=r"text file '.*nope\.txt'"):
        MonolingualSource(tmp_path / "nope.txt")


def test_empty_file_is_a_data_error_naming_the_file(tmp_path):
    (tmp_path / "empty.de").write_text("")
    with pytest.raises(DataError, match=r"'.*empty\.de' is empty"):
        ParallelSource("de", "en", src_path=tmp_path / "empty.de", tgt_path=write_lines(tmp_path / "x.en", ENGLISH))
    with pytest.raises(DataError, match=r"'.*empty\.de' is empty"):
        MonolingualSource([tmp_path / "empty.de"])


def test_misaligned_files_error_names_both_files_and_both_line_counts(tmp_path):
    source = text_source(tmp_path, english=ENGLISH[:-1])
    with pytest.raises(DataError, match=r"'.*train\.de' has 5 lines but '.*train\.en' has 4; the files must be "
                                        r"line-aligned"):
        source.read()
    with pytest.raises(DataError, match="has 5 lines but"):
        prepare_parallel("toy_deen", {"train": source}, data_dir=tmp_path / "tfds")


def test_json_entry_without_the_language_key_names_the_entry_and_its_keys(tmp_path):
    path = write_alma_json(tmp_path / "x.json", [("a", "b"), ("c", "d")])
    entries = json.loads(path.read_text())
    entries[1]["translation"] = {"cs": "c", "en": "d"}
    path.write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"entry 1 of .* has translation keys \['cs', 'en'\]; expected .*'de'"):
        ParallelSource("de", "en", json_path=path).read()


# --- Encoding ----------------------------------------------------------------------------------------------------

def test_alma_prompt_names_the_languages():
    alma = "Translate this from German to English:\nGerman: Hallo\nEnglish:"
    assert PromptFormat().render("Hallo", "de", "en") == alma
    assert PromptFormat("{src_lang}>{tgt_lang}: {src}").render("x", "de", "xx") == "German>xx: x"


def test_encode_translation_masks_exactly_the_prompt(tokenizer):
    prompt, target = PromptFormat().render(GERMAN[2], "de", "en"), ENGLISH[2]
    ids, loss_mask = encode_translation(tokenizer, prompt, target)
    n_prompt = len(tokenizer.encode(prompt))
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert loss_mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)
    assert tokenizer.decode(ids[:n_prompt], skip_special_tokens=True) == prompt
    assert tokenizer.decode([i for i, m in zip(ids, loss_mask) if m], skip_special_tokens=False) == \
        " " + target + "<eos>"


def test_encode_text_counts_every_token_but_the_first(tokenizer):
    ids, loss_mask = encode_text(tokenizer, GERMAN[0])
    assert ids == [tokenizer.bos_token_id] + tokenizer.encode(GERMAN[0], add_special_tokens=False) + \
        [tokenizer.eos_token_id]
    assert loss_mask == [0] + [1] * (len(ids) - 1)


# --- BatchStream -----------------------------------------------------------------------------------------------

def toy_examples(n=23, seed=0, max_len=9):
    """n examples with distinct first ids; lengths 2..max_len; the loss covers the second half of each."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        length = int(rng.integers(2, max_len + 1))
        ids = [100 + i] + rng.integers(3, 99, size=length - 1).tolist()
        examples.append((ids, [0] * (length // 2) + [1] * (length - length // 2)))
    return examples


def take(stream, k):
    return [next(stream) for _ in range(k)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def segments(batch):
    """[(row, ids, loss_mask, positions)] for each example in the batch, in row order."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        for s in range(1, batch["segment_ids"][r].max() + 1):
            at = batch["segment_ids"][r] == s
            out.append((r, batch["input_ids"][r, at].tolist(), batch["loss_mask"][r, at].tolist(),
                        batch["positions"][r, at].tolist()))
    return out


def test_stream_batches_follow_the_seeded_epoch_permutation_and_differ_between_seeds():
    examples = toy_examples(24)
    stream = BatchStream(examples, batch_size=4, max_len=9, pad_id=0, seed=7)
    batches = take(stream, 12)  # two epochs
    for epoch in (0, 1):
        order = np.random.default_rng([7, epoch]).permutation(24)
        got = [ids[0] - 100 for b in batches[6 * epoch:6 * epoch + 6] for _, ids, _, _ in segments(b)]
        assert got == order.tolist()
    assert_same_batches(batches, take(BatchStream(examples, batch_size=4, max_len=9, pad_id=0, seed=7), 12))
    other = take(BatchStream(examples, batch_size=4, max_len=9, pad_id=0, seed=8), 12)
    assert any(not np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, other))


def test_unpacked_rows_hold_one_right_padded_example_each_and_every_example_once_per_epoch():
    examples = toy_examples(24)
    batches = take(BatchStream(examples, batch_size=6, max_len=10, pad_id=0, seed=1), 4)
    seen = []
    for batch in batches:
        assert set(batch) == {"input_ids", "loss_mask", "attention_mask", "segment_ids", "positions"}
        assert all(a.shape == (6, 10) and a.dtype == np.int32 for a in batch.values())
        for row in range(6):
            ids, mask = examples[batch["input_ids"][row, 0] - 100]
            n = len(ids)
            assert batch["input_ids"][row].tolist() == list(ids) + [0] * (10 - n)
            assert batch["loss_mask"][row].tolist() == list(mask) + [0] * (10 - n)
            real = [1] * n + [0] * (10 - n)
            assert batch["attention_mask"][row].tolist() == batch["segment_ids"][row].tolist() == real
            assert batch["positions"][row].tolist() == list(range(n)) + [0] * (10 - n)
            seen.append(ids[0] - 100)
    assert sorted(seen) == list(range(24))
    assert sum(tokens_in(b) for b in batches) == sum(len(ids) for ids, _ in examples)


def test_packing_puts_whole_examples_first_fit_in_epoch_order_with_restarting_positions():
    examples = toy_examples(40)
    stream = BatchStream(examples, batch_size=3, max_len=16, pad_id=0, seed=3, pack=True)
    order = np.random.default_rng([3, 0]).permutation(40).tolist()
    consumed = 0
    while consumed < 30:  # within epoch 0
        batch = next(stream)
        rows = [[] for _ in range(3)]
        for row, ids, mask, positions in segments(batch):
            i = ids[0] - 100
            assert (ids, mask) == (list(examples[i][0]), examples[i][1])  # a whole example, never split
            assert positions == list(range(len(ids)))
            rows[row].append(i)
        # First fit, replayed: each consumed example in order goes to the first row with room for it.
        fill, expected = [0, 0, 0], [[], [], []]
        batch_order = order[consumed:consumed + sum(map(len, rows))]
        for i in batch_order:
            row = next(r for r in range(3) if fill[r] + len(examples[i][0]) <= 16)
            fill[row] += len(examples[i][0])
            expected[row].append(i)
        assert rows == expected
        consumed += len(batch_order)
        # The example that ended the batch fits in no row: it was left for the next batch.
        assert all(f + len(examples[order[consumed]][0]) > 16 for f in fill)
        assert stream.state()["index"] == consumed
        real = batch["segment_ids"] > 0
        np.testing.assert_array_equal(batch["attention_mask"], real)
        assert (batch["input_ids"][~real] == 0).all() and (batch["positions"][~real] == 0).all()


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("stop_after, stop_epoch", [(2, 0), (7, 1)])  # 23 examples, 4 or more per batch
def test_restore_continues_exactly_as_the_uninterrupted_stream(pack, stop_after, stop_epoch):
    examples = toy_examples(23)
    settings = dict(batch_size=4, max_len=12, pad_id=0, seed=5, pack=pack)
    uninterrupted = take(BatchStream(examples, **settings), stop_after + 8)
    first = BatchStream(examples, **settings)
    take(first, stop_after)
    state = json.loads(json.dumps(first.state()))
    assert state["batches"] == stop_after and state["epoch"] == stop_epoch and state["index"] > 0
    resumed = BatchStream(examples, **settings)
    resumed.restore(state)
    assert_same_batches(take(resumed, 8), uninterrupted[stop_after:])
    assert resumed.state()["epoch"] > state["epoch"]  # the continuation crossed an epoch boundary too


def test_over_long_examples_are_skipped_with_a_warning_per_epoch():
    examples = toy_examples(10, max_len=6) + [([200] * 30, [1] * 30), ([201] * 20, [1] * 20)]
    stream = BatchStream(examples, batch_size=5, max_len=8, pad_id=0, seed=0)
    with pytest.warns(UserWarning, match=r"epoch 0: skipped 2 examples longer than max_len=8 .*longest has 30"):
        batches = take(stream, 2)
    assert sorted(ids[0] - 100 for b in batches for _, ids, _, _ in segments(b)) == list(range(10))
    with pytest.raises(DataError, match=r"all 2 examples are longer than max_len=8 tokens \(the shortest has 20\)"):
        next(BatchStream(examples[-2:], batch_size=1, max_len=8, pad_id=0))


def test_stream_encodes_records_lazily_to_the_same_batches(tmp_path, tokenizer):
    builder = prepare_parallel("toy_deen", {"train": text_source(tmp_path)}, data_dir=tmp_path / "tfds")
    records, prompt = load_split(builder, "train"), PromptFormat()

    def encode(record):
        return encode_translation(tokenizer, prompt.render(record["src"], "de", "en"), record["tgt"])

    settings = dict(batch_size=2, max_len=64, pad_id=tokenizer.pad_token_id, seed=0, pack=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lazy = take(BatchStream(records, encode=encode, **settings), 3)
    assert_same_batches(lazy, take(BatchStream([encode(r) for r in records], **settings), 3))
    for _, ids, mask, _ in segments(lazy[0]):
        target = tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
        assert target.strip() in ENGLISH


def test_eval_batches_hold_every_fitting_example_once_in_fixed_shapes():
    examples = toy_examples(n=7, max_len=9)
    long = ([5] * 20, [1] * 20)
    batches = eval_batches(examples + [long], batch_size=3, max_len=12, pad_id=0)
    assert len(batches) == 3 and all(b["input_ids"].shape == (3, 12) for b in batches)
    rows = [(b["input_ids"][r], b["loss_mask"][r], b["attention_mask"][r]) for b in batches for r in range(3)]
    for (ids, mask), (row_ids, row_mask, row_attention) in zip(examples, rows):
        n = len(ids)
        assert list(row_ids[:n]) == list(ids) and list(row_mask[:n]) == list(mask)
        assert row_attention.sum() == n and not row_ids[n:].any()
    assert not any(attention.any() for _, _, attention in rows[7:])  # the filler rows are empty
