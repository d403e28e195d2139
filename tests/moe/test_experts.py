"""moe_ffn (every implementation) against its dense twin, transformers' PhimoeExperts and hand-built NumPy;
the dispatch gathers' custom VJP; input errors. fp32 on CPU."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxmoe.moe.dispatch import permute, route, unpermute
from jaxmoe.config import EXPERT_IMPLEMENTATIONS, MoEConfig
from jaxmoe.moe.experts import IMPLEMENTATIONS, dense_moe_reference, expert_ffn, moe_ffn, split_experts
from pallas_kernels import quantize_weight

D, F, E = 16, 32, 8
IMPLS = sorted(IMPLEMENTATIONS)


def make_params(rng, e=E, d=D, f=F):
    return (np.asarray(rng.normal(size=(e, d, 2 * f)) * 0.3, np.float32),
            np.asarray(rng.normal(size=(e, f, d)) * 0.3, np.float32))


def make_routing(rng, t, kind):
    """(weights [t, 2], experts [t, 2]); 'skewed' piles every token's first copy on expert 3, leaves experts
    1, 2, 4, 6 empty and gives the last expert a few copies at the end of the sorted buffer."""
    if kind == "random":
        experts = np.stack([rng.choice(E, 2, replace=False) for _ in range(t)])
    elif kind == "skewed":
        experts = np.stack([np.full(t, 3), rng.choice([0, 5, 7], size=t, p=[0.8, 0.17, 0.03])], axis=1)
    else:  # "one_pair" / "all_on_3": every token routes to the same experts
        experts = np.tile([0, 1] if kind == "one_pair" else [3, 3], (t, 1))
    return rng.random((t, 2)).astype(np.float32), experts.astype(np.int32)


def assert_close(actual, expected, rel=1e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel} x max |expected| {scale:.3g}"


def loss_and_grads(ffn, x, weights, experts, w_gate_up, w_down, r):
    """sum(ffn(...) · r) and its gradients w.r.t. x, weights, w_gate_up, w_down."""
    loss = lambda x, w, wgu, wd: jnp.sum(ffn(x, w, experts, wgu, wd) * r)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(x, weights, w_gate_up, w_down)


def ffn_for(impl):
    return functools.partial(moe_ffn, implementation=impl)


# The skewed buffer exercises the "blocked" tiling (what "auto" takes on CPU for so many copies); the slow tier
# runs it through every implementation.
@pytest.mark.parametrize("t,kind,impl", [
    pytest.param(t, kind, impl,
                 marks=[pytest.mark.slow] if kind == "skewed" and impl not in ("auto", "blocked") else [])
    for t, kind in [(640, "random"), (640, "skewed"), (5, "random")] for impl in IMPLS])
def test_moe_ffn_and_its_gradients_equal_the_dense_reference(rng, impl, t, kind):
    # t=640 gives 1280 copies: expert 3 in "skewed" needs 512 + 128-row tiles; t=5 is smaller than any tile.
    w_gate_up, w_down = make_params(rng)
    weights, experts = make_routing(rng, t, kind)
    x, r = rng.normal(size=(t, D)).astype(np.float32), rng.normal(size=(t, D)).astype(np.float32)

    y = jax.jit(ffn_for(impl))(x, weights, experts, w_gate_up, w_down)
    assert y.dtype == jnp.float32
    assert_close(y, dense_moe_reference(x, weights, experts, w_gate_up, w_down))
    _, grads = loss_and_grads(ffn_for(impl), x, weights, experts, w_gate_up, w_down, r)
    _, grads_ref = loss_and_grads(dense_moe_reference, x, weights, experts, w_gate_up, w_down, r)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref)


def transformers_experts(w_gate_up, w_down):
    import transformers
    from transformers.models.phimoe.modeling_phimoe import PhimoeExperts

    config = transformers.PhimoeConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                                       num_experts_per_tok=2, hidden_act="silu")
    module = PhimoeExperts(config)
    with torch.no_grad():  # transformers keeps [out, in]: gate_up_proj[e] = concat(gate, up) as [2f, d]
        module.gate_up_proj.copy_(torch.from_numpy(w_gate_up).transpose(1, 2))
        module.down_proj.copy_(torch.from_numpy(w_down).transpose(1, 2))
    return module


@pytest.mark.slow  # the whole model against transformers in the default tier: tests/models/test_phimoe_parity.py
@pytest.mark.parametrize("kind", ["random", "skewed"])
def test_moe_ffn_and_dense_reference_equal_transformers_phimoe_experts(rng, kind):
    t = 300
    w_gate_up, w_down = make_params(rng)
    weights, experts = make_routing(rng, t, kind)
    x, r = rng.normal(size=(t, D)).astype(np.float32), rng.normal(size=(t, D)).astype(np.float32)

    module = transformers_experts(w_gate_up, w_down)
    x_pt = torch.from_numpy(x).requires_grad_(True)
    w_pt = torch.from_numpy(weights).requires_grad_(True)
    y_pt = module(x_pt, torch.from_numpy(experts).long(), w_pt)
    (y_pt * torch.from_numpy(r)).sum().backward()
    expected = [y_pt.detach().numpy(), x_pt.grad.numpy(), w_pt.grad.numpy(),
                module.gate_up_proj.grad.transpose(1, 2).numpy(), module.down_proj.grad.transpose(1, 2).numpy()]

    for ffn in [dense_moe_reference] + [ffn_for(impl) for impl in IMPLS]:
        y = jax.jit(ffn)(x, weights, experts, w_gate_up, w_down)
        _, grads = loss_and_grads(ffn, x, weights, experts, w_gate_up, w_down, r)
        for actual, want in zip([y, *grads], expected):
            assert_close(actual, want)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["one_pair", "all_on_3"])
def test_dropless_path_keeps_every_copy_when_all_tokens_pick_the_same_experts(rng, impl, kind):
    t = 700  # all_on_3: 1400 copies on one expert, two per token
    w_gate_up, w_down = make_params(rng)
    weights, experts = make_routing(rng, t, kind)
    x = rng.normal(size=(t, D)).astype(np.float32)
    dispatch = route(jnp.asarray(experts), E)
    assert int(dispatch.group_sizes_e.sum()) == 2 * t and bool(dispatch.kept_tk.all())
    y = jax.jit(ffn_for(impl))(x, weights, experts, w_gate_up, w_down)
    assert_close(y, dense_moe_reference(x, weights, experts, w_gate_up, w_down))
    assert np.abs(np.asarray(y)).min(axis=1).all()  # no token's output is zero


def numpy_expert(x_d, w_gate_up_d2f, w_down_fd):
    h = x_d.astype(np.float64) @ w_gate_up_d2f
    gate, up = h[:F], h[F:]
    return (gate / (1 + np.exp(-gate)) * up) @ w_down_fd


@pytest.mark.parametrize("impl", IMPLS)
def test_capacity_keeps_each_experts_first_copies_in_token_order_and_drops_the_rest(rng, impl):
    t, k, capacity_factor = 24, 2, 0.75  # capacity = ceil(48 / 8 · 0.75) = 5 copies per expert
    w_gate_up, w_down = make_params(rng)
    x = rng.normal(size=(t, D)).astype(np.float32)
    experts = np.stack([rng.choice([0, 1, 2, 5], 2, replace=False, p=[0.4, 0.3, 0.2, 0.1]) for _ in range(t)])
    experts = experts.astype(np.int32)
    weights = rng.random((t, k)).astype(np.float32)

    kept, seen, expected = np.zeros((t, k), bool), np.zeros(E, int), np.zeros((t, D))
    for token in range(t):
        for slot in range(k):
            e = experts[token, slot]
            kept[token, slot] = seen[e] < 5
            seen[e] += 1
            if kept[token, slot]:
                expected[token] += weights[token, slot] * numpy_expert(x[token], w_gate_up[e], w_down[e])
    assert 0 < kept.sum() < t * k

    np.testing.assert_array_equal(route(jnp.asarray(experts), E, capacity_factor=capacity_factor).kept_tk, kept)
    y = jax.jit(functools.partial(moe_ffn, capacity_factor=capacity_factor, implementation=impl))(
        x, weights, experts, w_gate_up, w_down)
    assert_close(y, expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_expert_ffn_sends_each_group_through_its_expert_and_zeroes_rows_past_the_groups(rng, impl):
    sizes = np.array([170, 0, 3, 130, 0, 64, 1, 0], np.int32)  # 368 of 400 rows in groups
    w_gate_up, w_down = make_params(rng)
    x = rng.normal(size=(400, D)).astype(np.float32)
    expected, start = np.zeros((400, D)), 0
    for e, size in enumerate(sizes):
        for row in range(start, start + size):
            expected[row] = numpy_expert(x[row], w_gate_up[e], w_down[e])
        start += size
    out = jax.jit(functools.partial(expert_ffn, implementation=impl))(x, w_gate_up, w_down, sizes)
    assert_close(out, expected)


def test_permute_and_unpermute_backward_equal_plain_gather_autodiff_without_scatter_add(rng):
    t, k = 50, 2
    _, experts = make_routing(rng, t, "random")
    dispatch = route(jnp.asarray(experts), E)
    x = rng.normal(size=(t, D)).astype(np.float32)
    out_md = rng.normal(size=(t * k, D)).astype(np.float32)
    cot_md = rng.normal(size=(t * k, D)).astype(np.float32)
    cot_td = rng.normal(size=(t, D)).astype(np.float32)
    weights = rng.random((t, k)).astype(np.float32)

    token_m = dispatch.sorted_copy_m // k
    (dx,) = jax.vjp(lambda x: permute(x, dispatch), x)[1](cot_md)
    (dx_plain,) = jax.vjp(lambda x: x[token_m], x)[1](cot_md)
    np.testing.assert_allclose(dx, dx_plain, rtol=1e-6, atol=1e-6)
    plain_combine = lambda o, w: jnp.sum(o[dispatch.sorted_pos_tk] * w[..., None], axis=1)  # noqa: E731
    grads = jax.vjp(lambda o, w: unpermute(o, w, dispatch), out_md, weights)[1](cot_td)
    grads_plain = jax.vjp(plain_combine, out_md, weights)[1](cot_td)
    for g, g_plain in zip(grads, grads_plain):
        np.testing.assert_allclose(g, g_plain, rtol=1e-6, atol=1e-6)

    def float_scatter_adds(fn, *args):  # the printed jaxpr shows every nested loop, branch and custom-VJP body
        return re.findall(r":f32\[[\d,]*\] = scatter-add", str(jax.make_jaxpr(fn)(*args)))

    # The plain gather's autodiff is a scatter-add; the custom VJP is gathers and a sum.
    assert float_scatter_adds(jax.grad(lambda x: jnp.sum(x[token_m] * cot_md)), x)
    assert not float_scatter_adds(jax.grad(lambda x: jnp.sum(permute(x, dispatch) * cot_md)), x)
    assert float_scatter_adds(jax.grad(lambda o: jnp.sum(plain_combine(o, weights) * cot_td)), out_md)
    assert not float_scatter_adds(jax.grad(lambda o: jnp.sum(unpermute(o, weights, dispatch) * cot_td)), out_md)
    # Nor anywhere in the blocked moe_ffn backward (weight gradients accumulate with dynamic_update_slice);
    # the only scatter-add left is bincount's, on the int32 group sizes.
    w_gate_up, w_down = make_params(rng)
    loss = lambda x, wgu, wd: jnp.sum(moe_ffn(x, weights, experts, wgu, wd, implementation="blocked"))  # noqa: E731
    assert not float_scatter_adds(jax.grad(loss, argnums=(0, 1, 2)), x, w_gate_up, w_down)


@pytest.mark.parametrize("change,match", [
    (dict(experts=np.array([[0, 8], [1, 2]], np.int32)), r"\[8\] outside \[0, 8\)"),
    (dict(experts=np.array([[-1, 3], [1, 2]], np.int32)), r"\[-1\] outside \[0, 8\)"),
    (dict(weights=np.ones((2, 3), np.float32)), r"k=3 .*\(2, 3\).* k=2 .*\(2, 2\)"),
    (dict(w_down=np.ones((E, F + 1, D), np.float32)), r"\(8, 33, 16\).*\(8, 32, 16\).*\(8, 16, 64\)"),
    (dict(x=np.ones((2, D + 1), np.float32)), r"\(8, 16, 64\).*\(2, 17\)"),
    (dict(experts=np.ones((3, 2), np.int32)), r"\(2, 16\).*\(2, 2\).*\(3, 2\)"),
    (dict(experts=np.ones((2, 2), np.float32)), "float32"),
    (dict(implementation="megablox"), r"'megablox'.*\['blocked', 'decode', 'decode_int8', 'pallas', 'xla_ragged'\]"),
    (dict(capacity_factor=0.0), r"capacity_factor=0\.0"),
])
def test_bad_inputs_raise_value_errors_that_name_the_values(rng, change, match):
    w_gate_up, w_down = make_params(rng)
    args = dict(x=np.ones((2, D), np.float32), weights=np.ones((2, 2), np.float32),
                experts=np.array([[0, 1], [2, 3]], np.int32), w_gate_up=w_gate_up, w_down=w_down)
    args.update(change)
    options = {key: args.pop(key) for key in ("implementation", "capacity_factor") if key in args}
    with pytest.raises(ValueError, match=match):
        moe_ffn(args["x"], args["weights"], args["experts"], args["w_gate_up"], args["w_down"], **options)


def test_the_config_knows_every_expert_implementation():
    assert set(EXPERT_IMPLEMENTATIONS) == {"auto", *IMPLEMENTATIONS}
    with pytest.raises(ValueError, match=r"expert_implementation='megablox'.*'decode_int8'"):
        MoEConfig(num_experts=4, expert_implementation="megablox")


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("impl", ["decode", "decode_int8", "blocked"])
def test_per_expert_buffers_give_the_stacked_weights_result(rng, impl, bits):
    """split_experts: the decode paths read each expert's own buffer (a switch over the experts), the others
    stack them back; either way the output is the stacked weights' (decode_int8 rounds its activations alike)."""
    w_gate_up, w_down = make_params(rng)
    if bits is not None:
        w_gate_up, w_down = (quantize_weight(jnp.asarray(w), bits=bits, group_size=16) for w in (w_gate_up, w_down))
    weights, experts = make_routing(rng, 5, "random")
    x = rng.normal(size=(5, D)).astype(np.float32)
    ffn = jax.jit(functools.partial(moe_ffn, implementation=impl))
    split = split_experts(w_gate_up), split_experts(w_down)
    assert split[0].shape == (E, D, 2 * F) and len(split[0].parts) == E
    np.testing.assert_allclose(ffn(x, weights, experts, *split), ffn(x, weights, experts, w_gate_up, w_down),
                               rtol=1e-6, atol=1e-6)


def test_generate_splits_the_experts_only_for_a_decode_sized_batch():
    import jaxmoe
    from flax import nnx

    from jaxmoe.moe.experts import PerExpertWeights
    from jaxmoe.moe.layer import SparseMoeBlock, split_experts_for_decode

    def split_blocks(model, tokens):
        split_experts_for_decode(model, tokens)
        return [isinstance(node.w_gate_up.get_value(), PerExpertWeights) for _, node in nnx.iter_graph(model)
                if isinstance(node, SparseMoeBlock)]

    config = jaxmoe.get_preset("tiny-moe").replace(vocab_size=64, num_layers=2)
    assert split_blocks(jaxmoe.PhimoeForCausalLM(config, rngs=nnx.Rngs(0)), 4) == [True, True]
    assert split_blocks(jaxmoe.PhimoeForCausalLM(config, rngs=nnx.Rngs(0)), 33) == [False, False]  # 66 copies
    blocked = config.replace(moe=dataclasses.replace(config.moe, expert_implementation="blocked"))
    assert split_blocks(jaxmoe.PhimoeForCausalLM(blocked, rngs=nnx.Rngs(0)), 4) == [False, False]
