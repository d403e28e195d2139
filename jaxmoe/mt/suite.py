"""The WMT'22 evaluation suite of GPT-MT (Hendy et al. 2023) for any jaxmoe causal LM, or for existing outputs.

Data layout (a copy of microsoft/gpt-MT's evaluation data, e.g. ../shared/data/gpt-mt in this repository):

    DATA/wmt-testset/{src}{tgt}/test.{src}-{tgt}.{src|tgt}       sources and references
    DATA/wmt-testset-docids/{src}{tgt}/test.{src}-{tgt}.docids   one document id per line (optional)
    DATA/data-shots/{RR,QR,QS,DF,DR}/{k}-shot/shots.{src}-{tgt}.json   the paper's shots (optional)

`run_suite` translates each pair's test set (zero-shot or k-shot, sentence by sentence or in document windows of
W sentences), writes `OUT/{src}{tgt}/test.{src}-{tgt}.{tgt}` (the layout `score_hypothesis_dir` reads back) and
`OUT/results.json`, and returns one row of scores per pair: BLEU and chrF (sacreBLEU, the target language's
tokenizer), doc-BLEU when document ids exist, and COMET-22 / COMETkiwi / doc-COMETkiwi when COMET models are given
(`comet` extra). `format_table` prints the rows as one Markdown table.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxmoe.io.atomic import atomic_write_lines
from jaxmoe.mt.documents import read_docids, translate_documents
from jaxmoe.mt.eval import documents, read_lines, score, translate
from jaxmoe.mt.hybrid import max_routing, threshold_routing
from jaxmoe.mt.prompts import Shot, TranslationPrompt
from jaxmoe.mt.shots import (SHOT_TYPES, as_document_shot, document_shots, model_embedder, paper_shots, random_shots,
                             similar_shots)

__all__ = ["SUITES", "TestSet", "available_pairs", "doc_comet", "format_table", "hypothesis_path", "load_testset",
           "hybrid_rows", "read_hypotheses", "run_suite", "score_hypothesis_dir", "score_pair", "select_shots", "write_results"]

SUITES = ("wmt22",)
DOC_COMET_WINDOW = 4


@dataclasses.dataclass(frozen=True)
class TestSet:
    lang_pair: str
    sources: list[str]
    references: list[str]
    docids: list[str] | None

    @property
    def src_lang(self) -> str:
        return self.lang_pair.split("-")[0]

    @property
    def tgt_lang(self) -> str:
        return self.lang_pair.split("-")[1]

    def head(self, limit: int | None) -> "TestSet":
        """The first `limit` lines (all when None)."""
        if limit is None:
            return self
        return TestSet(self.lang_pair, self.sources[:limit], self.references[:limit],
                       None if self.docids is None else self.docids[:limit])


def _data_root(data) -> Path:
    root = Path(data)
    if not (root / "wmt-testset").is_dir():
        raise FileNotFoundError(f"test data folder {str(root)!r} has no wmt-testset/; expected GPT-MT's layout: "
                                "wmt-testset/xxyy/test.xx-yy.{xx,yy}, wmt-testset-docids/, data-shots/ (e.g. "
                                "--data ../shared/data/gpt-mt in this repository)")
    return root


def available_pairs(data) -> list[str]:
    """The language pairs with both test files under DATA/wmt-testset."""
    root = _data_root(data) / "wmt-testset"
    pairs = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for src_file in folder.glob("test.*-*.*"):
            pair = src_file.name.split(".")[1]
            src, _, tgt = pair.partition("-")
            if folder.name == src + tgt and src_file.suffix == f".{src}" and (folder / f"test.{pair}.{tgt}").is_file():
                pairs.append(pair)
    return sorted(set(pairs))


def load_testset(data, lang_pair: str) -> TestSet:
    """A pair's sources, references and (when present) document ids; an unknown pair lists the known ones."""
    known = available_pairs(data)
    if lang_pair not in known:
        raise ValueError(f"language pair {lang_pair!r} has no test set in {str(data)!r}; known pairs: "
                         f"{', '.join(known)}")
    src, tgt = lang_pair.split("-")
    folder = Path(data) / "wmt-testset" / f"{src}{tgt}"
    sources = read_lines(folder / f"test.{lang_pair}.{src}", what="test source file")
    references = read_lines(folder / f"test.{lang_pair}.{tgt}", what="test reference file")
    if len(sources) != len(references):
        raise ValueError(f"{lang_pair}: {len(sources)} source lines but {len(references)} reference lines in "
                         f"{str(folder)!r}; expected a line-aligned test set")
    docs = Path(data) / "wmt-testset-docids" / f"{src}{tgt}" / f"test.{lang_pair}.docids"
    docids = read_docids(docs, lines=len(sources), what="docids file") if docs.is_file() else None
    return TestSet(lang_pair, sources, references, docids)


