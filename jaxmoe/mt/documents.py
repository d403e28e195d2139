"""Document-level translation and scoring: document ids, windows of W sentences translated as one prompt, and
doc-BLEU (each document's sentences joined, then corpus BLEU), as in GPT-MT (Hendy et al. 2023)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from jaxmoe.mt.eval import doc_bleu, documents, read_lines

__all__ = ["DocumentTranslation", "doc_bleu", "documents", "read_docids", "translate_documents", "windows"]

MAX_WINDOW = 32


def read_docids(path, *, lines: int, what: str = "--docs file") -> list[str]:
    """One document id per line of `path`; it must have `lines` lines (the test set's), else a ValueError naming
    both counts."""
    docids = read_lines(path, what=what)
    if len(docids) != lines:
        raise ValueError(f"{what} {str(path)!r} has {len(docids)} document ids but the test set has {lines} lines; "
                         "expected one document id per test line")
    if any(not d for d in docids):
        raise ValueError(f"{what} {str(path)!r} line {docids.index('') + 1} is empty; expected a document id")
    return docids


def windows(docids: Sequence[str], size: int) -> list[list[int]]:
    """Consecutive, non-overlapping windows of at most `size` lines inside each document (a document's last
    window may be shorter); every line is in exactly one window."""
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_WINDOW:
        raise ValueError(f"window size {size!r}; expected an integer 1..{MAX_WINDOW} (sentences per prompt)")
    return [g[i:i + size] for g in documents(docids) for i in range(0, len(g), size)]


class DocumentTranslation(list):
    """The translations (a list of str, one per source line) with the counts of the document-level run:
    `windows` translated, `retried_windows` whose output line count differed from the window's, and
    `retried_sentences` translated alone because of that."""

    windows: int = 0
    retried_windows: int = 0
    retried_sentences: int = 0

    def stats(self) -> dict:
        return {"windows": self.windows, "retried_windows": self.retried_windows,
                "retried_sentences": self.retried_sentences}


def translate_documents(translate: Callable[[list[str]], list[str]], sources: Sequence[str],
                        docids: Sequence[str], *, window: int) -> DocumentTranslation:
    """Translates `sources` W=`window` sentences at a time: each window's lines joined by "\\n" are one source for
    `translate` (a function list of texts -> list of translations, e.g. `jaxmoe.mt.eval.translate` with a prompt
    and stop="\\n\\n" bound in), and its output is split back into lines. A window whose output (blank lines
    dropped) does not have exactly one line per sentence is translated again sentence by sentence; the returned
    list counts those retries (a retried sentence keeps its output's first non-empty line)."""
    if len(docids) != len(sources):
        raise ValueError(f"{len(docids)} document ids for {len(sources)} sources; expected one per source line")
    if any("\n" in s for s in sources):
        bad = next(i for i, s in enumerate(sources) if "\n" in s)
        raise ValueError(f"source {bad} contains a line break; a document window joins sentences by line breaks, so "
                         "each source must be one line")
    groups = windows(docids, window)
    outputs = translate(["\n".join(sources[i] for i in g) for g in groups])
    result = DocumentTranslation([""] * len(sources))
    result.windows = len(groups)
    retry: list[int] = []
    for group, text in zip(groups, outputs):
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        if len(lines) == len(group):
            for i, line in zip(group, lines):
                result[i] = line
        else:
            result.retried_windows += 1
            retry.extend(group)
    if retry:
        for i, text in zip(retry, translate([sources[i] for i in retry])):
            result[i] = next((line.strip() for line in text.split("\n") if line.strip()), "")
        result.retried_sentences = len(retry)
    return result
