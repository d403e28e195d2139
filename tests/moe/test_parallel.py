"""moe_ffn_sharded on eight fake CPU devices against the single-device moe_ffn (outputs and gradients), for each
strategy and several meshes; the all-to-all offset helper against a hand-worked case and a simulated exchange;
input errors. XLA:CPU has no kernel for `lax.ragged_all_to_all`: the "ragged_all_to_all" strategy runs here with the
exchange emulated from all_gathers by the primitive's documented semantics, and a separate test checks that the
real primitive is what the strategy lowers to."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxmoe.moe import parallel
from jaxmoe.moe.experts import moe_ffn
from jaxmoe.moe.parallel import STRATEGIES, all_to_all_params, moe_ffn_sharded, resolve_strategy

T, D, F, E, K = 64, 16, 24, 8, 2
MESHES = {  # name -> (shape, axis names) over the 8 fake devices
    "expert8": ((8,), ("expert",)),
    "data2_expert4": ((2, 4), ("data", "expert")),
    "fsdp2_expert2_tensor2": ((2, 2, 2), ("fsdp", "expert", "tensor")),
}


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """`lax.ragged_all_to_all` by its documented semantics, from all_gathers: sender i's rows
    [input_offsets[j], + send_sizes[j]) land in receiver j's output at [output_offsets[j], + send_sizes[j]) (the
    offsets are the sender's); the rest of each output is kept. recv_sizes must be the column of send sizes."""
    rows_in = lax.all_gather(operand, axis_name)  # [sender, m, d]
    starts_in, sizes, starts_out = (lax.all_gather(a, axis_name) for a in (input_offsets, send_sizes, output_offsets))
    me = lax.axis_index(axis_name)
    row = jnp.arange(output.shape[0])
    lo = starts_out[:, me][:, None]
    inside = (row >= lo) & (row < lo + sizes[:, me][:, None])  # [sender, output row]
    sender = jnp.argmax(inside, axis=0)
    source = jnp.clip(starts_in[sender, me] + row - starts_out[sender, me], 0, operand.shape[0] - 1)
    received = jnp.where(inside.any(axis=0)[:, None], rows_in[sender, source], output)
    consistent = jnp.all(recv_sizes == sizes[:, me])
    return jnp.where(consistent, received, jnp.nan)  # a wrong recv_sizes shows as NaN outputs


@pytest.fixture(autouse=True)
def ragged_exchange_on_cpu(monkeypatch):
    monkeypatch.setattr(parallel, "ragged_exchange", emulated_ragged_all_to_all)


def test_the_ragged_strategy_lowers_to_the_ragged_all_to_all_primitive(rng, monkeypatch):
    monkeypatch.setattr(parallel, "ragged_exchange", lax.ragged_all_to_all)
    x, weights, experts, w_gate_up, w_down, _ = make_inputs(rng)
    ffn = jax.jit(functools.partial(moe_ffn_sharded, mesh=make_mesh("data2_expert4"), strategy="ragged_all_to_all"))
    text = ffn.lower(x, weights, experts, w_gate_up, w_down).as_text()
    assert text.count("ragged_all_to_all") >= 2  # there and back


def make_mesh(name, axis_type=jax.sharding.AxisType.Auto):
    shape, names = MESHES[name]
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))


def make_inputs(rng, experts=None):
    x = rng.normal(size=(T, D)).astype(np.float32)
    weights = rng.random((T, K)).astype(np.float32)
    if experts is None:
        experts = np.stack([rng.choice(E, K, replace=False) for _ in range(T)])
    w_gate_up = (rng.normal(size=(E, D, 2 * F)) * 0.3).astype(np.float32)
    w_down = (rng.normal(size=(E, F, D)) * 0.3).astype(np.float32)
    r = rng.normal(size=(T, D)).astype(np.float32)
    return x, weights, experts.astype(np.int32), w_gate_up, w_down, r


def assert_close(actual, expected, rel=1e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel} x max |expected| {scale:.3g}"


def output_and_grads(ffn, x, weights, experts, w_gate_up, w_down, r):
    """y = ffn(...) and the gradients of sum(y · r) w.r.t. x, weights, w_gate_up, w_down, in one compiled call."""
    def run(x, w, wgu, wd, r):
        y, vjp = jax.vjp(lambda x, w, wgu, wd: ffn(x, w, experts, wgu, wd), x, w, wgu, wd)
        return y, vjp(r)
    return jax.jit(run)(x, weights, w_gate_up, w_down, r)


def check_against_single_device(mesh, strategy, x, weights, experts, w_gate_up, w_down, r):
    sharded = functools.partial(moe_ffn_sharded, mesh=mesh, strategy=strategy)
    y, grads = output_and_grads(sharded, x, weights, experts, w_gate_up, w_down, r)
    ref_y, ref_grads = output_and_grads(moe_ffn, x, weights, experts, w_gate_up, w_down, r)
    assert_close(y, ref_y)
    for g, ref in zip(grads, ref_grads, strict=True):
        assert_close(g, ref)


# The default tier: every strategy on the mesh with every kind of axis, all_gather on the others; the slow tier:
# every pair.
@pytest.mark.parametrize("mesh_name,strategy", [
    pytest.param(mesh, strategy, marks=[] if mesh == "fsdp2_expert2_tensor2" or strategy == "all_gather"
                 else [pytest.mark.slow])
    for mesh in sorted(MESHES) for strategy in STRATEGIES])
def test_sharded_output_and_gradients_equal_single_device(rng, mesh_name, strategy):
    check_against_single_device(make_mesh(mesh_name), strategy, *make_inputs(rng))


