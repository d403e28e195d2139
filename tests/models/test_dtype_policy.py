"""Parameter dtype and compute dtype are independent; bf16 compute keeps norms, softmax and logits in fp32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmoe


IDS = jnp.asarray(np.random.default_rng(0).integers(0, 512, size=(2, 24)), jnp.int32)
logits_of = nnx.jit(lambda model, ids: model(ids).logits)  # compiled: op by op, each dtype compiles every op


@pytest.fixture(scope="module")
def fp32_model():
    return jaxmoe.Phi3ForCausalLM(jaxmoe.get_preset("tiny"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def fp32_logits(fp32_model):
    return np.asarray(logits_of(fp32_model, IDS))


def _params_with(model, dtype):
    return all(x.dtype == dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("param_dtype,dtype", [(jnp.bfloat16, None), (jnp.float32, jnp.bfloat16)])
def test_bf16_compute_tracks_fp32_logits(fp32_model, fp32_logits, param_dtype, dtype):
    model = jaxmoe.Phi3ForCausalLM(jaxmoe.get_preset("tiny"), dtype=dtype, param_dtype=param_dtype,
                                   rngs=nnx.Rngs(0))
    assert _params_with(model, param_dtype)
    # Same weights as the fp32 model, stored in param_dtype.
    nnx.update(model, jax.tree.map(lambda x: x.astype(param_dtype), nnx.state(fp32_model, nnx.Param)))
    ref = fp32_logits
    got = logits_of(model, IDS)
    assert got.dtype == jnp.float32  # logits always fp32
    assert np.isfinite(np.asarray(got)).all()
    # bf16 has 8 mantissa bits: agreement to a few percent of the logit scale, and the same argmax almost always.
    assert np.abs(np.asarray(got) - ref).max() <= 0.05 * np.abs(ref).max()
    assert (np.asarray(got).argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_rmsnorm_statistics_are_fp32():
    """A bf16 input whose mean square overflows bf16's precision still normalises to unit RMS."""
    norm = jaxmoe.nn.norms.RMSNorm(256, eps=1e-5)
    x = (jnp.arange(256, dtype=jnp.float32) * 1000.0 + 3e4).astype(jnp.bfloat16)
    y = norm(x)
    assert y.dtype == jnp.bfloat16
    rms = float(jnp.sqrt(jnp.mean(y.astype(jnp.float32) ** 2)))
    assert abs(rms - 1.0) < 1e-2


def test_bf16_model_generates_a_batch_with_its_kv_cache(fp32_model):
    """bf16 parameters through prefill and cached decode (XLA:CPU lacks some bf16 dot forms: none may be hit)."""
    model = jaxmoe.Phi3ForCausalLM(jaxmoe.get_preset("tiny"), param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(fp32_model, nnx.Param)))
    ids = np.random.default_rng(1).integers(3, 512, size=(8, 12))
    out = np.asarray(jaxmoe.generate(model, ids, max_new_tokens=6, eos_token_id=()))
    ref = np.asarray(jaxmoe.generate(fp32_model, ids, max_new_tokens=6, eos_token_id=()))
    assert out.shape == (8, 18) and (out[:, :12] == ids).all()
    assert (out[:, 12] == ref[:, 12]).mean() >= 0.75  # first new token: bf16 rarely flips the argmax
