"""Token helpers: greedy_tokens is NumPy's argmax (first index among ties) over the last axis of any rank, and
check_token_ids refuses exactly the ids outside the vocabulary, naming the id, and leaves traced ids alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.nn.tokens import check_token_ids, greedy_tokens


def test_greedy_tokens_is_argmax_with_first_index_on_ties():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 300)), jnp.float32).at[2, 7].set(9).at[2, 9].set(9)
    np.testing.assert_array_equal(greedy_tokens(logits), np.argmax(np.asarray(logits), axis=-1))
    assert int(greedy_tokens(logits)[2]) == 7


def test_greedy_tokens_over_a_batch_of_sequences_is_argmax_per_position():
    logits = np.random.default_rng(1).normal(size=(2, 3, 50)).astype(np.float32)
    logits[1, 2, [4, 30]] = 10.0  # a tie: the first index wins
    tokens = greedy_tokens(jnp.asarray(logits))
    assert tokens.dtype == jnp.int32 and tokens.shape == (2, 3)
    np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))
    assert int(tokens[1, 2]) == 4


@pytest.mark.parametrize("bad", [-1, 64, 1000])
def test_check_token_ids_names_the_id_outside_the_vocabulary(bad):
    ids = np.array([[0, 5, 63], [1, bad, 2]], np.int32)
    with pytest.raises(ValueError, match=rf"token id {bad} is outside the vocabulary \[0, 64\).*tokenizer"):
        check_token_ids(ids, 64)
    with pytest.raises(ValueError, match=rf"token id {bad} "):
        check_token_ids(jnp.asarray(ids), 64)


def test_check_token_ids_accepts_the_whole_vocabulary_and_empty_ids():
    check_token_ids(np.arange(64).reshape(8, 8), 64)
    check_token_ids(np.zeros((2, 0), np.int32), 64)


def test_check_token_ids_skips_traced_ids():
    """Under jit the values are unknown: the check must not raise (nor fail by reading a tracer)."""
    out = jax.jit(lambda ids: (check_token_ids(ids, 64), ids + 1)[1])(jnp.asarray([[70, -3]], jnp.int32))
    np.testing.assert_array_equal(out, [[71, -2]])