DEFAULT_HOT = {("first_expert", "all_gather"), ("last_shard", "all_to_all"), ("last_shard", "ragged_all_to_all")}


@pytest.mark.parametrize("hot,strategy", [  # the default tier: each strategy once, each hot spot at least once
    pytest.param(hot, strategy, marks=[] if (hot, strategy) in DEFAULT_HOT else [pytest.mark.slow])
    for hot in ("first_expert", "last_shard") for strategy in STRATEGIES])
def test_every_token_on_one_expert_is_still_dropless(rng, strategy, hot):
    # Expert 0 lives on the first expert shard, expert 7 on the last; the other copy of each token goes to an
    # expert beside it, so one shard receives every copy of every token.
    pair = [0, 0] if hot == "first_expert" else [E - 1, E - 2]
    experts = np.tile(pair, (T, 1))
    check_against_single_device(make_mesh("data2_expert4"), strategy, *make_inputs(rng, experts))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_explicit_axes_mesh_reshards_the_inputs(rng, strategy):
    mesh = make_mesh("fsdp2_expert2_tensor2", jax.sharding.AxisType.Explicit)
    check_against_single_device(mesh, strategy, *make_inputs(rng))


def test_tokens_replicated_over_the_expert_axis(rng):
    # Decoding-style: tokens split over "data" only; each expert shard sees them all and a psum combines.
    mesh = make_mesh("data2_expert4")
    x, weights, experts, w_gate_up, w_down, _ = make_inputs(rng)
    y = jax.jit(functools.partial(moe_ffn_sharded, mesh=mesh, token_axes=("data",), strategy="all_gather"))(
        x, weights, experts, w_gate_up, w_down)
    assert_close(y, moe_ffn(x, weights, experts, w_gate_up, w_down))


def test_all_to_all_params_hand_worked():
    sizes = np.array([[1, 2, 0],
                      [3, 0, 4],
                      [2, 5, 1]])
    input_offsets, send_sizes, output_offsets, recv_sizes = all_to_all_params(sizes, 1)
    np.testing.assert_array_equal(send_sizes, [3, 0, 4])
    np.testing.assert_array_equal(input_offsets, [0, 3, 3])
    np.testing.assert_array_equal(output_offsets, [1, 2, 0])  # after shard 0's chunk at each receiver
    np.testing.assert_array_equal(recv_sizes, [2, 0, 5])
    np.testing.assert_array_equal(all_to_all_params(sizes, 0)[2], [0, 0, 0])
    np.testing.assert_array_equal(all_to_all_params(sizes, 2)[2], [4, 2, 4])


@pytest.mark.parametrize("ep", [1, 2, 5])
def test_all_to_all_params_move_every_row_to_its_receiver(rng, ep):
    # Simulate the ragged exchange: each sender's buffer holds rows labelled (sender, receiver, index) in
    # receiver order; each receiver's buffer must end up with every sender's rows, senders in order, no gaps.
    sizes = rng.integers(0, 6, size=(ep, ep))
    sent = {i: [(i, j, n) for j in range(ep) for n in range(sizes[i, j])] for i in range(ep)}
    received = {j: [None] * sizes[:, j].sum() for j in range(ep)}
    for i in range(ep):
        input_offsets, send_sizes, output_offsets, recv_sizes = all_to_all_params(sizes, i)
        np.testing.assert_array_equal(recv_sizes, sizes[:, i])
        for j in range(ep):
            chunk = sent[i][input_offsets[j]: input_offsets[j] + send_sizes[j]]
            assert all(row[1] == j for row in chunk) and len(chunk) == sizes[i, j]
            for n, row in enumerate(chunk):
                assert received[j][output_offsets[j] + n] is None, "two senders wrote the same row"
                received[j][output_offsets[j] + n] = row
    for j in range(ep):
        assert received[j] == sorted(row for i in range(ep) for row in sent[i] if row[1] == j)
    # Traced (jnp) inputs give the same answer as NumPy.
    for i in range(ep):
        for a, b in zip(jax.jit(all_to_all_params)(jnp.asarray(sizes), jnp.int32(i)), all_to_all_params(sizes, i)):
            np.testing.assert_array_equal(a, b)


def test_auto_strategy_and_unknown_strategy():
    assert resolve_strategy("auto") in STRATEGIES
    with pytest.raises(ValueError, match="strategy='ring'"):
        resolve_strategy("ring")


@pytest.mark.parametrize("mesh_shape,names,kwargs,t,message", [
    ((3,), ("expert",), {}, T, "8 experts do not divide over expert axis 'expert' of size 3"),
    ((8,), ("expert",), {}, 60, "60 tokens do not divide over token axes ('expert',) of total size 8"),
    ((8,), ("expert",), {"strategy": "ring"}, T, "strategy='ring'"),
    ((2, 4), ("data", "experts"), {}, T, "mesh axes ['experts']"),
    ((2, 4), ("tensor", "expert"), {"token_axes": ("tensor", "expert")}, T, "tensor_axis 'tensor' is also in"),
    ((2, 4), ("data", "expert"), {"token_axes": ("data",), "strategy": "all_to_all"}, T,
     "strategy='all_to_all' needs the tokens split over expert axis 'expert'"),
])
def test_bad_inputs_raise_with_the_values(rng, mesh_shape, names, kwargs, t, message):
    mesh = jax.make_mesh(mesh_shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names),
                         devices=jax.devices()[:int(np.prod(mesh_shape))])
    x, weights, experts, w_gate_up, w_down, _ = make_inputs(rng)
    with pytest.raises(ValueError, match=re.escape(message)):
        moe_ffn_sharded(x[:t], weights[:t], experts[:t], w_gate_up, w_down, mesh=mesh, **kwargs)
