"""The `jaxmoe` console script: demo, train, eval-mt, translate, generate, quantize, convert (see
`jaxmoe <command> --help`; quantize and convert live in jaxmoe/quant/cli.py).

`main(argv)` returns the exit code: 0 on success; 2 for a usage error (bad flag, missing file, bad config or data,
...), reported as one `error: ...` line on stderr without a traceback; 1 when training diverged (NaN / inf);
143 when training stopped on SIGTERM after saving a checkpoint (run the same command to resume).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.demo import DEFAULT_STEPS, run_demo
from jaxmoe.infer.generate import generate
from jaxmoe.io.hf import CheckpointError
from jaxmoe.io.load import load_model
from jaxmoe.io.tokenizer import Tokenizer
from jaxmoe.quant.cli import add_convert_parser, add_quantize_parser, run_convert, run_quantize

__all__ = ["main"]


class UsageError(Exception):
    """A mistake in what the user asked for; main prints it as one line and exits 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _build_parser() -> _Parser:
    parser = _Parser(prog="jaxmoe", description="Phi-family dense and MoE models in JAX / Flax NNX.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)

    demo = commands.add_parser(
        "demo", help="train a tiny GRIN-style MoE translator on a generated corpus and evaluate it",
        description="Generates an English -> Zentish parallel corpus (a rule-based language with its own lexicon, "
                    "SOV order, agreement), trains a BPE tokenizer and a tiny GRIN-style MoE (SparseMixer routing) "
                    "on it (about two minutes on 2 CPU cores), scores test translations with BLEU and chrF before "
                    "and after training, and writes the checkpoint, plots, metrics and translations to the run "
                    "folder.")
    demo.add_argument("--out", type=Path, default=None,
                      help="run folder to create (default: runs/demo-<timestamp>); must not exist or be empty")
    demo.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS,
                      help="training steps (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="seed for initialization and batch order (default: 0)")

    train = commands.add_parser(
        "train", help="train or fine-tune from a YAML run config (resumes when the run folder has checkpoints)",
        description="Runs the training job a YAML run config describes (presets in experiments/configs/): tfds "
                    "data, tokenizer, model (a preset, or a checkpoint via model.init_from; full or LoRA), AdamW, orbax "
                    "checkpoints, metrics, plots, and at the end validation loss, test BLEU/chrF and a Hugging "
                    "Face export in the run folder. Run it again on the same run folder to resume exactly; SIGTERM "
                    "saves a checkpoint before exiting.")
    train.add_argument("--config", type=Path, default=None, help="YAML run config")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides, e.g. optim.steps=200 run_dir=runs/x model.overrides.num_layers=4")

    evalmt = commands.add_parser(
        "eval-mt", help="score translations (sacrebleu BLEU, chrF, doc-BLEU) or run the WMT'22 GPT-MT suite",
        description="File mode (--hyp, --ref): prints one JSON object with bleu and chrf (sacrebleu's default "
                    "corpus settings, with the tokenizer sacrebleu picks for the target language), their "
                    "signatures, and doc_bleu with --docs. Suite mode (--suite wmt22): translates GPT-MT's WMT'22 "
                    "test sets with --model (zero- or k-shot, sentence or document level) or scores existing "
                    "outputs in --hyp-dir, then prints one table (pairs x metrics) and writes results.json.")
    evalmt.add_argument("--src", type=Path, default=None, help="source file (optional; checked for alignment)")
    evalmt.add_argument("--hyp", type=Path, default=None, help="system translations, one per line")
    evalmt.add_argument("--ref", type=Path, default=None, help="reference translations, one per line")
    evalmt.add_argument("--lang-pair", default=None, help="xx-yy, e.g. de-en or en-zh (sets the BLEU tokenizer)")
    evalmt.add_argument("--docs", type=Path, default=None,
                        help="one document id per line of --ref: adds doc_bleu (documents joined, then corpus BLEU)")
    suite = evalmt.add_argument_group("suite mode")
    suite.add_argument("--suite", choices=("wmt22",), default=None, help="run GPT-MT's WMT'22 evaluation")
    suite.add_argument("--data", type=Path, default=None,
                       help="GPT-MT data folder: wmt-testset/, wmt-testset-docids/, data-shots/ (default: "
                            "$JAXMOE_GPT_MT_DATA; in this repository ../shared/data/gpt-mt)")
    suite.add_argument("--pairs", default="de-en,en-de", help="comma-separated pairs (default: %(default)s)")
    suite.add_argument("--model", type=Path, default=None, help="checkpoint folder to translate with")
    suite.add_argument("--hyp-dir", type=Path, default=None,
                       help="score existing outputs laid out as DIR/xxyy/test.xx-yy.yy instead of translating")
    suite.add_argument("--shots", default="none", help="none (zero-shot), RR, QR, QS, DF or DR (default: none)")
    suite.add_argument("--k", type=int, default=5, help="shots per prompt when --shots is set (default: 5)")
    suite.add_argument("--shot-pool", default=None, metavar="FILE",
                       help="select shots from this pool (JSON list of {source, target}, or ALMA JSON/JSONL) "
                            "instead of the paper's released files; seeded by --seed")
    suite.add_argument("--similarity", choices=("tfidf", "model"), default="tfidf",
                       help="QS shots from a pool: character n-gram TF-IDF or the model's hidden states")
    suite.add_argument("--prompt", default="gpt-mt",
                       help="gpt-mt (default), alma, a format string with {src} {src_lang} {tgt_lang}, or Jinja")
    suite.add_argument("--chat", action="store_true", help="wrap each prompt in the checkpoint's chat template")
    suite.add_argument("--doc-window", type=int, default=None, metavar="W",
                       help="document level: translate W sentences (2..32) per prompt")
    suite.add_argument("--limit", type=_positive_int, default=None, help="only the first N lines of each test set")
    suite.add_argument("--num-beams", type=_positive_int, default=1, help="1: greedy (default); more: beam search")
    suite.add_argument("--length-penalty", type=float, default=1.0, help="beam search length penalty")
    suite.add_argument("--batch-size", type=_positive_int, default=16, help="prompts per batch (default: 16)")
    suite.add_argument("--max-new-tokens", type=_positive_int, default=None,
                       help="per prompt (default: 128, or 64 x W with --doc-window)")
    suite.add_argument("--seed", type=int, default=0, help="seed for RR/QR/DF/DR shots from a pool (default: 0)")
    suite.add_argument("--comet", type=Path, default=None, help="local COMET-22 model folder (comet extra)")
    suite.add_argument("--cometkiwi", type=Path, default=None, help="local COMETkiwi model folder (comet extra)")
    suite.add_argument("--hybrid-with", type=Path, default=None, metavar="DIR",
                       help="also route per sentence between the suite's outputs (A) and DIR's (B) by QE")
    suite.add_argument("--route", choices=("max", "threshold"), default="max", help="hybrid routing rule")
    suite.add_argument("--threshold", type=float, default=None, help="threshold routing: take B below this QE")
    suite.add_argument("--out", type=Path, default=None,
                       help="output folder for translations and results.json (default: runs/eval-mt-<time>)")

    tr = commands.add_parser(
        "translate", help="translate a file line by line with a trained model, in batches",
        description="Greedy or beam-search translation of each line of --src with a checkpoint folder (config.json, safetensors, "
                    "tokenizer.json), using the training prompt format; writes one line per source to --out. "
                    "Resumable: progress is kept in <out>.progress.jsonl, and a rerun of a killed run continues "
                    "where it stopped.")
    tr.add_argument("--model", type=Path, required=True, help="checkpoint folder (e.g. a run's model/)")
    tr.add_argument("--src", type=Path, required=True, help="source sentences, one per line")
    tr.add_argument("--out", type=Path, required=True, help="output file (written atomically)")
    tr.add_argument("--src-lang", required=True, help="source language code, e.g. de")
    tr.add_argument("--tgt-lang", required=True, help="target language code, e.g. en")
    tr.add_argument("--prompt", default=None,
                    help="prompt template with {src}, {src_lang}, {tgt_lang} (default: the ALMA prompt)")
    tr.add_argument("--max-new-tokens", type=_positive_int, default=128, help="default: %(default)s")
    tr.add_argument("--batch-size", type=_positive_int, default=32, help="default: %(default)s")
    tr.add_argument("--num-beams", type=_positive_int, default=1, help="1: greedy (default); more: beam search")
    tr.add_argument("--length-penalty", type=float, default=1.0,
                    help="beam search: hypotheses scored by log-prob / length ** this (default: %(default)s)")
    tr.add_argument("--cut-at-newline", action="store_true",
                    help="keep each translation's first non-empty line only (ALMA's decoding)")
    tr.add_argument("--prune-every", type=int, default=8,
                    help="greedy: finished rows leave the decode batch every N steps (batch pruning; the same "
                         "output); 0 turns it off (default: %(default)s)")

    gen = commands.add_parser(
        "generate", help="generate text from a Hugging Face checkpoint folder",
        description="Loads a checkpoint folder (config.json, safetensors, tokenizer.json) and streams the "
                    "model's continuation of --prompt to stdout.")
    gen.add_argument("--model", type=Path, required=True,
                     help="checkpoint folder with config.json, model.safetensors and tokenizer.json")
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=128,
                     help="tokens to generate at most (default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="sampling temperature; 0 is greedy (default: %(default)s)")
    gen.add_argument("--top-k", type=_positive_int, default=None, help="sample only from the k most likely tokens")
    gen.add_argument("--top-p", type=float, default=None,
                     help="sample only from the smallest set of tokens whose probability reaches p, 0 < p <= 1")
    gen.add_argument("--chat", action="store_true",
                     help="wrap the prompt as one user turn in the checkpoint's chat template")
    gen.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                     help="parameter and compute dtype (default: %(default)s)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")

    add_quantize_parser(commands)
    add_convert_parser(commands)
    return parser


