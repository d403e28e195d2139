"""jaxmoe.mt.pema: the external memory holds exactly the teacher-forced pre-norm states, both training phases
learn from head parameters alone, and Gradual Unrolling and the kNN-LM baseline inside jaxmoe.generate equal NumPy
references."""

import copy
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from flax import nnx

import jaxmoe
from conftest import tiny
from jaxmoe.infer.generate import _generate_compiled
from jaxmoe.mt.pema import (EN_DE_PROMPT, PEMA, Head, Memory, build_memory, encode_examples, exceeds_previous_two,
                            gradual_unrolling, gu_coefficients, knn_lm, knn_log_probs, lm_head_of, memory_arrays,
                            memory_loss, nearest, train_joint, train_reconstruction)
from jaxmoe.nn.lm_loss import OutputHead
from jaxmoe.nn.norms import RMSNorm

VOCAB = 96
D = 64
# (context ids, target ids), split differently but 8 tokens in all (one compiled shape for the unpadded reference
# passes): batches of 2 are padded to 16 columns, the last one holds a filler row.
EXAMPLES = [([1, 5, 9, 14], [20, 21, 22, 2]), ([1, 7], [30, 31, 32, 33, 34, 2]), ([1, 4, 8, 12, 16, 40], [50, 2]),
            ([1, 60, 61], [62, 63, 64, 65, 2]), ([1, 3, 3, 3, 3], [70, 71, 2])]


def tiny_model(**overrides):
    return tiny("tiny", seed=3, **{"num_layers": 2, "vocab_size": VOCAB, "longrope": None, **overrides})


@pytest.fixture(scope="module")
def model():
    model = tiny_model()
    # A final norm weight far from ones, so that normalising twice differs from once.
    model.norm.weight[...] = np.random.default_rng(0).uniform(0.5, 2.0, D).astype(np.float32)
    return model


@nnx.jit
def forward_prenorm(model, ids, mask):
    return model(ids, attention_mask=mask, return_hidden="pre_norm")


