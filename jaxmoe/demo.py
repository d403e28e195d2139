"""`jaxmoe demo`: train a tiny Phi-3-style decoder to translate between numbers and their English words.

The parallel corpus is generated here: every number 0..999 as digits ("3 4 2") and as words ("three hundred
forty two"), in both directions, with a target-language tag after the source, e.g.
`<bos> 3 4 2 <words> three hundred forty two <eos>` and `<bos> three hundred forty two <digits> 3 4 2 <eos>`.
A fixed tenth of the numbers is held out, so the greedy translations of unseen numbers show whether the model
learned the mapping (tens, teens, hundreds) rather than the examples. Everything runs on CPU in about a minute.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx

from jaxmoe.config import ModelConfig, get_preset
from jaxmoe.infer.generate import generate
from jaxmoe.io.hf import save_hf
from jaxmoe.io.tokenizer import Tokenizer
from jaxmoe.models.phi3 import Phi3ForCausalLM
from jaxmoe.train.loop import Batch, TrainConfig, evaluate, make_optimizer, train_step

__all__ = ["DEFAULT_STEPS", "make_corpus", "number_to_words", "run_demo"]

DEFAULT_STEPS = 400
BATCH_SIZE = 64
HELDOUT_NUMBERS = 100  # of 1000; the same numbers for every seed
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
TO_WORDS, TO_DIGITS = "<words>", "<digits>"
ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS = ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
VOCAB = (PAD, BOS, EOS, UNK, TO_WORDS, TO_DIGITS, *"0123456789", *ONES, *TENS, "hundred")


def number_to_words(n: int) -> str:
    """0 <= n <= 999 in English words, without "and": 342 -> "three hundred forty two"."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_to_words: {n} is outside 0..999")
    hundreds, rest = divmod(n, 100)
    words = [ONES[hundreds], "hundred"] if hundreds else []
    if rest >= 20:
        words += [TENS[rest // 10 - 2]] + ([ONES[rest % 10]] if rest % 10 else [])
    elif rest or not hundreds:
        words.append(ONES[rest])
    return " ".join(words)


@dataclasses.dataclass(frozen=True, slots=True)
class Example:
    """One translation: `prompt` (source text and target tag) -> `target` text."""

    prompt: str
    target: str


def make_corpus() -> tuple[list[Example], list[Example]]:
    """(training examples, held-out examples): each number in both directions; held-out numbers fixed."""
    heldout = set(np.random.default_rng(1234).permutation(1000)[:HELDOUT_NUMBERS].tolist())
    train, test = [], []
    for n in range(1000):
        digits, words = " ".join(str(n)), number_to_words(n)
        pair = [Example(f"{digits} {TO_WORDS}", words), Example(f"{words} {TO_DIGITS}", digits)]
        (test if n in heldout else train).extend(pair)
    return train, test


def make_tokenizer() -> Tokenizer:
    """A word-level tokenizer over VOCAB that puts <bos> first, as a transformers tokenizer.json would."""
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token=UNK))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    raw.add_special_tokens([PAD, BOS, EOS, UNK])
    raw.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, VOCAB.index(BOS))])
    return Tokenizer(raw, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def save_tokenizer(tokenizer: Tokenizer, folder: Path) -> None:
    """tokenizer.json and tokenizer_config.json, so `jaxmoe generate --model folder` can talk to the model."""
    tokenizer.tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
              "unk_token": UNK, "model_max_length": 64}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def model_config() -> ModelConfig:
    """The tiny preset's architecture (GQA, partial rotary, tied embeddings), sized for this task."""
    return get_preset("tiny").replace(vocab_size=len(VOCAB), hidden_size=128, intermediate_size=256,
                                      num_layers=2, num_heads=8, num_kv_heads=4,
                                      bos_token_id=VOCAB.index(BOS), eos_token_id=(VOCAB.index(EOS),),
                                      pad_token_id=VOCAB.index(PAD))


def pack(examples: list[Example], tokenizer: Tokenizer) -> Batch:
    """All examples as one right-padded Batch; the loss covers each target and its <eos>, not the prompt."""
    rows = [(tokenizer.encode(e.prompt), tokenizer.encode(e.target, add_special_tokens=False)) for e in examples]
    width = max(len(p) + len(t) + 1 for p, t in rows)
    ids = np.full((len(rows), width), tokenizer.pad_token_id, np.int32)
    loss_mask = np.zeros((len(rows), width), np.int32)
    attention_mask = np.zeros((len(rows), width), np.int32)
    for i, (prompt, target) in enumerate(rows):
        seq = prompt + target + [tokenizer.eos_token_id]
        ids[i, :len(seq)] = seq
        loss_mask[i, len(prompt):len(seq)] = 1
        attention_mask[i, :len(seq)] = 1
    return Batch(ids, loss_mask, attention_mask)


