"""Text <-> token ids for checkpoint folders: a thin wrapper over the `tokenizers` library, plus chat templates.

`Tokenizer.from_folder` reads what transformers' tokenizer folders hold: `tokenizer.json` (the tokenizer itself),
`tokenizer_config.json` (special tokens, added tokens, and the chat template) and `chat_template.jinja` (where
newer transformers versions keep the template). Chat templates render the way transformers renders them: in a
sandboxed Jinja environment that sees `messages`, `add_generation_prompt` and the special tokens. Without a
template, the Phi format `<|system|>...<|end|><|user|>...<|end|><|assistant|>` is used (phi_models.md §1.7).
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import jinja2.ext
import numpy as np
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["PHI_ROLES", "Tokenizer"]

PHI_ROLES = ("system", "user", "assistant", "tool")


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise_exception(message):
    raise ValueError(f"chat template: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; transformers overrides it with plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def _phi_chat(messages: list[dict], add_generation_prompt: bool, eos_token: str | None) -> str:
    text = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
    # As Phi-4-mini's own template: a finished conversation ends with the eos token.
    return text + ("<|assistant|>" if add_generation_prompt else (eos_token or ""))


class Tokenizer:
    """Encodes text to int token ids and back; renders chat conversations to prompt text."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, chat_template: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None, pad_token: str | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
            if token is not None and tokenizer.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")
        self._template = None if chat_template is None else _compile(chat_template)

    @classmethod
    def from_folder(cls, path) -> "Tokenizer":
        """Reads `tokenizer.json`, plus `tokenizer_config.json` and `chat_template.jinja` when present."""
        folder = Path(path)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {str(folder)!r}; expected a Hugging Face tokenizer folder (a transformers "
                "fast tokenizer saved with `save_pretrained`)")
        tokenizer = tokenizers.Tokenizer.from_file(str(file))
        config = {}
        if (folder / "tokenizer_config.json").is_file():
            with open(folder / "tokenizer_config.json") as f:
                config = json.load(f)
        for token_id, spec in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
            cls._add_token(tokenizer, int(token_id), spec)
        template = config.get("chat_template")
        if isinstance(template, list):  # older format: named templates
            template = {t["name"]: t["template"] for t in template}.get("default")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        return cls(tokenizer, chat_template=template, bos_token=_token_text(config.get("bos_token")),
                   eos_token=_token_text(config.get("eos_token")), pad_token=_token_text(config.get("pad_token")))

    @staticmethod
    def _add_token(tokenizer: tokenizers.Tokenizer, token_id: int, spec: dict) -> None:
        content = spec["content"]
        if tokenizer.token_to_id(content) is None:
            token = tokenizers.AddedToken(content, single_word=spec.get("single_word", False),
                                          lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                                          normalized=spec.get("normalized", True), special=spec.get("special", False))
            (tokenizer.add_special_tokens if spec.get("special", False) else tokenizer.add_tokens)([token])
        got = tokenizer.token_to_id(content)
        if got != token_id:
            raise ValueError(f"added token {content!r} gets id {got} from tokenizer.json, but tokenizer_config.json "
                             f"declares id {token_id}; the two files come from different tokenizers")

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce, added tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.tokenizer.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.tokenizer.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.tokenizer.token_to_id(self.pad_token)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """text -> token ids. `add_special_tokens` runs the tokenizer's post-processor (e.g. a BOS), as in
        transformers' `encode`."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str; got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Token ids (a list or a 1-D array) -> text."""
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                     skip_special_tokens=skip_special_tokens)

    def batch_encode(self, texts: list[str], *, pad_id: int | None = None, add_special_tokens: bool = True
                     ) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (ids int32 [b, t], attention_mask int32 [b, t]), left-padded with `pad_id` (default: the
        pad token) to the longest text, so every row's last token sits in the last column for generation."""
        if isinstance(texts, str) or not texts:
            raise ValueError("batch_encode expects a non-empty list of strings")
        if pad_id is None:
            pad_id = self.pad_token_id
            if pad_id is None:
                raise ValueError("batch_encode: this tokenizer has no pad_token; pass pad_id=...")
        rows = [self.encode(text, add_special_tokens=add_special_tokens) for text in texts]
        length = max(len(row) for row in rows)
        ids = np.full((len(rows), length), pad_id, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for i, row in enumerate(rows):
            if row:
                ids[i, length - len(row):] = row
                mask[i, length - len(row):] = 1
        return ids, mask

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Renders [{"role": ..., "content": ...}, ...] (roles from PHI_ROLES) to prompt text with the checkpoint's
        chat template, or the Phi format when it has none. Encode it with `encode(text, add_special_tokens=False)`."""
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content"), str):
                raise ValueError(f"chat message {i} is {message!r}; expected a dict with str 'role' and 'content'")
            if message["role"] not in PHI_ROLES:
                raise ValueError(f"chat message {i} has unknown role {message['role']!r}; Phi chat formats know "
                                 f"{', '.join(PHI_ROLES)}")
        if self._template is None:
            return _phi_chat(messages, add_generation_prompt, self.eos_token)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=self.eos_token, pad_token=self.pad_token)