def hypothesis_path(folder, lang_pair: str) -> Path:
    src, tgt = lang_pair.split("-")
    return Path(folder) / f"{src}{tgt}" / f"test.{lang_pair}.{tgt}"


# --- Scoring --------------------------------------------------------------------------------------------------

def doc_comet(scorer, testset: TestSet, hypotheses: Sequence[str], *, window: int = DOC_COMET_WINDOW) -> float:
    """Document-level COMETkiwi as GPT-MT computes it: in each document, windows of `window` consecutive sentences
    (stride 1; a shorter document is one window) with sources and hypotheses joined by a space are each scored
    once; a document's score is its windows' mean; the result is the mean over documents. (GPT-MT also shrinks
    a window whose text passes 512 model tokens; this does not.)"""
    groups = documents(testset.docids)
    srcs, hyps, owner = [], [], []
    for d, group in enumerate(groups):
        for start in range(max(len(group) - window, 0) + 1):
            lines = group[start:start + window]
            srcs.append(" ".join(testset.sources[i] for i in lines))
            hyps.append(" ".join(hypotheses[i] for i in lines))
            owner.append(d)
    scores = np.asarray(scorer(srcs, hyps), np.float64)
    owner = np.asarray(owner)
    return float(np.mean([scores[owner == d].mean() for d in range(len(groups))]))


def score_pair(testset: TestSet, hypotheses: Sequence[str], *, comet=None, cometkiwi=None) -> dict:
    """One row: bleu, chrf, doc_bleu (with document ids), and comet22 / cometkiwi / doc_cometkiwi for the COMET
    scorers given (`jaxmoe.mt.hybrid.CometScorer`)."""
    result = score(list(hypotheses), testset.references, lang_pair=testset.lang_pair, docids=testset.docids)
    row = {"pair": testset.lang_pair, "segments": result["segments"], "bleu": result["bleu"], "chrf": result["chrf"]}
    if "doc_bleu" in result:
        row["doc_bleu"] = result["doc_bleu"]
    if comet is not None:
        row["comet22"] = float(np.mean(comet(testset.sources, hypotheses, testset.references)))
    if cometkiwi is not None:
        row["cometkiwi"] = float(np.mean(cometkiwi(testset.sources, hypotheses)))
        if testset.docids is not None:
            row["doc_cometkiwi"] = doc_comet(cometkiwi, testset, hypotheses)
    row["bleu_signature"] = result["bleu_signature"]
    return row


def read_hypotheses(hyp_dir, data, lang_pair: str, limit: int | None = None) -> list[str]:
    """The outputs for `lang_pair` in the hypothesis folder `hyp_dir` (DIR/xxyy/test.xx-yy.yy): one line per test
    line; with `limit`, the first `limit` lines of a file that holds at least those (a run over the whole test set,
    or over a larger limit). A file with fewer lines, or with more than the test set, is an error."""
    path = hypothesis_path(hyp_dir, lang_pair)
    if not path.is_file():
        raise FileNotFoundError(f"hypothesis folder {str(hyp_dir)!r} is missing {lang_pair}: {str(path)!r}; "
                                "expected DIR/xxyy/test.xx-yy.yy")
    lines = read_lines(path, what="hypothesis file")
    full = len(load_testset(data, lang_pair).sources)
    wanted = full if limit is None else min(limit, full)
    if not wanted <= len(lines) <= full:
        raise ValueError(f"hypothesis file {str(path)!r} has {len(lines)} lines but the {lang_pair} test set has "
                         f"{full}{'' if wanted == full else f' (first {wanted} with the limit)'}; expected one "
                         "translation per test line")
    return lines[:wanted]


def score_hypothesis_dir(hyp_dir, data, pairs: Sequence[str], *, limit: int | None = None, comet=None,
                         cometkiwi=None) -> list[dict]:
    """Scores existing outputs laid out as HYP_DIR/{src}{tgt}/test.{src}-{tgt}.{tgt} against the test sets."""
    hyp_dir = Path(hyp_dir)
    if not hyp_dir.is_dir():
        raise FileNotFoundError(f"hypothesis folder {str(hyp_dir)!r} does not exist")
    testsets = [load_testset(data, pair).head(limit) for pair in pairs]
    missing = [str(hypothesis_path(hyp_dir, t.lang_pair)) for t in testsets
               if not hypothesis_path(hyp_dir, t.lang_pair).is_file()]
    if missing:
        raise FileNotFoundError(f"hypothesis folder {str(hyp_dir)!r} is missing {len(missing)} pair(s): "
                                f"{', '.join(missing)}; expected DIR/xxyy/test.xx-yy.yy for each pair")
    rows = []
    for testset in testsets:
        hypotheses = read_hypotheses(hyp_dir, data, testset.lang_pair, limit)
        rows.append(score_pair(testset, hypotheses, comet=comet, cometkiwi=cometkiwi))
    return rows


