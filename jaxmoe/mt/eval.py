"""Translate line-aligned text with a model, and score translations with sacreBLEU's corpus BLEU and chrF.

Files are read the way the `sacrebleu` command line reads them (UTF-8, one segment per "\\n"-ended line, trailing
whitespace removed), and scores use sacreBLEU's default corpus settings with the BLEU tokenizer sacreBLEU picks
for the target language (`zh` for Chinese, `ja-mecab` for Japanese, `ko-mecab` for Korean, else `13a`), so
`score_files(src, hyp, ref, lang_pair="en-zh")` equals `sacrebleu REF -i HYP -m bleu chrf -l en-zh`.
"""

from __future__ import annotations

import hashlib
import json
import os

import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from sacrebleu.metrics import BLEU, CHRF

from jaxmoe.infer.generate import generate
from jaxmoe.io.atomic import atomic_write_lines

__all__ = ["doc_bleu", "documents", "read_lines", "score", "score_files", "translate", "translate_file"]

PROMPT_WIDTH_MULTIPLE = 16  # prompts are left-padded to a multiple of this, so batches reuse compiled shapes
_LANG_PAIR = re.compile(r"[a-z]{2,3}-[a-z]{2,3}")


def read_lines(path, *, what: str) -> list[str]:
    """A UTF-8 text file -> its segments, one per line, as the sacrebleu CLI reads them: lines end at "\\n" only,
    and each loses its trailing whitespace (the newline, a "\\r", trailing spaces). `what` names the file in
    errors, e.g. "--hyp file"."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist; expected a UTF-8 text file with one segment "
                                "per line")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {str(path)!r} is not valid UTF-8 (byte {e.start}: {e.reason}); re-encode it as "
                         "UTF-8") from None
    lines = text.split("\n")
    if lines[-1] == "":  # the last line's newline, or an empty file
        lines.pop()
    if not lines:
        raise ValueError(f"{what} {str(path)!r} is empty; expected one segment per line")
    return [line.rstrip() for line in lines]


def _check_segments(segments, what: str) -> list[str]:
    if isinstance(segments, str) or not isinstance(segments, Sequence):
        raise TypeError(f"{what} is a {type(segments).__name__}; expected a list of str, one segment each")
    for i, segment in enumerate(segments):
        if not isinstance(segment, str):
            raise TypeError(f"{what}[{i}] is a {type(segment).__name__}; expected str")
    return list(segments)


def _target_language(lang_pair: str | None) -> str:
    """The target language of "src-tgt" ('' for None, sacreBLEU's "unknown")."""
    if lang_pair is None:
        return ""
    if not isinstance(lang_pair, str) or not _LANG_PAIR.fullmatch(lang_pair):
        raise ValueError(f"lang_pair={lang_pair!r}; expected the form xx-yy: lowercase ISO 639 codes of the source "
                         "and target languages, e.g. 'de-en' or 'en-zh'")
    return lang_pair.split("-")[1]


def _bleu(lang_pair: str | None) -> BLEU:
    """sacreBLEU's BLEU with the tokenizer it picks for the target language; ja-mecab / ko-mecab need extras."""
    target = _target_language(lang_pair)
    try:
        return BLEU(trg_lang=target)
    except RuntimeError as e:  # sacreBLEU's "requires extra dependencies"
        raise ValueError(f"BLEU for target language {target!r} uses sacreBLEU's {target}-mecab tokenizer, which "
                         f"is not installed; pip install 'sacrebleu[{target}]' ({' '.join(str(e).split())})") from None


def documents(docids: Sequence[str]) -> list[list[int]]:
    """Line indices grouped by document id, documents in order of first appearance, lines in file order."""
    groups: dict[str, list[int]] = {}
    for i, doc in enumerate(docids):
        groups.setdefault(doc, []).append(i)
    return list(groups.values())


def doc_bleu(hypotheses: Sequence[str], references: Sequence[str], docids: Sequence[str], *,
             lang_pair: str | None = None) -> float:
    """Corpus BLEU over documents: each document's hypotheses and references joined with a space (in line
    order), then sacreBLEU's corpus BLEU with the target language's tokenizer."""
    if not len(hypotheses) == len(references) == len(docids):
        raise ValueError(f"{len(hypotheses)} hypotheses, {len(references)} references and {len(docids)} document "
                         "ids; expected one of each per test line")
    groups = documents(docids)
    joined_hyp = [" ".join(hypotheses[i] for i in g) for g in groups]
    joined_ref = [" ".join(references[i] for i in g) for g in groups]
    return float(_bleu(lang_pair).corpus_score(joined_hyp, [joined_ref]).score)


def score(hypotheses: list[str], references: list[str], *, lang_pair: str | None = None,
          docids: Sequence[str] | None = None) -> dict:
    """Corpus BLEU and chrF of line-aligned `hypotheses` against one reference each, as a JSON-able dict.

    BLEU's tokenizer is the one sacreBLEU picks for the target language of `lang_pair` ("src-tgt"; None: 13a).
    Keys: bleu, chrf (scores 0..100), bleu_signature, chrf_signature, lang_pair, segments, and BLEU's
    bleu_precisions (1- to 4-gram, percent), bleu_bp, bleu_ratio, bleu_sys_len, bleu_ref_len, bleu_tokenizer.
    """
    hypotheses = _check_segments(hypotheses, "hypotheses")
    references = _check_segments(references, "references")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references; expected one hypothesis "
                         "per reference, line-aligned")
    if not hypotheses:
        raise ValueError("no segments to score; expected at least one hypothesis and reference")
    bleu_metric, chrf_metric = _bleu(lang_pair), CHRF()
    bleu = bleu_metric.corpus_score(hypotheses, [references])
    chrf = chrf_metric.corpus_score(hypotheses, [references])
    extra = {}
    if docids is not None:
        extra = {"doc_bleu": doc_bleu(hypotheses, references, docids, lang_pair=lang_pair),
                 "documents": len(documents(docids))}
    return {
        "bleu": float(bleu.score),
        "chrf": float(chrf.score),
        "lang_pair": lang_pair,
        "segments": len(hypotheses),
        "bleu_signature": bleu_metric.get_signature().format(),
        "chrf_signature": chrf_metric.get_signature().format(),
        "bleu_tokenizer": bleu_metric.tokenizer.signature(),
        "bleu_precisions": [float(p) for p in bleu.precisions],
        "bleu_bp": float(bleu.bp),
        "bleu_ratio": float(bleu.ratio),
        "bleu_sys_len": int(bleu.sys_len),
        "bleu_ref_len": int(bleu.ref_len),
        **extra,
    }