def _run_demo(args) -> int:
    run_demo(args.out, steps=args.steps, seed=args.seed)
    return 0


def _run_train(args) -> int:
    from jaxmoe.train.run_config import load_run_config
    from jaxmoe.train.trainer import Preempted, TrainingDivergedError, train

    config = load_run_config(args.config, args.overrides)
    try:
        train(config)
    except TrainingDivergedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Preempted as stop:
        print(str(stop), file=sys.stderr)
        return 143
    return 0


def _run_eval_mt(args) -> int:
    from jaxmoe.mt.eval import score_files

    if args.suite is not None:
        return _run_eval_suite(args)
    if args.hyp is None or args.ref is None:
        raise UsageError("eval-mt needs --hyp FILE and --ref FILE (file mode), or --suite wmt22 with --model or "
                         "--hyp-dir (suite mode)")
    print(json.dumps(score_files(args.src, args.hyp, args.ref, lang_pair=args.lang_pair, docs=args.docs),
                     ensure_ascii=False))
    return 0


def _run_eval_suite(args) -> int:
    import os
    import time

    from jaxmoe.mt import suite
    from jaxmoe.mt.hybrid import CometScorer, RoundTripChrF, comet_available
    from jaxmoe.mt.prompts import TranslationPrompt
    from jaxmoe.mt.shots import read_pool

    data = args.data or (Path(os.environ["JAXMOE_GPT_MT_DATA"]) if os.environ.get("JAXMOE_GPT_MT_DATA") else None)
    if data is None:
        raise UsageError("--suite needs the GPT-MT data folder: pass --data DIR (wmt-testset/, wmt-testset-docids/, "
                         "data-shots/) or set JAXMOE_GPT_MT_DATA")
    if args.model is None and args.hyp_dir is None:
        raise UsageError("--suite needs --model (translate) or --hyp-dir (score existing outputs)")
    if args.model is not None and args.hyp_dir is not None and args.hybrid_with is None:
        raise UsageError("--suite takes one of --model (translate) and --hyp-dir (score existing outputs); both "
                         "only with --hybrid-with, where --model scores round-trip chrF")
    if any(v is not None for v in (args.hyp, args.ref, args.src, args.docs)):
        raise UsageError("--suite reads sources, references and document ids from --data; drop --src/--hyp/--ref/"
                         "--docs")
    pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    known = suite.available_pairs(data)
    unknown = [p for p in pairs if p not in known]
    if not pairs or unknown:
        raise UsageError(f"--pairs {args.pairs!r}: unknown pair(s) {', '.join(unknown) or '(none given)'}; known "
                         f"pairs in {str(data)!r}: {', '.join(known)}")
    shot_type = None if args.shots == "none" else args.shots
    if shot_type is not None and shot_type not in suite.SHOT_TYPES:
        raise UsageError(f"--shots {args.shots!r} is unknown; expected none, {', '.join(suite.SHOT_TYPES)}")
    if args.k < 0:
        raise UsageError(f"--k {args.k}: expected an integer >= 0")
    if args.doc_window is not None and not 2 <= args.doc_window <= 32:
        raise UsageError(f"--doc-window {args.doc_window}: expected 2..32 sentences per prompt")
    comet = cometkiwi = None
    if args.comet is not None or args.cometkiwi is not None:
        if not comet_available():
            raise UsageError("--comet/--cometkiwi need the unbabel-comet package: pip install 'jaxmoe[comet]'")
        comet = CometScorer(args.comet) if args.comet is not None else None
        cometkiwi = CometScorer(args.cometkiwi) if args.cometkiwi is not None else None
    out = args.out or Path("runs") / time.strftime("eval-mt-%Y%m%d-%H%M%S")
    model = tokenizer = None
    if args.model is not None:
        if not (args.model / "tokenizer.json").is_file():
            raise UsageError(f"--model {str(args.model)!r} has no tokenizer.json; expected a checkpoint folder with "
                             "config.json, model.safetensors and tokenizer.json")
        tokenizer = Tokenizer.from_folder(args.model)
        model = load_model(args.model)
    if args.hyp_dir is not None:
        rows = suite.score_hypothesis_dir(args.hyp_dir, data, pairs, limit=args.limit, comet=comet,
                                          cometkiwi=cometkiwi)
        out.mkdir(parents=True, exist_ok=True)
        settings = {"hyp_dir": str(args.hyp_dir), "limit": args.limit}
        suite.write_results(out, rows, settings)
        system_a = args.hyp_dir
    else:
        prompt = TranslationPrompt(args.prompt, chat=tokenizer if args.chat else None)
        pool = None
        if args.shot_pool is not None:
            if shot_type is None:
                raise UsageError("--shot-pool needs --shots RR, QR, QS, DF or DR")
            pool = {pair: read_pool(args.shot_pool, pair) for pair in pairs}
        rows = suite.run_suite(model, tokenizer, data=data, pairs=pairs, out_dir=out, shot_type=shot_type,
                               k=args.k, prompt=prompt, pool=pool, similarity=args.similarity, seed=args.seed,
                               doc_window=args.doc_window, limit=args.limit, num_beams=args.num_beams,
                               length_penalty=args.length_penalty, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens, comet=comet, cometkiwi=cometkiwi)
        settings = json.loads((out / "results.json").read_text())["settings"]
        system_a = out
    print(suite.format_table(rows))
    if comet is None and cometkiwi is None:
        print("COMET-22 / COMETkiwi columns skipped: pass --comet / --cometkiwi with local model folders and the "
              "comet extra installed", file=sys.stderr)
    if args.hybrid_with is not None:
        if cometkiwi is not None:
            scorers, qe = (lambda pair: cometkiwi), "COMETkiwi"
        elif model is not None:
            scorers, qe = (lambda pair: _round_trip_scorer(model, tokenizer, pair, args, RoundTripChrF)), \
                "round-trip chrF"
        else:
            raise UsageError("--hybrid-with needs a QE scorer: --cometkiwi DIR, or --model for round-trip chrF")
        hybrid = suite.hybrid_rows(data, pairs, system_a, args.hybrid_with, scorers, route=args.route,
                                   threshold=args.threshold, limit=args.limit, out_dir=out / "hybrid")
        print(f"\nhybrid: {args.route} routing by {qe}; A = {system_a}, B = {args.hybrid_with}")
        print(suite.format_table(hybrid))
        rows = rows + [dict(row, system="hybrid") for row in hybrid]
        settings.update(hybrid_with=str(args.hybrid_with), route=args.route, threshold=args.threshold, qe=qe)
        suite.write_results(out, rows, settings)
    print(f"wrote {out / 'results.json'}", file=sys.stderr)
    return 0


