"""Training data: parallel and monolingual text -> tfds array_record datasets -> random-access records.

Text files (line-aligned pairs, ALMA JSON, or one document per line) are prepared once into a tfds data
directory by `prepare_parallel` / `prepare_monolingual`, which return a `tfds.core.DatasetBuilder`; `load_split`
reads a split (of those, or of a public tfds dataset prepared in array_record format) as a random-access sequence
of str dicts. `jaxmoe.train.batches` turns records into token batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

__all__ = ["ALMA_LANGUAGE_SAMPLING", "ConcatRecords", "DataError", "DirectedRecords", "LanguageMix",
           "MonolingualSource", "ParallelSource", "Records", "load_split", "prepare_monolingual", "prepare_parallel",
           "sampling_probabilities"]

# ALMA's stage-1 (monolingual fine-tuning) language sampling probabilities (Xu et al. 2024, section 3 and App. D.1).
ALMA_LANGUAGE_SAMPLING = {"en": 0.17, "ru": 0.22, "cs": 0.14, "zh": 0.19, "is": 0.08, "de": 0.20}


class DataError(ValueError):
    """Training data that cannot be used as it is: empty, misaligned, malformed, or too long."""


# --- Sources ---------------------------------------------------------------------------------------------------

def _check_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist (or is not a file)")
    if path.stat().st_size == 0:
        raise DataError(f"{what} {str(path)!r} is empty")


def _read_lines(path: Path) -> list[str]:
    """The file's lines split on '\\n' only (str.splitlines would also split on U+2028 and break alignment)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{str(path)!r} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _warn_skipped(skipped: list[int], total: int, where: str) -> None:
    if skipped:
        warnings.warn(f"{where}: skipped {len(skipped)} of {total} lines with empty text (first at line "
                      f"{skipped[0] + 1})", stacklevel=3)


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclasses.dataclass(frozen=True, slots=True)
class ParallelSource:
    """Sentence pairs from line-aligned text files (`src_path`, `tgt_path`) or one ALMA JSON file (`json_path`: a
    list of {"translation": {src_lang: ..., tgt_lang: ...}}, or such entries one per line, JSON Lines, as ALMA's
    training files are). Languages are codes such as "de", "en"."""

    src_lang: str
    tgt_lang: str
    src_path: str | Path | None = None
    tgt_path: str | Path | None = None
    json_path: str | Path | None = None

    def __post_init__(self):
        for name in ("src_lang", "tgt_lang"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"ParallelSource: {name}={getattr(self, name)!r}; expected a language code like 'de'")
        given = (self.src_path is not None, self.tgt_path is not None, self.json_path is not None)
        if given not in ((True, True, False), (False, False, True)):
            raise ValueError("ParallelSource: pass either src_path and tgt_path (line-aligned text files) or "
                             f"json_path (ALMA JSON); got src_path={self.src_path!r}, tgt_path={self.tgt_path!r}, "
                             f"json_path={self.json_path!r}")
        for name, what in self._files():
            _check_file(Path(getattr(self, name)), what)

    def _files(self) -> list[tuple[str, str]]:
        if self.json_path is not None:
            return [("json_path", "ALMA JSON file")]
        return [("src_path", f"source-language ({self.src_lang}) text file"),
                ("tgt_path", f"target-language ({self.tgt_lang}) text file")]

    def fingerprint(self) -> str:
        """sha256 hex of the languages and the files' contents: it changes whenever the pairs may change."""
        parts = [self.src_lang, self.tgt_lang] + [f"{name}={_file_digest(Path(getattr(self, name)))}"
                                                  for name, _ in self._files()]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def read(self) -> list[tuple[int, str, str]]:
        """[(line or entry index, source text, target text)], in file order; pairs with an empty side are skipped
        with a warning that counts them."""
        for name, what in self._files():
            _check_file(Path(getattr(self, name)), what)
        if self.json_path is not None:
            pairs, where = self._read_json(Path(self.json_path)), str(self.json_path)
        else:
            src_lines, tgt_lines = _read_lines(Path(self.src_path)), _read_lines(Path(self.tgt_path))
            if len(src_lines) != len(tgt_lines):
                raise DataError(f"{str(self.src_path)!r} has {len(src_lines)} lines but {str(self.tgt_path)!r} has "
                                f"{len(tgt_lines)}; the files must be line-aligned")
            pairs, where = list(zip(src_lines, tgt_lines)), f"{self.src_path} / {self.tgt_path}"
        skipped = [i for i, (src, tgt) in enumerate(pairs) if not src.strip() or not tgt.strip()]
        _warn_skipped(skipped, len(pairs), where)
        skip = set(skipped)
        return [(i, src, tgt) for i, (src, tgt) in enumerate(pairs) if i not in skip]

    def _read_json(self, path: Path) -> list[tuple[str, str]]:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{str(path)!r} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":
                raise DataError(f"{str(path)!r} is not a JSON file: {e}") from None
            entries = []  # JSON Lines, as ALMA's own training files: one entry per line
            for n, line in enumerate(text.split("\n"), start=1):
                if line.strip():
                    try:
                        entries.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"line {n} of {str(path)!r} (JSON Lines) is not JSON: {e}") from None
        if not isinstance(entries, list) or not entries:
            raise DataError(f"{str(path)!r} holds {type(entries).__name__}; expected a non-empty JSON list of "
                            '{"translation": {...}} entries')
        pairs = []
        for i, entry in enumerate(entries):
            translation = entry.get("translation") if isinstance(entry, dict) else None
            if not isinstance(translation, dict):
                raise DataError(f"entry {i} of {str(path)!r} is {str(entry)[:80]!r}; expected "
                                '{"translation": {...}}')
            if not all(isinstance(translation.get(lang), str) for lang in (self.src_lang, self.tgt_lang)):
                raise DataError(f"entry {i} of {str(path)!r} has translation keys {sorted(translation)}; expected "
                                f"str texts under {self.src_lang!r} and {self.tgt_lang!r}")
            pairs.append((translation[self.src_lang], translation[self.tgt_lang]))
        return pairs


