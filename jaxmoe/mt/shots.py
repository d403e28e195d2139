"""Few-shot examples for translation prompts: the GPT-MT paper's released shot files, and the same kinds of
selection from a pool of your own.

Shot types (Hendy et al. 2023):
- RR: k pairs drawn at random from the full (noisy) training data; QR: the same from a high-quality pool. One
  fixed set of k shots per direction (seeded), used for every test sentence, as the paper did.
- QS: for each test sentence its own k pool pairs, the most similar sources first. Similarity is cosine over
  character n-gram TF-IDF vectors (`CharNgramSimilarity`, no model needed), or over any embedding function, e.g.
  mean-pooled hidden states of the model under test (`model_embedder`).
- DF: k consecutive sentences of one pool document; DR: k pool sentences drawn at random. For document-level
  prompts the k sentences form one multi-line shot (`as_document_shot`).

The released files (`DIR/{RR,QR,QS,DF,DR}/{k}-shot/shots.{src}-{tgt}.json`) hold a list of {"source", "target"},
or for QS one such list per test sentence, in test-set order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from jaxmoe.mt.prompts import Shot

__all__ = ["SHOT_TYPES", "CharNgramSimilarity", "as_document_shot", "document_shots", "model_embedder",
           "read_pool", "read_shot_file", "paper_shots", "random_shots", "similar_shots"]

SHOT_TYPES = ("RR", "QR", "QS", "DF", "DR")


def _shot_list(items, where: str) -> list[Shot]:
    if not isinstance(items, list):
        raise ValueError(f"{where} is a {type(items).__name__}; expected a list of {{\"source\", \"target\"}} objects")
    shots = []
    for i, item in enumerate(items):
        if not (isinstance(item, dict) and isinstance(item.get("source"), str)
                and isinstance(item.get("target"), str)):
            raise ValueError(f"{where}[{i}] is {item!r:.120}; expected an object with str \"source\" and \"target\"")
        shots.append(Shot(item["source"], item["target"]))
    return shots


def read_shot_file(path) -> list[Shot] | list[list[Shot]]:
    """A GPT-MT shot file: a JSON list of {"source", "target"} (one shot set), or a list of such lists (QS: one
    set per test sentence)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shot file {str(path)!r} does not exist; expected a JSON list of "
                                "{\"source\", \"target\"} objects (or one such list per test sentence)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"shot file {str(path)!r} is not UTF-8 JSON ({e}); expected the GPT-MT shot format") \
            from None
    if isinstance(data, list) and data and isinstance(data[0], list):
        return [_shot_list(item, f"{path}[{i}]") for i, item in enumerate(data)]
    return _shot_list(data, str(path))


def paper_shots(root, shot_type: str, k: int, lang_pair: str) -> list[Shot] | list[list[Shot]]:
    """The paper's released shots `root/{shot_type}/{k}-shot/shots.{lang_pair}.json`; errors list what exists."""
    if shot_type not in SHOT_TYPES:
        raise ValueError(f"shot type {shot_type!r} is unknown; expected one of {', '.join(SHOT_TYPES)}")
    root = Path(root)
    path = root / shot_type / f"{k}-shot" / f"shots.{lang_pair}.json"
    if not path.is_file():
        have = sorted(str(p.relative_to(root)) for p in root.glob(f"{shot_type}/*-shot/shots.*.json"))
        raise FileNotFoundError(f"no released {shot_type} {k}-shot file for {lang_pair} ({str(path)!r}); "
                                f"{shot_type} files present: {', '.join(have) or 'none'}")
    return read_shot_file(path)


