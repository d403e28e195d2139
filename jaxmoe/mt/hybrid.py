"""Hybrid translation systems that pick, per sentence, between systems by a quality estimate (GPT-MT, Hendy et
al. 2023): max-routing (the candidate with the highest QE score) and threshold routing (system A unless its QE
score is below a threshold, then system B), with any reference-free scorer behind one interface.

A scorer is any callable `scorer(sources, hypotheses) -> [n] scores`, higher is better. Two come with jaxmoe:
- `CometScorer`: COMETkiwi (or any COMET model) from a local checkpoint folder, when the `comet` extra
  (unbabel-comet) is installed; `comet_available()` says whether it is.
- `RoundTripChrF`: translate each hypothesis back into the source language (with the model under test, or any
  translate function) and score the back-translation against the source with sentence chrF, / 100 so scores lie
  in [0, 1]. A cheap proxy for QE when no COMETkiwi is at hand; it rewards adequacy, not fluency.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from sacrebleu.metrics import CHRF

__all__ = ["CometScorer", "Routed", "RoundTripChrF", "comet_available", "max_routing", "threshold_routing"]


def comet_available() -> bool:
    """Whether the `comet` package (pip install unbabel-comet, or jaxmoe's `comet` extra) can be imported."""
    return importlib.util.find_spec("comet") is not None


class CometScorer:
    """A COMET model from a local folder (no download): `path` is the model's checkpoint (.ckpt) or its folder
    (the one holding checkpoints/model.ckpt, as `comet-download` writes it). Reference-free models (COMETkiwi)
    score (source, hypothesis); reference-based ones (COMET-22) also need `references` in `__call__`."""

    def __init__(self, path, *, batch_size: int = 16, gpus: int = 0):
        if not comet_available():
            raise ImportError("COMET scoring needs the unbabel-comet package: pip install 'jaxmoe[comet]' (or "
                              "unbabel-comet), then pass a local model folder")
        path = Path(path)
        checkpoint = path if path.suffix == ".ckpt" else path / "checkpoints" / "model.ckpt"
        if not checkpoint.is_file():
            raise FileNotFoundError(f"COMET model {str(path)!r} has no {checkpoint.name} ({str(checkpoint)!r}); "
                                    "expected a folder with checkpoints/model.ckpt or the .ckpt file itself")
        from comet import load_from_checkpoint

        self.name = path.name
        self.model = load_from_checkpoint(str(checkpoint))
        self.batch_size, self.gpus = batch_size, gpus

    def __call__(self, sources: Sequence[str], hypotheses: Sequence[str],
                 references: Sequence[str] | None = None) -> np.ndarray:
        rows = [{"src": s, "mt": h} for s, h in zip(sources, hypotheses)]
        if references is not None:
            for row, ref in zip(rows, references):
                row["ref"] = ref
        output = self.model.predict(rows, batch_size=self.batch_size, gpus=self.gpus, progress_bar=False)
        return np.asarray(output.scores, np.float64)


class RoundTripChrF:
    """QE proxy: sentence chrF (sacreBLEU defaults) of `back_translate(hypotheses)` against the sources, / 100.

    back_translate: a function list of target-language texts -> list of source-language texts, e.g.
    `lambda xs: jaxmoe.mt.eval.translate(model, tokenizer, xs, prompt=..., max_new_tokens=...)` with a prompt
    for the reverse direction."""

    name = "round-trip chrF"

    def __init__(self, back_translate: Callable[[list[str]], list[str]]):
        self.back_translate = back_translate
        self._chrf = CHRF()

    def __call__(self, sources: Sequence[str], hypotheses: Sequence[str]) -> np.ndarray:
        back = self.back_translate(list(hypotheses))
        if len(back) != len(sources):
            raise ValueError(f"back_translate returned {len(back)} texts for {len(sources)} hypotheses")
        return np.array([self._chrf.sentence_score(b, [s]).score / 100 for b, s in zip(back, sources)], np.float64)


@dataclasses.dataclass(frozen=True)
class Routed:
    """A hybrid system's output: `outputs` (one str per source), `choice` (per source, the index of the system
    whose output was taken) and `scores` ([systems, n] QE scores; for threshold routing only system A's row is
    computed and B's is NaN)."""

    outputs: list[str]
    choice: np.ndarray
    scores: np.ndarray

    def shares(self) -> list[float]:
        """Fraction of sentences taken from each system."""
        counts = np.bincount(self.choice, minlength=self.scores.shape[0])
        return (counts / max(len(self.choice), 1)).tolist()


def _check_systems(sources, systems) -> list[list[str]]:
    if len(systems) < 2:
        raise ValueError(f"{len(systems)} systems given; routing needs at least two candidate outputs per source")
    for i, system in enumerate(systems):
        if len(system) != len(sources):
            raise ValueError(f"system {i} has {len(system)} outputs for {len(sources)} sources; expected one per "
                             "source, line-aligned")
    return [list(s) for s in systems]


def _scores(scorer, sources, hypotheses) -> np.ndarray:
    scores = np.asarray(scorer(list(sources), list(hypotheses)), np.float64)
    if scores.shape != (len(sources),):
        raise ValueError(f"the scorer returned shape {scores.shape} for {len(sources)} sentences; expected one score "
                         "per sentence")
    if not np.isfinite(scores).all():
        raise ValueError("the scorer returned a NaN or infinite score; expected finite QE scores")
    return scores


def max_routing(sources: Sequence[str], systems: Sequence[Sequence[str]], scorer) -> Routed:
    """Per source, the output of the system whose QE score is highest (a tie goes to the earlier system)."""
    systems = _check_systems(sources, systems)
    scores = np.stack([_scores(scorer, sources, system) for system in systems])
    choice = np.argmax(scores, axis=0)
    return Routed([systems[c][i] for i, c in enumerate(choice)], choice, scores)


def threshold_routing(sources: Sequence[str], system_a: Sequence[str], system_b: Sequence[str], scorer,
                      threshold: float) -> Routed:
    """Per source, system A's output unless its QE score is below `threshold`, then system B's. With a scorer in
    [0, 1), threshold 0 keeps A everywhere and threshold 1 takes B everywhere. Only A is scored."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not np.isfinite(threshold):
        raise ValueError(f"threshold={threshold!r}; expected a finite number on the scorer's scale (e.g. 0..1)")
    system_a, system_b = _check_systems(sources, [system_a, system_b])
    scores_a = _scores(scorer, sources, system_a)
    choice = (scores_a < threshold).astype(np.int64)
    outputs = [system_b[i] if c else system_a[i] for i, c in enumerate(choice)]
    return Routed(outputs, choice, np.stack([scores_a, np.full_like(scores_a, np.nan)]))