@dataclasses.dataclass(frozen=True, slots=True)
class MonolingualSource:
    """Text from one or more files, one document (or sentence) per line, read in the order given. deduplicate:
    keep only the first occurrence of each line (compared after stripping surrounding whitespace)."""

    paths: tuple[str | Path, ...]
    deduplicate: bool = False

    def __post_init__(self):
        paths = (self.paths,) if isinstance(self.paths, (str, Path)) else tuple(self.paths)
        if not paths:
            raise ValueError("MonolingualSource: no paths; expected one or more text files")
        object.__setattr__(self, "paths", paths)
        for path in paths:
            _check_file(Path(path), "text file")

    def fingerprint(self) -> str:
        """sha256 hex of the files' contents, in order (and of the deduplicate setting, when on)."""
        parts = [_file_digest(Path(p)) for p in self.paths] + (["deduplicate"] if self.deduplicate else [])
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def read(self) -> list[tuple[int, str]]:
        """[(line index counted across the files, text)]; empty lines are skipped with a warning that counts them."""
        lines = []
        for path in self.paths:
            _check_file(Path(path), "text file")
            lines += _read_lines(Path(path))
        skipped = [i for i, line in enumerate(lines) if not line.strip()]
        _warn_skipped(skipped, len(lines), ", ".join(str(p) for p in self.paths))
        kept = [(i, line) for i, line in enumerate(lines) if line.strip()]
        if self.deduplicate:
            seen: set[str] = set()
            kept = [(i, line) for i, line in kept if not (line.strip() in seen or seen.add(line.strip()))]
        return kept


# --- tfds datasets ---------------------------------------------------------------------------------------------

