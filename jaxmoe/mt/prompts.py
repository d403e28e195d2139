"""Translation prompts for any causal LM: GPT-MT's zero- and k-shot template, ALMA's, a user's, or a checkpoint's
chat template around any of them.

GPT-MT (Hendy et al. 2023) asks `Translate this into 1. {target language}:\\n\\n{source}\\n\\n1.` and the model
continues after "1.". A k-shot prompt repeats that block for each shot with the shot's reference after "1. ", then
ends with the block of the sentence to translate; blocks are separated by a blank line:

    Translate this into 1. English:\\n\\n{shot source}\\n\\n1. {shot reference}\\n\\nTranslate this into 1. English:
    \\n\\n{source}\\n\\n1.

Every template here works the same way: a template renders one block for a source (ending where the translation
starts), a shot is its block + " " + its reference, and the blocks are joined by `SHOT_SEPARATOR`. A Jinja
template (one with "{{" or "{%") instead renders the whole prompt itself from `src`, `src_lang`, `tgt_lang`
(language names), `src_code`, `tgt_code` and `shots` (a list of {"source", "target"}).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jinja2

from jaxmoe.train.batches import ALMA_PROMPT, LANGUAGE_NAMES

__all__ = ["GPT_MT_PROMPT", "NAMED_PROMPTS", "SHOT_SEPARATOR", "Shot", "TranslationPrompt"]

GPT_MT_PROMPT = "Translate this into 1. {tgt_lang}:\n\n{src}\n\n1."
NAMED_PROMPTS = {"gpt-mt": GPT_MT_PROMPT, "alma": ALMA_PROMPT}
SHOT_SEPARATOR = "\n\n"


class Shot(NamedTuple):
    """One few-shot example: a source sentence (or a document window, lines joined by "\\n") and its reference."""

    source: str
    target: str


def _check_shots(shots) -> tuple[Shot, ...]:
    if isinstance(shots, (str, bytes)) or not isinstance(shots, Sequence):
        raise TypeError(f"shots is a {type(shots).__name__}; expected a sequence of Shot(source, target)")
    checked = []
    for i, shot in enumerate(shots):
        if isinstance(shot, dict):
            shot = (shot.get("source"), shot.get("target"))
        if not (isinstance(shot, Sequence) and len(shot) == 2 and all(isinstance(x, str) for x in shot)):
            raise TypeError(f"shots[{i}] is {shot!r}; expected Shot(source: str, target: str)")
        checked.append(Shot(*shot))
    return tuple(checked)


@dataclasses.dataclass(frozen=True)
class TranslationPrompt:
    """Renders the prompt that asks a model to translate `src` from `src_lang` to `tgt_lang` (ISO codes), after
    any shots.

    template: "gpt-mt" (default), "alma", a format string with {src} and optionally {src_lang}, {tgt_lang}
    (rendered as language names, e.g. "German"), or a Jinja template that renders the whole prompt (see the
    module docstring). chat: when given a `jaxmoe.io.tokenizer.Tokenizer`, the rendered prompt becomes one user
    turn in its chat template (`add_special_tokens` is then False: the template writes its own special tokens).
    """

    template: str = "gpt-mt"
    chat: object = None

    def __post_init__(self):
        if not isinstance(self.template, str) or not self.template:
            raise ValueError(f"prompt template {self.template!r}; expected 'gpt-mt', 'alma', a format string with "
                             "{src}, or a Jinja template")
        text = NAMED_PROMPTS.get(self.template, self.template)
        if "{{" in text or "{%" in text:
            try:
                compiled = jinja2.Environment(undefined=jinja2.StrictUndefined,
                                              keep_trailing_newline=True).from_string(text)
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(f"prompt template {text!r} is not valid Jinja ({e}); fix the template") from None
            object.__setattr__(self, "_jinja", compiled)
        else:
            try:
                text.format(src="", src_lang="", tgt_lang="")
            except (KeyError, IndexError, ValueError, AttributeError) as e:
                known = ", ".join(NAMED_PROMPTS)
                raise ValueError(f"prompt template {text!r} does not format ({e!r}); expected one of {known} or a "
                                 "format string using only {src}, {src_lang}, {tgt_lang}") from None
            if "{src}" not in text:
                raise ValueError(f"prompt template {text!r} has no {{src}} placeholder; expected one of "
                                 f"{', '.join(NAMED_PROMPTS)} or a format string with {{src}}")
            object.__setattr__(self, "_jinja", None)
        object.__setattr__(self, "_text", text)
        if self.chat is not None and not hasattr(self.chat, "apply_chat_template"):
            raise TypeError(f"chat is a {type(self.chat).__name__}; expected a jaxmoe Tokenizer (its chat template)")

    @property
    def add_special_tokens(self) -> bool:
        """Whether the rendered prompt is encoded with the tokenizer's special tokens (not with a chat template)."""
        return self.chat is None

    def block(self, src: str, src_lang: str, tgt_lang: str) -> str:
        """One source's block, ending where its translation starts (format-string templates only)."""
        if self._jinja is not None:
            raise ValueError("a Jinja prompt template renders the whole prompt; call render()")
        return self._text.format(src=src, src_lang=LANGUAGE_NAMES.get(src_lang, src_lang),
                                 tgt_lang=LANGUAGE_NAMES.get(tgt_lang, tgt_lang))

    def render(self, src: str, src_lang: str, tgt_lang: str, shots: Sequence[Shot] = ()) -> str:
        """The prompt for `src` after `shots` (each a Shot or a {"source", "target"} dict), as text."""
        if not isinstance(src, str):
            raise TypeError(f"src is a {type(src).__name__}; expected str")
        shots = _check_shots(shots)
        if self._jinja is not None:
            try:
                text = self._jinja.render(src=src, src_lang=LANGUAGE_NAMES.get(src_lang, src_lang),
                                          tgt_lang=LANGUAGE_NAMES.get(tgt_lang, tgt_lang), src_code=src_lang,
                                          tgt_code=tgt_lang, shots=[s._asdict() for s in shots])
            except jinja2.UndefinedError as e:
                raise ValueError(f"prompt template uses an unknown variable ({e}); it may use src, src_lang, "
                                 "tgt_lang, src_code, tgt_code and shots") from None
        else:
            blocks = [f"{self.block(s.source, src_lang, tgt_lang)} {s.target}" for s in shots]
            text = SHOT_SEPARATOR.join([*blocks, self.block(src, src_lang, tgt_lang)])
        if self.chat is not None:
            text = self.chat.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return text
