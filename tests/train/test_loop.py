"""The training loop: the loss is masked next-token cross-entropy, AdamW learns, evaluate averages per token."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxmoe
from jaxmoe.train import (Batch, TrainConfig, current_learning_rate, evaluate, learning_rate_schedule,
                          make_optimizer, next_token_stats, train_step)
from jaxmoe.train import next_token_loss as eager_next_token_loss

CONFIG = jaxmoe.get_preset("tiny").replace(vocab_size=64, num_layers=1)  # one layer: the loss sees nothing more in two
next_token_loss = nnx.jit(eager_next_token_loss)  # compiling once beats dispatching the model op by op
logits_of = nnx.jit(lambda model, ids: model(ids).logits)


def tiny_model(seed=0):
    return jaxmoe.Phi3ForCausalLM(CONFIG, rngs=nnx.Rngs(seed))


def right_padded_batch(rng, lengths, width):
    """Random tokens, right-padded with id 0; every real token after the first is a target."""
    ids = rng.integers(3, CONFIG.vocab_size, size=(len(lengths), width))
    real = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
    ids = np.where(real, ids, 0)
    return Batch(jnp.asarray(ids, jnp.int32), jnp.asarray(real, jnp.int32), jnp.asarray(real, jnp.int32))


def reference_loss(model, batch):
    """Per-row numpy cross-entropy over each row's unpadded tokens, averaged over all targets."""
    ids, loss_mask, attn = (np.asarray(x) for x in batch[:3])
    total, count = 0.0, 0
    for row, lm, am in zip(ids, loss_mask, attn):
        real = row[am.astype(bool)]
        logits = np.asarray(logits_of(model, jnp.asarray(real[None], jnp.int32))[0], np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        targets = lm[am.astype(bool)][1:].astype(bool)
        nll = -logp[np.arange(len(real) - 1), real[1:]]
        total += nll[targets].sum()
        count += targets.sum()
    return total / count


def test_loss_equals_per_row_cross_entropy_without_padding(rng):
    model = tiny_model()
    batch = right_padded_batch(rng, [10, 6, 3], 10)
    loss, stats = next_token_loss(model, batch)
    assert float(stats["tokens"]) == 9 + 5 + 2
    np.testing.assert_allclose(float(loss), reference_loss(model, batch), rtol=1e-5)


def test_tokens_under_the_mask_do_not_change_the_loss(rng):
    model = tiny_model()
    batch = right_padded_batch(rng, [10, 6, 3], 10)
    loss = float(next_token_loss(model, batch)[0])
    ids = np.asarray(batch.input_ids).copy()
    ids[np.asarray(batch.loss_mask) == 0] = rng.integers(3, CONFIG.vocab_size, size=int((ids == 0).sum()))
    scrambled = float(next_token_loss(model, batch._replace(input_ids=jnp.asarray(ids)))[0])
    assert scrambled == pytest.approx(loss, abs=1e-6)
    # ...while changing a single target token does change it.
    ids[1, 4] = 3 + (ids[1, 4] - 2) % (CONFIG.vocab_size - 3)
    changed = float(next_token_loss(model, batch._replace(input_ids=jnp.asarray(ids)))[0])
    assert abs(changed - loss) > 1e-4


def test_left_padding_is_ignored(rng):
    """A left-padded row has the loss of the same row unpadded."""
    model = tiny_model()
    row = rng.integers(3, CONFIG.vocab_size, size=7)
    plain = Batch(jnp.asarray(row[None], jnp.int32), jnp.ones((1, 7), jnp.int32))
    padded_ids = np.concatenate([rng.integers(3, CONFIG.vocab_size, size=4), row])[None]
    mask = np.concatenate([np.zeros(4), np.ones(7)])[None].astype(np.int32)
    padded = Batch(jnp.asarray(padded_ids, jnp.int32), jnp.asarray(mask), jnp.asarray(mask))
    assert float(next_token_loss(model, padded)[0]) == pytest.approx(float(next_token_loss(model, plain)[0]),
                                                                      abs=1e-5)


def test_next_token_stats_sum_numpy_cross_entropy_and_argmax_hits_over_the_targets(rng):
    """Random logits over left padding, a hole in the loss mask and two packed segments: the sums run over exactly
    the pairs (t, t + 1) where t + 1 is a target and both are real tokens of one segment."""
    b, t, v = 2, 7, 11
    logits = rng.normal(size=(b, t, v)).astype(np.float32)
    ids = rng.integers(0, v, size=(b, t))
    ids[:, 1:4] = logits[:, :3].argmax(-1)  # a few greedy hits
    loss_mask = np.ones((b, t), np.int32)
    loss_mask[0, 4] = 0
    attention = np.ones((b, t), np.int32)
    attention[1, :2] = 0
    segments = np.zeros((b, t), np.int32)
    segments[0, 5:] = 1
    batch = Batch(*(jnp.asarray(x, jnp.int32) for x in (ids, loss_mask, attention, segments)))
    loss_sum = tokens = correct = 0.0
    for i in range(b):
        for j in range(t - 1):
            same_segment = segments[i, j] == segments[i, j + 1]
            if loss_mask[i, j + 1] and attention[i, j] and attention[i, j + 1] and same_segment:
                row = logits[i, j].astype(np.float64)
                loss_sum += np.log(np.exp(row).sum()) - row[ids[i, j + 1]]
                tokens += 1
                correct += row.argmax() == ids[i, j + 1]
    stats = jax.jit(next_token_stats)(jnp.asarray(logits), batch)
    assert tokens == 4 + 4 and correct > 0
    np.testing.assert_allclose(float(stats["loss_sum"]), loss_sum, rtol=1e-5)
    assert float(stats["tokens"]) == tokens and float(stats["correct"]) == correct
    with pytest.raises(ValueError, match=r"logits have shape \(2, 6, 11\) but input_ids have \(2, 7\)"):
        next_token_stats(jnp.asarray(logits[:, :6]), batch)


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_thirty_steps_on_a_fixed_batch_cut_the_loss(rng):
    model = tiny_model()
    config = TrainConfig(learning_rate=1e-2, warmup_steps=3, total_steps=30)
    optimizer = make_optimizer(model, config)
    batch = right_padded_batch(rng, [16, 16, 12, 9], 16)
    start = float(next_token_loss(model, batch)[0])
    losses = [float(train_step(model, optimizer, batch)["loss"]) for _ in range(30)]
    end = float(next_token_loss(model, batch)[0])
    assert losses[0] == pytest.approx(start, rel=1e-5)  # the metrics report the loss before the update
    assert start > 0.8 * np.log(CONFIG.vocab_size)
    assert end < 0.3 * start


def test_step_metrics_report_the_scheduled_rate_and_gradient_norm(rng):
    model = tiny_model()
    config = TrainConfig(learning_rate=1e-3, warmup_steps=4, total_steps=10, final_lr_fraction=0.1)
    optimizer = make_optimizer(model, config)
    batch = right_padded_batch(rng, [8, 5], 8)
    schedule = learning_rate_schedule(config)
    for step in range(10):
        metrics = train_step(model, optimizer, batch)
        assert float(metrics["learning_rate"]) == pytest.approx(float(schedule(step)), rel=1e-6)
        assert float(metrics["grad_norm"]) > 0
    assert float(schedule(4)) == pytest.approx(1e-3)
    assert float(schedule(10)) == pytest.approx(1e-4)


def test_optimizers_of_one_config_share_the_compiled_step(rng):
    """A new model and optimizer with the settings of a step already compiled (each `train` call, each resume in
    one process) run without compiling again: make_optimizer gives equal configs the same optax transformation."""
    config = TrainConfig(learning_rate=1e-3, warmup_steps=4, total_steps=10, final_lr_fraction=0.1)
    batch = right_padded_batch(rng, [8, 5], 8)
    first = tiny_model(0)
    train_step(first, make_optimizer(first, config), batch)
    events = []
    listener = lambda name, *args, **kwargs: events.append(name) if "compile" in name else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        second = tiny_model(1)
        train_step(second, make_optimizer(second, TrainConfig(**dataclasses.asdict(config))), batch)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert events == []


def test_current_learning_rate_reads_the_scheduled_rate_and_refuses_other_optimizers():
    """(The rate after each step is checked through train_step's metrics above.)"""
    model = tiny_model()
    config = TrainConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10)
    assert float(current_learning_rate(make_optimizer(model, config))) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="no scheduled learning rate.*make_optimizer"):
        current_learning_rate(nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param))