def _prepare(name: str, splits: Mapping[str, Any], source_type: type, features: dict[str, Any],
             examples: Callable[[Any], Any], data_dir) -> tfds.core.DatasetBuilder:
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"dataset name {name!r}: expected snake_case, like 'alma_deen'")
    if not isinstance(splits, Mapping) or not splits:
        raise ValueError(f"splits={splits!r}: expected a non-empty dict of split name -> {source_type.__name__}")
    for split, source in splits.items():
        if not isinstance(split, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", split):
            raise ValueError(f"split name {split!r}: expected letters, digits, '_' or '-', like 'train'")
        if not isinstance(source, source_type):
            raise TypeError(f"split {split!r} is a {type(source).__name__}; expected a {source_type.__name__}")
    # The config name carries a hash of the files' contents: changed files get a fresh directory, so stale records
    # are never read, and unchanged files find their prepared data and are not read at all.
    digest = hashlib.sha256(json.dumps({s: splits[s].fingerprint() for s in sorted(splits)}).encode()).hexdigest()
    config = tfds.core.BuilderConfig(name=f"files_{digest[:16]}")
    builder_name = name

    class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = builder_name
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = [config]
        # No code folder to look for download checksums in (nothing is downloaded). tfds would otherwise inspect
        # this module's package with the importlib_resources backport, which it needs but does not install.
        code_path = None

        def _info(self):
            # disable_shuffling: records are written in key (= line index) order, so record i is the i-th kept line.
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                         disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(source) for split, source in splits.items()}

        def _generate_examples(self, source):
            return examples(source)

    builder = Builder(config=config.name, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()  # a no-op when this config's directory is already complete
    return builder


def prepare_parallel(name: str, splits: Mapping[str, ParallelSource], *, data_dir) -> tfds.core.DatasetBuilder:
    """Prepares each split's pairs as records {"src": str, "tgt": str} in file order, under
    data_dir/name/files_<hash of the files>/1.0.0 (array_record); reuses that directory when it is complete."""
    def examples(source: ParallelSource):
        return ((i, {"src": src, "tgt": tgt}) for i, src, tgt in source.read())
    return _prepare(name, splits, ParallelSource, {"src": tfds.features.Text(), "tgt": tfds.features.Text()},
                    examples, data_dir)


def prepare_monolingual(name: str, splits: Mapping[str, MonolingualSource], *, data_dir
                        ) -> tfds.core.DatasetBuilder:
    """As `prepare_parallel`, for records {"text": str}."""
    def examples(source: MonolingualSource):
        return ((i, {"text": text}) for i, text in source.read())
    return _prepare(name, splits, MonolingualSource, {"text": tfds.features.Text()}, examples, data_dir)


class Records(Sequence):
    """A random-access view of one split: record i as a dict with bytes decoded to str, and, given `src_lang` and
    `tgt_lang`, translation records {src_lang: ..., tgt_lang: ...} renamed to {"src": ..., "tgt": ...}."""

    def __init__(self, source: Sequence, *, src_lang: str | None = None, tgt_lang: str | None = None):
        if (src_lang is None) != (tgt_lang is None):
            raise ValueError(f"src_lang={src_lang!r}, tgt_lang={tgt_lang!r}: pass both or neither")
        self._source, self._langs = source, None if src_lang is None else (src_lang, tgt_lang)
        if self._langs and len(source):
            keys = sorted(source[0])
            if not set(self._langs) <= set(keys):
                raise DataError(f"records have keys {keys}; expected the languages {src_lang!r} and {tgt_lang!r}")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = operator.index(index)
        i = i + len(self) if i < 0 else i
        if not 0 <= i < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        record = {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in self._source[i].items()}
        return record if self._langs is None else {"src": record[self._langs[0]], "tgt": record[self._langs[1]]}


def load_split(builder_or_name: tfds.core.DatasetBuilder | str, split: str, *, data_dir=None, download: bool = False,
               src_lang: str | None = None, tgt_lang: str | None = None) -> Records:
    """One split as `Records`. A builder (from `prepare_*`) reads its own data; a name ("wmt19_translate/de-en")
    is looked up in data_dir (default: tfds's, ~/tensorflow_datasets) and must be prepared there in array_record
    format, unless `download` lets tfds download and prepare it (needs internet)."""
    if isinstance(builder_or_name, tfds.core.DatasetBuilder):
        if data_dir is not None:
            raise ValueError("load_split: a builder knows its data_dir; pass data_dir only with a dataset name")
        builder = builder_or_name
    elif isinstance(builder_or_name, str):
        where = (repr(str(data_dir)) if data_dir is not None
                 else "tfds's default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)")
        missing = (f"dataset {builder_or_name!r} is not prepared in {where}; downloading it needs a machine with "
                   "internet (pass download=True there, or prepare it elsewhere with file_format='array_record' "
                   "and copy its data_dir here)")
        try:
            builder = tfds.builder(builder_or_name, data_dir=data_dir, file_format="array_record")
        except tfds.core.registered.DatasetNotFoundError:
            # Without TensorFlow, builders whose code needs it (the wmt translation ones) are only found from files.
            raise FileNotFoundError(
                f"{missing}. Note: tfds finds no builder named {builder_or_name!r} here; the builders of some public "
                "datasets (e.g. wmt*_translate) import TensorFlow, so preparing them needs `pip install "
                "tensorflow` on the machine that downloads; reading the prepared array_record files does not") from None
        if not builder.is_prepared():
            if not download:
                raise FileNotFoundError(missing)
            builder.download_and_prepare()
    else:
        raise TypeError(f"load_split: got a {type(builder_or_name).__name__}; expected a tfds DatasetBuilder or a "
                        "dataset name")
    if split not in builder.info.splits:
        raise ValueError(f"split {split!r} is not in {builder.name}; it has {sorted(builder.info.splits)}")
    try:
        source = builder.as_data_source(split=split)
    except NotImplementedError as e:
        raise DataError(f"{builder.name} in {builder.data_dir} is not in a random-access format ({e}); prepare it "
                        "again with file_format='array_record'") from None
    return Records(source, src_lang=src_lang, tgt_lang=tgt_lang)


# --- Views over records: directions, concatenation, language sampling ---------------------------------------------

class DirectedRecords(Sequence):
    """The pairs of one parallel corpus with their languages: record i is {"src", "tgt", "src_lang", "tgt_lang"}.

    indices: the pairs used, in this order (default all); both_directions: the records are those pairs in the
    given direction, then the same pairs reversed (ALMA uses each human-written pair both ways).
    """

    def __init__(self, records: Sequence, *, src_lang: str, tgt_lang: str, indices: Sequence[int] | None = None,
                 both_directions: bool = False):
        self._records, self._langs = records, (src_lang, tgt_lang)
        self._indices = list(range(len(records)) if indices is None else indices)
        self._both = bool(both_directions)

    def __len__(self) -> int:
        return len(self._indices) * (2 if self._both else 1)

    def directions(self) -> list[tuple[str, str]]:
        """The (src_lang, tgt_lang) directions of its records (without reading them)."""
        return [self._langs, self._langs[::-1]] if self._both else [self._langs]

    def __getitem__(self, index):
        i = _checked_index(index, len(self))
        n = len(self._indices)
        record = self._records[self._indices[i % n]]
        (src_lang, tgt_lang), src, tgt = self._langs, record["src"], record["tgt"]
        if i >= n:
            src_lang, tgt_lang, src, tgt = tgt_lang, src_lang, tgt, src
        return {"src": src, "tgt": tgt, "src_lang": src_lang, "tgt_lang": tgt_lang}


class ConcatRecords(Sequence):
    """Several record sequences one after another."""

    def __init__(self, parts: Sequence[Sequence]):
        self.parts = list(parts)
        self._ends = np.cumsum([len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index):
        i = _checked_index(index, len(self))
        part = int(np.searchsorted(self._ends, i, side="right"))
        return self.parts[part][i - (int(self._ends[part - 1]) if part else 0)]


def sampling_probabilities(setting: str | Mapping[str, float], sizes: Mapping[str, int]) -> dict[str, float]:
    """The probability of drawing each language of `sizes` (language -> number of texts).

    setting: "alma" (`ALMA_LANGUAGE_SAMPLING`), "proportional" (each language by its share of the texts) or a
    mapping language -> probability. Every language with data needs a probability and every probability a language
    with data; probabilities are positive and sum to 1 (within 1e-3). Raises ValueError naming what is wrong.
    """
    if setting == "proportional":
        total = sum(sizes.values())
        return {lang: n / total for lang, n in sizes.items()}
    if setting == "alma":
        probabilities, where = ALMA_LANGUAGE_SAMPLING, "data.language_sampling 'alma' (ALMA's en/ru/cs/zh/is/de)"
    elif isinstance(setting, Mapping):
        probabilities, where = dict(setting), f"data.language_sampling {dict(setting)!r}"
    else:
        raise ValueError(f"data.language_sampling={setting!r}; expected 'alma', 'proportional' or a mapping of "
                         "language -> probability such as {en: 0.5, de: 0.5}")
    no_data = sorted(set(probabilities) - set(sizes))
    if no_data:
        raise ValueError(f"{where} gives language {no_data[0]!r} a probability, but the monolingual data has no "
                         f"{no_data[0]!r} text (it has {sorted(sizes)}); add {no_data[0]!r} files or set "
                         "data.language_sampling for the languages you have (or 'proportional')")
    unsampled = sorted(set(sizes) - set(probabilities))
    if unsampled:
        raise ValueError(f"{where} has no probability for language {unsampled[0]!r}, which has data; add it to "
                         "data.language_sampling or remove its files")
    for lang, p in probabilities.items():
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0:
            raise ValueError(f"{where}: probability {p!r} for {lang!r}; expected a positive number")
    total = sum(probabilities.values())
    if abs(total - 1.0) > 1e-3:
        raise ValueError(f"{where}: the probabilities sum to {total:.4f}; expected 1")
    return {lang: float(p) for lang, p in probabilities.items()}


class LanguageMix(Sequence):
    """Monolingual records drawn language by language: draw i picks a language with the given probabilities, then
    that language's next text in a fixed shuffled order (starting over, reshuffled, when it runs out), so small
    languages are repeated and large ones subsampled. Record i is {"text", "lang"}.

    The draws are fixed by `seed`: the mix is an ordinary random-access sequence of `length` records (default the
    total number of texts: one pass over it draws as many texts as there are), which `BatchStream` can shuffle,
    batch and resume like any other.
    """

    def __init__(self, parts: Mapping[str, Sequence], probabilities: Mapping[str, float], *, seed: int = 0,
                 length: int | None = None):
        empty = [lang for lang, records in parts.items() if not len(records)]
        if empty:
            raise DataError(f"language {empty[0]!r} has no text to sample from; give it a non-empty file")
        probabilities = sampling_probabilities(dict(probabilities), {k: len(v) for k, v in parts.items()})
        self.parts, self.probabilities = dict(parts), probabilities
        self.languages = sorted(parts)
        length = sum(len(v) for v in parts.values()) if length is None else int(length)
        rng = np.random.default_rng([seed, 1])
        p = np.asarray([probabilities[lang] for lang in self.languages])
        self._lang = rng.choice(len(self.languages), size=length, p=p / p.sum()).astype(np.int32)
        self._item = np.zeros(length, np.int64)
        for k, lang in enumerate(self.languages):
            draws = np.flatnonzero(self._lang == k)
            n = len(parts[lang])
            passes = -(-len(draws) // n) if len(draws) else 0
            order = np.concatenate([np.random.default_rng([seed, 2, k, e]).permutation(n) for e in range(passes)]
                                   ) if passes else np.zeros(0, np.int64)
            self._item[draws] = order[:len(draws)]

    def __len__(self) -> int:
        return len(self._lang)

    def __getitem__(self, index):
        i = _checked_index(index, len(self))
        lang = self.languages[self._lang[i]]
        return {"text": self.parts[lang][int(self._item[i])]["text"], "lang": lang}

    def counts(self) -> dict[str, int]:
        """Draws per language over the whole mix."""
        return {lang: int(np.sum(self._lang == k)) for k, lang in enumerate(self.languages)}


def _checked_index(index, length: int) -> int:
    i = operator.index(index)
    i = i + length if i < 0 else i
    if not 0 <= i < length:
        raise IndexError(f"record {index} of {length}")
    return i
