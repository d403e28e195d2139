"""pallas_kernels.router.sparsemixer_top2 (XLA reference and Pallas kernel in interpret mode) against
jaxmoe.moe.router.sparsemixer (variant "v2", which follows transformers' PhimoeForCausalLM router), given the same
Exp(1) / U(0, 1) draws: weights, experts and router gradients; plus known answers and the boundary checks.
"""

import contextlib
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from jaxmoe.moe.router import sparsemixer
from pallas_kernels.router import kernel, sparsemixer_top2

EPS = 0.01  # router_jitter_noise of Phi-3.5-MoE and GRIN: a relative gap threshold of 0.02
BACKENDS = [pytest.param("xla", False, id="xla"), pytest.param("pallas", True, id="pallas-interpret")]
# T is never a multiple of the token tile (8..128, a power of two); 140 tokens take two tiles, E = 4 pads to 8.
SHAPES = [(13, 4), (21, 8), (140, 16)]


def _crafted(experts: int) -> np.ndarray:
    """Rows for the threshold and tie rules, [6, E]; see `test_crafted_rows_known_answers` for what each must give."""
    base = np.linspace(-2.0, -1.5, experts)  # all far (>2%) below the maxima set below
    rows = np.stack([base] * 6)
    rows[0, [1, 3]] = 2.0  # a tie at the top: round 1 takes expert 1, round 2 expert 3, each p = 1/2
    rows[1, 2], rows[1, 0] = 5.0, 3.0  # lone survivors: only the max is within 2% in both rounds, p = 1
    rows[2] = 3.0  # all equal: experts 0 then 1, uniform softmax over E then E - 1
    rows[3] = 0.0  # 0/0 in the relative gap is NaN, compares False: nothing is masked
    rows[4, [0, 1, 2]] = [-1.0, -1.005, -1.0]  # negative maximum tied at 0 and 2, -1.005 within 2% of it
    rows[5, [experts - 1, experts - 2]] = [1.0, 0.99]  # the picks are the last experts, next to the padding
    return rows


