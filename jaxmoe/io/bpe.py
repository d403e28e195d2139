"""Training a byte-level BPE tokenizer from text with the `tokenizers` library, and saving it as a transformers
tokenizer folder.

Byte-level BPE starts from the 256 byte values, so every string encodes (no <unk>) and decodes back to itself,
whatever its script. Special tokens take ids 0, 1, ... in the order given; `encode` prepends <bos>.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from jaxmoe.io.tokenizer import Tokenizer

__all__ = ["BOS", "EOS", "PAD", "UNK", "save_tokenizer", "train_bpe"]

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"


def train_bpe(texts: Iterable[str], *, vocab_size: int, special_tokens: Sequence[str] = (PAD, BOS, EOS, UNK),
              min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE of at most `vocab_size` ids (special tokens and the 256 bytes included) trained on `texts`.
    `special_tokens` must hold PAD, BOS, EOS and UNK, and may add more; the same texts give the same tokenizer."""
    if isinstance(texts, str):
        raise ValueError("train_bpe: texts is one str; pass an iterable of sentences, e.g. [text]")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"train_bpe: texts[{i}] is a {type(text).__name__}; expected str")
    if not any(texts):
        raise ValueError(f"train_bpe: got {'only empty texts' if texts else 'no texts'}; pass the sentences to "
                         "learn merges from")
    special_tokens = list(special_tokens)
    missing = [token for token in (PAD, BOS, EOS, UNK) if token not in special_tokens]
    if missing or len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"train_bpe: special_tokens={special_tokens!r}; expected distinct tokens including "
                         f"{PAD}, {BOS}, {EOS} and {UNK}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    smallest = len(special_tokens) + len(alphabet) + 1
    if not isinstance(vocab_size, int) or vocab_size < smallest:
        raise ValueError(f"train_bpe: vocab_size={vocab_size!r}; expected an int >= {smallest} ({len(special_tokens)} "
                         f"special tokens + {len(alphabet)} byte symbols + at least one merge)")
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"train_bpe: min_frequency={min_frequency!r}; expected an int >= 1")

    tokenizer = tokenizers.Tokenizer(models.BPE(unk_token=UNK))
    # add_prefix_space=False keeps decode(encode(text)) == text; the regex splits words, digits and punctuation.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
                                  initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos_id)])
    return Tokenizer(tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def save_tokenizer(tokenizer: Tokenizer, folder) -> None:
    """Writes tokenizer.json and tokenizer_config.json into `folder` (created if missing), which
    `Tokenizer.from_folder` and transformers' AutoTokenizer read back."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer.bos_token,
              "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
              "unk_token": getattr(tokenizer.tokenizer.model, "unk_token", None)}
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