def translate(model: Phi3ForCausalLM, tokenizer: Tokenizer, prompts: list[str], batch_size: int = 100) -> list[str]:
    """Greedy translations of `prompts` (left-padded batches through `jaxmoe.generate`), cut at <eos>."""
    outputs = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = tokenizer.batch_encode(prompts[start:start + batch_size])
        tokens = np.asarray(generate(model, ids, attention_mask=mask, max_new_tokens=6,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        for row in tokens[:, ids.shape[1]:]:
            ends = np.flatnonzero(row == tokenizer.eos_token_id)
            outputs.append(tokenizer.decode(row[:ends[0]] if ends.size else row))
    return outputs


def plot_losses(path: Path, train_losses: list[float], heldout: list[tuple[int, float]]) -> None:
    """Training loss per step and held-out loss at its evaluation steps, as a PNG."""
    from matplotlib.figure import Figure  # the object API needs no display and leaves pyplot's state alone

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(np.arange(1, len(train_losses) + 1), train_losses, lw=1, alpha=0.8, label="train (batch)")
    ax.plot(*zip(*heldout), "o-", label="held-out numbers")
    ax.set(xlabel="step", ylabel="next-token cross-entropy (target tokens)", yscale="log",
           title="jaxmoe demo: numbers <-> English words")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def default_out() -> Path:
    return Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")


def run_demo(out: Path | str | None = None, *, steps: int = DEFAULT_STEPS, seed: int = 0, log=print) -> dict:
    """Generates the corpus, trains, evaluates, and writes model/, loss.png, samples.txt and metrics.json
    into `out` (default runs/demo-<timestamp>; it must not exist or be empty). Returns the metrics dict."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}; expected an integer >= 1")
    out = Path(out) if out is not None else default_out()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output folder {str(out)!r} already exists and is not empty; choose another --out")
    started = time.perf_counter()
    tokenizer = make_tokenizer()
    train_examples, heldout_examples = make_corpus()
    train_set, heldout_set = pack(train_examples, tokenizer), pack(heldout_examples, tokenizer)
    config = model_config()
    model = Phi3ForCausalLM(config, rngs=nnx.Rngs(seed))
    train_config = TrainConfig(learning_rate=3e-3, warmup_steps=min(30, steps // 10), total_steps=steps)
    optimizer = make_optimizer(model, train_config)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    log(f"jaxmoe demo: {len(train_examples)} training and {len(heldout_examples)} held-out translations "
        f"(numbers 0-999 <-> English words); model {n_params:,} parameters; {steps} steps of {BATCH_SIZE}")

    heldout_batch = Batch(*(jnp.asarray(x) for x in heldout_set))
    order = np.random.default_rng(seed)
    eval_every = max(1, steps // 8)
    train_losses, heldout_losses = [], [(0, evaluate(model, [heldout_batch])["loss"])]
    log(f"  step    0  (random weights)         held-out loss {heldout_losses[0][1]:.4f}")
    for step in range(1, steps + 1):
        rows = order.choice(len(train_set.input_ids), BATCH_SIZE, replace=False)
        metrics = train_step(model, optimizer, Batch(*(jnp.asarray(x[rows]) for x in train_set)))
        train_losses.append(float(metrics["loss"]))
        if step % eval_every == 0 or step == steps:
            heldout_losses.append((step, evaluate(model, [heldout_batch])["loss"]))
            log(f"  step {step:4d}  train loss {train_losses[-1]:.4f}  held-out loss {heldout_losses[-1][1]:.4f}"
                f"  lr {float(metrics['learning_rate']):.2e}")
    train_seconds = time.perf_counter() - started

    model.eval()
    heldout_eval = evaluate(model, [heldout_batch])
    predictions = translate(model, tokenizer, [e.prompt for e in heldout_examples])
    right = [p == e.target for p, e in zip(predictions, heldout_examples)]
    to_words = [r for r, e in zip(right, heldout_examples) if e.prompt.endswith(TO_WORDS)]
    to_digits = [r for r, e in zip(right, heldout_examples) if e.prompt.endswith(TO_DIGITS)]
    results = {
        "steps": steps, "seed": seed, "batch_size": BATCH_SIZE, "parameters": n_params,
        "train_examples": len(train_examples), "heldout_examples": len(heldout_examples),
        "initial_heldout_loss": heldout_losses[0][1], "final_train_loss": train_losses[-1],
        "heldout_loss": heldout_eval["loss"],
        "heldout_token_accuracy": heldout_eval["accuracy"],
        "heldout_exact_match": float(np.mean(right)), "heldout_exact_match_to_words": float(np.mean(to_words)),
        "heldout_exact_match_to_digits": float(np.mean(to_digits)), "train_seconds": round(train_seconds, 2),
    }

    out.mkdir(parents=True, exist_ok=True)
    model_dir = save_hf(model, out / "model")
    save_tokenizer(tokenizer, model_dir)
    plot_losses(out / "loss.png", train_losses, heldout_losses)
    with open(out / "samples.txt", "w") as f:
        f.write("# greedy translations of held-out numbers: ok/WRONG | prompt | model output | reference\n")
        for ok, prediction, example in zip(right, predictions, heldout_examples):
            f.write(f"{'ok   ' if ok else 'WRONG'} | {example.prompt} | {prediction} | {example.target}\n")
    results["total_seconds"] = round(time.perf_counter() - started, 2)
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")

    log(f"held-out: loss {results['heldout_loss']:.4f}, token accuracy {results['heldout_token_accuracy']:.1%}, "
        f"exact match {results['heldout_exact_match']:.1%} (digits->words "
        f"{results['heldout_exact_match_to_words']:.1%}, words->digits {results['heldout_exact_match_to_digits']:.1%})")
    pairs = np.linspace(0, len(heldout_examples) // 2 - 1, 3).astype(int)  # examples come in direction pairs
    for i in [j for pair in pairs for j in (2 * pair, 2 * pair + 1)]:
        ok, prediction, example = right[i], predictions[i], heldout_examples[i]
        log(f"  {example.prompt!r} -> {prediction!r}" + ("" if ok else f"  (expected {example.target!r})"))
    log(f"wrote {out}/\n  model/        checkpoint + tokenizer (load with jaxmoe.load_hf)\n"
        f"  loss.png      loss curves\n  samples.txt   all held-out translations\n  metrics.json  the numbers above")
    example = heldout_examples[-1].prompt
    log(f"try: jaxmoe generate --model {model_dir} --prompt '{example}' --max-new-tokens 6")
    return results
