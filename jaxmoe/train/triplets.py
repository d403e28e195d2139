"""Preference triplets for CPO (jaxmoe.train.cpo): reading and writing them, building them from a model's own
samples, and turning them into batches of chosen and rejected rows.

  data       `read_triplets` / `write_triplets` (ALMA-R's JSON layout, or jaxmoe's candidate JSONL), and
             `build_triplets`, which samples and scores candidates from a model;
  batches    `encode_preference`, `PreferenceBatch`, `PreferenceStream` (training) and `preference_eval_batches`.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from flax import nnx
from sacrebleu.metrics import BLEU, CHRF

from jaxmoe.infer.generate import generate
from jaxmoe.io.atomic import atomic_write_lines
from jaxmoe.mt.eval import PROMPT_WIDTH_MULTIPLE
from jaxmoe.train.batches import Example, PromptFormat, encode_translation
from jaxmoe.train.data import DataError

__all__ = ["PreferenceBatch", "PreferenceStream", "Triplet", "build_triplets", "encode_preference",
           "preference_eval_batches", "read_triplets", "write_triplets"]


def is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and \
        math.isfinite(float(value))


# --- Triplets: reading and writing -------------------------------------------------------------------------------

class Triplet(NamedTuple):
    """One preference example: the source sentence, the preferred and the dispreferred translation, and the
    direction (ISO 639 codes, e.g. "de", "en")."""

    source: str
    chosen: str
    rejected: str
    src_lang: str
    tgt_lang: str


def _choose(texts: Sequence[str], scores: Sequence[float]) -> tuple[str, str, str | None]:
    """(chosen, rejected, problem): the first highest- and first lowest-scoring texts (ALMA-R's rule; the middle
    ones are dropped); `problem` says why they make no preference pair, else None."""
    best, worst = scores.index(max(scores)), scores.index(min(scores))
    if scores[best] == scores[worst]:
        return texts[best], texts[worst], f"all {len(texts)} candidates score {scores[best]!r}: no preference"
    if texts[best] == texts[worst]:
        return texts[best], texts[worst], (f"the chosen (score {scores[best]!r}) and rejected (score "
                                           f"{scores[worst]!r}) translations are the same text {texts[best]!r:.80}")
    return texts[best], texts[worst], None


def _field(record: Mapping, key: str, kind, where: str):
    if key not in record:
        raise DataError(f"{where}: no field {key!r}; found {sorted(record)[:12]}")
    value = record[key]
    if kind is float:
        if not is_number(value):
            raise DataError(f"{where}: field {key!r} is {value!r}; expected a finite number")
        return float(value)
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {key!r} is a {type(value).__name__}; expected {kind.__name__}")
    return value


def _candidate_triplet(record: Mapping, where: str) -> tuple[Triplet, str | None]:
    """A record of jaxmoe's layout -> (Triplet, problem or None)."""
    candidates = _field(record, "candidates", list, where)
    if len(candidates) < 2:
        raise DataError(f"{where}: {len(candidates)} candidate(s); expected at least 2 to choose a preference pair "
                        "from")
    texts, scores = [], []
    for i, candidate in enumerate(candidates):
        if not isinstance(candidate, Mapping):
            raise DataError(f"{where}: candidates[{i}] is a {type(candidate).__name__}; expected an object with "
                            "'text' and 'score'")
        texts.append(_field(candidate, "text", str, f"{where}, candidates[{i}]"))
        scores.append(_field(candidate, "score", float, f"{where}, candidates[{i}]"))
    chosen, rejected, problem = _choose(texts, scores)
    return Triplet(_field(record, "source", str, where), chosen, rejected, _field(record, "src_lang", str, where),
                   _field(record, "tgt_lang", str, where)), problem