def test_norm_gains_are_not_weight_decayed(rng):
    """With a zero gradient (no targets) AdamW only decays; norm gains (1-D) stay exactly as they were."""
    model = tiny_model()
    optimizer = make_optimizer(model, TrainConfig(learning_rate=1e-1, warmup_steps=0, total_steps=5,
                                                  weight_decay=0.5))
    batch = right_padded_batch(rng, [6], 6)._replace(loss_mask=jnp.zeros((1, 6), jnp.int32))
    norm_before = np.asarray(model.norm.weight[...]).copy()
    embed_before = np.asarray(model.embed_tokens.embedding[...]).copy()
    train_step(model, optimizer, batch)
    train_step(model, optimizer, batch)
    np.testing.assert_array_equal(np.asarray(model.norm.weight[...]), norm_before)
    assert np.abs(np.asarray(model.embed_tokens.embedding[...])).sum() < np.abs(embed_before).sum()


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_evaluate_weights_batches_by_their_target_tokens(rng):
    model = tiny_model()
    batches = [right_padded_batch(rng, [10, 4], 10), right_padded_batch(rng, [3], 3)]
    stats = [next_token_loss(model, b)[1] for b in batches]
    result = evaluate(model, batches)
    tokens = sum(float(s["tokens"]) for s in stats)
    assert result["tokens"] == 9 + 3 + 2
    assert result["loss"] == pytest.approx(sum(float(s["loss_sum"]) for s in stats) / tokens, rel=1e-6)
    ids = np.asarray(batches[0].input_ids)
    logits = np.asarray(logits_of(model, batches[0].input_ids))
    hits0 = (logits[0, :9].argmax(-1) == ids[0, 1:10]).sum() + (logits[1, :3].argmax(-1) == ids[1, 1:4]).sum()
    logits1 = np.asarray(logits_of(model, batches[1].input_ids))
    hits1 = (logits1[0, :2].argmax(-1) == np.asarray(batches[1].input_ids)[0, 1:]).sum()
    assert result["accuracy"] == pytest.approx((hits0 + hits1) / tokens)


