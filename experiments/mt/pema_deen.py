"""Issue 18, reproduced small: PEMA against LoRA, kNN-LM and no adaptation on de-en (experiments/mt/README.md).

The base must be trained first (it is issue 16's base, not in the repository), from the repository root:
  jaxmoe train --config experiments/configs/alma-base.yaml                  # runs/alma-base/model
then
  python experiments/mt/pema_deen.py --base runs/alma-base/model --out runs/pema-deen

On --pairs de-en pairs drawn from ALMA's human-written training data (../shared/data/alma/deen) and tested on the
first --test sentences of WMT'22 de-en, every arm translates greedily with ALMA's prompt, cut at the first newline,
at most --max-new-tokens new tokens:
  none         the base as it is.
  pema         external memory of the pairs (and of --valid validation pairs) built with the frozen base; phase 1
               (reconstruction) and phase 2 (kappa 0.2); decoding with Gradual Unrolling, lambda_max 0.9, L = the
               source's token count (length="source"; the paper's code uses the reference's length, an oracle).
  pema-kappa0  the paper's "no B_rct" ablation: phase 2 with kappa = 0, cross-entropy alone. train_joint draws A
               afresh and B_rct then has no weight, so phase 1 cannot change the result: this arm runs phase 2 only.
  pema-no-gu   the same adapter as pema, lambda constant at lambda_max at every step (schedule="constant"). In
               jaxmoe "constant lambda" and "no GU" are one ablation (gu_coefficients: "the paper's no-GU
               ablation"), so it runs once. Note GU applies lambda**2 (0.81 at the first step), constant lambda 0.9.
  knn          kNN-LM over the same memory (jaxmoe.mt.pema.knn_lm): P = lam P_kNN + (1 - lam) P_LM, P_kNN a
               softmax over -squared L2 distance / T of the k=--knn-k nearest keys. T and lam are chosen on the
               validation memory's teacher-forced next-token NLL (kNN-LM's way of tuning lambda): T from
               median(neighbour distance) x {0.03 ... 3}, lam from {0.1, 0.25, 0.5, 0.75}.
  lora         `jaxmoe train --config experiments/configs/alma-stage2-lora.yaml` (LoRA r16 a32 dropout 0.05 on
               down_proj, lr 5e-3 inverse-sqrt, the best validation checkpoint merged and exported) from the base,
               overridden to train on exactly the same pairs (written to OUT/data) in one direction, de -> en,
               validated on the same validation pairs, for --lora-steps steps; its export is translated here.

Measured per arm (one JSON line each in OUT/results.jsonl, then the table in OUT/table.md): test BLEU and chrF
(sacreBLEU defaults, jaxmoe.mt.eval.score), training wall seconds (PEMA: its phases in this process, compile
included; LoRA: the trainer's train_seconds, which include its data preparation and validation), and training
memory: the compiled training step's XLA memory_analysis(), argument + output - alias + temp bytes (as
experiments/mt/dry_run.py), i.e. what the device holds during one step: for LoRA the whole base model, its adapters,
AdamW's moments and a batch; for PEMA the adapter, Adam's moments, the final norm and LM head and a batch of memory
rows (the larger of the two phases). Building the memory (the model owner's forward passes) is timed on its own.

Rerunning with the same --out continues: arms already in results.jsonl are kept, built memories and the LoRA run
folder are reused. Smoke-sized example (see the README): --pairs 50 --valid 10 --test 8 --max-steps 4
--eval-every 2 --lora-steps 3.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxmoe.infer.generate import generate
from jaxmoe.io.load import load_model
from jaxmoe.io.tokenizer import Tokenizer
from jaxmoe.mt.eval import PROMPT_WIDTH_MULTIPLE, score
from jaxmoe.mt.pema import (PEMA, Memory, build_memory, encode_examples, gradual_unrolling, knn_lm, lm_head_of,
                            memory_arrays, nearest, train_joint, train_reconstruction)
from jaxmoe.mt.pema.train import pema_step
from jaxmoe.train.batches import PromptFormat
from jaxmoe.train.data import ParallelSource
from jaxmoe.train.loop import Batch, TrainConfig, make_optimizer, train_step
from jaxmoe.train.run_config import load_run_config
from jaxmoe.train.trainer import build_model

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "alma" / "deen"
LORA_CONFIG = REPO / "experiments" / "configs" / "alma-stage2-lora.yaml"
ARMS = ("none", "pema", "pema-kappa0", "pema-no-gu", "knn", "lora")
PROMPT = PromptFormat()  # ALMA's: "Translate this from German to English:\nGerman: {src}\nEnglish:"
MAX_LEN = 256  # the LoRA config's data.max_len: pairs longer than this (prompt + target) are not drawn
KNN_T_SCALES = (0.03, 0.1, 0.3, 1.0, 3.0)
KNN_LAMS = (0.1, 0.25, 0.5, 0.75)


# ------------------------------------------------------------------------------------------------------ data

def draw(pairs: list, n: int, seed: int) -> list:
    """n pairs drawn as `jaxmoe train` draws max_pairs from one corpus (rng [seed, 0], ascending)."""
    if n > len(pairs):
        raise SystemExit(f"asked for {n} pairs but only {len(pairs)} fit {MAX_LEN} tokens; lower the count")
    return [pairs[i] for i in sorted(np.random.default_rng([seed, 0]).permutation(len(pairs))[:n].tolist())]


def fits(tokenizer, src: str, tgt: str) -> bool:
    return len(tokenizer.encode(PROMPT.render(src, "de", "en"))) + len(tokenizer.encode(" " + tgt)) + 1 <= MAX_LEN


def write_alma_json(pairs, path: Path) -> None:
    path.write_text(json.dumps([{"translation": {"de": s, "en": t}} for s, t in pairs], ensure_ascii=False) + "\n",
                    encoding="utf-8")


def prepare_data(args, tokenizer) -> dict:
    """The train / valid pairs (also written to OUT/data for the LoRA run) and the test pairs."""
    train_all = ParallelSource("de", "en", src_path=DATA / "train.de-en.de", tgt_path=DATA / "train.de-en.en").read()
    valid_all = ParallelSource("de", "en", json_path=DATA / "valid.de-en.json").read()
    test = [(s, t) for _, s, t in ParallelSource("de", "en", json_path=DATA / "test.de-en.json").read()][:args.test]
    splits = {"train": draw([(s, t) for _, s, t in train_all if fits(tokenizer, s, t)], args.pairs, args.seed),
              "valid": draw([(s, t) for _, s, t in valid_all if fits(tokenizer, s, t)], args.valid, args.seed),
              "test": test}
    folder = args.out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train", "valid"):
        write_alma_json(splits[name], folder / f"{name}.de-en.json")
    return splits


# ------------------------------------------------------------------------------------------------ decoding

def translate_with(model, tokenizer, sources: list[str], processor_for, *, max_new_tokens: int, batch_size: int
                   ) -> list[str]:
    """jaxmoe.mt.eval.translate's greedy decoding with ALMA's prompt and cut_at_newline (sorted by length, the last
    batch filled with a repeated row, prompts left-padded to a multiple of 16), plus a logits processor per batch:
    processor_for(the batch's sources) -> processor or None. translate itself takes no processor, and a per-prompt
    one (GU's source lengths) must follow its reordering, hence this copy of its loop."""
    config = model.config
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (config.pad_token_id or 0)
    config_eos = config.eos_token_id
    config_eos = () if config_eos is None else (config_eos,) if np.isscalar(config_eos) else tuple(config_eos)
    eos_ids = tuple(dict.fromkeys(int(i) for i in (tokenizer.eos_token_id, *config_eos) if i is not None))
    prompts = [PROMPT.render(s, "de", "en") for s in sources]
    lengths = [len(tokenizer.encode(p)) for p in prompts]
    order = sorted(range(len(sources)), key=lambda i: lengths[i])
    rows = min(batch_size, len(sources))
    outputs = [None] * len(sources)
    for start in range(0, len(order), rows):
        members = order[start:start + rows]
        filled = members + [members[-1]] * (rows - len(members))
        ids, mask = tokenizer.batch_encode([prompts[i] for i in filled], pad_id=pad_id)
        width = -(-ids.shape[1] // PROMPT_WIDTH_MULTIPLE) * PROMPT_WIDTH_MULTIPLE
        extra = min(width, config.max_position_embeddings - max_new_tokens) - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id)
        mask = np.pad(mask, ((0, 0), (extra, 0)))
        tokens = np.asarray(generate(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     eos_token_id=eos_ids, pad_token_id=pad_id,
                                     logits_processor=processor_for([sources[i] for i in filled])))[:, ids.shape[1]:]
        for i, row in zip(members, tokens):
            ends = np.flatnonzero(np.isin(row, eos_ids))
            text = tokenizer.decode(row[:ends[0]] if ends.size else row, skip_special_tokens=True).strip()
            outputs[i] = text.split("\n", 1)[0].rstrip()
    return outputs


def evaluate(arm: str, model, tokenizer, test, processor_for, args) -> dict:
    """Translates the test sources, writes OUT/hyp/ARM.txt, returns BLEU, chrF and the decoding seconds."""
    started = time.perf_counter()
    hyps = translate_with(model, tokenizer, [s for s, _ in test], processor_for, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    (args.out / "hyp").mkdir(exist_ok=True)
    (args.out / "hyp" / f"{arm}.txt").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    scores = score(hyps, [t for _, t in test], lang_pair="de-en")
    return {"bleu": scores["bleu"], "chrf": scores["chrf"], "test_sentences": len(test),
            "decode_seconds": round(seconds, 1), "bleu_signature": scores["bleu_signature"]}


# ------------------------------------------------------------------------------------------- training memory

def peak_bytes(compiled) -> int:
    """argument + output - alias + temp of a compiled step (experiments/mt/dry_run.py's peak)."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def pema_step_bytes(pema: PEMA, head, rows: int, d: int, *, phase: int) -> int:
    """The compiled PEMA training step of `phase` (train.py's step and its Adam over the phase's parameters) on a
    batch of `rows` memory rows."""
    trained = "b_rct_dr" if phase == 1 else "b_pd_dr"
    wrt = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("a_rd"), nnx.PathContains(trained)))
    optimizer = nnx.Optimizer(pema, optax.adam(1e-3), wrt=wrt)
    f = jax.ShapeDtypeStruct((rows, d), jnp.float32)
    y = jax.ShapeDtypeStruct((rows,), jnp.int32)
    w = jax.ShapeDtypeStruct((rows,), jnp.float32)
    return peak_bytes(pema_step.lower(pema, optimizer, None if phase == 1 else head, f, y, w,
                                        jnp.float32(0.2)).compile())


def lora_step(config, tokenizer) -> tuple[int, int]:
    """(peak bytes, trained parameters) of the LoRA run's training step: the trainer's model (build_model: the
    base with the config's adapters), optimizer and train_step on a batch of optim.batch_size x data.max_len."""
    model = build_model(config, tokenizer)
    o = config.optim
    optimizer = make_optimizer(model, TrainConfig(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps,
                                                  total_steps=o.steps, schedule=o.schedule), wrt=nnx.LoRAParam)
    graphdef, state = nnx.split((model, optimizer))

    def step(state, batch, key):
        model, optimizer = nnx.merge(graphdef, state)
        metrics = train_step(model, optimizer, batch, nnx.Rngs(key))
        return nnx.state((model, optimizer)), metrics

    ids = jax.ShapeDtypeStruct((o.batch_size, config.data.max_len), jnp.int32)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    batch = Batch(input_ids=ids, loss_mask=ids, attention_mask=ids, segment_ids=ids, positions=ids)  # packed rows
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch, key).compile()
    trained = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    return peak_bytes(compiled), int(trained)


# ------------------------------------------------------------------------------------------------------ arms

def memories(model, tokenizer, splits, args) -> tuple[Memory, Memory, float]:
    """The train and valid memories (built once, reused from OUT/memory), and the build seconds."""
    prompt = PROMPT.render("{source}", "de", "en")
    started, paths = time.perf_counter(), {name: args.out / "memory" / name for name in ("train", "valid")}
    for name, path in paths.items():
        if not (path / "memory.json").is_file():
            # " " + target: the trainer's encoding (encode_translation), what the model continues after "English:".
            examples = encode_examples(tokenizer, [s for s, _ in splits[name]], [" " + t for _, t in splits[name]],
                                       prompt=prompt)
            build_memory(model, examples, path, batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    return Memory(paths["train"]), Memory(paths["valid"]), seconds


def train_pema(memory, valid, head, args, *, kappa: float) -> tuple[PEMA, dict]:
    """Phase 1 (skipped for kappa 0, see the module docstring) and phase 2; the adapter and its record."""
    pema = PEMA(head.hidden_size, args.rank, rngs=nnx.Rngs(args.seed))
    common = dict(valid=valid, max_epochs=args.max_epochs, max_steps=args.max_steps, eval_every=args.eval_every,
                  seed=args.seed)
    record, started = {}, time.perf_counter()
    if kappa > 0:
        r1 = train_reconstruction(pema, memory, **common)
        record["phase1"] = {"steps": r1.steps, "best_valid_mse": r1.best_valid_loss, "stopped_early": r1.stopped_early}
    r2 = train_joint(pema, head, memory, kappa=kappa, **common)
    record["phase2"] = {"steps": r2.steps, "best_valid_loss": r2.best_valid_loss, "stopped_early": r2.stopped_early}
    record["train_seconds"] = round(time.perf_counter() - started, 1)
    d, rows = head.hidden_size, len(memory)
    phases = [2] if kappa == 0 else [1, 2]
    by_phase = {p: pema_step_bytes(PEMA(d, args.rank, rngs=nnx.Rngs(0)), head, min(20480 if p == 1 else 2048, rows),
                                   d, phase=p) for p in phases}
    record["train_memory_bytes"] = max(by_phase.values())
    record["train_memory_bytes_by_phase"] = by_phase
    record["trained_parameters"] = (2 if kappa == 0 else 3) * args.rank * d  # A, B_pd and (kappa > 0) B_rct
    return pema, record


def tune_knn(memory, valid, head, k: int) -> dict:
    """T and lam minimising the teacher-forced next-token NLL of lam P_kNN + (1 - lam) P_LM on the valid memory."""
    keys, values = (jnp.asarray(a) for a in memory_arrays(memory))
    vkeys, vvalues = memory_arrays(valid)
    d2s, matches, lp_lm = [], [], []
    for s in range(0, len(vvalues), 256):
        q, y = jnp.asarray(vkeys[s:s + 256]), vvalues[s:s + 256]
        d2, idx = nearest(q, keys, k)
        d2s.append(np.asarray(d2, np.float64))
        matches.append(np.asarray(values[idx]) == y[:, None])
        lp_lm.append(np.asarray(jax.nn.log_softmax(head.logits(q), -1))[np.arange(len(y)), y].astype(np.float64))
    d2, match, lp_lm = np.concatenate(d2s), np.concatenate(matches), np.concatenate(lp_lm)
    scale = float(np.median(d2)) or 1.0
    grid = []
    for t in (scale * c for c in KNN_T_SCALES):
        w = np.exp(-(d2 - d2[:, :1]) / t)
        p_knn = np.sum(w * match, -1) / np.sum(w, -1)
        for lam in KNN_LAMS:
            nll = -float(np.mean(np.log(lam * p_knn + (1 - lam) * np.exp(lp_lm))))
            grid.append({"temperature": t, "lam": lam, "valid_nll": nll})
    best = min(grid, key=lambda g: g["valid_nll"])
    return {**best, "lm_valid_nll": -float(np.mean(lp_lm)), "distance_median": scale}


def run_lora(splits, args) -> tuple[dict, Path]:
    """Trains (or resumes, or reuses) the LoRA run; returns its record and exported model folder."""
    data, run_dir = args.out / "data", args.out / "lora"
    pairs = lambda name: f"[{{json: {data / f'{name}.de-en.json'}, src_lang: de, tgt_lang: en}}]"  # noqa: E731
    overrides = [f"model.init_from={args.base.resolve()}", f"run_dir={run_dir}", f"optim.steps={args.lora_steps}",
                 f"data.train.pairs={pairs('train')}", "data.train.both_directions=false", "data.train.max_pairs=null",
                 f"data.valid.pairs={pairs('valid')}", "data.valid.both_directions=false", "data.valid.max_pairs=null",
                 "data.test=null", "eval.translate=0", "progress=false", *args.lora_override]
    config = load_run_config(LORA_CONFIG, overrides)
    if not (run_dir / "summary.json").is_file():
        jaxmoe = Path(sys.executable).with_name("jaxmoe")
        command = [str(jaxmoe) if jaxmoe.exists() else "jaxmoe", "train", "--config", str(LORA_CONFIG), *overrides]
        print("+ " + " ".join(command), flush=True)
        subprocess.run(command, check=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    memory_bytes, trained = lora_step(config, Tokenizer.from_folder(args.base))
    return {"train_seconds": summary["train_seconds"], "train_memory_bytes": memory_bytes,
            "trained_parameters": trained, "steps": summary["steps"], "valid_loss": summary.get("valid_loss"),
            "exported_step": summary.get("exported_step"), "command_overrides": overrides}, run_dir / "model"


# ----------------------------------------------------------------------------------------------------- table

def table(rows: list[dict]) -> str:
    head = ("| arm | BLEU | chrF | train s | train-step memory MiB | trained params | memory build s | decode s |"
            " settings |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        mib = "-" if r.get("train_memory_bytes") is None else f"{r['train_memory_bytes'] / 2**20:,.1f}"
        cells = [r["arm"], f"{r['bleu']:.2f}", f"{r['chrf']:.2f}", str(r.get("train_seconds", "-")), mib,
                 f"{r['trained_parameters']:,}" if r.get("trained_parameters") else "-",
                 str(r.get("memory_build_seconds", "-")), str(r["decode_seconds"]), r.get("settings", "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the base model folder (runs/alma-base/model)")
    parser.add_argument("--out", type=Path, required=True, help="the output folder (continued when it exists)")
    parser.add_argument("--pairs", type=int, default=2000, help="training pairs (issue 16's N)")
    parser.add_argument("--valid", type=int, default=200, help="validation pairs (PEMA's early stopping, kNN tuning)")
    parser.add_argument("--test", type=int, default=1984, help="first sentences of WMT'22 de-en (1,984: all)")
    parser.add_argument("--rank", type=int, default=64, help="PEMA's rank (the paper's 512 for d=2048 is d/4)")
    parser.add_argument("--max-epochs", type=int, default=200, help="PEMA epochs per phase (the paper's 200)")
    parser.add_argument("--max-steps", type=int, default=None, help="PEMA steps per phase (default: no limit)")
    parser.add_argument("--eval-every", type=int, default=100, help="PEMA validation checks (the paper's 100)")
    parser.add_argument("--lambda-max", type=float, default=0.9)
    parser.add_argument("--knn-k", type=int, default=16)
    parser.add_argument("--lora-steps", type=int, default=150, help="the LoRA run's optim.steps (issue 16's 150)")
    parser.add_argument("--lora-override", action="append", default=[], metavar="KEY=VALUE",
                        help="more overrides for the LoRA run (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32, help="decoding and memory-building batch")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    if set(arms) - set(ARMS):
        parser.error(f"--arms {args.arms!r}: unknown {sorted(set(arms) - set(ARMS))}; expected some of {ARMS}")
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    done = {}
    if results_path.is_file():
        done = {r["arm"]: r for r in map(json.loads, results_path.read_text().splitlines()) if r["arm"] in arms}
    (args.out / "args.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                    for k, v in vars(args).items()}, indent=1) + "\n")

    model, tokenizer = load_model(args.base), Tokenizer.from_folder(args.base)
    model.eval()
    splits = prepare_data(args, tokenizer)
    test, head = splits["test"], lm_head_of(model)
    print(f"{len(splits['train'])} train, {len(splits['valid'])} valid, {len(test)} test pairs", flush=True)
    state = {}

    def adapter(kappa):  # pema and pema-no-gu share one adapter
        if kappa not in state:
            state[kappa] = train_pema(*state["memory"][:2], head, args, kappa=kappa)
        return state[kappa]

    for arm in arms:
        if arm in done:
            print(json.dumps(done[arm]), flush=True)
            continue
        record = {"arm": arm}
        if arm != "none" and arm != "lora" and "memory" not in state:
            state["memory"] = memories(model, tokenizer, splits, args)
        if arm == "none":
            record.update(evaluate(arm, model, tokenizer, test, lambda _: None, args))
        elif arm.startswith("pema"):
            kappa = 0.0 if arm == "pema-kappa0" else 0.2
            pema, trained = adapter(kappa)
            schedule = "constant" if arm == "pema-no-gu" else "gradual"

            def gu(batch, pema=pema, schedule=schedule):
                lengths = [len(tokenizer.encode(s, add_special_tokens=False)) for s in batch]
                return gradual_unrolling(pema, head, lambda_max=args.lambda_max, length="source",
                                         source_lengths=lengths, schedule=schedule)

            record.update({**trained, "memory_build_seconds": round(state["memory"][2], 1),
                           "memory_rows": len(state["memory"][0]),
                           "settings": f"r{args.rank} kappa {kappa:g} lambda_max {args.lambda_max:g} {schedule}"
                                       + (" (pema's adapter)" if arm == "pema-no-gu" else "")})
            record.update(evaluate(arm, model, tokenizer, test, gu, args))
        elif arm == "knn":
            memory, valid, build_seconds = state["memory"]
            tuned = tune_knn(memory, valid, head, args.knn_k)
            knn = knn_lm(memory, k=args.knn_k, temperature=tuned["temperature"], lam=tuned["lam"])
            record.update({"knn": tuned, "train_seconds": 0, "train_memory_bytes": None,
                           "memory_build_seconds": round(build_seconds, 1), "memory_rows": len(memory),
                           "settings": f"k {args.knn_k} T {tuned['temperature']:.3g} lam {tuned['lam']:g}"})
            record.update(evaluate(arm, model, tokenizer, test, lambda _: knn, args))
        else:
            trained, exported = run_lora(splits, args)
            lo = load_run_config(LORA_CONFIG).model.lora
            record.update({**trained, "settings": f"r{lo.rank} a{lo.alpha:g} {'+'.join(lo.targets)}, "
                                                  f"{args.lora_steps} steps"})
            lora_model = load_model(exported)
            lora_model.eval()
            record.update(evaluate(arm, lora_model, Tokenizer.from_folder(exported), test, lambda _: None, args))
        for key, value in record.items():
            if isinstance(value, float) and not math.isfinite(value):
                record[key] = None
        done[arm] = record
        with results_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(json.dumps(record, ensure_ascii=False), flush=True)
    text = table([done[a] for a in arms if a in done])
    (args.out / "table.md").write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