def _round_trip_scorer(model, tokenizer, pair: str, args, round_trip):
    """Round-trip chrF for `pair` (src-tgt): back-translates target text into the source language, zero-shot,
    with the model under test and the suite's prompt and decoding settings."""
    from jaxmoe.mt.eval import translate
    from jaxmoe.mt.prompts import TranslationPrompt

    src, tgt = pair.split("-")
    prompt = TranslationPrompt(args.prompt, chat=tokenizer if args.chat else None)

    def back(texts):
        return translate(model, tokenizer, [prompt.render(t, tgt, src) for t in texts], prompt=lambda t: t,
                         max_new_tokens=args.max_new_tokens or 128, batch_size=args.batch_size,
                         num_beams=args.num_beams, length_penalty=args.length_penalty, cut_at_newline=True,
                         add_special_tokens=prompt.add_special_tokens, progress=f"{pair} round trip")

    return round_trip(back)


def _run_translate(args) -> int:
    from jaxmoe.mt.eval import translate_file
    from jaxmoe.train.batches import ALMA_PROMPT, PromptFormat

    if not (args.model / "tokenizer.json").is_file():
        raise UsageError(f"--model {str(args.model)!r} has no tokenizer.json; expected a checkpoint folder with "
                         "config.json, model.safetensors and tokenizer.json (e.g. a training run's model/)")
    prompt = PromptFormat(args.prompt or ALMA_PROMPT)
    tokenizer = Tokenizer.from_folder(args.model)
    model = load_model(args.model)
    translations = translate_file(model, tokenizer, args.src, args.out,
                                  prompt=lambda s: prompt.render(s, args.src_lang, args.tgt_lang),
                                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                  num_beams=args.num_beams, length_penalty=args.length_penalty,
                                  cut_at_newline=args.cut_at_newline, prune_every=args.prune_every or None,
                                  progress="translate")
    print(f"wrote {len(translations)} translations to {args.out}", file=sys.stderr)
    return 0


