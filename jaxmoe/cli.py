"""The `jaxmoe` console script: `jaxmoe demo` and `jaxmoe generate` (see `jaxmoe <command> --help`).

`main(argv)` returns the exit code: 0 on success, 2 for a usage error (bad flag, missing folder, ...), which is
reported as one `error: ...` line on stderr without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.demo import DEFAULT_STEPS, run_demo
from jaxmoe.infer.generate import generate
from jaxmoe.io.hf import CheckpointError, load_hf
from jaxmoe.io.tokenizer import Tokenizer

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
        "demo", help="train a tiny model on a generated numbers <-> words corpus and evaluate it",
        description="Trains a tiny Phi-3-style decoder (on CPU, about a minute) to translate numbers 0-999 between "
                    "digits and English words, on a corpus the demo generates itself; reports held-out loss and "
                    "exact-match accuracy of greedy translations; writes model/ (checkpoint + tokenizer), "
                    "loss.png, samples.txt and metrics.json to the run folder.")
    demo.add_argument("--out", type=Path, default=None,
                      help="run folder to create (default: runs/demo-<timestamp>); must not exist or be empty")
    demo.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS,
                      help="training steps (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="seed for initialization and batch order (default: 0)")

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
    return parser


def _run_demo(args) -> int:
    run_demo(args.out, steps=args.steps, seed=args.seed)
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
    model = load_hf(args.model, dtype=jnp.dtype(args.dtype))
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
        return {"demo": _run_demo, "generate": _run_generate}[args.command](args)
    except (UsageError, CheckpointError, FileExistsError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
