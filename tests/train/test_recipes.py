"""ALMA's recipe pieces: language-sampled monolingual data, parallel corpora in both directions with N pairs drawn,
the inverse-sqrt schedule, LoRA dropout, the best checkpoint exported, test translations per direction, and the
errors for bad recipe configs.

The end-to-end runs (slow tier) share one tiny dense model setting so they reuse each other's compiled steps."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmoe import get_preset
from jaxmoe.models.phi3 import Phi3ForCausalLM
from jaxmoe.nn.lora import LoRAConfig, apply_lora
from jaxmoe.train import data as data_lib
from jaxmoe.train.loop import TrainConfig, learning_rate_schedule
from jaxmoe.train.run_config import ConfigError, run_config_from_dict
from jaxmoe.train.trainer import build_model, load_records, train

WORDS = {"en": "the house is big and the cat is small today".split(),
         "de": "das Haus ist gross und die Katze ist klein heute".split(),
         "cs": "dum je velky a kocka je mala dnes".split()}


def sentences(lang: str, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS[lang], size=rng.integers(3, 7))) + f" {i}" for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("recipes")
    for lang, n in (("en", 60), ("de", 40), ("cs", 20)):
        lines = sentences(lang, n, seed=len(lang) + n)
        (folder / f"mono.{lang}").write_text("".join(line + "\n" for line in lines + lines[:5]))  # 5 duplicates
    for pair in ("de", "cs"):
        src, tgt = sentences(pair, 30, seed=1), sentences("en", 30, seed=2)
        (folder / f"train.{pair}-en.{pair}").write_text("".join(s + "\n" for s in src))
        (folder / f"train.{pair}-en.en").write_text("".join(s + "\n" for s in tgt))
        for split, n in (("valid", 6), ("test", 4)):
            entries = [{"translation": {pair: s, "en": t}} for s, t in zip(src[:n], tgt[:n])]
            (folder / f"{split}.{pair}-en.json").write_text(json.dumps(entries))
            reverse = [{"translation": {"en": t, pair: s}} for s, t in zip(src[:n], tgt[:n])]
            (folder / f"{split}.en-{pair}.json").write_text(json.dumps(reverse))
    return folder


def mono_spec(corpus: Path, langs=("en", "de", "cs")) -> dict:
    return {"monolingual": {lang: [str(corpus / f"mono.{lang}")] for lang in langs}}


def pairs_spec(corpus: Path, split: str = "train", **extra) -> dict:
    if split == "train":
        pairs = [{"src": str(corpus / f"train.{p}-en.{p}"), "tgt": str(corpus / f"train.{p}-en.en"), "src_lang": p,
                  "tgt_lang": "en"} for p in ("de", "cs")]
    else:
        pairs = [{"json": str(corpus / f"{split}.{a}-{b}.json"), "src_lang": a, "tgt_lang": b}
                 for a, b in (("de", "en"), ("en", "de"), ("cs", "en"), ("en", "cs"))]
    return {"pairs": pairs, **extra}


def config(corpus: Path, run_dir: Path, data: dict, **sections) -> dict:
    values = {
        "run_dir": str(run_dir), "seed": 3, "log_every": 1, "progress": False,
        "model": {"preset": "tiny", "overrides": {"hidden_size": 32, "intermediate_size": 48, "num_layers": 1,
                                                  "longrope": None, "max_position_embeddings": 192}},
        "tokenizer": {"bpe_vocab_size": 300},
        "data": {"max_len": 128, "data_dir": str(corpus / "tfds"), **data},
        "optim": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "learning_rate": 3e-3},
        "checkpoint": {"every": 2, "keep_last": 1, "keep_best": 1},
        "eval": {"every": 2, "translate": 2, "max_new_tokens": 6, "batch_size": 4},
    }
    for name, update in sections.items():
        values[name] = {**values[name], **update} if isinstance(values.get(name), dict) else update
    return values


# --- data views ------------------------------------------------------------------------------------------------

def test_language_mix_draws_each_language_with_its_probability():
    parts = {"en": [{"text": f"en {i}"} for i in range(50)], "is": [{"text": f"is {i}"} for i in range(5)]}
    mix = data_lib.LanguageMix(parts, {"en": 0.6, "is": 0.4}, seed=0, length=5000)
    counts = mix.counts()
    assert abs(counts["is"] / 5000 - 0.4) < 0.03 and sum(counts.values()) == 5000
    records = [mix[i] for i in range(len(mix))]
    assert all(r["text"].split()[0] == r["lang"] for r in records)
    seen_is = [r["text"] for r in records if r["lang"] == "is"]
    # The small language is repeated: every one of its texts once per pass, in a shuffled order each pass.
    assert sorted(seen_is[:5]) == sorted(f"is {i}" for i in range(5)) and len(set(seen_is)) == 5
    again = data_lib.LanguageMix(parts, {"en": 0.6, "is": 0.4}, seed=0, length=5000)
    assert [again[i] for i in range(100)] == records[:100]
    other = data_lib.LanguageMix(parts, {"en": 0.6, "is": 0.4}, seed=1, length=5000)
    assert [other[i] for i in range(100)] != records[:100]


def test_sampling_probabilities_alma_proportional_and_errors():
    sizes = {lang: 10 for lang in data_lib.ALMA_LANGUAGE_SAMPLING}
    assert data_lib.sampling_probabilities("alma", sizes) == data_lib.ALMA_LANGUAGE_SAMPLING
    assert data_lib.sampling_probabilities("proportional", {"en": 30, "de": 10}) == {"en": 0.75, "de": 0.25}
    with pytest.raises(ValueError, match=r"language 'cs' a probability, but the monolingual data has no 'cs'"):
        data_lib.sampling_probabilities({"en": 0.5, "cs": 0.5}, {"en": 10, "de": 10})
    with pytest.raises(ValueError, match=r"'alma'.*'cs'.*no 'cs' text"):
        data_lib.sampling_probabilities("alma", {"en": 10, "de": 10})
    with pytest.raises(ValueError, match="no probability for language 'de'"):
        data_lib.sampling_probabilities({"en": 1.0}, {"en": 10, "de": 10})
    with pytest.raises(ValueError, match="sum to 0.9000"):
        data_lib.sampling_probabilities({"en": 0.5, "de": 0.4}, {"en": 10, "de": 10})
    with pytest.raises(ValueError, match="probability -0.5 for 'de'"):
        data_lib.sampling_probabilities({"en": 1.5, "de": -0.5}, {"en": 10, "de": 10})


def test_directed_records_both_directions_and_concatenation():
    pairs = [{"src": f"s{i}", "tgt": f"t{i}"} for i in range(4)]
    directed = data_lib.DirectedRecords(pairs, src_lang="de", tgt_lang="en", indices=[3, 1], both_directions=True)
    assert [directed[i] for i in range(len(directed))] == [
        {"src": "s3", "tgt": "t3", "src_lang": "de", "tgt_lang": "en"},
        {"src": "s1", "tgt": "t1", "src_lang": "de", "tgt_lang": "en"},
        {"src": "t3", "tgt": "s3", "src_lang": "en", "tgt_lang": "de"},
        {"src": "t1", "tgt": "s1", "src_lang": "en", "tgt_lang": "de"}]
    both = data_lib.ConcatRecords([directed, data_lib.DirectedRecords(pairs[:1], src_lang="cs", tgt_lang="en")])
    assert len(both) == 5 and both[4]["src_lang"] == "cs" and both[-1] == both[4]
    with pytest.raises(IndexError):
        both[5]


def test_monolingual_spec_deduplicates_per_language_and_samples(corpus, tmp_path):
    cfg = run_config_from_dict(config(corpus, tmp_path / "run", {"train": mono_spec(corpus),
                                                                  "language_sampling": {"en": 0.5, "de": 0.3,
                                                                                        "cs": 0.2}}))
    records = load_records(cfg, corpus / "tfds")["train"]
    assert isinstance(records, data_lib.LanguageMix)
    assert {lang: len(part) for lang, part in records.parts.items()} == {"en": 60, "de": 40, "cs": 20}
    assert len(records) == 120 and records.probabilities == {"en": 0.5, "de": 0.3, "cs": 0.2}


def test_pairs_spec_draws_max_pairs_and_uses_both_directions(corpus, tmp_path):
    cfg = run_config_from_dict(config(corpus, tmp_path / "run", {"train": pairs_spec(corpus, both_directions=True,
                                                                                     max_pairs=10)}))
    records = load_records(cfg, corpus / "tfds")["train"]
    assert len(records) == 2 * 2 * 10
    directions = [(records[i]["src_lang"], records[i]["tgt_lang"]) for i in range(len(records))]
    assert directions == [("de", "en")] * 10 + [("en", "de")] * 10 + [("cs", "en")] * 10 + [("en", "cs")] * 10
    assert records[0]["src"] == records[10]["tgt"]
    de = (corpus / "train.de-en.de").read_text().splitlines()
    chosen = [de.index(records[i]["src"]) for i in range(10)]
    assert chosen == sorted(chosen) and chosen != list(range(10))  # a seeded draw, in file order


def test_recipe_config_errors(corpus, tmp_path):
    def load(data, **sections):
        cfg = run_config_from_dict(config(corpus, tmp_path / "run", data, **sections))
        return load_records(cfg, corpus / "tfds")
    with pytest.raises(ConfigError, match=r"max_pairs=99 but corpus 0 has only 30 pairs"):
        load({"train": pairs_spec(corpus, max_pairs=99)})
    with pytest.raises(ConfigError, match=r"'alma'.*gives language 'is' a probability.*no 'is' text"):
        load({"train": mono_spec(corpus)})  # the default sampling is ALMA's six languages
    with pytest.raises(ConfigError, match=r"language 'is' a probability"):
        load({"train": mono_spec(corpus, ("en", "de")), "language_sampling": {"en": 0.5, "de": 0.3, "is": 0.2}})
    with pytest.raises(ConfigError, match=r"pairs\[0\]"):
        load({"train": {"pairs": [{"src": "a", "tgt": "b"}]}})
    with pytest.raises(ConfigError, match="optim.schedule=inverse_sqrt with optim.warmup_steps=0"):
        run_config_from_dict(config(corpus, tmp_path, {"train": mono_spec(corpus)},
                                    optim={"schedule": "inverse_sqrt", "warmup_steps": 0}))
    with pytest.raises(ConfigError, match="export_best=true needs a validation split"):
        run_config_from_dict(config(corpus, tmp_path, {"train": mono_spec(corpus)}, checkpoint={"export_best": True}))
    with pytest.raises(ConfigError, match=r"model.lora.dropout=1.5"):
        run_config_from_dict(config(corpus, tmp_path, {"train": mono_spec(corpus)},
                                    model={"preset": "tiny", "lora": {"dropout": 1.5}}))


def test_a_lora_target_that_matches_no_module_is_named(corpus, tmp_path):
    cfg = run_config_from_dict(config(corpus, tmp_path, {"train": mono_spec(corpus)},
                                      model={"preset": "tiny", "lora": {"targets": ["down_projection"]}}))
    tokenizer = type("T", (), {"vocab_size": 300, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})()
    with pytest.raises(ValueError, match=r"targets \['down_projection'\] match no nnx.Linear.*down_proj"):
        build_model(cfg, tokenizer)


# --- schedule and LoRA dropout --------------------------------------------------------------------------------

def test_inverse_sqrt_schedule_equals_transformers():
    torch = pytest.importorskip("torch")
    from transformers import get_inverse_sqrt_schedule
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    scheduler = get_inverse_sqrt_schedule(optimizer, num_warmup_steps=10)
    expected = []
    for _ in range(60):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    schedule = learning_rate_schedule(TrainConfig(learning_rate=2e-3, warmup_steps=10, total_steps=60,
                                                  schedule="inverse_sqrt"))
    np.testing.assert_allclose([float(schedule(i)) for i in range(60)], expected, rtol=1e-6)


def test_lora_dropout_only_in_training_and_only_on_the_adapter_input():
    model = Phi3ForCausalLM(get_preset("tiny"), rngs=nnx.Rngs(0))
    assert apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=("down_proj",), dropout=0.5),
                      rngs=nnx.Rngs(1)) == 2
    for layer in model.layers:  # a non-zero adapter, so that dropout on its input shows
        layer.mlp.down_proj.lora_b[...] = jax.random.normal(jax.random.key(2), layer.mlp.down_proj.lora_b.shape)
    ids = jnp.arange(12, dtype=jnp.int32)[None] % 500
    model.eval()
    clean = model(ids).logits
    np.testing.assert_array_equal(clean, model(ids).logits)
    model.train()
    with pytest.raises(ValueError, match="dropout 0.5 is in training mode but got no rngs"):
        model(ids)
    a, b = model(ids, rngs=nnx.Rngs(5)).logits, model(ids, rngs=nnx.Rngs(6)).logits
    assert not np.allclose(a, clean) and not np.allclose(a, b)
    np.testing.assert_array_equal(a, model(ids, rngs=nnx.Rngs(5)).logits)
    with pytest.raises(ValueError, match=r"dropout=0.1 on targets \['o_proj'\]"):
        apply_lora(Phi3ForCausalLM(get_preset("tiny"), rngs=nnx.Rngs(0)),
                   LoRAConfig(targets=("o_proj",), dropout=0.1), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"dropout is 1.0; expected a number in \[0, 1\)"):
        LoRAConfig(dropout=1.0)


# --- the recipe end to end: stage 1 (monolingual, sampled), stage 2 (pairs both ways, best exported) --------------

@pytest.fixture(scope="module")
def stage1(corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("stage1") / "run"
    train(config(corpus, run_dir, {"train": mono_spec(corpus), "language_sampling": "proportional"},
                 eval={"every": 0, "translate": 0}, checkpoint={"keep_best": 0}), log=lambda _: None)
    return run_dir


@pytest.mark.slow  # about 40 s with the shared stage-1 run: the default tier's budget
def test_stage2_from_stage1_translates_every_direction_with_the_best_checkpoint(corpus, stage1, tmp_path):
    run_dir = tmp_path / "stage2"
    cfg = config(corpus, run_dir, {"train": pairs_spec(corpus, both_directions=True, max_pairs=20),
                                   "valid": pairs_spec(corpus, "valid"), "test": pairs_spec(corpus, "test")},
                 checkpoint={"export_best": True}, optim={"schedule": "inverse_sqrt", "steps": 4},
                 eval={"cut_at_newline": True})
    cfg["model"] = {"init_from": str(stage1 / "model"), "overrides": {"remat": "layer"},
                    "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.05, "targets": ["down_proj"]}}
    cfg["tokenizer"] = {}
    summary = train(cfg, log=lambda _: None)
    assert sorted(summary["test"]) == ["cs-en", "de-en", "en-cs", "en-de"]
    assert all(r["sentences"] == 2 and 0 <= r["bleu"] <= 100 for r in summary["test"].values())
    assert math.isclose(summary["test_chrf"], np.mean([r["chrf"] for r in summary["test"].values()]))
    for name in summary["test"]:
        assert len((run_dir / f"test.{name}.hyp.txt").read_text().splitlines()) == 2
    valid = {json.loads(line)["step"]: json.loads(line)["loss"] for line in
             (run_dir / "metrics.jsonl").read_text().splitlines() if json.loads(line)["split"] == "valid"}
    best = min(valid, key=valid.get)
    assert summary["exported_step"] == best and summary["valid_loss"] == valid[best]
    cfg["optim"] = {**cfg["optim"], "steps": 2}
    with pytest.raises(ConfigError, match=r"holds step 4, past optim.steps=2; set optim.steps >= 4"):
        train(cfg, log=lambda _: None)


# --- CPO through the training job -------------------------------------------------------------------------------

def write_candidates(path: Path, corpus: Path, n: int) -> None:
    de = (corpus / "train.de-en.de").read_text().splitlines()[:n]
    en = (corpus / "train.de-en.en").read_text().splitlines()[:n]
    lines = [json.dumps({"source": s, "src_lang": "de", "tgt_lang": "en", "candidates": [
        {"text": t, "score": 100.0}, {"text": " ".join(reversed(t.split())), "score": 20.0},
        {"text": t.split()[0], "score": 5.0}]}) for s, t in zip(de, en)]
    path.write_text("".join(line + "\n" for line in lines))


@pytest.mark.slow  # about 40 s with the shared stage-1 run: the default tier's budget
def test_cpo_objective_trains_lora_on_triplets_and_raises_the_margin(corpus, stage1, tmp_path):
    write_candidates(tmp_path / "train.jsonl", corpus, 16)
    write_candidates(tmp_path / "valid.jsonl", corpus, 8)
    run_dir = tmp_path / "cpo"
    cfg = config(corpus, run_dir, {"train": {"triplets": str(tmp_path / "train.jsonl")},
                                   "valid": {"triplets": str(tmp_path / "valid.jsonl")},
                                   "test": pairs_spec(corpus, "test")},
                 objective="cpo", optim={"steps": 6, "learning_rate": 1e-2}, eval={"every": 3, "translate": 2},
                 checkpoint={"every": 3})
    cfg["model"] = {"init_from": str(stage1 / "model"), "lora": {"rank": 4, "alpha": 8.0, "targets": ["down_proj"]}}
    cfg["tokenizer"] = {}
    summary = train(cfg, log=lambda _: None)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    margins = [r["rewards/margins"] for r in rows if r["split"] == "valid"]
    assert len(margins) == 2 and margins[1] > margins[0]
    assert summary["valid_rewards_margins"] == margins[-1] and "nll_loss" in rows[0]
    assert sorted(summary["test"]) == ["cs-en", "de-en", "en-cs", "en-de"]


def test_cpo_config_errors(corpus, tmp_path):
    triplets = {"train": {"triplets": str(tmp_path / "t.jsonl")}}
    with pytest.raises(ConfigError, match="objective cpo trains on"):
        run_config_from_dict(config(corpus, tmp_path, triplets))
    with pytest.raises(ConfigError, match="objective: cpo fine-tunes a trained model"):
        run_config_from_dict(config(corpus, tmp_path, triplets, objective="cpo"))
    with pytest.raises(ConfigError, match="objective='dpo'"):
        run_config_from_dict(config(corpus, tmp_path, {"train": mono_spec(corpus)}, objective="dpo"))


def test_alma_json_lines_training_files_are_read(tmp_path):
    """ALMA's own training files (train.cs-en.json) hold one {"translation": ...} entry per line."""
    entries = [{"translation": {"cs": f"veta {i}", "en": f"sentence {i}"}} for i in range(3)]
    (tmp_path / "train.json").write_text("".join(json.dumps(e) + "\n" for e in entries))
    source = data_lib.ParallelSource(src_lang="cs", tgt_lang="en", json_path=tmp_path / "train.json")
    assert source.read() == [(i, f"veta {i}", f"sentence {i}") for i in range(3)]
    (tmp_path / "bad.json").write_text(json.dumps(entries[0]) + "\n{oops\n")
    with pytest.raises(data_lib.DataError, match=r"line 2 of .*bad.json.* \(JSON Lines\) is not JSON"):
        data_lib.ParallelSource(src_lang="cs", tgt_lang="en", json_path=tmp_path / "bad.json").read()