def _alma_r_triplet(t: Mapping, where: str, src_lang: str, tgt_lang: str, scorer_key: str
                    ) -> tuple[Triplet | None, str | None]:
    """ALMA-R's `translation` object -> (Triplet or None when it serves another direction, problem or None)."""
    pair = t.get("language_pair")
    if pair is not None and set(str(pair).split("-")) != {src_lang, tgt_lang}:
        return None, None
    required = t.get("required_directions")
    if required and str(required).split("-")[-1] != tgt_lang:  # ALMA compares the target only
        return None, None
    source = _field(t, src_lang, str, where)
    texts = [_field(t, tgt_lang, str, where), _field(t, f"gpt4_{tgt_lang}", str, where),
             _field(t, f"alma_{tgt_lang}", str, where)]
    delta = t.get("Delta")
    if delta is not None and delta != 0:  # a human judgement of GPT-4 against ALMA decides, the reference aside
        if not is_number(delta):
            raise DataError(f"{where}: field 'Delta' is {delta!r}; expected a finite number or null")
        chosen, rejected = (texts[1], texts[2]) if delta > 0 else (texts[2], texts[1])
        problem = (f"Delta={delta!r} prefers one of two identical translations {chosen!r:.80}"
                   if chosen == rejected else None)
    else:
        scores = [_field(t, f"{system}_{tgt_lang}_{scorer_key}", float, where) for system in ("ref", "gpt4", "alma")]
        chosen, rejected, problem = _choose(texts, scores)
    return Triplet(source, chosen, rejected, src_lang, tgt_lang), problem


def _records(path: Path) -> Iterable[tuple[Any, str]]:
    """(record, location) for each object of a JSON array file or a JSON Lines file."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{str(path)!r} is not valid JSON ({e})") from None
        yield from ((record, f"{str(path)!r}, entry {i}") for i, record in enumerate(records))
        return
    # Split on "\n" only: str.splitlines would also split inside strings that hold U+2028 or U+0085, which
    # json.dumps(ensure_ascii=False) writes as they are.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{str(path)!r}, line {n}: not valid JSON ({e})") from None
        yield record, f"{str(path)!r}, line {n}"


def read_triplets(path, *, src_lang: str | None, tgt_lang: str | None, scorer_key: str = "kiwi_xcomet"
                  ) -> list[Triplet]:
    """The preference triplets for src_lang -> tgt_lang (None and None: every direction of a file in jaxmoe's
    layout) in a JSON Lines file (one object per line) or a JSON array file, in file order. Each object has one
    of two layouts:

    jaxmoe's (what `build_triplets` returns and `write_triplets` writes):
        {"source": str, "src_lang": str, "tgt_lang": str, "candidates": [{"text": str, "score": float}, ...]}
        with at least 2 candidates; other fields are ignored. Objects of another direction are skipped.
    ALMA-R's (haoranxu/ALMA-R-Preference exported to JSON): {"translation": {...}} with the two sentences under
        their language codes (e.g. "de", "en"), the system outputs "gpt4_{tgt}" and "alma_{tgt}", their scores
        "{ref,gpt4,alma}_{tgt}_{scorer_key}" (scorer_key "kiwi_xcomet", "kiwi" or "xcomet"), and optionally
        "language_pair" ("de-en": the object serves both directions), "required_directions" ("en-de": only
        that target) and "Delta" (a human label: > 0 prefers gpt4_{tgt} over alma_{tgt}, < 0 the reverse, 0 none).
        As ALMA-R's `preprocess_cpo_data` reads it.

    Chosen is the first highest-scoring candidate, rejected the first lowest-scoring (ALMA-R drops the middle);
    a human `Delta` decides between the two systems instead. Raises DataError naming the file and line (or
    entry) for a missing or mistyped field, fewer than 2 candidates, all candidates scoring the same, or a chosen
    text identical to the rejected one; nothing is silently dropped but other directions.
    """
    path = Path(path)
    if (src_lang is None) != (tgt_lang is None):
        raise ValueError(f"read_triplets: src_lang={src_lang!r}, tgt_lang={tgt_lang!r}; pass both, or neither "
                         "for every direction of a file in jaxmoe's layout")
    every = src_lang is None
    for name, value in (("src_lang", src_lang or "-"), ("tgt_lang", tgt_lang or "-"), ("scorer_key", scorer_key)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"read_triplets: {name}={value!r}; expected a non-empty str, e.g. 'de'")
    if not path.is_file():
        raise FileNotFoundError(f"read_triplets: {str(path)!r} does not exist; expected a JSON Lines or JSON file "
                                "of preference triplets")
    triplets, directions = [], set()
    for record, where in _records(path):
        if not isinstance(record, Mapping):
            raise DataError(f"{where}: a {type(record).__name__}; expected a JSON object")
        if "candidates" in record:
            triplet, problem = _candidate_triplet(record, where)
            directions.add(f"{triplet.src_lang}-{triplet.tgt_lang}")
            if not every and (triplet.src_lang, triplet.tgt_lang) != (src_lang, tgt_lang):
                continue
        elif "translation" in record:
            if every:
                raise DataError(f"{where}: an ALMA-R record serves the direction it is read for; pass src_lang and "
                                "tgt_lang (data.src_lang / data.tgt_lang in a run config)")
            t = _field(record, "translation", Mapping, where)
            directions.add(str(t.get("language_pair", "?")))
            triplet, problem = _alma_r_triplet(t, where, src_lang, tgt_lang, scorer_key)
            if triplet is None:
                continue
        else:
            raise DataError(f"{where}: neither 'candidates' (jaxmoe's layout) nor 'translation' (ALMA-R's) in "
                            f"fields {sorted(record)[:12]}; see read_triplets for the two layouts")
        if problem:
            raise DataError(f"{where}: {problem}; fix or remove this entry")
        triplets.append(triplet)
    if not triplets:
        wanted = "any direction" if every else f"{src_lang}-{tgt_lang}"
        raise DataError(f"{str(path)!r} holds no triplets for {wanted}; its entries are for "
                        f"{sorted(directions) or 'nothing (empty file)'}")
    return triplets


def write_triplets(path, records: Sequence[Mapping]) -> None:
    """Writes candidate records in jaxmoe's layout (see read_triplets; e.g. from build_triplets) as JSON Lines,
    atomically: every record is checked first (DataError naming records[i]), then the file is written to a
    temporary name in the same folder and renamed over `path`, so a reader never sees half a file."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"write_triplets: folder {str(path.parent)!r} does not exist; create it first")
    if isinstance(records, (str, Mapping)) or not records:
        raise DataError(f"write_triplets: got {type(records).__name__} {records!r:.80}; expected a non-empty list "
                        "of candidate records")
    records = list(records)
    for i, record in enumerate(records):
        where = f"write_triplets: records[{i}]"
        if not isinstance(record, Mapping):
            raise DataError(f"{where} is a {type(record).__name__}; expected a dict")
        problem = _candidate_triplet(record, where)[1]
        if problem:
            raise DataError(f"{where}: {problem}; read_triplets would refuse it")
    atomic_write_lines(path, (json.dumps(record, ensure_ascii=False) for record in records))