def score_files(src, hyp, ref, *, lang_pair: str | None = None, docs=None) -> dict:
    """Scores the line-aligned files `hyp` against `ref` (see `score`); `src` (or None) only has to align. `docs`:
    a file with one document id per line (as many lines as `ref`), which adds doc_bleu."""
    files = {"--hyp file": hyp, "--ref file": ref} if src is None else {"--src file": src, "--hyp file": hyp,
                                                                       "--ref file": ref}
    lines = {what: read_lines(path, what=what) for what, path in files.items()}
    if len({len(segments) for segments in lines.values()}) > 1:
        counts = ", ".join(f"{what} {str(files[what])!r} has {len(segments)} lines"
                           for what, segments in lines.items())
        raise ValueError(f"the files are not line-aligned: {counts}; expected the same number of lines in each")
    docids = None
    if docs is not None:
        docids = read_lines(docs, what="--docs file")
        if len(docids) != len(lines["--ref file"]):
            raise ValueError(f"--docs file {str(docs)!r} has {len(docids)} document ids but --ref file {str(ref)!r} "
                             f"has {len(lines['--ref file'])} lines; expected one document id per test line")
    return score(lines["--hyp file"], lines["--ref file"], lang_pair=lang_pair, docids=docids)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r}; expected an integer >= 1")
    return int(value)


