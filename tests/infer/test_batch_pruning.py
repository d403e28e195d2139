"""Batch pruning in jaxmoe.generate (`prune_every`): finished rows leave the decode batch, and every row's tokens
equal unpruned generation's, greedy and sampled, with EOS at different steps, across Phi-3's LongRoPE switch
and on an MoE model."""

import numpy as np
import pytest
from flax import nnx

import jaxmoe
from jaxmoe.infer import generate as generate_module

NEW = 24
LONGROPE = "gqa_partial_longrope_tied"  # original_max_position_embeddings 16: 8 + 24 tokens cross the switch


@pytest.fixture(scope="module")
def phi3(hf_checkpoint):
    return jaxmoe.load_hf(hf_checkpoint(LONGROPE))


def left_padded(lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids, mask = np.zeros((len(lengths), width), np.int32), np.zeros((len(lengths), width), np.int32)
    for row, n in enumerate(lengths):
        ids[row, width - n:], mask[row, width - n:] = rng.integers(3, vocab, size=n), 1
    return ids, mask


def staggered_eos(tokens, prompt_len):
    """EOS ids taken from an unpruned run's output: row r's token at step 1 + 3r, so rows end at different steps
    (a token also met earlier in another row ends that row sooner, which only adds variety)."""
    new = tokens[:, prompt_len:]
    return sorted({int(new[row, min(1 + 3 * row, new.shape[1] - 1)]) for row in range(len(new))})


def finish_steps(tokens, prompt_len, eos):
    new = tokens[:, prompt_len:]
    return [int(np.flatnonzero(np.isin(row, eos))[0]) if np.isin(row, eos).any() else None for row in new]


@pytest.fixture
def compactions(monkeypatch):
    """The batch sizes the pruned loop moved to, recorded by a wrapper around the row gather."""
    sizes = []
    take_rows = generate_module._take_rows

    def spy(carry, rows, index, real):
        sizes.append(int(index.shape[0]))
        return take_rows(carry, rows, index, real)

    monkeypatch.setattr(generate_module, "_take_rows", spy)
    return sizes


@pytest.mark.parametrize("prune_every", [1, 3])
def test_pruned_greedy_generation_equals_unpruned_across_the_longrope_switch(phi3, compactions, prune_every):
    ids, mask = left_padded([8, 5, 8, 3, 7, 8], phi3.config.vocab_size)
    plain = np.asarray(jaxmoe.generate(phi3, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=()))
    eos = staggered_eos(plain, ids.shape[1])
    expected = np.asarray(jaxmoe.generate(phi3, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos))
    steps = finish_steps(expected, ids.shape[1], eos)
    assert len(set(steps)) >= 3, steps  # rows end at different steps
    got = jaxmoe.generate(phi3, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos,
                          prune_every=prune_every)
    np.testing.assert_array_equal(np.asarray(got), expected)
    assert compactions and compactions == sorted(compactions, reverse=True) and compactions[-1] < len(ids)


def test_pruned_sampling_with_a_fixed_key_equals_unpruned(phi3, compactions):
    ids, mask = left_padded([6, 8, 4, 8, 2], phi3.config.vocab_size, seed=1)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, temperature=1.0, top_k=40)
    plain = np.asarray(jaxmoe.generate(phi3, ids, eos_token_id=(), rngs=nnx.Rngs(5), **kwargs))
    eos = staggered_eos(plain, ids.shape[1])
    expected = np.asarray(jaxmoe.generate(phi3, ids, eos_token_id=eos, rngs=nnx.Rngs(5), **kwargs))
    got = np.asarray(jaxmoe.generate(phi3, ids, eos_token_id=eos, rngs=nnx.Rngs(5), prune_every=2, **kwargs))
    np.testing.assert_array_equal(got, expected)
    assert compactions


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_pruned_generation_of_an_moe_model_equals_unpruned(tiny_model, compactions):
    model = tiny_model("tiny-moe", num_layers=2)
    ids, mask = left_padded([5, 7, 7, 2, 6, 7, 4, 3], model.config.vocab_size, seed=2)
    plain = np.asarray(jaxmoe.generate(model, ids, attention_mask=mask, max_new_tokens=16, eos_token_id=()))
    eos = staggered_eos(plain, ids.shape[1])
    expected = np.asarray(jaxmoe.generate(model, ids, attention_mask=mask, max_new_tokens=16, eos_token_id=eos))
    got = np.asarray(jaxmoe.generate(model, ids, attention_mask=mask, max_new_tokens=16, eos_token_id=eos,
                                     prune_every=2))
    np.testing.assert_array_equal(got, expected)
    assert compactions


@pytest.mark.parametrize("kwargs,match", [
    (dict(prune_every=0), "prune_every=0; expected an integer >= 1"),
    (dict(prune_every=2.5), "prune_every=2.5"),
    (dict(prune_every=4, num_beams=2), r"prune_every=4 with num_beams > 1"),
    (dict(prune_every=4, stream_callback=lambda step, tokens: None), "with stream_callback"),
    (dict(prune_every=4, logits_processor=lambda step, logits, hidden: logits), "with logits_processor"),
])
def test_bad_pruning_arguments_are_named(phi3, kwargs, match):
    with pytest.raises(ValueError, match=match):
        jaxmoe.generate(phi3, np.ones((2, 3), np.int32), max_new_tokens=4, **kwargs)
