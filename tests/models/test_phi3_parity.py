"""Phi3ForCausalLM logits and gradients equal transformers' PyTorch Phi3ForCausalLM (the oracle), fp32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxmoe
from conftest import HF_CONFIGS, hf_model

TOL = 1e-4


@nnx.jit
def _logits(model, ids, mask=None):
    return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
@pytest.mark.parametrize("length", [12, 40])  # 40 > original_max_position_embeddings=16: long factors
def test_logits_match_transformers(name, length, hf_checkpoint, rng):
    model = jaxmoe.load_hf(hf_checkpoint(name))
    ids = rng.integers(0, 128, size=(3, length))
    with torch.no_grad():
        expected = hf_model(name)(torch.tensor(ids)).logits.numpy()
    got = np.asarray(_logits(model, jnp.asarray(ids, jnp.int32)))
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOL


def test_left_padded_rows_match_unpadded_transformers(hf_checkpoint, rng):
    """A left-padded batch gives each row the logits transformers gives that row alone."""
    name = "gqa_partial_longrope_tied"
    model = jaxmoe.load_hf(hf_checkpoint(name))
    lengths = [9, 5]
    ids = np.zeros((2, 9), np.int64)
    mask = np.zeros((2, 9), np.int64)
    rows = [rng.integers(3, 128, size=n) for n in lengths]
    for i, row in enumerate(rows):
        ids[i, 9 - len(row):] = row
        mask[i, 9 - len(row):] = 1
    got = np.asarray(_logits(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask)))
    for i, row in enumerate(rows):
        with torch.no_grad():
            expected = hf_model(name)(torch.tensor(row[None])).logits.numpy()[0]
        assert np.abs(got[i, 9 - len(row):] - expected).max() <= TOL


def test_loss_gradients_match_transformers(hf_checkpoint, rng):
    """d(mean next-token loss)/d(params) agrees with torch autograd on the same weights."""
    name = "gqa_partial_longrope_tied"
    model = jaxmoe.load_hf(hf_checkpoint(name))
    # No pad id (0) in the input: torch's nn.Embedding(padding_idx=0) zeroes that row's lookup gradient.
    ids = rng.integers(1, 128, size=(2, 20))
    hf = hf_model(name)
    hf.zero_grad()
    loss = hf(torch.tensor(ids), labels=torch.tensor(ids)).loss
    loss.backward()

    def loss_fn(m):
        logits = m(jnp.asarray(ids, jnp.int32)).logits[:, :-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, jnp.asarray(ids[:, 1:])[..., None], axis=-1).mean()

    value, grads = jax.jit(jax.value_and_grad(loss_fn))(model)
    assert abs(float(value) - loss.item()) <= 1e-5
    g_qkv = np.asarray(grads.layers[1].self_attn.qkv_proj.kernel[...]).T
    ref_qkv = hf.model.layers[1].self_attn.qkv_proj.weight.grad.numpy()
    assert np.abs(g_qkv - ref_qkv).max() <= 1e-5 * max(1.0, np.abs(ref_qkv).max())
    g_emb = np.asarray(grads.embed_tokens.embedding[...])
    ref_emb = hf.model.embed_tokens.weight.grad.numpy()  # tied: embedding and output-head gradients summed
    assert np.abs(g_emb - ref_emb).max() <= 1e-5 * max(1.0, np.abs(ref_emb).max())
