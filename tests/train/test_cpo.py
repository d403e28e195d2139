"""CPO (ALMA-R): the loss is TRL's CPOTrainer's, sequence log-probs are per-token log-softmax sums over the
targets, a few steps raise the reward margin, and triplets are read, built, batched and resumed exactly.

TRL's own `CPOTrainer.cpo_loss` and `get_batch_loss_metrics` (trl.experimental.cpo), called on a stand-in
trainer object that carries only the attributes they read, are the oracle for the loss; numpy's log-softmax
over the model's logits for the log-probs; sacreBLEU's sentence chrF for the builder's scores.
"""

import functools
import json
import os
import warnings
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import tokenizers
from flax import nnx
from sacrebleu.metrics import CHRF

import jaxmoe
from jaxmoe.nn.lora import LoRAConfig, apply_lora
from jaxmoe.train.batches import PromptFormat, encode_translation
from jaxmoe.train.cpo import (METRICS, CPOConfig, PreferenceBatch, PreferenceStream, Triplet, build_triplets,
                              cpo_evaluate, cpo_loss, cpo_objective, cpo_train_step, encode_preference,
                              preference_eval_batches, read_triplets, sequence_logps, write_triplets)
from jaxmoe.train.data import DataError
from jaxmoe.train.loop import TrainConfig, make_optimizer

# --- The loss against TRL ----------------------------------------------------------------------------------------

TRL_CASES = {
    "sigmoid": dict(loss_type="sigmoid"),
    "sigmoid_smoothed": dict(loss_type="sigmoid", beta=0.3, label_smoothing=0.2),
    "hinge": dict(loss_type="hinge", beta=0.05, cpo_alpha=0.5),
    "ipo": dict(loss_type="ipo", beta=0.5),
    "simpo": dict(loss_type="simpo", beta=2.0, simpo_gamma=0.7),
    "simpo_smoothed_no_nll": dict(loss_type="simpo", beta=2.5, label_smoothing=0.1, cpo_alpha=0.0),
    "sigmoid_no_nll": dict(loss_type="sigmoid", cpo_alpha=0.0),
}


@pytest.fixture(scope="module")
def trl_trainer():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return pytest.importorskip("trl.experimental.cpo").CPOTrainer


@pytest.mark.parametrize("case", TRL_CASES.values(), ids=TRL_CASES.keys())
def test_cpo_loss_and_metrics_equal_trl_cpo_trainer(case, trl_trainer, rng):
    import torch

    settings = {"beta": 0.1, "label_smoothing": 0.0, "simpo_gamma": 0.5, "cpo_alpha": 1.0, **case}
    # Summed log-probs for sigmoid/hinge, per-token averages for ipo/simpo, as TRL's forward makes them.
    scale = 1.0 if case["loss_type"] in ("ipo", "simpo") else 25.0
    chosen = (-rng.uniform(0.1, 3.0, 8) * scale).astype(np.float32)
    rejected = (-rng.uniform(0.1, 3.0, 8) * scale).astype(np.float32)
    nll = np.float32(rng.uniform(0.5, 3.0))
    trainer = SimpleNamespace(**settings, alpha=0.0, aux_loss_enabled=False,
                              accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x))
    trainer.cpo_loss = functools.partial(trl_trainer.cpo_loss, trainer)
    # TRL's concatenated_forward returns the NLL as 0 when cpo_alpha == 0, else the chosen rows' cross-entropy.
    trl_nll = torch.tensor(0.0 if settings["cpo_alpha"] == 0 else float(nll))
    trainer.concatenated_forward = lambda model, batch: (torch.from_numpy(chosen), torch.from_numpy(rejected),
                                                         torch.zeros(1), torch.zeros(1), trl_nll)
    want_loss, want = trl_trainer.get_batch_loss_metrics(trainer, None, {})

    loss, got = cpo_loss(chosen, rejected, nll, **settings)
    assert 0 < want["rewards/accuracies"] < 1  # both orders occur
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-6, abs=1e-6)
    for key in METRICS:
        assert float(got[key]) == pytest.approx(want[key], rel=1e-6, abs=1e-6), key
    assert float(got["nll_loss"]) == pytest.approx(float(nll))  # logged even when it is left out of the loss