# --- Triplets: sampling and scoring candidates -------------------------------------------------------------------

def _sample(model, tokenizer, prompts: list[str], *, num_samples: int, temperature: float, top_p: float | None,
            max_new_tokens: int, batch_size: int, seed: int) -> list[list[str]]:
    """num_samples sampled continuations per prompt, each cut at the first EOS id and then at its first line
    break (ALMA's decoding), stripped. Rows are batched as `jaxmoe.mt.eval.translate` batches them: sorted by
    prompt length, left-padded to a multiple of PROMPT_WIDTH_MULTIPLE, the last batch filled with a repeat."""
    config = model.config
    pad_id = next((i for i in (tokenizer.pad_token_id, config.pad_token_id) if i is not None), 0)
    config_eos = config.eos_token_id
    config_eos = () if config_eos is None else (config_eos,) if np.isscalar(config_eos) else tuple(config_eos)
    eos_ids = tuple(dict.fromkeys(int(i) for i in (tokenizer.eos_token_id, *config_eos) if i is not None))
    lengths = [len(tokenizer.encode(text)) for text in prompts]
    limit = config.max_position_embeddings
    longest = int(np.argmax(lengths))
    if min(lengths) == 0 or lengths[longest] + max_new_tokens > limit:
        raise ValueError(f"build_triplets: prompts encode to {min(lengths)} to {lengths[longest]} tokens; expected "
                         f"at least 1, and at most {limit - max_new_tokens} (the model's max_position_embeddings="
                         f"{limit} less max_new_tokens={max_new_tokens}); shorten source {longest} or max_new_tokens")
    rows_of = [p for p in range(len(prompts)) for _ in range(num_samples)]
    order = sorted(range(len(rows_of)), key=lambda r: lengths[rows_of[r]])
    rows = min(batch_size, len(order))
    rngs = nnx.Rngs(seed)  # each generate call draws the next key: the samples depend on (seed, batch layout)
    outputs: list[list[str]] = [[] for _ in prompts]
    for start in range(0, len(order), rows):
        members = order[start:start + rows]
        filled = members + [members[-1]] * (rows - len(members))
        ids, mask = tokenizer.batch_encode([prompts[rows_of[r]] for r in filled], pad_id=pad_id)
        width = -(-ids.shape[1] // PROMPT_WIDTH_MULTIPLE) * PROMPT_WIDTH_MULTIPLE
        extra = min(width, limit - max_new_tokens) - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id)
        mask = np.pad(mask, ((0, 0), (extra, 0)))
        tokens = np.asarray(generate(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p, eos_token_id=eos_ids, pad_token_id=pad_id,
                                     rngs=rngs))[:, ids.shape[1]:]
        for r, row in zip(members, tokens):
            ends = np.flatnonzero(np.isin(row, eos_ids))
            text = tokenizer.decode(row[:ends[0]] if ends.size else row, skip_special_tokens=True).strip()
            outputs[rows_of[r]].append(text.split("\n")[0].strip())
    return outputs