@pytest.fixture(scope="module")
def memory(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("pema") / "memory"
    build_memory(model, EXAMPLES, path, batch_size=2, rows_per_shard=7)
    return Memory(path)


def expected_rows(model):
    """Each example run alone, unpadded: the pre-norm state at the position before each target token."""
    keys, values = [], []
    for context, target in EXAMPLES:
        ids = jnp.asarray([context + target], jnp.int32)
        out = forward_prenorm(model, ids, jnp.ones_like(ids))
        # Pre-norm states: the final norm (weights far from 1) and the LM head map them to the logits.
        np.testing.assert_allclose(lm_head_of(model).logits(out.hidden_states), out.logits, atol=1e-4)
        c = len(context)
        keys.append(np.asarray(out.hidden_states[0, c - 1:c - 1 + len(target)]))
        values.append(np.asarray(target, np.int32))
    return np.concatenate(keys), np.concatenate(values)


def test_memory_holds_the_teacher_forced_prenorm_states_and_next_tokens_after_a_round_trip(model, memory):
    keys, values = expected_rows(model)
    info = memory.info
    assert (info.hidden_size, info.vocab_size, info.num_rows) == (D, VOCAB, len(values))
    assert [rows for _, rows in info.shards] == [7, 7, 6]
    got = list(memory.batches(4))
    assert [len(v) for _, v in got] == [4, 4, 4, 4, 4]
    np.testing.assert_allclose(np.concatenate([k for k, _ in got]), keys, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.concatenate([v for _, v in got]), values)
    # A shuffled pass holds the same rows (key with value), in another order.
    rows = np.concatenate([np.concatenate([k, v[:, None]], 1) for k, v in got])
    shuffled = np.concatenate([np.concatenate([k, v[:, None]], 1) for k, v in memory.batches(5, seed=1)])
    assert not np.array_equal(shuffled, rows)
    np.testing.assert_array_equal(shuffled[np.lexsort(shuffled.T)], rows[np.lexsort(rows.T)])


def test_encode_examples_formats_the_prompt_and_ends_each_target_with_eos():
    words = ["<pad>", "<bos>", "<eos>", "<unk>", "Translate", "this", "from", "English", "to", "German:", "a", "b",
             "c"]
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    raw.post_processor = tokenizers.processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tokenizer = jaxmoe.Tokenizer(raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    (context, target), = encode_examples(tokenizer, ["a b"], ["c a"], EN_DE_PROMPT)
    assert context == [1, 4, 5, 6, 7, 8, 9, 10, 11, 9]
    assert target == [12, 10, 2]
    with pytest.raises(ValueError, match="2 sources but 1 targets"):
        encode_examples(tokenizer, ["a", "b"], ["c"])


def test_build_memory_refuses_a_nonempty_folder_and_bad_examples(model, memory, tmp_path):
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        build_memory(model, EXAMPLES, memory.path)
    with pytest.raises(ValueError, match=r"example 1 holds token id 96, outside the model's vocabulary \[0, 96\)"):
        build_memory(model, [EXAMPLES[0], ([1], [96])], tmp_path / "m")
    with pytest.raises(ValueError, match="example 0 has 2 context and 0 target tokens"):
        build_memory(model, [([1, 2], [])], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_phase_one_and_phase_two_reduce_their_losses(model, memory):
    pema = PEMA(D, 8, rngs=nnx.Rngs(0))
    before = memory_loss(pema, memory)
    result = train_reconstruction(pema, memory, valid=memory, learning_rate=1e-2, batch_size=16, max_steps=60,
                                  eval_every=20)
    after = memory_loss(pema, memory)
    assert result.steps == 60 and len(result.valid_losses) == 3
    assert after < 0.5 * before
    assert after == pytest.approx(result.best_valid_loss, rel=1e-5)

    head = lm_head_of(model)
    b_rct, a_phase1 = np.asarray(pema.b_rct_dr[...]), np.asarray(pema.a_rd[...])
    start = copy.deepcopy(pema)
    start.reset_a(nnx.Rngs(0))  # phase 2 starts from a fresh A (seed 0), B_rct from phase 1, B_pd zero
    before = memory_loss(start, memory, head, kappa=0.2)
    assert before > 0.8 * np.log(VOCAB)  # B_pd = 0: uniform next-token distribution
    train_joint(pema, head, memory, valid=memory, kappa=0.2, learning_rate=1e-2, batch_size=16, max_steps=60,
                eval_every=20)
    assert memory_loss(pema, memory, head, kappa=0.2) < 0.7 * before
    np.testing.assert_array_equal(pema.b_rct_dr[...], b_rct)  # frozen
    assert not np.allclose(pema.a_rd[...], a_phase1)


def test_early_stopping_rule_needs_the_loss_above_both_previous_checks():
    assert not exceeds_previous_two([3.0, 2.0])
    assert not exceeds_previous_two([3.0, 2.0, 2.5])
    assert exceeds_previous_two([2.0, 2.1, 2.2])
    assert exceeds_previous_two([2.1, 2.0, 2.2])


def test_gu_schedules_decay_quadratically_to_zero_or_stay_constant():
    lengths = jnp.asarray([4.0, 2.0])
    gradual = [np.asarray(gu_coefficients(s, 0.8, lengths)) for s in range(5)]
    np.testing.assert_allclose(gradual, [[0.64, 0.64], [0.36, 0.16], [0.16, 0], [0.04, 0], [0, 0]], atol=1e-6)
    np.testing.assert_allclose(gu_coefficients(3, 0.8, lengths, "constant"), [0.8, 0.8])


def test_training_receives_only_the_memory_pema_and_head_parameters(model, memory):
    assert [p for p in inspect.signature(train_joint).parameters][:3] == ["pema", "head", "memory"]
    assert "model" not in inspect.signature(train_reconstruction).parameters
    head = lm_head_of(model)
    # Tied embeddings: the head is the final norm's weight and the embedding table, nothing else.
    assert sorted(leaf.shape for leaf in jax.tree.leaves(head)) == [(D,), (VOCAB, D)]
    untied = lm_head_of(tiny_model(tie_word_embeddings=False))
    assert sorted(leaf.shape for leaf in jax.tree.leaves(untied)) == [(D,), (D, VOCAB)]
    # The head travels as plain NumPy arrays (what a model owner would hand over); no model object is involved.
    owner_copy = jax.tree.map(np.asarray, head)
    pema = PEMA(D, 8, rngs=nnx.Rngs(1))
    result = train_joint(pema, owner_copy, memory, max_steps=2, batch_size=16)
    assert result.steps == 2 and np.isfinite(result.train_loss)


def numpy_gu_reference(model, pema, logits_tv, hidden_td, source_len, lambda_max):
    """NumPy's Gradual Unrolling over one row's steps, from the model's logits [steps, v] and pre-norm states
    [steps, d] at the positions that chose each token: per step the lambda schedule (lambda -= lambda_max / L
    after each step, weight lambda ** 2 while lambda > 0) and the mixed log-probs log(c P_PEMA + (1 - c) P_LM)."""
    w_vd = np.asarray(model.embed_tokens.embedding[...], np.float64)
    norm_w = np.asarray(model.norm.weight[...], np.float64)
    a, b_pd, s = np.asarray(pema.a_rd[...], np.float64), np.asarray(pema.b_pd_dr[...], np.float64), pema.scale
    lam, steps = lambda_max, []
    for logits, hidden in zip(logits_tv, hidden_td):
        h = s * (b_pd @ (a @ np.asarray(hidden, np.float64)))
        h = norm_w * h / np.sqrt(np.mean(h * h) + model.config.rms_norm_eps)
        p_pema = np.exp(w_vd @ h - np.logaddexp.reduce(w_vd @ h))
        logp_lm = np.asarray(logits, np.float64) - np.logaddexp.reduce(np.asarray(logits, np.float64))
        c = lam ** 2 if lam > 0 else 0.0
        steps.append((c, np.log(c * p_pema + (1 - c) * np.exp(logp_lm))))
        lam -= lambda_max / source_len
    return steps


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.logaddexp.reduce(x)


def test_gradual_unrolling_in_generate_equals_a_numpy_reference_and_lambda_zero_is_plain_generation(model):
    prompts = [[1, 5, 9, 14, 20], [1, 7, 30]]
    ids = np.asarray([prompts[0], [0, 0] + prompts[1]], np.int32)
    mask = (np.arange(5) >= np.asarray([[0], [2]])).astype(np.int32)
    pema = PEMA(D, 8, rngs=nnx.Rngs(4))
    pema.b_pd_dr[...] = jax.random.normal(jax.random.key(5), pema.b_pd_dr.shape) * 40.0  # a sharp, different P_PEMA
    head = lm_head_of(model)
    source_lengths, steps = [3, 1], 5  # L = 3 and 1: lambda reaches 0 after 3 steps and after 1
    gu = gradual_unrolling(pema, head, lambda_max=0.9, length="source", source_lengths=source_lengths)
    got = np.asarray(jaxmoe.generate(model, ids, attention_mask=mask, max_new_tokens=steps, eos_token_id=(),
                                     logits_processor=gu))[:, 5:]
    # One teacher-forced pass over prompt + generated tokens, no cache: causal, so the position that chose token s
    # sees exactly what decode step s saw.
    full = np.concatenate([ids, got], axis=1)
    out = forward_prenorm(model, jnp.asarray(full), jnp.asarray(np.concatenate([mask, np.ones_like(got)], 1)))
    logits_stv, hidden_std = out.logits[:, 4:-1].swapaxes(0, 1), out.hidden_states[:, 4:-1].swapaxes(0, 1)
    processed = jax.jit(lambda gu, s, lg, h: gu(s, lg, h))
    mixed_by_step = [processed(gu, jnp.int32(s), logits_stv[s], hidden_std[s]) for s in range(steps)]
    for row in range(2):
        reference = numpy_gu_reference(model, pema, logits_stv[:, row], hidden_std[:, row], source_lengths[row], 0.9)
        for step, (c, mixed) in enumerate(reference):
            assert got[row, step] == np.argmax(mixed)
            assert float(gu.coefficients(jnp.int32(step), 2)[row]) == pytest.approx(c, abs=1e-6)
            # The processor's output is the same distribution (as logits where c = 0, as log-probs elsewhere).
            np.testing.assert_allclose(log_softmax(mixed_by_step[step][row]), mixed, rtol=1e-4, atol=1e-4)
    plain = np.asarray(jaxmoe.generate(model, ids, attention_mask=mask, max_new_tokens=steps, eos_token_id=()))
    assert (got != plain[:, 5:]).any()  # PEMA changed some token, so the comparison above could fail

    # lambda_max = 0: the model's own logits at every step, the same tokens; a new processor does not recompile.
    compiled = _generate_compiled._cache_size()
    off = gradual_unrolling(pema, head, lambda_max=0.0, length="source", source_lengths=source_lengths)
    got_off = jaxmoe.generate(model, ids, attention_mask=mask, max_new_tokens=steps, eos_token_id=(),
                              logits_processor=off)
    np.testing.assert_array_equal(got_off, plain)
    assert _generate_compiled._cache_size() == compiled


@pytest.mark.slow
def test_gradual_unrolling_runs_inside_beam_search_and_lambda_zero_changes_nothing(model):
    ids = np.asarray([[1, 5, 9, 14, 20], [1, 7, 30, 31, 32]], np.int32)
    pema = PEMA(D, 8, rngs=nnx.Rngs(4))
    pema.b_pd_dr[...] = jax.random.normal(jax.random.key(5), pema.b_pd_dr.shape) * 40.0
    kwargs = dict(max_new_tokens=6, eos_token_id=(), num_beams=3, num_return_sequences=2)
    plain = jaxmoe.generate(model, ids, **kwargs)
    off = gradual_unrolling(pema, lm_head_of(model), lambda_max=0.0, length=6)
    np.testing.assert_array_equal(jaxmoe.generate(model, ids, logits_processor=off, **kwargs), plain)
    on = gradual_unrolling(pema, lm_head_of(model), lambda_max=0.9, length=6)
    assert (np.asarray(jaxmoe.generate(model, ids, logits_processor=on, **kwargs)) != np.asarray(plain)).any()


@pytest.mark.slow
def test_a_plain_function_works_as_logits_processor(model):
    ids = np.asarray([[1, 5, 9]], np.int32)
    favour = lambda step, logits, hidden: logits.at[:, 40 + step].add(1e3)  # noqa: E731
    got = jaxmoe.generate(model, ids, max_new_tokens=4, eos_token_id=(), logits_processor=favour)
    np.testing.assert_array_equal(np.asarray(got)[0, 3:], [40, 41, 42, 43])


def test_bad_inputs_name_the_value_and_what_to_do(model, memory):
    head, pema = lm_head_of(model), PEMA(D, 4, rngs=nnx.Rngs(0))
    norm_def, norm_params = nnx.split(RMSNorm(32))  # the head of a model with hidden size 32
    narrow = Head(norm_def, nnx.to_pure_dict(norm_params), OutputHead(jnp.ones((VOCAB, 32)), None, "vd"), "other")
    with pytest.raises(ValueError, match="holds hidden states of size 64 but the head has hidden size 32; it comes "
                                         "from a different model"):
        train_joint(PEMA(32, 4, rngs=nnx.Rngs(0)), narrow, memory)
    with pytest.raises(ValueError, match="vocabulary of 96 tokens but the head has 100"):
        train_joint(pema, lm_head_of(tiny_model(vocab_size=100, num_layers=1)), memory)
    with pytest.raises(ValueError, match="model fingerprint"):
        train_joint(pema, lm_head_of(tiny_model(num_layers=1)), memory)
    with pytest.raises(ValueError, match="holds hidden states of size 64 but the PEMA has hidden size 32"):
        train_reconstruction(PEMA(32, 4, rngs=nnx.Rngs(0)), memory)
    for kappa in (-0.1, 1.5):
        with pytest.raises(ValueError, match=rf"kappa={kappa}; expected a number in \[0, 1\]"):
            train_joint(pema, head, memory, kappa=kappa)
    for lam in (-0.5, 1.2):
        with pytest.raises(ValueError, match=rf"lambda_max={lam}; expected a number in \[0, 1\]"):
            gradual_unrolling(pema, head, lambda_max=lam, length=10)
    with pytest.raises(ValueError, match="the reference length is oracle information"):
        gradual_unrolling(pema, head, length="reference")
    with pytest.raises(ValueError, match='length="source" needs source_lengths'):
        gradual_unrolling(pema, head)
    with pytest.raises(ValueError, match="return_hidden='prenorm'; expected False"):
        model(jnp.asarray([[1, 2]], jnp.int32), return_hidden="prenorm")


def numpy_knn_log_probs(query_nd, keys_md, values_m, vocab, k, temperature):
    """kNN-LM by brute force in float64: per query, sort all squared distances, softmax over the k smallest,
    summed per value."""
    q, keys = np.asarray(query_nd, np.float64), np.asarray(keys_md, np.float64)
    out = np.zeros((len(q), vocab))
    for n, row in enumerate(q):
        d2 = np.sum((keys - row) ** 2, axis=-1)
        near = np.argsort(d2, kind="stable")[:k]
        w = np.exp(-(d2[near] - d2[near].min()) / temperature)
        np.add.at(out[n], np.asarray(values_m)[near], w / w.sum())
    with np.errstate(divide="ignore"):
        return np.log(out)


def test_knn_log_probs_and_the_knn_lm_mixture_equal_a_numpy_reference(memory):
    keys, values = memory_arrays(memory)
    assert keys.shape == (len(memory), D) and values.shape == (len(memory),)
    queries = keys[[0, 5, 11]] + np.random.default_rng(1).normal(0, 0.3, (3, D)).astype(np.float32)
    # Temperatures on the scale of the distances, so that no weight underflows in float32.
    scale = float(np.median(np.sum((keys[None] - queries[:, None]) ** 2, -1)))
    for k, temperature in ((1, 1.0), (4, scale), (len(memory), 2 * scale)):
        got = np.asarray(knn_log_probs(jnp.asarray(queries), jnp.asarray(keys), jnp.asarray(values), VOCAB, k=k,
                                       temperature=temperature))
        want = numpy_knn_log_probs(queries, keys, values, VOCAB, k, temperature)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))  # the same tokens get no vote
        np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-4, atol=1e-4)
    d2, idx = nearest(jnp.asarray(queries), jnp.asarray(keys), 3)
    # |q|^2 - 2 q.k + |k|^2 cancels: float32 error on the scale of |q|^2 + |k|^2 (about 4,000 here).
    np.testing.assert_allclose(d2, np.sum((keys[np.asarray(idx)] - queries[:, None]) ** 2, -1), rtol=1e-4, atol=1e-2)
    assert (np.diff(np.asarray(d2), axis=-1) >= 0).all()

    knn = knn_lm(memory, k=4, temperature=scale, lam=0.3)
    logits = np.random.default_rng(2).normal(0, 2, (3, VOCAB)).astype(np.float32)
    mixed = np.asarray(jax.jit(lambda p, lg, h: p(jnp.int32(0), lg, h))(knn, jnp.asarray(logits),
                                                                         jnp.asarray(queries)))
    p_knn = np.exp(numpy_knn_log_probs(queries, keys, values, VOCAB, 4, scale))
    want = np.log(0.3 * p_knn + 0.7 * np.exp(np.stack([log_softmax(r) for r in logits])))
    np.testing.assert_allclose(mixed, want, rtol=1e-4, atol=1e-4)
    off = knn_lm(memory, k=4, temperature=scale, lam=0.0)(jnp.int32(0), jnp.asarray(logits), jnp.asarray(queries))
    np.testing.assert_allclose(np.asarray(off), np.stack([log_softmax(r) for r in logits]), atol=1e-5)


def test_knn_lm_runs_inside_generate_and_rejects_bad_settings(model, memory):
    ids = np.asarray([[1, 5, 9, 14, 20]], np.int32)
    plain = np.asarray(jaxmoe.generate(model, ids, max_new_tokens=4, eos_token_id=()))
    off = knn_lm(memory, k=2, temperature=1.0, lam=0.0)
    np.testing.assert_array_equal(jaxmoe.generate(model, ids, max_new_tokens=4, eos_token_id=(),
                                                  logits_processor=off), plain)
    # lam = 1: only the memory's tokens can be chosen.
    only = np.asarray(jaxmoe.generate(model, ids, max_new_tokens=4, eos_token_id=(),
                                      logits_processor=knn_lm(memory, k=2, lam=1.0)))[0, 5:]
    assert set(only.tolist()) <= set(memory_arrays(memory)[1].tolist())
    with pytest.raises(ValueError, match=r"k=0; expected an integer in \[1, 20\]"):
        knn_lm(memory, k=0)
    with pytest.raises(ValueError, match="temperature=0; expected a positive number"):
        knn_lm(memory, temperature=0)
    with pytest.raises(ValueError, match=r"lam=1.5; expected a number in \[0, 1\]"):
        knn_lm(memory, lam=1.5)