def read_pool(path, lang_pair: str | None = None) -> list[Shot]:
    """A shot pool: a JSON list of {"source", "target"} (the paper's format), or ALMA's JSON / JSON Lines with
    {"translation": {src: ..., tgt: ...}} per line (then `lang_pair` "src-tgt" picks the sides)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shot pool {str(path)!r} does not exist; expected a JSON list of "
                                "{\"source\", \"target\"} or ALMA-style {\"translation\": {...}} records")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.split("\n") if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"shot pool {str(path)!r} is neither JSON nor JSON Lines ({e})") from None
    if isinstance(data, list) and data and isinstance(data[0], dict) and "translation" in data[0]:
        if lang_pair is None:
            raise ValueError(f"shot pool {str(path)!r} has ALMA-style records; pass lang_pair='src-tgt' to pick "
                             "the sides")
        src, tgt = lang_pair.split("-")
        shots = []
        for i, record in enumerate(data):
            pair = record.get("translation") if isinstance(record, dict) else None
            if not (isinstance(pair, dict) and isinstance(pair.get(src), str) and isinstance(pair.get(tgt), str)):
                raise ValueError(f"shot pool {str(path)!r} record {i} has no str translation.{src} and "
                                 f"translation.{tgt}: {record!r:.120}")
            shots.append(Shot(pair[src], pair[tgt]))
        return shots
    shots = _shot_list(data, f"shot pool {str(path)!r}")
    if not shots:
        raise ValueError(f"shot pool {str(path)!r} is empty; expected at least one pair")
    return shots


def _check_k(k, pool_size: int, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k={k!r}; expected an integer >= 0 (shots per prompt)")
    if k > pool_size:
        raise ValueError(f"k={k} shots asked but the {what} has only {pool_size}; lower k or use a larger pool")
    return int(k)


def random_shots(pool: Sequence[Shot], k: int, *, seed: int = 0) -> list[Shot]:
    """RR / QR: k distinct pool pairs drawn with `seed` (the same seed gives the same shots)."""
    k = _check_k(k, len(pool), "pool")
    picks = np.random.default_rng(seed).choice(len(pool), size=k, replace=False)
    return [Shot(*pool[int(i)]) for i in picks]


class CharNgramSimilarity:
    """Cosine similarity of TF-IDF vectors over character n-grams (n in `orders`, over the lowercased text with
    runs of whitespace as one space and a space at each end; sublinear term frequency 1 + log tf; smoothed idf
    log((1 + N) / (1 + df)) + 1 fit on the pool). Works for any script without a tokenizer or a model."""

    def __init__(self, orders: Sequence[int] = (2, 3, 4)):
        self.orders = tuple(int(n) for n in orders)
        if not self.orders or min(self.orders) < 1:
            raise ValueError(f"orders={orders!r}; expected positive n-gram lengths, e.g. (2, 3, 4)")

    def _grams(self, text: str) -> dict[str, int]:
        text = f" {' '.join(text.lower().split())} "
        counts: dict[str, int] = {}
        for n in self.orders:
            for i in range(len(text) - n + 1):
                gram = text[i:i + n]
                counts[gram] = counts.get(gram, 0) + 1
        return counts

    def fit(self, pool_sources: Sequence[str]) -> "CharNgramSimilarity":
        grams = [self._grams(s) for s in pool_sources]
        df: dict[str, int] = {}
        for g in grams:
            for gram in g:
                df[gram] = df.get(gram, 0) + 1
        n = len(pool_sources)
        self._index = {gram: i for i, gram in enumerate(df)}
        self._idf = np.array([np.log((1 + n) / (1 + df[g])) + 1 for g in df], np.float64)
        self._pool = self._matrix(grams)
        return self

    def _matrix(self, grams: list[dict[str, int]]) -> np.ndarray:
        out = np.zeros((len(grams), len(self._index)), np.float32)
        for row, g in enumerate(grams):
            for gram, count in g.items():
                j = self._index.get(gram)
                if j is not None:
                    out[row, j] = (1 + np.log(count)) * self._idf[j]
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1, norms)

    def __call__(self, queries: Sequence[str]) -> np.ndarray:
        """[len(queries), pool size] cosine similarities to the fitted pool's sources."""
        if not hasattr(self, "_pool"):
            raise RuntimeError("CharNgramSimilarity is not fitted; call fit(pool_sources) first")
        return self._matrix([self._grams(q) for q in queries]) @ self._pool.T