def _metric_scores(metric: str, tgt_lang: str, hypotheses: list[str], references: list[str]) -> list[float]:
    """sacreBLEU sentence scores 0..100: chrF, or BLEU with effective order and the target language's tokenizer."""
    scorer = CHRF() if metric == "chrf" else BLEU(trg_lang=tgt_lang, effective_order=True)
    return [float(scorer.sentence_score(h, [r]).score) for h, r in zip(hypotheses, references)]


def build_triplets(model, tokenizer, sources: Sequence[str], references: Sequence[str], *, src_lang: str,
                   tgt_lang: str, prompt: PromptFormat = PromptFormat(), num_samples: int = 4,
                   temperature: float = 0.9, top_p: float | None = 0.95, metric: str = "chrf",
                   max_new_tokens: int = 256, batch_size: int = 32, seed: int = 0,
                   scorer: Callable[[list[str], list[str]], Sequence[float]] | None = None) -> list[dict]:
    """Candidate records (jaxmoe's layout, see read_triplets) for CPO: per source, `num_samples` translations
    sampled from the model (temperature, top_p; keys from `seed`) plus the reference, each scored.

    Scores are sacreBLEU sentence chrF (metric="chrf") or BLEU ("bleu") against the reference (so the reference
    scores 100), or, when `scorer` is given, `scorer(sources, hypotheses)` -> one float per candidate, e.g. a
    reference-free COMETkiwi model loaded from a local folder (ALMA-R's choice; jaxmoe does not depend on
    comet: wrap its `predict` yourself). Each candidate carries "system": "sample" or "reference".

    A source whose best and worst candidates are the same text, or all score the same, makes no preference pair:
    it is left out, and the count is reported in a warning. Returns the records in source order.
    """
    if isinstance(sources, str) or isinstance(references, str) or len(sources) != len(references) or not sources:
        raise ValueError(f"build_triplets: {len(sources)} sources and {len(references)} references; expected "
                         "equally long non-empty lists of str")
    for what, texts in (("sources", sources), ("references", references)):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"build_triplets: {what}[{i}] is a {type(text).__name__}; expected str")
    for name, value in (("src_lang", src_lang), ("tgt_lang", tgt_lang)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"build_triplets: {name}={value!r}; expected a non-empty str, e.g. 'de'")
    if not isinstance(prompt, PromptFormat):
        raise TypeError(f"build_triplets: prompt is a {type(prompt).__name__}; expected a PromptFormat")
    for name, value, least in (("num_samples", num_samples, 1), ("max_new_tokens", max_new_tokens, 1),
                               ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise ValueError(f"build_triplets: {name}={value!r}; expected an int >= {least}")
    if not is_number(temperature) or temperature <= 0:
        raise ValueError(f"build_triplets: temperature={temperature!r}; expected a number > 0 (sampling)")
    if scorer is None and metric not in ("chrf", "bleu"):
        raise ValueError(f"build_triplets: metric={metric!r}; expected 'chrf' or 'bleu', or pass scorer=")

    prompts = [prompt.render(s, src_lang, tgt_lang) for s in sources]
    samples = _sample(model, tokenizer, prompts, num_samples=int(num_samples), temperature=float(temperature),
                      top_p=top_p, max_new_tokens=int(max_new_tokens), batch_size=int(batch_size), seed=int(seed))
    texts = [[*drawn, ref] for drawn, ref in zip(samples, references)]
    flat_sources = [s for s, group in zip(sources, texts) for _ in group]
    flat_texts = [text for group in texts for text in group]
    if scorer is None:
        flat_refs = [r for r, group in zip(references, texts) for _ in group]
        flat_scores = _metric_scores(metric, tgt_lang, flat_texts, flat_refs)
    else:
        flat_scores = list(scorer(flat_sources, flat_texts))
        if len(flat_scores) != len(flat_texts) or not all(is_number(s) for s in flat_scores):
            raise ValueError(f"build_triplets: scorer returned {len(flat_scores)} values for {len(flat_texts)} "
                             f"candidates (first {flat_scores[:3]!r}); expected one finite number per candidate")
    records, skipped, at = [], 0, 0
    for source, group in zip(sources, texts):
        scores = [float(s) for s in flat_scores[at:at + len(group)]]
        at += len(group)
        if _choose(group, scores)[2]:
            skipped += 1
            continue
        records.append({"source": source, "src_lang": src_lang, "tgt_lang": tgt_lang, "candidates": [
            {"text": text, "score": score, "system": "reference" if i == len(group) - 1 else "sample"}
            for i, (text, score) in enumerate(zip(group, scores))]})
    if skipped:
        warnings.warn(f"build_triplets: left out {skipped} of {len(sources)} sources whose best and worst "
                      "candidates are the same text or score the same (no preference pair)")
    return records


# --- Batches -----------------------------------------------------------------------------------------------------

class PreferenceBatch(NamedTuple):
    """b preference pairs as int32 [2b, t] arrays, right-padded: rows 0..b-1 the chosen examples, rows b..2b-1
    the rejected ones in the same order. input_ids (pad id on padding); attention_mask (1 = token); loss_mask
    (1 on target tokens, EOS included). A pair whose chosen row has no target is a filler (weight 0)."""

    input_ids: Any
    attention_mask: Any
    loss_mask: Any


def encode_preference(tokenizer, prompt_text: str, chosen: str, rejected: str) -> tuple[Example, Example]:
    """((ids, loss_mask) chosen, (ids, loss_mask) rejected), each as `encode_translation` encodes a translation
    example: the prompt with special tokens, " " + target, EOS; the loss on the target and EOS."""
    return encode_translation(tokenizer, prompt_text, chosen), encode_translation(tokenizer, prompt_text, rejected)


def _assemble(pairs: Sequence[tuple[Example, Example]], batch_size: int, max_len: int, pad_id: int
              ) -> PreferenceBatch:
    ids = np.full((2 * batch_size, max_len), pad_id, np.int32)
    attention = np.zeros((2 * batch_size, max_len), np.int32)
    loss_mask = np.zeros((2 * batch_size, max_len), np.int32)
    for i, pair in enumerate(pairs):
        for row, (tokens, mask) in zip((i, batch_size + i), pair):
            ids[row, :len(tokens)], attention[row, :len(tokens)], loss_mask[row, :len(tokens)] = tokens, 1, mask
    return PreferenceBatch(ids, attention, loss_mask)


def _check_sizes(where: str, **values) -> None:
    for name, value in values.items():
        least = 0 if name in ("seed", "pad_id") else 2 if name == "max_len" else 1
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise ValueError(f"{where}: {name}={value!r}; expected an int >= {least}")


def _check_triplets(triplets, where: str) -> None:
    if isinstance(triplets, (str, Mapping)) or not len(triplets):
        raise DataError(f"{where}: no triplets; expected a non-empty list of Triplet (see read_triplets)")
    if not isinstance(triplets[0], Triplet):
        raise TypeError(f"{where}: triplets[0] is a {type(triplets[0]).__name__}; expected a Triplet")


class PreferenceStream:
    """An endless iterator of PreferenceBatch of numpy int32 [2 * batch_size, max_len], b = batch_size pairs each.

    Epoch e visits the triplets in the order `np.random.default_rng([seed, e]).permutation(n)`; each batch takes
    the next batch_size triplets whose chosen and rejected examples both fit max_len (longer ones are skipped and
    counted in a warning at the end of each epoch); an epoch's tail continues into the next epoch, so batches are
    never short. A batch depends only on (epoch, index): `state()` / `restore()` resume exactly, as
    `jaxmoe.train.batches.BatchStream` does. Each triplet becomes the prompt `prompt.render(source, src_lang,
    tgt_lang)` and `encode_preference`.
    """

    def __init__(self, triplets: Sequence[Triplet], tokenizer, *, prompt: PromptFormat = PromptFormat(),
                 batch_size: int, max_len: int, pad_id: int, seed: int = 0):
        _check_sizes("PreferenceStream", batch_size=batch_size, max_len=max_len, pad_id=pad_id, seed=seed)
        _check_triplets(triplets, "PreferenceStream")
        self.batch_size, self.max_len, self.pad_id, self.seed = int(batch_size), int(max_len), int(pad_id), int(seed)
        self._triplets, self._tokenizer, self._prompt, self._n = triplets, tokenizer, prompt, len(triplets)
        self._epoch = self._index = self._batches = 0
        self._order = (-1, None)
        self._dropped = self._longest = self._run = 0

    def state(self) -> dict[str, int]:
        """{"epoch", "index" (next position in the epoch's order), "batches" (served so far)}: JSON-able."""
        return {"epoch": self._epoch, "index": self._index, "batches": self._batches}

    def restore(self, state: Mapping[str, int]) -> None:
        """Continues from `state()` of a stream over the same triplets and settings."""
        if not isinstance(state, Mapping) or set(state) != {"epoch", "index", "batches"}:
            raise ValueError(f"PreferenceStream.restore: got {state!r}; expected a dict from "
                             "PreferenceStream.state() with keys epoch, index, batches")
        for key, value in state.items():
            limit = self._n if key == "index" else None
            if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (limit and value >= limit):
                raise ValueError(f"PreferenceStream.restore: {key}={value!r}; expected an int >= 0"
                                 + (f" and < {limit} (the number of triplets)" if limit else ""))
        self._epoch, self._index, self._batches = state["epoch"], state["index"], state["batches"]
        self._dropped = self._longest = self._run = 0

    def __iter__(self):
        return self

    def __next__(self) -> PreferenceBatch:
        pairs = []
        while len(pairs) < self.batch_size:
            if self._order[0] != self._epoch:
                self._order = (self._epoch, np.random.default_rng([self.seed, self._epoch]).permutation(self._n))
            t = self._triplets[int(self._order[1][self._index])]
            pair = encode_preference(self._tokenizer, self._prompt.render(t.source, t.src_lang, t.tgt_lang),
                                     t.chosen, t.rejected)
            length = max(len(pair[0][0]), len(pair[1][0]))
            if length <= self.max_len:
                pairs.append(pair)
                self._run = 0
            else:
                self._dropped, self._longest, self._run = self._dropped + 1, max(self._longest, length), self._run + 1
                if self._run >= self._n:
                    raise DataError(f"PreferenceStream: all {self._n} triplets are longer than max_len="
                                    f"{self.max_len} tokens; raise max_len")
            self._advance()
        self._batches += 1
        return _assemble(pairs, self.batch_size, self.max_len, self.pad_id)

    def _advance(self) -> None:
        self._index += 1
        if self._index == self._n:
            if self._dropped:
                warnings.warn(f"PreferenceStream epoch {self._epoch}: skipped {self._dropped} triplets whose chosen "
                              f"or rejected example is longer than max_len={self.max_len} tokens (the longest has "
                              f"{self._longest}); raise max_len to train on them")
            self._epoch, self._index, self._dropped, self._longest = self._epoch + 1, 0, 0, 0


def preference_eval_batches(triplets: Sequence[Triplet], tokenizer, *, prompt: PromptFormat = PromptFormat(),
                            batch_size: int, max_len: int, pad_id: int) -> list[PreferenceBatch]:
    """Every triplet once, in order, as PreferenceBatch of numpy int32 [2 * batch_size, max_len]; the last batch is
    filled with empty pairs (no tokens: weight 0 in cpo_evaluate), so one compiled shape serves all. Triplets
    longer than max_len are skipped, counted in a warning."""
    _check_sizes("preference_eval_batches", batch_size=batch_size, max_len=max_len, pad_id=pad_id)
    _check_triplets(triplets, "preference_eval_batches")
    pairs = [encode_preference(tokenizer, prompt.render(t.source, t.src_lang, t.tgt_lang), t.chosen, t.rejected)
             for t in triplets]
    fitting = [p for p in pairs if max(len(p[0][0]), len(p[1][0])) <= max_len]
    if len(fitting) < len(pairs):
        warnings.warn(f"preference_eval_batches: skipped {len(pairs) - len(fitting)} of {len(pairs)} triplets "
                      f"longer than max_len={max_len} tokens; raise max_len to evaluate them")
    if not fitting:
        raise DataError(f"preference_eval_batches: all {len(pairs)} triplets are longer than max_len={max_len}")
    return [_assemble(fitting[i:i + batch_size], batch_size, max_len, pad_id)
            for i in range(0, len(fitting), batch_size)]