class _TextStream:
    """Prints the decoded text of the generated tokens (row 0) as they arrive, stopping at an EOS token."""

    def __init__(self, tokenizer, eos_ids):
        self.tokenizer, self.eos_ids = tokenizer, set(eos_ids)
        self.ids, self.printed, self.done = [], "", False

    def __call__(self, step: int, tokens) -> None:
        token = int(tokens[0])
        if self.done or token in self.eos_ids:
            self.done = True
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        # A multi-byte character split over tokens decodes to U+FFFD until its last byte arrives.
        if text.endswith("\ufffd"):
            return
        if len(text) > len(self.printed):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
        self.printed = text


def _run_generate(args) -> int:
    if args.temperature < 0:
        raise UsageError(f"--temperature {args.temperature}: expected a number >= 0 (0 is greedy)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p {args.top_p}: expected a number in (0, 1]")
    if not args.model.is_dir():
        raise UsageError(f"--model {str(args.model)!r} is not a folder; expected a checkpoint folder with "
                         "config.json, model.safetensors and tokenizer.json")
    if not (args.model / "tokenizer.json").is_file():
        raise UsageError(f"--model {str(args.model)!r} has no tokenizer.json; copy the tokenizer files of the "
                         "checkpoint (tokenizer.json, tokenizer_config.json) into the folder")
    tokenizer = Tokenizer.from_folder(args.model)
    model = load_model(args.model, dtype=jnp.dtype(args.dtype))
    config = model.config
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        ids = tokenizer.encode(prompt, add_special_tokens=False)
    else:
        ids = tokenizer.encode(args.prompt)
    if not ids:
        raise UsageError("--prompt encodes to no tokens; give some text")
    if max(ids) >= config.vocab_size:
        raise UsageError(f"the tokenizer in {str(args.model)!r} produced token id {max(ids)}, outside the model's "
                         f"vocabulary of {config.vocab_size}; the tokenizer does not belong to this checkpoint")
    eos_ids = set(config.eos_token_id)
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    room = config.max_position_embeddings - len(ids)
    if room < 1:
        raise UsageError(f"the prompt is {len(ids)} tokens, no room left in the model's "
                         f"max_position_embeddings={config.max_position_embeddings}")
    stream = _TextStream(tokenizer, eos_ids)
    generate(model, np.asarray([ids], np.int32), max_new_tokens=min(args.max_new_tokens, room),
             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_token_id=sorted(eos_ids),
             rngs=nnx.Rngs(args.seed), stream_callback=stream)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the command line `argv` (default: sys.argv[1:]) and returns its exit code."""
    parser = _build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:  # --help
            return exit_.code if isinstance(exit_.code, int) else 0
        commands = {"demo": _run_demo, "train": _run_train, "eval-mt": _run_eval_mt, "translate": _run_translate,
                    "generate": _run_generate, "quantize": run_quantize, "convert": run_convert}
        return commands[args.command](args)
    except (UsageError, CheckpointError, FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
