"""MoEConfig.sparsemixer_variant: the MoE block routes with the SparseMixer variant its config names (GRIN Alg. 1
"v2" or Alg. 2 "v2*", docs/paper_methods.md §d), in training and in eval, against jaxmoe.moe.router.sparsemixer
given the same draws; bad values are named; the field survives the checkpoint dict and keeps v2* models out of
transformers' format (whose phimoe routes with v2)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmoe
from jaxmoe.config import SPARSEMIXER_VARIANTS, MoEConfig
from jaxmoe.io.hf import hf_problems
from jaxmoe.moe import router
from jaxmoe.moe.experts import dense_moe_reference
from jaxmoe.moe.layer import SparseMoeBlock
from jaxmoe.quant.checkpoint import config_from_dict, config_to_dict

D, F, E, B, T = 8, 8, 4, 2, 6
JITTER = 0.25  # wide enough that every expert survives the masked softmax, so the sampled picks vary


def _block(variant: str) -> SparseMoeBlock:
    """A block with NumPy-normal parameters (the same for every variant), input jitter off so that the router
    draws are the only randomness."""
    moe = MoEConfig(num_experts=E, router_jitter_noise=JITTER, input_jitter_noise=0.0, sparsemixer_variant=variant)
    block = nnx.eval_shape(lambda: SparseMoeBlock(D, F, moe, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    leaves, treedef = jax.tree.flatten(nnx.state(block, nnx.Param))
    nnx.update(block, jax.tree.unflatten(treedef, [jnp.asarray(0.5 * rng.normal(size=x.shape), jnp.float32)
                                                   for x in leaves]))
    return block


@nnx.jit
def _block_and_reference(block, x_btd):
    """{mode: (block output [b, t, d], the reference's output [b, t, d], block experts, reference experts)} for
    mode "train" and "eval". The reference routes the block's logits with `router.sparsemixer(variant=...)` and
    the draws the block made (router stream seeded 3), then runs the dense every-expert twin of the experts."""
    out = {}
    for mode, training in (("train", True), ("eval", False)):
        block.deterministic = not training
        y_btd, routing = block(x_btd, rngs=nnx.Rngs(router=3) if training else None)
        noise = router.sparsemixer_noise(nnx.Rngs(router=3), B * T, E) if training else None
        weights, experts = router.sparsemixer(routing.router_logits, jitter_eps=JITTER, training=training,
                                              noise=noise, variant=block.moe.sparsemixer_variant)
        y_ref = dense_moe_reference(x_btd.reshape(B * T, D), weights, experts, block.w_gate_up[...],
                                    block.w_down[...])
        out[mode] = (y_btd, y_ref.reshape(B, T, D), routing.experts, experts)
    return out


def test_the_block_routes_with_the_configured_variant_in_training_and_eval_against_the_reference():
    x_btd = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, D)), jnp.float32)
    outputs = {}
    for variant in SPARSEMIXER_VARIANTS:
        for mode, (y, y_ref, experts, experts_ref) in _block_and_reference(_block(variant), x_btd).items():
            np.testing.assert_array_equal(np.asarray(experts), np.asarray(experts_ref))
            np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
            outputs[variant, mode] = np.asarray(y)
    # The variants route differently (v2*: halved logits, its own coin), so the checks above tell them apart.
    for mode in ("train", "eval"):
        assert np.abs(outputs["v2", mode] - outputs["v2*", mode]).max() > 1e-2


def test_the_config_names_a_bad_variant_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"sparsemixer_variant='v3'; expected one of \['v2', 'v2\*'\]"):
        MoEConfig(num_experts=4, sparsemixer_variant="v3")
    with pytest.raises(ValueError, match=r"sparsemixer_variant='v2\*' with router='topk'"):
        MoEConfig(num_experts=4, router="topk", sparsemixer_variant="v2*")
    assert set(SPARSEMIXER_VARIANTS) == set(router._VARIANTS)  # the config allows what the router implements


def test_the_variant_round_trips_through_the_checkpoint_dict_and_v2_star_is_not_exported_to_transformers():
    preset = jaxmoe.get_preset("tiny-moe")
    assert preset.moe.sparsemixer_variant == "v2" and hf_problems(preset) is None
    star = preset.replace(moe=MoEConfig(num_experts=4, sparsemixer_variant="v2*"))
    assert config_from_dict(json.loads(json.dumps(config_to_dict(star)))) == star
    old = config_to_dict(preset)
    del old["moe"]["sparsemixer_variant"]  # a checkpoint written before the field existed
    assert config_from_dict(old) == preset
    assert hf_problems(star).startswith("moe.sparsemixer_variant='v2*' has no counterpart in PhimoeForCausalLM")
