"""jaxmoe.generate equals transformers' generate token for token (greedy), and its sampling helpers are exact.

transformers' PyTorch Phi3ForCausalLM.generate is the oracle. Its configs have original_max_position_embeddings
16, so an 8-token prompt plus 32 new tokens crosses into LongRoPE's long factors mid-generation (transformers
then recomputes the whole cache) and a 20-token prompt uses the long factors from the start.
"""

import numpy as np
import pytest
import torch
import transformers
import jax
import jax.numpy as jnp
from flax import nnx

import jaxmoe
from conftest import hf_model
from jaxmoe.infer.generate import _generate_compiled, filter_logits, sample_logits

NEW = 32
PAD = 0
TIED, UNTIED = "gqa_partial_longrope_tied", "mha_full_rotary_untied"


@pytest.fixture(scope="module")
def models(hf_checkpoint):
    return {name: jaxmoe.load_hf(hf_checkpoint(name)) for name in (TIED, UNTIED)}


def left_padded(lengths, seed=0):
    """ids and attention mask [len(lengths), max(lengths)], each row's random tokens right-aligned."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids, mask = np.full((len(lengths), width), PAD, np.int64), np.zeros((len(lengths), width), np.int64)
    for row, n in enumerate(lengths):
        ids[row, width - n:], mask[row, width - n:] = rng.integers(3, 128, size=n), 1
    return ids, mask


def hf_generate(name, ids, mask, **kwargs):
    with torch.no_grad():
        return hf_model(name).generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                       max_new_tokens=NEW, pad_token_id=PAD, **kwargs).numpy()


def assert_same_as_transformers(got, expected):
    """transformers stops once every row is done; jaxmoe keeps the full width, padded."""
    got = np.asarray(got)
    assert got.dtype == np.int32 and got.shape[1] >= expected.shape[1]
    np.testing.assert_array_equal(got[:, :expected.shape[1]], expected)
    assert (got[:, expected.shape[1]:] == PAD).all()


def stopping_eos(expected, prompt_len):
    """EOS ids the random model emits, from transformers' output `expected` [b, prompt_len + new]: row r's own
    token at step 3 + 7r, capped at the row's first config EOS (2) after which transformers writes padding,
    so that every row stops early.
    """
    tokens = expected[:, prompt_len:]
    steps = [min([3 + 7 * row, *np.flatnonzero(tokens[row] == 2)]) for row in range(len(tokens))]
    return sorted({int(tokens[row, step]) for row, step in enumerate(steps)})


@pytest.mark.parametrize("name,lengths", [
    (TIED, [8]),       # crosses original_max_position_embeddings=16 at slot 16: the cache is recomputed
    (TIED, [8, 5]),    # left-padded batch; the crossing follows the buffer width, as in transformers
    (TIED, [20]),      # long factors from the prompt on
    pytest.param(UNTIED, [8], marks=pytest.mark.slow),
    (UNTIED, [8, 5]),
])
def test_greedy_matches_transformers(models, name, lengths):
    ids, mask = left_padded(lengths)
    # First with the config's EOS id (2), then with ids the model emits so that every row ends early.
    got = jaxmoe.generate(models[name], ids, attention_mask=mask, max_new_tokens=NEW)
    assert got.shape == (len(lengths), ids.shape[1] + NEW)
    expected = hf_generate(name, ids, mask)
    assert_same_as_transformers(got, expected)
    eos = stopping_eos(expected, ids.shape[1])
    expected = hf_generate(name, ids, mask, eos_token_id=eos)
    assert expected.shape[1] < ids.shape[1] + NEW  # every row finished: the early exit is exercised
    got = jaxmoe.generate(models[name], ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos)
    assert_same_as_transformers(got, expected)


def test_prefill_logits_to_keep_is_the_last_position_of_the_full_logits(models):
    ids, mask = left_padded([8, 5])

    @nnx.jit  # one compile for both calls (op by op, each call compiles every op)
    def full_and_last(model, ids, mask):
        return model(ids, attention_mask=mask).logits, model(ids, attention_mask=mask, logits_to_keep=1).logits

    full, last = full_and_last(models[TIED], jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    np.testing.assert_allclose(last, full[:, -1:], rtol=1e-6, atol=1e-6)


def test_repeated_calls_reuse_the_compiled_program(models):
    ids, mask = left_padded([8, 5], seed=1)
    jaxmoe.generate(models[TIED], ids, attention_mask=mask, max_new_tokens=NEW)
    compiled = _generate_compiled._cache_size()
    ids, mask = left_padded([6, 8], seed=2)
    jaxmoe.generate(models[TIED], ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[5, 7, 9])
    assert _generate_compiled._cache_size() == compiled


def test_stream_callback_gets_each_step_in_order(models):
    ids, mask = left_padded([8, 5])
    eos = stopping_eos(hf_generate(TIED, ids, mask), ids.shape[1])
    seen = []
    got = np.asarray(jaxmoe.generate(models[TIED], ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos,
                                     stream_callback=lambda step, tokens: seen.append((step, tokens.copy()))))
    steps_run = hf_generate(TIED, ids, mask, eos_token_id=eos).shape[1] - ids.shape[1]
    assert [step for step, _ in seen] == list(range(steps_run))
    for step, tokens in seen:
        assert tokens.shape == (2,)
        np.testing.assert_array_equal(tokens, got[:, ids.shape[1] + step])


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_sampling_with_top_k_1_is_greedy(models):
    ids, mask = left_padded([8, 5])
    greedy = jaxmoe.generate(models[TIED], ids, attention_mask=mask, max_new_tokens=NEW)
    sampled = jaxmoe.generate(models[TIED], ids, attention_mask=mask, max_new_tokens=NEW, temperature=1.3, top_k=1,
                              top_p=0.9, rngs=nnx.Rngs(5))
    np.testing.assert_array_equal(sampled, greedy)


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_sampling_is_reproducible_from_rngs_and_varies_with_the_seed(models):
    ids, mask = left_padded([8, 5])
    run = lambda seed: np.asarray(jaxmoe.generate(  # noqa: E731
        models[TIED], ids, attention_mask=mask, max_new_tokens=NEW, temperature=1.0, top_k=50, top_p=0.95,
        eos_token_id=(), rngs=nnx.Rngs(seed)))
    first, again, other = run(1), run(1), run(2)
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()
    np.testing.assert_array_equal(first[:, :8], ids)
    assert ((first >= 0) & (first < 128)).all()


# ------------------------------------------------------------------------------------------ sampling helpers

def test_top_k_1_sampling_equals_argmax():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(6, 50)), jnp.float32)
    for seed in range(5):
        got = sample_logits(logits, jax.random.key(seed), temperature=0.7, top_k=1)
        np.testing.assert_array_equal(got, np.argmax(np.asarray(logits), axis=-1))


def nucleus_reference(logits, top_p):
    """NumPy: the smallest set of most probable tokens whose probability sums to >= top_p."""
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    order = np.argsort(-probs, kind="stable")
    size = int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)
    keep = np.zeros(len(logits), bool)
    keep[order[:size]] = True
    return keep


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.8, 0.95, 1.0])
def test_top_p_keeps_exactly_the_nucleus(top_p):
    logits = np.log(np.asarray([0.02, 0.4, 0.05, 0.25, 0.08, 0.2], np.float64)).astype(np.float32)
    kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits[None]), top_p=top_p)[0]))
    np.testing.assert_array_equal(kept, nucleus_reference(logits.astype(np.float64), top_p))
    warped = transformers.TopPLogitsWarper(top_p)(None, torch.tensor(logits[None]))[0].numpy()
    np.testing.assert_array_equal(kept, np.isfinite(warped))


def test_top_k_then_top_p_match_transformers_warpers():
    logits = np.random.default_rng(2).normal(size=(4, 40)).astype(np.float32) * 2
    got = np.asarray(filter_logits(jnp.asarray(logits), top_k=10, top_p=0.7))
    scores = transformers.TopKLogitsWarper(10)(None, torch.tensor(logits))
    expected = transformers.TopPLogitsWarper(0.7)(None, scores).numpy()
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(expected))
    np.testing.assert_array_equal(got[np.isfinite(got)], expected[np.isfinite(expected)])


def test_temperature_sampling_frequencies_follow_softmax():
    logits, temperature, draws = jnp.asarray([[1.0, 0.2, -0.5, 0.7]]), 0.8, 4000
    keys = jax.random.split(jax.random.key(0), draws)
    tokens = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, temperature)[0])(keys))
    probs = np.asarray(jax.nn.softmax(logits[0] / temperature))
    freqs = np.bincount(tokens, minlength=4) / draws
    assert np.all(np.abs(freqs - probs) <= 4 * np.sqrt(probs * (1 - probs) / draws))


def test_top_p_sampling_draws_only_from_the_nucleus():
    logits = np.log(np.asarray([0.02, 0.4, 0.05, 0.25, 0.08, 0.2], np.float32))
    keys = jax.random.split(jax.random.key(1), 2000)
    tokens = np.asarray(jax.vmap(lambda k: sample_logits(jnp.asarray(logits[None]), k, 1.0, top_p=0.6)[0])(keys))
    assert set(tokens.tolist()) == set(np.flatnonzero(nucleus_reference(logits, 0.6)).tolist())


# ----------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("change,needle", [
    (dict(input_ids=np.ones((1, 8), np.float32)), "float32"),
    (dict(input_ids=np.ones(8, np.int32)), "(8,)"),
    (dict(input_ids=np.full((1, 8), 128)), "128"),
    (dict(input_ids=np.full((1, 8), -3)), "-3"),
    (dict(max_length=5), ("max_length=5", "8 tokens")),
    (dict(max_length=30), ("max_length=30", "40")),
    (dict(max_new_tokens=60), ("68", "max_position_embeddings=64")),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(attention_mask=np.ones((1, 7))), "(1, 7)"),
    (dict(input_ids=np.ones((2, 8), np.int32), attention_mask=np.asarray([[1] * 8, [0] * 8])), "row 1"),
    (dict(attention_mask=np.asarray([[1] * 7 + [0]])), "row 0"),
    (dict(temperature=-0.5), "-0.5"),
    (dict(temperature=1.0, top_k=0), "top_k=0"),
    (dict(temperature=1.0, top_k=2.5), "top_k=2.5"),
    (dict(temperature=1.0, top_p=0.0), "top_p=0.0"),
    (dict(temperature=1.0, top_p=1.5), "top_p=1.5"),
])
def test_bad_input_raises_a_value_error_naming_the_value(models, change, needle):
    kwargs = {"input_ids": np.ones((1, 8), np.int32), "max_new_tokens": NEW, **change}
    with pytest.raises(ValueError) as info:
        jaxmoe.generate(models[TIED], kwargs.pop("input_ids"), **kwargs)
    for part in (needle,) if isinstance(needle, str) else needle:
        assert part in str(info.value)