def translate(model, tokenizer, sources: list[str], *, prompt: Callable[[str], str], max_new_tokens: int,
              batch_size: int = 32, num_beams: int = 1, length_penalty: float = 1.0,
              cut_at_newline: bool = False, stop: str | None = None, add_special_tokens: bool = True,
              progress: str | None = None, task_ids=None, prune_every: int | None = None,
              on_batch: Callable[[list[int], list[str]], None] | None = None) -> list[str]:
    """Greedy (num_beams=1) or beam search translations of `sources`, one stripped str each, in the order given.

    Each source becomes `prompt(source)`, encoded with the tokenizer's special tokens (e.g. its BOS). Prompts
    are sorted by length into batches of `batch_size` rows, left-padded to a multiple of 16 tokens, and the
    last batch is filled up with a repeated row, so that few shapes are compiled. Each row stops at the
    tokenizer's EOS id or any of the model config's `eos_token_id`, and is decoded without special tokens.
    `num_beams` and `length_penalty` go to `jaxmoe.generate` (the best hypothesis is kept). `cut_at_newline`
    keeps only the first line of each stripped output (ALMA's decoding: the translation ends at the first line
    break; a line break right after the prompt is skipped by the strip). `stop` cuts each stripped output at
    the first occurrence of that string (e.g. "\n\n" after a multi-line document window). `add_special_tokens`
    False encodes prompts without the tokenizer's BOS (a chat template writes its own). `progress`: a label for a
    tqdm progress bar over the batches (None: no bar). `task_ids`: for a model with MoE task adapters, the task id
    of every source (an int) or of each (a sequence, one per source); they go to `jaxmoe.generate` with the rows.
    `prune_every`: batch pruning for greedy decoding (`jaxmoe.generate`'s: rows that reached EOS leave the batch
    every that many steps; the same translations); ignored with beam search. `on_batch(indices, texts)` is called
    after each batch with the source indices it translated and their outputs (e.g. to save progress).
    """
    sources = _check_segments(sources, "sources")
    if task_ids is not None:
        task_ids = [task_ids] * len(sources) if np.ndim(task_ids) == 0 else list(task_ids)
        if len(task_ids) != len(sources):
            raise ValueError(f"{len(task_ids)} task_ids for {len(sources)} sources; pass one task id for all, or "
                             "one per source")
    batch_size = _positive_int(batch_size, "batch_size")
    max_new_tokens = _positive_int(max_new_tokens, "max_new_tokens")
    if not isinstance(cut_at_newline, bool):
        raise TypeError(f"cut_at_newline={cut_at_newline!r}; expected True or False")
    if stop is not None and (not isinstance(stop, str) or not stop):
        raise ValueError(f"stop={stop!r}; expected a non-empty str or None")
    if not sources:
        return []
    config = model.config
    pad_id = next((i for i in (tokenizer.pad_token_id, config.pad_token_id) if i is not None), 0)
    config_eos = config.eos_token_id
    config_eos = () if config_eos is None else (config_eos,) if np.isscalar(config_eos) else tuple(config_eos)
    eos_ids = tuple(dict.fromkeys(int(i) for i in (tokenizer.eos_token_id, *config_eos) if i is not None))

    prompts = []
    for i, source in enumerate(sources):
        text = prompt(source)
        if not isinstance(text, str):
            raise TypeError(f"prompt(sources[{i}]) returned a {type(text).__name__}; expected str")
        prompts.append(text)
    lengths = [len(tokenizer.encode(text, add_special_tokens=add_special_tokens)) for text in prompts]
    if min(lengths) == 0:
        empty = lengths.index(0)
        raise ValueError(f"prompt(sources[{empty}]) = {prompts[empty]!r} encodes to no tokens; the model needs at "
                         "least one prompt token to translate from")
    limit = config.max_position_embeddings
    longest = int(np.argmax(lengths))
    if lengths[longest] + max_new_tokens > limit:
        raise ValueError(f"source {longest} becomes a prompt of {lengths[longest]} tokens, which with "
                         f"max_new_tokens={max_new_tokens} needs {lengths[longest] + max_new_tokens} positions, more "
                         f"than the model's max_position_embeddings={limit}; shorten or split the source, or lower "
                         "max_new_tokens")

    order = sorted(range(len(sources)), key=lambda i: lengths[i])
    rows = min(batch_size, len(sources))
    outputs: list[str | None] = [None] * len(sources)
    starts = range(0, len(order), rows)
    bar = None
    if progress is not None:
        from tqdm.auto import tqdm

        starts = bar = tqdm(starts, desc=progress, unit="batch", leave=False)
    began, generated = time.perf_counter(), 0
    for start in starts:
        members = order[start:start + rows]
        filled = members + [members[-1]] * (rows - len(members))
        ids, mask = tokenizer.batch_encode([prompts[i] for i in filled], pad_id=pad_id,
                                           add_special_tokens=add_special_tokens)
        width = -(-ids.shape[1] // PROMPT_WIDTH_MULTIPLE) * PROMPT_WIDTH_MULTIPLE
        extra = min(width, limit - max_new_tokens) - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id)
        mask = np.pad(mask, ((0, 0), (extra, 0)))
        tasks = None if task_ids is None else np.asarray([task_ids[i] for i in filled])
        tokens = np.asarray(generate(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     eos_token_id=eos_ids, pad_token_id=pad_id, num_beams=num_beams,
                                     length_penalty=length_penalty, task_ids=tasks,
                                     prune_every=prune_every if num_beams == 1 else None))[:, ids.shape[1]:]
        for source_index, row in zip(members, tokens):
            ends = np.flatnonzero(np.isin(row, eos_ids))
            generated += int(ends[0]) + 1 if ends.size else len(row)
            text = tokenizer.decode(row[:ends[0]] if ends.size else row, skip_special_tokens=True).strip()
            if stop is not None:
                text = text.split(stop, 1)[0].rstrip()
            outputs[source_index] = text.split("\n", 1)[0].rstrip() if cut_at_newline else text
        if bar is not None:
            bar.set_postfix_str(f"{generated / (time.perf_counter() - began):.1f} tok/s")
        if on_batch is not None:
            on_batch(list(members), [outputs[i] for i in members])
    return outputs