def test_evaluate_without_targets_is_an_error(rng):
    batch = right_padded_batch(rng, [4], 4)._replace(loss_mask=jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="no target tokens"):
        evaluate(tiny_model(), [batch])


def test_mismatched_mask_shape_is_named(rng):
    batch = right_padded_batch(rng, [4, 3], 4)
    with pytest.raises(ValueError, match="loss_mask has shape"):
        next_token_loss(tiny_model(), batch._replace(loss_mask=batch.loss_mask[:, :3]))


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_moe_model_trains_in_training_mode_with_its_routing_losses(rng):
    """SparseMixer sampling and input jitter (model.train() + rngs) still learn; the aux losses enter the loss."""
    config = jaxmoe.get_preset("tiny-moe").replace(
        vocab_size=64, num_layers=1, moe=jaxmoe.MoEConfig(num_experts=4, aux_loss_coef=0.01, z_loss_coef=0.001))
    model = jaxmoe.PhimoeForCausalLM(config, rngs=nnx.Rngs(0))
    model.train()
    batch = Batch(jnp.asarray(rng.integers(3, 64, size=(4, 16)), jnp.int32), jnp.ones((4, 16), jnp.int32))
    optimizer = make_optimizer(model, TrainConfig(learning_rate=3e-3, warmup_steps=2, total_steps=30))
    rngs = nnx.Rngs(router=1, jitter=2)
    losses = [float(train_step(model, optimizer, batch, rngs)["loss"]) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]

    @nnx.jit  # one compile for both (the MoE model op by op is slow)
    def outputs_and_loss(model, batch):
        out = model(batch.input_ids, rngs=nnx.Rngs(router=5, jitter=6))
        return out, eager_next_token_loss(model, batch, nnx.Rngs(router=5, jitter=6))  # the same draws

    out, (loss, stats) = outputs_and_loss(model, batch)
    ce = stats["loss_sum"] / stats["tokens"]
    assert float(loss) == pytest.approx(float(ce + 0.01 * out.aux_loss + 0.001 * out.router_z_loss), rel=1e-5)
    assert float(out.aux_loss) > 0 and float(out.router_z_loss) > 0
    with pytest.raises(ValueError, match="pass rngs"):
        train_step(model, optimizer, batch)


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_accumulated_micro_batches_take_the_whole_batch_step(rng):
    """[2, b/2, t] micro-batches give the same update as the [b, t] batch (the token-weighted gradient)."""
    batch = right_padded_batch(rng, [12, 5, 9, 3], 12)
    whole, split = tiny_model(), tiny_model()
    # Plain SGD, so the parameter change is the gradient itself (Adam would amplify rounding in tiny entries).
    sgd = lambda m: nnx.Optimizer(m, optax.inject_hyperparams(optax.sgd)(learning_rate=1.0), wrt=nnx.Param)  # noqa: E731
    whole_opt, split_opt = sgd(whole), sgd(split)
    micro = Batch(*(jnp.stack([x[:2], x[2:]]) for x in batch[:3]))
    a = train_step(whole, whole_opt, batch)
    b = train_step(split, split_opt, micro)
    assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-6)
    assert float(a["grad_norm"]) == pytest.approx(float(b["grad_norm"]), rel=1e-5)
    for x, y in zip(jax.tree.leaves(nnx.state(whole, nnx.Param)), jax.tree.leaves(nnx.state(split, nnx.Param))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)