def test_cpo_alpha_weights_the_nll_and_zero_leaves_it_out(rng):
    chosen, rejected = -rng.uniform(1, 30, 5), -rng.uniform(1, 30, 5)
    pure = float(cpo_loss(chosen, rejected, 7.0, cpo_alpha=0.0)[0])
    assert pure == pytest.approx(float(cpo_loss(chosen, rejected, 123.0, cpo_alpha=0.0)[0]))
    assert float(cpo_loss(chosen, rejected, 7.0, cpo_alpha=2.0)[0]) == pytest.approx(pure + 14.0, rel=1e-6)


@pytest.mark.parametrize("settings, message", [
    (dict(loss_type="dpo"), "loss_type='dpo'"),
    (dict(beta=0.0), "beta=0.0"),
    (dict(beta=-0.1), "beta=-0.1"),
    (dict(label_smoothing=0.5), "label_smoothing=0.5"),
    (dict(label_smoothing=-0.1), "label_smoothing=-0.1"),
    (dict(loss_type="hinge", label_smoothing=0.1), "sigmoid and simpo losses only"),
    (dict(cpo_alpha=-1.0), "cpo_alpha=-1.0"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        CPOConfig(**settings)
    with pytest.raises(ValueError, match=message):
        cpo_loss(np.zeros(2), np.zeros(2), 0.0, **settings)


# --- A word-level tokenizer and a tiny Phi-3 over it --------------------------------------------------------------

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
WORDS = SPECIAL + ["<to>"] + [f"w{i}" for i in range(40)]
PROMPT = PromptFormat("{src} <to>")


def words(rng, n):
    return " ".join(f"w{i}" for i in rng.integers(0, 40, n))


@pytest.fixture(scope="module")
def tokenizer():
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    raw.add_special_tokens(SPECIAL)
    raw.post_processor = tokenizers.processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return jaxmoe.Tokenizer(raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


CONFIG = jaxmoe.get_preset("tiny").replace(vocab_size=len(WORDS), num_layers=1, longrope=None)


def tiny_model(seed=0):
    return jaxmoe.Phi3ForCausalLM(CONFIG, rngs=nnx.Rngs(seed))


def triplets_of(rng, n, lengths=(3, 6)):
    return [Triplet(words(rng, rng.integers(*lengths)), words(rng, rng.integers(*lengths)),
                    words(rng, rng.integers(*lengths)), "xx", "yy") for _ in range(n)]


# --- Log-probs, the objective, training steps ---------------------------------------------------------------------

def numpy_row_logps(logits, ids, loss_mask, attention):
    """Per row: sum over targets j (loss_mask and both ends real) of log_softmax(logits[j - 1])[ids[j]], float64."""
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    sums, counts = [], []
    for r in range(ids.shape[0]):
        js = [j for j in range(1, ids.shape[1]) if loss_mask[r, j] and attention[r, j] and attention[r, j - 1]]
        sums.append(sum(logp[r, j - 1, ids[r, j]] for j in js))
        counts.append(len(js))
    return np.asarray(sums), np.asarray(counts)


sequence_logps_jit = nnx.jit(sequence_logps)  # one compile per batch shape for the tests below
logits_of = nnx.jit(lambda model, batch: model(batch.input_ids, attention_mask=batch.attention_mask).logits)


def test_sequence_logps_sum_log_softmax_over_the_target_tokens(tokenizer, rng):
    model = tiny_model()
    batch = preference_eval_batches(triplets_of(rng, 3), tokenizer, prompt=PROMPT, batch_size=4, max_len=16,
                                    pad_id=0)[0]  # three pairs and a filler
    got = sequence_logps_jit(model, batch)
    sums, counts = numpy_row_logps(logits_of(model, batch), *(np.asarray(x) for x in (
        batch.input_ids, batch.loss_mask, batch.attention_mask)))
    np.testing.assert_allclose(np.asarray(got.logps), sums, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got.tokens), counts)
    assert counts[3] == 0 and counts[7] == 0 and counts[:3].min() >= 4  # the filler pair has no targets
    assert float(got.chosen_nll) == pytest.approx(-sums[:4].sum() / counts[:4].sum(), rel=1e-5)


@pytest.fixture(scope="module")
def fixed_batch(tokenizer):
    rng = np.random.default_rng(7)
    return preference_eval_batches(triplets_of(rng, 4), tokenizer, prompt=PROMPT, batch_size=4, max_len=16,
                                   pad_id=0)[0]


@pytest.mark.parametrize("lora", [pytest.param(False, id="full", marks=pytest.mark.slow),
                                  pytest.param(True, id="lora")])
def test_cpo_steps_raise_the_reward_margin_on_a_fixed_batch(lora, fixed_batch):
    model = tiny_model()
    if lora:
        apply_lora(model, LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    optimizer = make_optimizer(model, TrainConfig(learning_rate=1e-2, warmup_steps=1, total_steps=20),
                               wrt=nnx.LoRAParam if lora else nnx.Param)
    # Each step's metrics are those of the model before its update.
    steps = [cpo_train_step(model, optimizer, fixed_batch, config=CPOConfig(beta=0.1)) for _ in range(12)]
    first, last = steps[0], steps[-1]
    assert set(first) >= {"loss", "grad_norm", "learning_rate", "nll_loss", *METRICS}
    assert float(last["rewards/margins"]) > float(first["rewards/margins"]) + 0.5
    assert float(last["rewards/accuracies"]) == 1.0 and float(last["loss"]) < float(first["loss"])
    assert all(np.isfinite(float(s["grad_norm"])) and float(s["grad_norm"]) > 0 for s in steps)
    assert float(first["learning_rate"]) == 0.0 and float(steps[1]["learning_rate"]) == pytest.approx(1e-2)


def test_objective_adds_the_nll_only_with_cpo_alpha_and_moe_models_add_their_routing_losses(fixed_batch):
    config = jaxmoe.get_preset("tiny-moe").replace(
        vocab_size=len(WORDS), num_layers=1, moe=jaxmoe.MoEConfig(num_experts=4, aux_loss_coef=0.01, z_loss_coef=0.001))
    model = jaxmoe.PhimoeForCausalLM(config, rngs=nnx.Rngs(0))
    model.train()

    @nnx.jit
    def both(model, batch):  # the same routing draws for both
        return [cpo_objective(model, batch, nnx.Rngs(router=5, jitter=6), config=CPOConfig(cpo_alpha=alpha))
                for alpha in (0.0, 1.0)]

    (objective0, without), (objective1, with_nll) = both(model, fixed_batch)
    assert float(without["nll_loss"]) == pytest.approx(float(with_nll["nll_loss"])) and float(without["nll_loss"]) > 1
    assert float(with_nll["loss"]) == pytest.approx(float(without["loss"]) + float(with_nll["nll_loss"]), rel=1e-6)
    for objective, metrics in ((objective0, without), (objective1, with_nll)):
        routing = 0.01 * float(metrics["aux_loss"]) + 0.001 * float(metrics["router_z_loss"])
        assert routing > 0 and float(objective) == pytest.approx(float(metrics["loss"]) + routing, rel=1e-6)
        assert metrics["expert_load"].shape == (1, 4)


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_evaluation_over_padded_batches_equals_the_loss_of_one_batch_of_all_pairs(loss_type, tokenizer, rng):
    model = tiny_model(3)
    triplets = triplets_of(rng, 3)
    config = CPOConfig(loss_type=loss_type, cpo_alpha=0.7)
    got = cpo_evaluate(model, preference_eval_batches(triplets, tokenizer, prompt=PROMPT, batch_size=2, max_len=16,
                                                      pad_id=0), config=config)  # the second batch has a filler
    whole = preference_eval_batches(triplets, tokenizer, prompt=PROMPT, batch_size=4, max_len=16, pad_id=0)[0]
    scores = jax.tree.map(lambda x: np.asarray(x, np.float32), sequence_logps_jit(model, whole))
    logps = scores.logps / np.maximum(scores.tokens, 1) if loss_type == "simpo" else scores.logps
    loss, want = cpo_loss(logps[:3], logps[4:7], scores.chosen_nll, loss_type=loss_type, cpo_alpha=0.7)
    assert got["pairs"] == 3
    assert got["loss"] == pytest.approx(float(loss), rel=1e-5)
    for key in (*METRICS, "nll_loss"):
        assert got[key] == pytest.approx(float(want[key]), rel=1e-5, abs=1e-6), key


# --- Triplet files ------------------------------------------------------------------------------------------------

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def record(source="s", candidates=(("a", 1.0), ("b", 0.0)), src_lang="de", tgt_lang="en"):
    return {"source": source, "src_lang": src_lang, "tgt_lang": tgt_lang,
            "candidates": [{"text": t, "score": s} for t, s in candidates]}


def test_jsonl_triplets_keep_the_best_and_worst_candidates_of_the_direction(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [
        record("s1", [("mid", 0.5), ("best", 0.9), ("worst", 0.1), ("best2", 0.9)]),
        record("other", src_lang="en", tgt_lang="de"),
        record("s2", [("x", 3.0), ("y", -1.0)]),
    ])
    assert read_triplets(path, src_lang="de", tgt_lang="en") == [Triplet("s1", "best", "worst", "de", "en"),
                                                                 Triplet("s2", "x", "y", "de", "en")]
    with pytest.raises(DataError, match=r"no triplets for fr-en; its entries are for \['de-en', 'en-de'\]"):
        read_triplets(path, src_lang="fr", tgt_lang="en")


@pytest.mark.parametrize("bad, message", [
    ({"src_lang": "de", "tgt_lang": "en", "candidates": [{"text": "a", "score": 1}, {"text": "b", "score": 0}]},
     r"line 2: no field 'source'"),
    (record(candidates=[("a", 1.0), ("b", None)]), r"line 2, candidates\[1\]: field 'score' is None"),
    (record(candidates=[("a", 1.0), ("a", 0.5)]), r"line 2: the chosen .* and rejected .* are the same text 'a'"),
    (record(candidates=[("a", 1.0)]), r"line 2: 1 candidate\(s\); expected at least 2"),
    (record(candidates=[("a", 1.0), ("b", 1.0)]), r"line 2: all 2 candidates score 1.0: no preference"),
    ({"text": "x"}, r"line 2: neither 'candidates'"),
])
def test_bad_triplet_records_are_errors_naming_the_line(bad, message, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [record(), bad])
    with pytest.raises(DataError, match=message):
        read_triplets(path, src_lang="de", tgt_lang="en")


def alma_r(de, en, scores_de, scores_en, delta=0.0, required="", pair="de-en"):
    """One ALMA-R-Preference row ({"translation": ...}); scores are (ref, gpt4, alma) kiwi_xcomet values."""
    t = {"de": de, "en": en, "gpt4_de": de + " g", "alma_de": de + " a", "gpt4_en": en + " g", "alma_en": en + " a",
         "Delta": delta, "required_directions": required, "language_pair": pair}
    for lang, scores in (("de", scores_de), ("en", scores_en)):
        for system, score in zip(("ref", "gpt4", "alma"), scores):
            t[f"{system}_{lang}_kiwi_xcomet"] = score
            t[f"{system}_{lang}_kiwi"] = -score  # another scorer, read with scorer_key="kiwi"
    return {"translation": t}


def test_alma_r_layout_reads_as_alma_r_preprocesses_it(tmp_path):
    rows = [
        alma_r("D0", "E0", (0.9, 0.8, 0.7), (0.6, 0.95, 0.6)),       # de: ref > alma; en: gpt4 > ref (first lowest)
        alma_r("D1", "E1", (0.9, 0.1, 0.5), (0.9, 0.1, 0.5), delta=2.0, required="en-de"),  # human label, en->de only
        alma_r("D2", "E2", (0.9, 0.8, 0.7), (0.9, 0.8, 0.7), delta=-1.0),  # human label: alma over gpt4, both ways
        alma_r("C3", "E3", (0.9, 0.8, 0.7), (0.9, 0.8, 0.7), pair="cs-en"),  # another pair
    ]
    rows[3]["translation"] = {k.replace("_de", "_cs") if "_de" in k else ("cs" if k == "de" else k): v
                              for k, v in rows[3]["translation"].items()}
    path = tmp_path / "alma_r.json"
    path.write_text(json.dumps(rows), encoding="utf-8")  # a JSON array, as ALMA's own data files are

    assert read_triplets(path, src_lang="en", tgt_lang="de") == [
        Triplet("E0", "D0", "D0 a", "en", "de"), Triplet("E1", "D1 g", "D1 a", "en", "de"),
        Triplet("E2", "D2 a", "D2 g", "en", "de")]
    assert read_triplets(path, src_lang="de", tgt_lang="en") == [
        Triplet("D0", "E0 g", "E0", "de", "en"), Triplet("D2", "E2 a", "E2 g", "de", "en")]
    assert read_triplets(path, src_lang="en", tgt_lang="de", scorer_key="kiwi")[0] == Triplet("E0", "D0 a", "D0",
                                                                                             "en", "de")
    jsonl = write_jsonl(tmp_path / "alma_r.jsonl", rows[:1])  # datasets' to_json writes JSON Lines
    assert read_triplets(jsonl, src_lang="en", tgt_lang="de") == [Triplet("E0", "D0", "D0 a", "en", "de")]
    del rows[0]["translation"]["alma_de_kiwi_xcomet"]
    path.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(DataError, match=r"entry 0: no field 'alma_de_kiwi_xcomet'"):
        read_triplets(path, src_lang="en", tgt_lang="de")


def test_write_triplets_checks_every_record_before_writing_anything(tmp_path):
    path = tmp_path / "t.jsonl"
    write_triplets(path, [record("s1"), record("s2")])
    before = path.read_text()
    with pytest.raises(DataError, match=r"records\[1\]: .*same text"):
        write_triplets(path, [record("s3"), record(candidates=[("a", 1.0), ("a", 0.0)])])
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["t.jsonl"]
    assert [t.source for t in read_triplets(path, src_lang="de", tgt_lang="en")] == ["s1", "s2"]


# --- Building triplets from a model --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def diverse_model():
    model = tiny_model(2)
    # Larger weights than the default init, so that samples vary and do not stop at once.
    nnx.update(model, jax.tree.map(lambda p: p * 10.0 if p.ndim > 1 else p, nnx.state(model, nnx.Param)))
    return model


def test_build_triplets_scores_samples_and_the_reference_with_sentence_chrf(diverse_model, tokenizer, tmp_path):
    rng = np.random.default_rng(11)
    sources, references = [words(rng, 4) for _ in range(3)], [words(rng, 5) for _ in range(3)]
    kwargs = dict(src_lang="xx", tgt_lang="yy", prompt=PROMPT, num_samples=3, max_new_tokens=6, batch_size=4, seed=0)
    records = build_triplets(diverse_model, tokenizer, sources, references, **kwargs)
    assert [r["source"] for r in records] == sources
    chrf = CHRF()
    for r, ref in zip(records, references):
        assert r["src_lang"] == "xx" and r["tgt_lang"] == "yy" and len(r["candidates"]) == 4
        assert r["candidates"][-1] == {"text": ref, "score": 100.0, "system": "reference"}
        for c in r["candidates"][:3]:
            assert c["system"] == "sample" and c["score"] == chrf.sentence_score(c["text"], [ref]).score
    assert len({c["text"] for r in records for c in r["candidates"][:3]}) > 3  # sampled, not greedy
    assert build_triplets(diverse_model, tokenizer, sources, references, **kwargs) == records  # seeded

    write_triplets(tmp_path / "built.jsonl", records)
    triplets = read_triplets(tmp_path / "built.jsonl", src_lang="xx", tgt_lang="yy")
    for t, r, ref in zip(triplets, records, references):
        worst = min(r["candidates"], key=lambda c: c["score"])
        assert (t.source, t.chosen, t.rejected) == (r["source"], ref, worst["text"])

    bleu = build_triplets(diverse_model, tokenizer, sources, references, **kwargs, metric="bleu")
    assert [r["candidates"][-1]["score"] for r in bleu] == pytest.approx([100.0] * 3)
    with pytest.warns(UserWarning, match="left out 3 of 3 sources"):
        assert build_triplets(diverse_model, tokenizer, sources, references, **kwargs,
                              scorer=lambda srcs, hyps: [1.0] * len(hyps)) == []


# --- Batches --------------------------------------------------------------------------------------------------------

def test_encode_preference_encodes_both_as_translation_examples(tokenizer):
    chosen, rejected = encode_preference(tokenizer, "w1 w2 <to>", "w3 w4", "w5")
    assert chosen == encode_translation(tokenizer, "w1 w2 <to>", "w3 w4")
    assert rejected == encode_translation(tokenizer, "w1 w2 <to>", "w5")
    assert rejected == ([1, 6, 7, 4, 10, 2], [0, 0, 0, 0, 1, 1])


def test_stream_serves_chosen_rows_then_rejected_rows_in_its_shuffled_order_and_resumes_exactly(tokenizer, rng):
    triplets = triplets_of(rng, 7)
    triplets[4] = triplets[4]._replace(rejected=words(rng, 20))  # too long for max_len=16
    stream = PreferenceStream(triplets, tokenizer, prompt=PROMPT, batch_size=2, max_len=16, pad_id=0, seed=3)
    first = next(stream)
    assert isinstance(first, PreferenceBatch) and all(x.shape == (4, 16) and x.dtype == np.int32 for x in first)
    order = [i for i in np.random.default_rng([3, 0]).permutation(7) if i != 4]
    for row, i in enumerate(order[:2]):
        t = triplets[i]
        for offset, (ids, mask) in zip((0, 2), encode_preference(tokenizer, PROMPT.render(t.source, "xx", "yy"),
                                                                 t.chosen, t.rejected)):
            np.testing.assert_array_equal(first.input_ids[row + offset], np.pad(ids, (0, 16 - len(ids))))
            np.testing.assert_array_equal(first.loss_mask[row + offset], np.pad(mask, (0, 16 - len(mask))))
            np.testing.assert_array_equal(first.attention_mask[row + offset], np.arange(16) < len(ids))

    with pytest.warns(UserWarning, match="epoch 0: skipped 1 triplets .* longer than max_len=16"):
        for _ in range(3):  # 6 fitting triplets: batches 1..3 finish epoch 0
            next(stream)
    state = stream.state()
    assert state["epoch"] == 1 and state["batches"] == 4
    resumed = PreferenceStream(triplets, tokenizer, prompt=PROMPT, batch_size=2, max_len=16, pad_id=0, seed=3)
    resumed.restore(json.loads(json.dumps(state)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # epoch 1's skip warning (the restored stream counts skips from here on)
        want = [next(stream) for _ in range(4)]
        got = [next(resumed) for _ in range(4)]
    for a, b in zip(got, want):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="index=7"):
        resumed.restore({"epoch": 0, "index": 7, "batches": 0})


def test_json_lines_with_unicode_line_separators_inside_strings_round_trip(tmp_path):
    """json.dumps(ensure_ascii=False) keeps U+2028 and U+0085 as they are; lines are split on "\\n" only."""
    from jaxmoe.train.cpo import read_triplets, write_triplets
    record = {"source": "a\u2028b", "src_lang": "de", "tgt_lang": "en",
              "candidates": [{"text": "good\u0085one", "score": 90.0}, {"text": "bad", "score": 1.0}]}
    write_triplets(tmp_path / "t.jsonl", [record])
    (triplet,) = read_triplets(tmp_path / "t.jsonl", src_lang="de", tgt_lang="en")
    assert triplet.source == "a\u2028b" and triplet.chosen == "good\u0085one" and triplet.rejected == "bad"