# --- Translation ----------------------------------------------------------------------------------------------

def select_shots(testset: TestSet, shot_type: str | None, k: int, *, data=None, pool: Sequence[Shot] | None = None,
                 pool_docids: Sequence[str] | None = None, similarity=None,
                 seed: int = 0) -> list[list[Shot]] | None:
    """Per test line, its shots (None for zero-shot: shot_type None / "none" or k == 0).

    From `pool` when given: RR/QR k random pairs (seeded, the same for every line), QS the k most similar per
    line (`similar_shots`, `similarity` as there), DF/DR document shots (`document_shots`). Otherwise the paper's
    released file DATA/data-shots/{type}/{k}-shot/shots.{pair}.json (QS: one set per test line, used as
    released: the paper's de-en file has no shots for 3 lines, which then get a zero-shot prompt)."""
    if shot_type is None or shot_type == "none" or k == 0:
        return None
    if shot_type not in SHOT_TYPES:
        raise ValueError(f"shot type {shot_type!r} is unknown; expected none or one of {', '.join(SHOT_TYPES)}")
    n = len(testset.sources)
    if pool is not None:
        if shot_type == "QS":
            return similar_shots(pool, testset.sources, k, similarity=similarity)
        if shot_type in ("DF", "DR"):
            return [document_shots(pool, pool_docids, k, shot_type, seed=seed)] * n
        return [random_shots(pool, k, seed=seed)] * n
    if data is None:
        raise ValueError(f"{shot_type} shots need the paper's shot files (data) or a shot pool")
    released = paper_shots(Path(data) / "data-shots", shot_type, k, testset.lang_pair)
    if shot_type == "QS":
        if len(released) < n:
            raise ValueError(f"the released QS file for {testset.lang_pair} has {len(released)} shot sets but the test "
                             f"set has {n} lines; expected one set per test line")
        return [list(s) for s in released[:n]]
    if len(released) < k:
        raise ValueError(f"k={k} shots asked but the released {shot_type} file for {testset.lang_pair} has only "
                         f"{len(released)}")
    return [list(released[:k])] * n


def _prompt_texts(prompt: TranslationPrompt, testset: TestSet, sources: Sequence[str],
                  shots: Sequence[Sequence[Shot]] | None) -> list[str]:
    return [prompt.render(s, testset.src_lang, testset.tgt_lang, () if shots is None else shots[i])
            for i, s in enumerate(sources)]


def run_suite(model, tokenizer, *, data, pairs: Sequence[str], out_dir, shot_type: str | None = None, k: int = 0,
              prompt: TranslationPrompt | None = None, pool: dict | None = None, similarity: str = "tfidf",
              seed: int = 0, doc_window: int | None = None, limit: int | None = None, num_beams: int = 1,
              length_penalty: float = 1.0, batch_size: int = 16, max_new_tokens: int | None = None,
              comet=None, cometkiwi=None, progress: bool = True) -> list[dict]:
    """Translates and scores each pair (see the module docstring); returns the rows, also in OUT/results.json.

    pool: {lang_pair: [Shot, ...]} to select shots from instead of the paper's files (`select_shots`);
    similarity: "tfidf" (character n-grams) or "model" (this model's mean-pooled hidden states) for QS;
    doc_window: W sentences per prompt (2..32) for document-level translation, None for sentence level (then
    every shot set is one multi-line document shot); limit: the first N lines of each test set;
    max_new_tokens: per prompt (default 128, or 64 x W for document windows).
    """
    prompt = prompt or TranslationPrompt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    testsets = [load_testset(data, pair).head(limit) for pair in pairs]  # every pair checked before translating
    if doc_window is not None and any(t.docids is None for t in testsets):
        bare = [t.lang_pair for t in testsets if t.docids is None]
        raise ValueError(f"document-level translation needs document ids; none for {', '.join(bare)} in "
                         f"{str(data)!r}/wmt-testset-docids")
    if doc_window is not None and shot_type == "QS":
        raise ValueError("QS shots are chosen per sentence; document-level windows take RR, QR, DF or DR shots")
    if similarity not in ("tfidf", "model"):
        raise ValueError(f"similarity={similarity!r}; expected 'tfidf' or 'model'")
    if max_new_tokens is None:
        max_new_tokens = 128 if doc_window is None else 64 * doc_window
    rows = []
    for testset in testsets:
        started = time.perf_counter()
        pair_pool = None if pool is None else pool.get(testset.lang_pair)
        if pool is not None and pair_pool is None:
            raise ValueError(f"the shot pool has no pairs for {testset.lang_pair}; pools given for "
                             f"{', '.join(sorted(pool))}")
        sim = model_embedder(model, tokenizer) if similarity == "model" and shot_type == "QS" else None
        shots = select_shots(testset, shot_type, k, data=data, pool=pair_pool, similarity=sim, seed=seed)
        decode = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, num_beams=num_beams,
                      length_penalty=length_penalty, add_special_tokens=prompt.add_special_tokens)
        label = testset.lang_pair if progress else None
        if doc_window is None:
            texts = _prompt_texts(prompt, testset, testset.sources, shots)
            hypotheses = translate(model, tokenizer, texts, prompt=lambda t: t, cut_at_newline=True, progress=label,
                                   **decode)
            stats = {}
        else:
            doc_shot = None if shots is None else [as_document_shot(shots[0])]

            def translate_windows(sources: list[str]) -> list[str]:
                texts = [prompt.render(s, testset.src_lang, testset.tgt_lang, doc_shot or ()) for s in sources]
                return translate(model, tokenizer, texts, prompt=lambda t: t, stop="\n\n", progress=label,
                                 **decode)

            hypotheses = translate_documents(translate_windows, testset.sources, testset.docids, window=doc_window)
            stats = hypotheses.stats()
        hypotheses = [" ".join(h.split()) for h in hypotheses]  # one line each, as written and as scored
        atomic_write_lines(_prepare(hypothesis_path(out_dir, testset.lang_pair)), hypotheses)
        row = score_pair(testset, hypotheses, comet=comet, cometkiwi=cometkiwi)
        row.update(stats, seconds=round(time.perf_counter() - started, 1))
        rows.append(row)
    zero_shot = shot_type in (None, "none") or k == 0
    settings = {"shots": "none" if zero_shot else shot_type, "k": 0 if zero_shot else k, "prompt": prompt.template,
                "chat": prompt.chat is not None,
                "doc_window": doc_window, "limit": limit, "num_beams": num_beams, "length_penalty": length_penalty,
                "seed": seed, "similarity": similarity if shot_type == "QS" else None,
                "shot_source": None if zero_shot else ("pool" if pool else "paper")}
    write_results(out_dir, rows, settings)
    return rows


