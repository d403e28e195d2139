"""jaxmoe.io.bpe: a byte-level BPE trained here decodes every text back to itself, gives special tokens the ids
asked for, prepends <bos>, trains the same way twice, and saves a folder that jaxmoe and transformers both read.
"""

import pytest

from jaxmoe.io.bpe import BOS, EOS, PAD, UNK, save_tokenizer, train_bpe
from jaxmoe.io.tokenizer import Tokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A small garden with green trees and a quiet river.",
    "Die Mädchen gehen über die Brücke zum großen Fluss.",
    "Können Sie mir bitte den Weg zum Bahnhof zeigen?",
    "我们今天下午去公园散步。",
    "这本书很有意思，我已经读了两遍。",
]
TEXTS = SENTENCES * 5 + [f"sentence number {i} of the garden corpus" for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(TEXTS, vocab_size=400)


@pytest.mark.parametrize("text", SENTENCES + [
    "Grüße aus Köln — unseen words: Straßenbahnhaltestelle, 北京大学, emoji 🙂.",
    "  leading spaces, two  inner spaces,\ttabs and\nnewlines  ",
])
def test_decode_of_encode_gives_the_text_back(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert UNK not in [tokenizer.tokenizer.id_to_token(i) for i in tokenizer.encode(text)]


def test_special_tokens_take_ids_in_the_given_order(tokenizer):
    assert [tokenizer.token_to_id(t) for t in (PAD, BOS, EOS, UNK)] == [0, 1, 2, 3]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    custom = train_bpe(TEXTS, vocab_size=400, special_tokens=(UNK, "<2de>", EOS, PAD, BOS))
    assert [custom.token_to_id(t) for t in (UNK, "<2de>", EOS, PAD, BOS)] == [0, 1, 2, 3, 4]
    assert custom.encode("hi")[0] == 4


def test_encode_prepends_bos_only_with_special_tokens(tokenizer):
    text = SENTENCES[0]
    plain = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.encode(text) == [tokenizer.bos_token_id] + plain
    assert tokenizer.bos_token_id not in plain


def test_training_learns_merges_up_to_the_vocab_size(tokenizer):
    assert tokenizer.vocab_size == 400
    assert len(tokenizer.encode(" garden", add_special_tokens=False)) == 1  # 45 occurrences merge to one token
    assert len(tokenizer.encode(SENTENCES[4], add_special_tokens=False)) < len(SENTENCES[4].encode())


def test_same_texts_train_the_same_tokenizer(tokenizer):
    assert train_bpe(iter(TEXTS), vocab_size=400).tokenizer.to_str() == tokenizer.tokenizer.to_str()


def test_saved_folder_reads_back_with_the_same_ids(tokenizer, tmp_path):
    import transformers

    save_tokenizer(tokenizer, tmp_path / "tok")
    loaded = Tokenizer.from_folder(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    for text in SENTENCES:
        assert loaded.encode(text) == tokenizer.encode(text) == hf(text)["input_ids"]
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2, 3)


@pytest.mark.parametrize("texts, kwargs, message", [
    (TEXTS, dict(vocab_size=100), "vocab_size=100; expected an int >= 261"),
    (TEXTS, dict(vocab_size=400.0), "vocab_size=400.0"),
    ([], dict(vocab_size=400), "no texts"),
    (["", ""], dict(vocab_size=400), "only empty texts"),
    ("one string", dict(vocab_size=400), "one str"),
    (TEXTS, dict(vocab_size=400, special_tokens=(PAD, BOS, EOS)), "including"),
    (TEXTS, dict(vocab_size=400, min_frequency=0), "min_frequency=0"),
])
def test_bad_arguments_are_refused_with_the_value_named(texts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        train_bpe(texts, **kwargs)
