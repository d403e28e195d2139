"""jaxmoe.io.tokenizer.Tokenizer gives the ids and chat prompts that transformers gives for the same folder.

The tokenizer is a real byte-level BPE trained here with the `tokenizers` library on a few dozen sentences, with
the Phi chat special tokens, and saved as a transformers tokenizer folder (nothing is downloaded).
"""

import json

import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxmoe.io.tokenizer import Tokenizer

SPECIAL = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Phi-4-mini-instruct's chat template (tokenizer_config.json), tools branch included.
PHI4_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] "
    "is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
    "'<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

# A template whose output the Phi fallback cannot produce: block tags on their own lines (rendered differently
# without trim_blocks / lstrip_blocks), the bos token, tojson, a loop control and a filter.
BLOCK_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] == 'system' %}
<<SYS {{ message['content'] | tojson }}>>
    {% else %}
[{{ message['role'] | upper }}]: {{ message['content'] | trim }}
    {% endif %}
    {% if loop.index >= 3 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
[ASSISTANT]:{% endif %}"""

TEMPLATES = {"phi4": PHI4_TEMPLATE, "block": BLOCK_TEMPLATE}

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.", "A mixture of experts routes each token to two experts.",
    "Translate the following sentence into German.", "Hello world, how are you today?",
    "JAX compiles numerical programs with XLA.", "Flax NNX modules hold their parameters as attributes.",
    "The router picks the top two experts for every token.", "Sparse models trade memory for compute.",
    "Phi models are small language models trained on curated data.", "Please answer briefly and precisely.",
    "What is the capital of France? Paris is the capital of France.", "Grouped matmuls run one matmul per expert.",
    "Left padding keeps the last token of every prompt in the same column.", "Tokens are integers in a vocabulary.",
    "Rotary position embeddings rotate pairs of channels.", "The cat sat on the mat and looked at the dog.",
    "Numbers like 42, 3.14 and 2025 appear in text too.", "Good morning! Good evening! Good night!",
    "Quantization stores weights with fewer bits.", "A checkpoint folder holds config.json and safetensors.",
    "Attention scores are computed in float32.", "The model generates one token at a time.",
    "Every test checks a property against an independent reference.", "You are a helpful assistant.",
] * 3

CONVERSATIONS = [
    [{"role": "user", "content": "Hello world"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."},
     {"role": "user", "content": "And of Germany?\nAnswer briefly."}],
]


def _train_tokenizer() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    return tok


def _write_folder(folder, *, chat_template: str | None, extra_config: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    _train_tokenizer().save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
              "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", **(extra_config or {})}
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(folder / "tokenizer_config.json", "w") as f:
        json.dump(config, f)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {name: _write_folder(tmp_path_factory.mktemp(f"tokenizer_{name}"), chat_template=template)
            for name, template in TEMPLATES.items()}


@pytest.fixture(scope="module")
def folder(folders):
    return folders["phi4"]


@pytest.fixture(scope="module")
def reference(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world", "", "  leading spaces and\ttabs\n",
         "unseen words: zebra quokka Übermaß 中文 😀", "<|user|>Hi<|end|><|assistant|>", "3.14159 and 2025"]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers_and_decode_round_trips(folder, reference, text):
    tok = Tokenizer.from_folder(folder)
    ids = tok.encode(text)
    assert ids == reference.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_are_single_ids_and_decode_skips_them(folder):
    tok = Tokenizer.from_folder(folder)
    for token in SPECIAL:
        assert tok.encode(token) == [tok.token_to_id(token)]
    ids = tok.encode("<|user|>Hello world<|end|>")
    assert tok.decode(ids) == "Hello world"
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == tok.token_to_id("<|endoftext|>")
    assert tok.pad_token_id == tok.token_to_id("<|endoftext|>")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_chat_template_renders_like_transformers(folders, template, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    tok = Tokenizer.from_folder(folders[template])
    reference = transformers.AutoTokenizer.from_pretrained(folders[template])
    assert tok.chat_template == TEMPLATES[template]
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    got = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert got == expected
    assert tok.encode(got, add_special_tokens=False) == reference.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False)


def test_phi_format_without_template_equals_phi4_template(tmp_path, reference):
    """A folder with no chat template falls back to the Phi format, which is what Phi-4-mini's template renders."""
    tok = Tokenizer.from_folder(_write_folder(tmp_path, chat_template=None))
    assert tok.chat_template is None
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == \
                reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]) == \
        "<|system|>S<|end|><|user|>U<|end|><|assistant|>"


def test_template_saved_by_transformers_is_read_back(tmp_path, reference):
    """transformers' save_pretrained (which may move the template to chat_template.jinja) round-trips."""
    reference.save_pretrained(tmp_path)
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.chat_template == PHI4_TEMPLATE
    messages = CONVERSATIONS[1]
    assert tok.apply_chat_template(messages) == reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert tok.encode(TEXTS[0]) == reference.encode(TEXTS[0])


def test_added_tokens_from_tokenizer_config(tmp_path):
    """A special token declared only in tokenizer_config.json's added_tokens_decoder gets its declared id."""
    vocab = _train_tokenizer().get_vocab_size()
    added = {str(vocab): {"content": "<|endoftext10|>", "special": True, "lstrip": False, "rstrip": False,
                          "normalized": False, "single_word": False}}
    folder = _write_folder(tmp_path, chat_template=None, extra_config={"added_tokens_decoder": added})
    tok = Tokenizer.from_folder(folder)
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    text = "Hello<|endoftext10|> world"
    assert tok.encode(text) == reference.encode(text)
    assert vocab in tok.encode(text)
    assert tok.vocab_size == vocab + 1


def test_batch_encode_left_pads_like_transformers(folder, reference):
    tok = Tokenizer.from_folder(folder)
    texts = ["Hello world", "The quick brown fox jumps over the lazy dog.", "Good night!"]
    pad = tok.pad_token_id
    ids, mask = tok.batch_encode(texts, pad_id=pad)
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    rows = [tok.encode(t) for t in texts]
    assert ids.shape == mask.shape == (3, max(map(len, rows)))
    for i, row in enumerate(rows):
        n = ids.shape[1] - len(row)
        assert ids[i, n:].tolist() == row and (ids[i, :n] == pad).all()
        assert mask[i].tolist() == [0] * n + [1] * len(row)
    reference.padding_side = "left"
    expected = reference(texts, padding=True, return_tensors="np")
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    other, _ = tok.batch_encode(texts, pad_id=7)
    assert (other[mask == 0] == 7).all()


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_unknown_chat_role_is_named(folder, tmp_path):
    messages = [{"role": "wizard", "content": "Hi"}]
    for tok in (Tokenizer.from_folder(folder), Tokenizer.from_folder(_write_folder(tmp_path, chat_template=None))):
        with pytest.raises(ValueError, match="'wizard'"):
            tok.apply_chat_template(messages)
