"""PhimoeForCausalLM (Phi-3.5-MoE / GRIN-MoE) against transformers' PhimoeForCausalLM, fp32, eval mode."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import jaxmoe
from conftest import HF_MOE_CONFIGS, hf_moe_model
from jaxmoe.io.hf import config_to_hf

TOL = 1e-4


@nnx.jit
def _forward(model, ids):
    out = model(ids)
    return out.logits, out.aux_loss


@pytest.mark.parametrize("name", sorted(HF_MOE_CONFIGS))
def test_logits_and_aux_loss_match_transformers(name, hf_checkpoint, rng):
    model = jaxmoe.load_hf(hf_checkpoint(name))
    assert isinstance(model, jaxmoe.PhimoeForCausalLM)
    ids = rng.integers(0, 128, size=(3, 24))  # < original_max_position_embeddings and > the sliding window
    with torch.no_grad():
        ref = hf_moe_model(name)(torch.tensor(ids), output_router_logits=True)
    logits, aux = _forward(model, jnp.asarray(ids, jnp.int32))
    assert np.abs(np.asarray(logits) - ref.logits.numpy()).max() <= TOL
    assert abs(float(aux) - ref.aux_loss.item()) <= 1e-5


def _hf_grads_as_model(hf, folder):
    """transformers' gradients, laid out as a jaxmoe model: save the grads as the weights, load them back."""
    grads = transformers.PhimoeForCausalLM(hf.config)
    with torch.no_grad():
        for (_, p), (_, g) in zip(hf.named_parameters(), grads.named_parameters()):
            g.copy_(p.grad)
    grads.save_pretrained(folder)
    return jaxmoe.load_hf(folder)


def test_gradients_of_every_parameter_match_transformers(hf_checkpoint, tmp_path, rng):
    name = "grin_like"
    model = jaxmoe.load_hf(hf_checkpoint(name))
    ids = rng.integers(1, 128, size=(2, 16))  # no pad id: torch zeroes the pad row's embedding gradient
    hf = hf_moe_model(name)
    hf.zero_grad()
    hf(torch.tensor(ids), labels=torch.tensor(ids)).loss.backward()
    expected = nnx.state(_hf_grads_as_model(hf, tmp_path / "grads"), nnx.Param)
    hf.zero_grad()

    def loss_fn(m):
        logits = m(jnp.asarray(ids, jnp.int32)).logits[:, :-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, jnp.asarray(ids[:, 1:])[..., None], axis=-1).mean()

    grads = nnx.state(jax.jit(jax.grad(loss_fn))(model), nnx.Param)
    flat_got = dict(jax.tree_util.tree_flatten_with_path(grads)[0])
    flat_want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    assert flat_got.keys() == flat_want.keys()
    for path, want in flat_want.items():
        got, want = np.asarray(flat_got[path]), np.asarray(want)
        scale = max(np.abs(want).max(), 1e-6)
        assert np.abs(got - want).max() <= 1e-5 * scale, jax.tree_util.keystr(path)


def test_save_hf_loads_in_transformers_with_same_logits(hf_checkpoint, tmp_path, rng):
    name = "phi35_moe_like"
    model = jaxmoe.load_hf(hf_checkpoint(name))
    jaxmoe.save_hf(model, tmp_path / "saved")
    hf = transformers.PhimoeForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="eager").eval()
    ids = rng.integers(0, 128, size=(3, 24))  # the shape of the parity test above: its compiled forward serves
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(_forward(model, jnp.asarray(ids, jnp.int32))[0]) - ref).max() <= TOL


def test_grin_moe_preset_parameter_count_matches_transformers():
    preset = jaxmoe.get_preset("grin-moe")
    abstract = nnx.eval_shape(lambda: jaxmoe.PhimoeForCausalLM(preset, rngs=nnx.Rngs(0)))
    ours = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    with torch.device("meta"):
        theirs = sum(p.numel() for p in
                     transformers.PhimoeForCausalLM(transformers.PhimoeConfig(**config_to_hf(preset))).parameters())
    assert ours == theirs
    assert 41.5e9 < ours < 42.2e9  # "16x3.8B, 41.9B total" (model card)


@pytest.mark.parametrize("experts_in_config", [3, 5])
def test_checkpoint_with_a_different_expert_count_is_named(hf_checkpoint, tmp_path, experts_in_config):
    import json

    folder = shutil.copytree(hf_checkpoint("grin_like"), tmp_path / "ckpt")  # 4 experts stored
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_local_experts": experts_in_config}))
    with pytest.raises(jaxmoe.CheckpointError, match=r"experts\.[34]\.w[123]\.weight"):
        jaxmoe.load_hf(folder)


def test_train_mode_without_rngs_is_a_clear_error(hf_checkpoint):
    model = jaxmoe.load_hf(hf_checkpoint("grin_like"))
    model.train()
    with pytest.raises(ValueError, match="pass rngs"):  # raised while tracing, as it would be op by op
        _forward(model, jnp.ones((1, 4), jnp.int32))


def test_greedy_generation_matches_transformers(hf_checkpoint, rng):
    name = "grin_like"
    model = jaxmoe.load_hf(hf_checkpoint(name))
    ids = rng.integers(3, 128, size=(1, 6))
    with torch.no_grad():
        ref = hf_moe_model(name).generate(torch.tensor(ids), do_sample=False, max_new_tokens=16,
                                          min_new_tokens=16, eos_token_id=None, pad_token_id=0).numpy()
    got = np.asarray(jaxmoe.generate(model, ids, max_new_tokens=16, eos_token_id=()))
    np.testing.assert_array_equal(got, ref)