def translate_file(model, tokenizer, src_path, out_path, *, prompt: Callable[[str], str], max_new_tokens: int,
                   batch_size: int = 32, num_beams: int = 1, length_penalty: float = 1.0,
                   cut_at_newline: bool = False, prune_every: int | None = None, progress: str | None = None,
                   task_ids=None) -> list[str]:
    """Translates each line of `src_path` (see `translate`, which takes the decoding settings) and writes one line
    per source to `out_path`, atomically (a temporary file in the same folder, then os.replace). Line breaks inside
    a translation become spaces, so the output stays line-aligned. Returns the translations as written.

    Resumable: after every batch the finished translations are appended (flushed and synced) to
    `<out_path>.progress.jsonl`, whose first line records the source file's SHA-256 and the decoding settings. A run
    that finds that file with the same sources and settings translates only the lines it lacks (a killed run
    continues where it stopped and writes the same file); with other sources or settings it refuses to mix them.
    The progress file is removed once `out_path` is written."""
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"output folder {str(out_path.parent)!r} does not exist; create it first")
    sources = read_lines(src_path, what="source file")
    settings = {"sources_sha256": hashlib.sha256(Path(src_path).read_bytes()).hexdigest(),
                "prompt_of_line_0": prompt(sources[0]), "max_new_tokens": max_new_tokens, "num_beams": num_beams,
                "length_penalty": length_penalty, "cut_at_newline": cut_at_newline,
                "task_ids": None if task_ids is None else np.asarray(task_ids).tolist()}
    progress_path = out_path.with_name(out_path.name + ".progress.jsonl")
    done = _read_progress(progress_path, settings, len(sources))
    todo = [i for i in range(len(sources)) if i not in done]
    if todo:
        per_source = None if task_ids is None or np.ndim(task_ids) == 0 else list(task_ids)
        with open(progress_path, "a", encoding="utf-8") as log:
            if not done:
                log.write(json.dumps({"settings": settings}) + "\n")

            def save(indices, texts):
                log.writelines(json.dumps({"i": todo[i], "text": t}, ensure_ascii=False) + "\n"
                               for i, t in zip(indices, texts))
                log.flush()
                os.fsync(log.fileno())

            texts = translate(model, tokenizer, [sources[i] for i in todo], prompt=prompt,
                              max_new_tokens=max_new_tokens, batch_size=batch_size, num_beams=num_beams,
                              length_penalty=length_penalty, cut_at_newline=cut_at_newline, prune_every=prune_every,
                              progress=progress, on_batch=save,
                              task_ids=task_ids if per_source is None else [per_source[i] for i in todo])
        done.update(zip(todo, texts))
    translations = [re.sub(r"\s*[\r\n]+\s*", " ", done[i]) for i in range(len(sources))]
    atomic_write_lines(out_path, translations)
    progress_path.unlink(missing_ok=True)
    return translations


def _read_progress(path: Path, settings: dict, count: int) -> dict[int, str]:
    """{source index: translation} from a progress file of the same sources and settings ({} when there is none);
    ValueError when it belongs to another run. A last line cut short by a kill is ignored."""
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").split("\n")
    if not lines[0].strip():  # killed before the header reached the disk
        path.unlink()
        return {}
    try:
        header = json.loads(lines[0])["settings"]
    except (ValueError, KeyError, TypeError):
        header = None
    if header != settings:
        raise ValueError(f"progress file {str(path)!r} belongs to another run (other sources or decoding settings); "
                         "delete it to start over, or rerun with the settings it records")
    done = {}
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # an empty or half-written last line
        if 0 <= entry["i"] < count:
            done[int(entry["i"])] = entry["text"]
    return done