def _prepare(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_results(out_dir, rows: list[dict], settings: dict) -> Path:
    path = Path(out_dir) / "results.json"
    atomic_write_lines(path, [json.dumps({"settings": settings, "rows": rows}, indent=1, ensure_ascii=False)])
    return path


def hybrid_rows(data, pairs: Sequence[str], dir_a, dir_b, scorer_for, *, route: str = "max",
                threshold: float | None = None, limit: int | None = None, out_dir=None) -> list[dict]:
    """Routes per sentence between the outputs in `dir_a` and `dir_b` (hypothesis-folder layout) with the QE
    scorer `scorer_for(pair)` (max-routing, or threshold routing with `threshold`), scores the hybrid, and writes
    it to `out_dir` when given. Each row adds `share_a` (fraction of sentences taken from A)."""
    if route not in ("max", "threshold"):
        raise ValueError(f"route={route!r}; expected 'max' or 'threshold'")
    if route == "threshold" and threshold is None:
        raise ValueError("threshold routing needs a threshold (--threshold T)")
    rows = []
    for pair in pairs:
        testset = load_testset(data, pair).head(limit)
        outputs = [read_hypotheses(folder, data, pair, limit) for folder in (dir_a, dir_b)]
        scorer = scorer_for(pair)
        routed = (max_routing(testset.sources, outputs, scorer) if route == "max"
                  else threshold_routing(testset.sources, *outputs, scorer, threshold))
        if out_dir is not None:
            atomic_write_lines(_prepare(hypothesis_path(out_dir, pair)), routed.outputs)
        row = score_pair(testset, routed.outputs)
        row["share_a"] = routed.shares()[0]
        rows.append(row)
    return rows


_COLUMNS = (("bleu", "BLEU"), ("chrf", "chrF"), ("doc_bleu", "doc-BLEU"), ("comet22", "COMET-22"),
            ("cometkiwi", "COMETkiwi"), ("doc_cometkiwi", "doc-COMETkiwi"), ("share_a", "share A"),
            ("retried_windows", "retried windows"), ("segments", "sentences"), ("seconds", "seconds"))


def format_table(rows: list[dict], *, label: str | None = None) -> str:
    """The rows as one Markdown table: a line per pair, a column per metric present in any row."""
    columns = [(key, name) for key, name in _COLUMNS if any(key in row for row in rows)]
    head = ["pair" if label is None else label] + [name for _, name in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["pair"] if label is None else f"{row['pair']} {row.get('setting', '')}".strip()]
        for key, _ in columns:
            value = row.get(key)
            cells.append("" if value is None else f"{value:.4f}" if key in ("comet22", "cometkiwi", "doc_cometkiwi")
                         else f"{value:.2f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