def test_a_packed_row_has_the_loss_of_its_sequences_apart(rng):
    """Two sequences packed in one row (segment ids, restarting positions) = the same two as separate rows."""
    model = tiny_model()
    first, second = rng.integers(3, CONFIG.vocab_size, size=7), rng.integers(3, CONFIG.vocab_size, size=5)
    apart = Batch(jnp.asarray(np.stack([first, np.pad(second, (0, 2))]), jnp.int32),
                  jnp.asarray([[1] * 7, [1] * 5 + [0] * 2], jnp.int32),
                  jnp.asarray([[1] * 7, [1] * 5 + [0] * 2], jnp.int32))
    row = np.concatenate([first, second, [0, 0]])[None]
    segments = np.asarray([[1] * 7 + [2] * 5 + [0] * 2])
    packed = Batch(jnp.asarray(row, jnp.int32), jnp.asarray(segments > 0, jnp.int32),
                   jnp.asarray(segments > 0, jnp.int32), segment_ids=jnp.asarray(segments, jnp.int32))
    loss_apart, stats_apart = next_token_loss(model, apart)
    loss_packed, stats_packed = next_token_loss(model, packed)
    assert float(stats_packed["tokens"]) == float(stats_apart["tokens"]) == 6 + 4  # no target across the seam
    assert float(loss_packed) == pytest.approx(float(loss_apart), rel=1e-5)


