"""ModelConfig.remat="layer" (each decoder layer recomputed in the backward) changes memory, never results: logits,
routing losses and every gradient equal remat="none" (fp32), also through train_step and in MoE training mode."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxmoe
from jaxmoe.models.phi3 import Phi3ForCausalLM
from jaxmoe.models.phimoe import PhimoeForCausalLM
from jaxmoe.train.loop import Batch, train_step
from jaxmoe.train.run_config import load_run_config, run_config_from_dict

TOL = 1e-6
CONFIGS = Path(__file__).parents[2] / "experiments" / "configs"


def _model(name: str, remat: str, **overrides):
    cls = PhimoeForCausalLM if jaxmoe.get_preset(name).moe is not None else Phi3ForCausalLM
    model = cls(jaxmoe.get_preset(name).replace(remat=remat, **overrides), rngs=nnx.Rngs(0))
    model.train()  # the MoE routers sample (SparseMixer) and jitter: remat must replay the same draws
    return model


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


# tiny-moe (38 s) runs in the slow tier: the default tier's 8-minute budget; the MoE remat path is also exercised
# by tests/moe/test_task_adapters.py::test_task_ids_reach_the_layers_under_remat.
@pytest.mark.parametrize("name", ["tiny", pytest.param("tiny-moe", marks=pytest.mark.slow)])
def test_remat_leaves_logits_and_every_gradient_unchanged(name, rng):
    """Two layers: the second must draw its routing noise from the RNG state the first one's recomputation
    passes on, as without remat."""
    ids = jnp.asarray(rng.integers(3, 512, size=(2, 24)), jnp.int32)
    attention_mask = jnp.asarray(np.arange(24)[None] >= np.array([[0], [5]]), jnp.int32)

    def run(remat):
        @nnx.jit
        def grads_and_outputs(model):
            def loss(model):
                out = model(ids, attention_mask=attention_mask, rngs=nnx.Rngs(7))
                aux = out.aux_loss if out.aux_loss is not None else 0.0
                return jnp.mean(jnp.tanh(out.logits)) + aux, out
            return nnx.grad(loss, has_aux=True)(model)

        grads, out = grads_and_outputs(_model(name, remat))
        return _flat(nnx.to_pure_dict(grads)), out

    (plain_grads, plain), (remat_grads, rematted) = run("none"), run("layer")
    assert np.abs(np.asarray(rematted.logits) - np.asarray(plain.logits)).max() <= TOL
    if plain.aux_loss is not None:
        assert abs(float(rematted.aux_loss) - float(plain.aux_loss)) <= TOL
        np.testing.assert_array_equal(np.asarray(rematted.expert_load), np.asarray(plain.expert_load))
    assert plain_grads.keys() == remat_grads.keys()
    for key, want in plain_grads.items():
        scale = max(1.0, float(np.abs(want).max()))
        assert np.abs(remat_grads[key] - want).max() <= TOL * scale, key


def test_remat_keeps_no_attention_probabilities_for_the_backward(rng):
    """Without remat the backward keeps each layer's attention probabilities [b, kv, group, t, t]; with it,
    nothing of that shape is kept (the check that remat is in effect, not merely harmless)."""
    t = 40
    ids = jnp.asarray(rng.integers(3, 512, size=(1, t)), jnp.int32)

    def residual_shapes(remat):
        graphdef, params, rest = nnx.split(_model("tiny", remat), nnx.Param, ...)
        # The function jax.vjp returns is a pytree whose leaves are the residuals the backward reads.
        backward = jax.eval_shape(lambda p: jax.vjp(lambda p: nnx.merge(graphdef, p, rest)(ids).logits, p)[1],
                                  params)
        return [x.shape for x in jax.tree.leaves(backward)]

    assert any(shape[-2:] == (t, t) for shape in residual_shapes("none"))
    assert not any(shape[-2:] == (t, t) for shape in residual_shapes("layer"))


@pytest.mark.slow  # 8-12 s: kept out of the default tier's 8-minute budget
def test_a_train_step_with_remat_takes_the_same_step(rng):
    """One layer (the RNG hand-over between layers is checked above)."""
    ids = jnp.asarray(rng.integers(3, 512, size=(2, 16)), jnp.int32)
    batch = Batch(input_ids=ids, loss_mask=jnp.ones_like(ids))
    results = {}
    for remat in ("none", "layer"):
        model = _model("tiny-moe", remat, num_layers=1)
        # Plain SGD, so the parameter change is the gradient itself (Adam would amplify rounding in tiny entries).
        optimizer = nnx.Optimizer(model, optax.inject_hyperparams(optax.sgd)(learning_rate=1.0), wrt=nnx.Param)
        metrics = train_step(model, optimizer, batch, nnx.Rngs(3))
        results[remat] = (metrics, _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    (plain_metrics, plain_params), (remat_metrics, remat_params) = results["none"], results["layer"]
    for key in ("loss", "grad_norm", "aux_loss"):
        want = float(plain_metrics[key])
        assert abs(float(remat_metrics[key]) - want) <= TOL * max(1.0, abs(want)), key
    assert np.isfinite(float(remat_metrics["loss"]))
    for key, want in plain_params.items():
        assert np.abs(remat_params[key] - want).max() <= TOL, key


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_generation_with_remat_decodes_the_same_tokens(rng):
    """The decode loop runs the layers inside a while loop over parameters traced outside it; remat must work
    there too (it changes nothing without a backward). One layer shows it."""
    from jaxmoe.infer.generate import generate

    ids = jnp.asarray(rng.integers(3, 512, size=(2, 9)), jnp.int32)
    tokens = []
    for remat in ("none", "layer"):
        model = _model("tiny-moe", remat, num_layers=1)
        model.eval()
        tokens.append(np.asarray(generate(model, ids, max_new_tokens=6)))
    np.testing.assert_array_equal(tokens[1], tokens[0])


def test_unknown_remat_is_named():
    with pytest.raises(ValueError, match=r"remat='all'; expected 'none' or 'layer'"):
        jaxmoe.get_preset("tiny").replace(remat="all")


def test_the_run_config_sets_remat_and_attention_on_the_built_model(tmp_path):
    from jaxmoe.io.bpe import train_bpe
    from jaxmoe.train.trainer import build_model

    text = tmp_path / "train.txt"
    text.write_text("a small corpus for a tiny tokenizer\n" * 4)
    config = run_config_from_dict({
        "model": {"preset": "tiny-moe", "overrides": {"remat": "layer", "attention_impl": "blocked"}},
        "tokenizer": {"bpe_vocab_size": 300}, "data": {"train": {"text": str(text)}}})
    model = build_model(config, train_bpe(text.read_text().splitlines(), vocab_size=300))
    assert (model.config.remat, model.config.attention_impl) == ("layer", "blocked")
    assert model.layers[0].self_attn.implementation == "blocked"


@pytest.mark.parametrize("name", ["grin-moe-v5p-128.yaml", "grin-moe-h100x8.yaml"])
def test_the_grin_moe_pod_configs_turn_remat_on(name):
    config = load_run_config(CONFIGS / name)
    assert config.model.preset == "grin-moe"
    assert config.model.overrides["remat"] == "layer"
    assert jaxmoe.get_preset("grin-moe").replace(**config.model.overrides).remat == "layer"