def _scores(seed: int, tokens: int, experts: int, dtype=jnp.float32) -> jax.Array:
    """[tokens, E]: crafted rows, then rows clustered within the threshold, all-negative rows and plain normals."""
    rng = np.random.default_rng(seed)
    crafted = _crafted(experts)
    rest = tokens - len(crafted)
    cluster = 5.0 + 0.06 * rng.normal(size=(rest // 3, experts))  # several experts within 2% of the max
    negative = -3.0 - 0.05 * np.abs(rng.normal(size=(rest // 3, experts)))  # factor = |s_j|
    plain = rng.normal(size=(rest - 2 * (rest // 3), experts))
    return jnp.asarray(np.concatenate([crafted, cluster, negative, plain]), dtype)


def _noise(seed: int, tokens: int, experts: int):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.exponential(k1, (tokens, experts)), jax.random.uniform(k2, (tokens, 1)),
            jax.random.exponential(k3, (tokens, experts)), jax.random.uniform(k4, (tokens, 1)))


def _route_and_grad(route, scores, cotangent_t2):
    """-> (weights, experts, d/d scores of sum(weights * cotangent) as float32 and its dtype), jitted."""
    def loss(s):
        weights, experts = route(s)
        return jnp.sum(weights * cotangent_t2), (weights, experts)

    (_, (weights, experts)), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(scores)
    return np.asarray(weights), np.asarray(experts), np.asarray(grad.astype(jnp.float32)), grad.dtype


@functools.cache
def _jaxmoe_case(tokens: int, experts: int, dtype_name: str, training: bool):
    """Inputs for one case and jaxmoe's (weights, experts, gradient), shared by both backends' tests."""
    scores = _scores(tokens * experts, tokens, experts, jnp.dtype(dtype_name))
    noise = _noise(tokens + experts, tokens, experts)
    cotangent_t2 = jax.random.normal(jax.random.key(tokens), (tokens, 2))
    route = functools.partial(sparsemixer, jitter_eps=EPS, training=training, noise=noise, variant="v2")
    return scores, noise, cotangent_t2, _route_and_grad(route, scores, cotangent_t2)


def _compare_with_jaxmoe(tokens, experts, *, training, backend, interpret, dtype_name="float32"):
    """Checks weights (1e-6) and experts (exactly) against jaxmoe -> (ours, jaxmoe's) (weights, experts, grad)."""
    scores, noise, cotangent_t2, theirs = _jaxmoe_case(tokens, experts, dtype_name, training)
    route = functools.partial(sparsemixer_top2, jitter_eps=EPS, training=training, noise=noise, backend=backend,
                              interpret=interpret)
    ours = _route_and_grad(route, scores, cotangent_t2)
    assert ours[0].dtype == np.float32 and ours[1].dtype == np.int32 and ours[0].shape == (tokens, 2)
    assert ours[3] == scores.dtype  # the gradient comes back in the scores' dtype, as jaxmoe's does
    np.testing.assert_array_equal(ours[1], theirs[1])
    np.testing.assert_allclose(ours[0], theirs[0], rtol=0, atol=1e-6)
    return ours, theirs


@pytest.mark.parametrize("tokens,experts", SHAPES)
@pytest.mark.parametrize("backend,interpret", BACKENDS)
def test_eval_matches_jaxmoe(backend, interpret, tokens, experts):
    ours, theirs = _compare_with_jaxmoe(tokens, experts, training=False, backend=backend, interpret=interpret)
    np.testing.assert_allclose(ours[2], theirs[2], rtol=0, atol=1e-6)  # the rule equals autograd in eval
    assert np.abs(theirs[2]).max() > 0.1  # the cotangent reaches the scores


@pytest.mark.parametrize("tokens,experts", SHAPES)
@pytest.mark.parametrize("backend,interpret", BACKENDS)
def test_training_matches_jaxmoe_with_same_noise(backend, interpret, tokens, experts):
    ours, theirs = _compare_with_jaxmoe(tokens, experts, training=True, backend=backend, interpret=interpret)
    np.testing.assert_allclose(ours[2], theirs[2], rtol=0, atol=1e-6)
    eval_experts = _jaxmoe_case(tokens, experts, "float32", False)[3][1]
    assert np.any(ours[1] != eval_experts)  # the draws did sample experts other than the argmax


def _saved_residuals(f, *args) -> list[tuple[str, str]]:
    """(type, source) of every array jax.vjp(f, *args) keeps for the backward, e.g. ("f32[16,8]", "output of
    pallas_call from ..."), as print_saved_residuals prints them."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print_saved_residuals(f, *args)
    return [tuple(line.split(" ", 1)) for line in printed.getvalue().splitlines()]


# What each backward keeps for 12 tokens and 6 experts: the reference, per round, the masked softmax, p and the
# int expert; the kernel the padded scores [16, 8] (its backward recomputes the gates), the experts and p.
SAVED_FOR_BACKWARD = {"xla": ["f32[12,1]"] * 2 + ["f32[12,6]"] * 2 + ["i32[12,1]"] * 2,
                      "pallas": ["f32[16,2]", "f32[16,8]", "i32[16,2]"]}


@pytest.mark.parametrize("backend,interpret", BACKENDS)
def test_training_backward_keeps_what_the_rule_needs_and_not_the_noise(backend, interpret):
    noise = _noise(0, 12, 6)
    route = lambda s, n: sparsemixer_top2(s, jitter_eps=EPS, training=True, noise=n, backend=backend,  # noqa: E731
                                          interpret=interpret)[0]
    saved = _saved_residuals(route, _scores(0, 12, 6), noise)
    assert not [source for _, source in saved if "argument" in source]  # no noise array (nor the scores)
    arrays = sorted(kind for kind, _ in saved if not kind.endswith("[]"))  # scalars: jnp.pad's padding values
    assert arrays == SAVED_FOR_BACKWARD[backend]


@pytest.mark.parametrize("backend,interpret", BACKENDS)
def test_crafted_rows_known_answers(backend, interpret):
    """Ties pick the lowest index (round 2 the next tied one); a lone survivor of the 2% gap gets weight 1."""
    experts = 8
    scores = jnp.asarray(_crafted(experts), jnp.float32)
    weights, picked = sparsemixer_top2(scores, jitter_eps=EPS, training=False, backend=backend, interpret=interpret)
    expected_experts = [[1, 3], [2, 0], [0, 1], [0, 1], [0, 2], [experts - 1, experts - 2]]
    expected_weights = [[0.5, 1.0], [1.0, 1.0], [1 / experts, 1 / (experts - 1)], [1 / experts, 1 / (experts - 1)]]
    np.testing.assert_array_equal(np.asarray(picked), expected_experts)
    np.testing.assert_allclose(np.asarray(weights)[:4], expected_weights, rtol=0, atol=1e-6)
    # Row 4: round 1 keeps {0, 1, 2} (-1.005 is 0.5% below -1), round 2 keeps {1, 2}.
    round1, round2 = np.exp([-1.0, -1.005, -1.0]), np.exp([-1.005, -1.0])
    np.testing.assert_allclose(np.asarray(weights)[4], [round1[0] / round1.sum(), round2[1] / round2.sum()],
                               rtol=0, atol=1e-6)
    # Row 5: only 1.0 and 0.99 are within 2%; round 2 keeps 0.99 alone.
    round1 = np.exp([1.0, 0.99])
    np.testing.assert_allclose(np.asarray(weights)[5], [round1[0] / round1.sum(), 1.0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "training"])
@pytest.mark.parametrize("backend,interpret", BACKENDS)
def test_bf16_scores_match_jaxmoe(backend, interpret, training):
    ours, theirs = _compare_with_jaxmoe(13, 8, training=training, backend=backend, interpret=interpret,
                                        dtype_name="bfloat16")
    # Both gradients are float32 values rounded to bfloat16: equal up to one bf16 rounding step.
    np.testing.assert_allclose(ours[2], theirs[2], rtol=2**-7, atol=1e-6)
    assert ours[3] == jnp.bfloat16


@pytest.mark.parametrize("backend,interpret", BACKENDS)
def test_nan_scores_route_like_jaxmoe(backend, interpret):
    """A NaN score is picked first (jnp.argmax's rule) with a NaN weight; the other round is unaffected."""
    scores = jnp.asarray([[0.5, np.nan, 1.0, 0.2], [1.0, 0.3, np.nan, np.nan]], jnp.float32)
    ours = sparsemixer_top2(scores, jitter_eps=EPS, training=False, backend=backend, interpret=interpret)
    theirs = sparsemixer(scores, jitter_eps=EPS, training=False)
    np.testing.assert_array_equal(np.asarray(ours[1]), np.asarray(theirs[1]))
    np.testing.assert_array_equal(np.asarray(ours[0]), np.asarray(theirs[0]))  # NaN where jaxmoe has NaN


def _bad_calls():
    scores = jnp.zeros((5, 4), jnp.float32)
    noise = _noise(0, 5, 4)
    return {
        "scores_1d": (dict(scores=jnp.zeros((4,)), training=False), "scores must be a float array"),
        "one_expert": (dict(scores=jnp.zeros((5, 1)), training=False), "at least 2 experts"),
        "int_scores": (dict(scores=jnp.zeros((5, 4), jnp.int32), training=False), "dtype int32"),
        "negative_eps": (dict(scores=scores, training=False, jitter_eps=-0.01), "jitter_eps=-0.01"),
        "nan_eps": (dict(scores=scores, training=False, jitter_eps=float("nan")), "jitter_eps=nan"),
        "training_no_noise": (dict(scores=scores, training=True), "draws no random numbers"),
        "noise_three": (dict(scores=scores, training=True, noise=noise[:3]), "tuple of 4 arrays"),
        "exp1_shape": (dict(scores=scores, training=True, noise=(noise[0][:, :3], *noise[1:])),
                       r"exp1 has shape \(5, 3\); expected \(5, 4\)"),
        "u2_shape": (dict(scores=scores, training=True, noise=(*noise[:3], noise[3][:, 0])),
                     r"u2 has shape \(5,\); expected \(5, 1\)"),
        "backend_name": (dict(scores=scores, training=False, backend="triton"), "backend='triton'"),
    }


@pytest.mark.parametrize("case", sorted(_bad_calls()))
def test_bad_inputs_raise_clear_errors(case):
    kwargs, message = _bad_calls()[case]
    kwargs = {"jitter_eps": EPS, **kwargs}
    with pytest.raises(ValueError, match=message):
        sparsemixer_top2(**kwargs)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the Pallas kernel runs natively off CPU")
def test_pallas_on_cpu_needs_interpret():
    with pytest.raises(ValueError, match="interpret=True"):
        sparsemixer_top2(jnp.zeros((5, 4)), jitter_eps=EPS, training=False, backend="pallas")


@pytest.mark.parametrize("platform,target", [("tpu", "tpu_custom_call"), ("cuda", "__gpu$xla.gpu.triton")])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "training"])
def test_kernels_lower_through_mosaic_and_triton(platform, target, training):
    """No TPU or GPU needed: both kernels pass Pallas' lowering to Mosaic (TPU) and to Triton IR (GPU). Whether
    Mosaic and Triton then compile them is only checked on the hardware."""
    tokens, experts = 140, 5
    noise = _noise(0, tokens, experts)

    def loss(scores):
        weights, _ = kernel.sparsemixer_top2(scores, jitter_eps=EPS, training=training, noise=noise, interpret=False)
        return jnp.sum(weights)

    triton_unversioned = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    exported = jax.export.export(jax.jit(jax.value_and_grad(loss)), platforms=[platform],
                                 disabled_checks=[triton_unversioned])(_scores(0, tokens, experts))
    module = exported.mlir_module()
    assert target in module and "_forward_kernel" in module and "_backward_kernel" in module