def model_embedder(model, tokenizer, *, batch_size: int = 32, max_tokens: int = 256) -> Callable:
    """texts -> [n, d] L2-normalized embeddings: the model's final normed hidden states, mean-pooled over each
    text's tokens (at most `max_tokens` of them). Any jaxmoe causal LM works (Phi3/PhiMoE `return_hidden`)."""
    pad_id = next((i for i in (tokenizer.pad_token_id, model.config.pad_token_id) if i is not None), 0)

    def embed(texts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = [tokenizer.encode(t, add_special_tokens=False)[:max_tokens] or [pad_id]
                     for t in texts[start:start + batch_size]]
            width = -(-max(len(c) for c in chunk) // 16) * 16
            ids = np.full((len(chunk), width), pad_id, np.int32)
            mask = np.zeros((len(chunk), width), np.int32)
            for i, c in enumerate(chunk):
                ids[i, width - len(c):], mask[i, width - len(c):] = c, 1
            hidden = np.asarray(model(ids, attention_mask=mask, return_hidden=True).hidden_states, np.float32)
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
            out.append(pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12))
        return np.concatenate(out)

    return embed


def similar_shots(pool: Sequence[Shot], sources: Sequence[str], k: int, *,
                  similarity: Callable | None = None) -> list[list[Shot]]:
    """QS: for each source its k most similar pool pairs (by source side), most similar first; a pool pair whose
    source equals the test source is never picked (it would leak the reference). `similarity`: a fitted
    `CharNgramSimilarity` (default, fit on the pool here), or an embedding function texts -> [n, d] rows
    (e.g. `model_embedder(model, tokenizer)`, or a LaBSE SentenceTransformer loaded from a local folder:
    `lambda xs: st.encode(xs, normalize_embeddings=True)`), compared by dot product (cosine for unit rows)."""
    pool = [Shot(*p) for p in pool]
    k = _check_k(k, len(pool), "pool")
    pool_sources = [p.source for p in pool]
    if similarity is None:
        similarity = CharNgramSimilarity().fit(pool_sources)
    if isinstance(similarity, CharNgramSimilarity):
        scores = similarity(list(sources))
    else:
        scores = np.asarray(similarity(list(sources))) @ np.asarray(similarity(pool_sources)).T
    scores = np.array(scores, np.float64)
    by_source: dict[str, list[int]] = {}
    for j, s in enumerate(pool_sources):
        by_source.setdefault(s.strip(), []).append(j)
    picked = []
    for i, source in enumerate(sources):
        row = scores[i].copy()
        row[by_source.get(source.strip(), [])] = -np.inf
        if np.isfinite(row).sum() < k:
            raise ValueError(f"source {i} leaves only {int(np.isfinite(row).sum())} pool pairs once its own copy is "
                             f"excluded; k={k} needs a larger pool")
        order = np.argsort(-row, kind="stable")[:k]
        picked.append([pool[int(j)] for j in order])
    return picked


def document_shots(pool: Sequence[Shot], docids: Sequence[str] | None, k: int, kind: str, *,
                   seed: int = 0) -> list[Shot]:
    """DF: k consecutive pairs of one pool document (a document with at least k pairs, drawn with `seed`);
    DR: k pool pairs drawn at random (docids are not needed). Returns the k shots in order."""
    if kind == "DR":
        return random_shots(pool, k, seed=seed)
    if kind != "DF":
        raise ValueError(f"document shot type {kind!r} is unknown; expected DF or DR")
    if docids is None or len(docids) != len(pool):
        count = "none" if docids is None else f"{len(docids)}"
        raise ValueError(f"DF shots need one document id per pool pair: {count} ids for {len(pool)} pairs")
    k = _check_k(k, len(pool), "pool")
    runs, start = [], 0
    for i in range(1, len(pool) + 1):
        if i == len(pool) or docids[i] != docids[start]:
            if i - start >= k:
                runs.append(start)
            start = i
    if not runs:
        raise ValueError(f"no pool document has {k} consecutive pairs; lower k for DF shots")
    first = runs[int(np.random.default_rng(seed).integers(len(runs)))]
    return [Shot(*p) for p in pool[first:first + k]]


def as_document_shot(shots: Sequence[Shot]) -> Shot:
    """k sentence shots as one document shot: sources and targets each joined by newlines."""
    return Shot("\n".join(s.source for s in shots), "\n".join(s.target for s in shots))