def test_linear_schedule_warms_up_then_decays_linearly():
    schedule = learning_rate_schedule(TrainConfig(learning_rate=1.0, warmup_steps=10, total_steps=110,
                                                  final_lr_fraction=0.1, schedule="linear"))
    assert [round(float(schedule(s)), 6) for s in (0, 5, 10, 60, 110)] == [0.0, 0.5, 1.0, 0.55, 0.1]
    with pytest.raises(ValueError, match="schedule='step'"):
        TrainConfig(schedule="step")


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clipping_equals_optax_clip_by_global_norm_below_and_above_the_threshold(max_norm, rng):
    """The scalar-factor clip the optimizer uses gives optax's clipped gradients: unchanged below max_norm (the
    tree's norm is about 8 here), scaled to norm max_norm above it."""
    from jaxmoe.train.loop import clip_by_global_norm

    grads = {"w": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32), "b": jnp.asarray(rng.normal(size=(6,)))}
    ours, _ = clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    want, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    for key in grads:
        np.testing.assert_allclose(np.asarray(ours[key]), np.asarray(want[key]), rtol=2e-7, atol=0)
    assert float(optax.global_norm(ours)) == pytest.approx(min(max_norm, float(optax.global_norm(grads))), rel=1e-6)


@pytest.mark.parametrize("head, wrt", [pytest.param("tied", nnx.Param, id="tied", marks=pytest.mark.slow),
                                       pytest.param("untied_bias", nnx.Param, id="untied_bias"),
                                       pytest.param("tied", nnx.LoRAParam, id="lora_only", marks=pytest.mark.slow)])
def test_a_step_takes_the_gradient_of_the_cross_entropy_of_the_models_logits(head, wrt, rng):
    """train_step's loss never holds the logits (jaxmoe.nn.lm_loss); its loss, accuracy and gradient (plain SGD
    at rate 1: the parameter change) are those of next_token_stats on the model's logits, by autodiff. The rows
    end in greedy continuations, so the accuracy counts hits."""
    config = CONFIG if head == "tied" else CONFIG.replace(tie_word_embeddings=False, lm_head_bias=True)
    model = jaxmoe.Phi3ForCausalLM(config, rngs=nnx.Rngs(0))
    if wrt is nnx.LoRAParam:
        jaxmoe.nn.lora.apply_lora(model, jaxmoe.nn.lora.LoRAConfig(rank=2), rngs=nnx.Rngs(1))
    batch = right_padded_batch(rng, [10, 7, 10], 10)
    ids = np.asarray(batch.input_ids).copy()
    for j in range(4, 9):
        ids[:, j + 1] = np.where(np.asarray(batch.loss_mask)[:, j + 1] > 0,
                                 np.asarray(logits_of(model, jnp.asarray(ids)))[:, j].argmax(-1), ids[:, j + 1])
    batch = batch._replace(input_ids=jnp.asarray(ids))

    def objective(model):
        stats = next_token_stats(model(batch.input_ids, attention_mask=batch.attention_mask).logits, batch)
        return stats["loss_sum"] / stats["tokens"], stats

    (loss, stats), grads = nnx.jit(nnx.value_and_grad(objective, argnums=nnx.DiffState(0, wrt), has_aux=True))(model)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, wrt)))  # copied: the step donates them
    sgd = nnx.Optimizer(model, optax.inject_hyperparams(optax.sgd)(learning_rate=1.0), wrt=wrt)
    metrics = train_step(model, sgd, batch)
    assert float(stats["correct"]) >= 5
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-6)
    assert float(metrics["accuracy"]) == pytest.approx(float(stats["correct"] / stats["tokens"]), rel=1e-6)
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.global_norm(grads)), rel=1e-5)
    changes = jax.tree.map(lambda b, a: b - np.asarray(a), before, nnx.to_pure_dict(nnx.state(model, wrt)))
    for change, grad in zip(jax.tree.leaves(changes), jax.tree.leaves(nnx.to_pure_dict(grads))):
        np.testing.assert_allclose(change, np.asarray(grad), rtol=0, atol=1e-6)
