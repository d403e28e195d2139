"""Phi-4-multimodal fine-tuning: a step moves exactly the adapters and projectors its batch uses and leaves every
other variable bit-identical, alternating image and audio batches teaches a synthetic image-to-text and
audio-to-text task, a step reports the loss and accuracy of the model's own logits, a repeated step with the same
sizes does not recompile, and misuse fails clearly."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxmoe.models.phi4mm.model import Phi4MultimodalForCausalLM, get_mm_preset
from jaxmoe.models.phi4mm.processor import Phi4MMProcessor
from jaxmoe.models.phi4mm.vision import num_image_tokens
from jaxmoe.nn.lora import LoRAConfig
from jaxmoe.nn.multi_lora import add_adapter
from jaxmoe.train import TrainConfig, make_optimizer
from jaxmoe.train.multimodal import MMBatch, frozen_state, make_mm_optimizer, mm_train_step, trainable_state

CONFIG = get_mm_preset("tiny-mm")
IMAGE, AUDIO = CONFIG.image_token_id, CONFIG.audio_token_id
PROCESSOR = Phi4MMProcessor(size=CONFIG.vision.crop_size, patch_size=CONFIG.vision.patch_size, dynamic_hd=4)
CLASSES = (10, 11, 12)  # answer token of class k
BOS, PROMPT = 1, (7, 8)
ROWS = 6
STEPS = 24  # alternating: 12 image batches, 12 audio batches
LEARNING_RATE = 1e-2
SEED = 0
NORM_SCALE = 10.0
# Which variables each batch kind moves (path pieces, found independently of the module's own grouping).
MOVES = {
    "image": {("adapters", "vision"), ("image_embed", "img_projection_up"), ("image_embed", "img_projection_down")},
    "audio": {("adapters", "speech"), ("audio_embed", "up_proj_for_speech"),
              ("audio_embed", "down_proj_for_speech")},
}
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")


def image_batch(rng) -> MMBatch:
    """Noisy single-colour 56 x 56 images (red, green or blue); the answer is the colour's class token."""
    labels = rng.permutation(np.arange(ROWS) % len(CLASSES))
    base = np.eye(3)[labels][:, None, None, :] * 160 + 40
    images = np.clip(base + rng.uniform(-40, 40, size=(ROWS, 56, 56, 3)), 0, 255).astype(np.uint8)
    out = PROCESSOR.images(list(images))
    n = num_image_tokens(out["image_sizes"], out["image_attention_mask"], CONFIG.vision)[0]
    return _prompts(labels, IMAGE, n)._replace(
        image_pixel_values=out["image_pixel_values"], image_sizes=out["image_sizes"],
        image_attention_mask=out["image_attention_mask"])


def audio_batch(rng) -> MMBatch:
    """0.4 s tones of 300, 1200 or 3500 Hz (random phase and level, light noise); the answer is the pitch class."""
    labels = rng.permutation(np.arange(ROWS) % len(CLASSES))
    t = np.arange(400 + 160 * 39) / 16000  # 40 feature frames -> 5 audio tokens
    waves = [rng.uniform(0.2, 0.8) * np.sin(2 * np.pi * (300, 1200, 3500)[k] * t + rng.uniform(0, 2 * np.pi))
             + 0.01 * rng.normal(size=t.shape) for k in labels]
    out = PROCESSOR.audio(waves, 16000)
    return _prompts(labels, AUDIO, int(out["audio_embed_sizes"][0]))._replace(
        audio_input_features=out["audio_input_features"], audio_embed_sizes=out["audio_embed_sizes"],
        audio_attention_mask=out["audio_attention_mask"])


def _prompts(labels, placeholder: int, count: int) -> MMBatch:
    """[BOS, placeholder x count, *PROMPT, answer] per row; only the answer is a target."""
    ids = np.array([[BOS, *[placeholder] * count, *PROMPT, CLASSES[k]] for k in labels], np.int32)
    loss_mask = np.zeros_like(ids)
    loss_mask[:, -1] = 1
    return MMBatch(ids, loss_mask)


def adapted_model(seed: int) -> Phi4MultimodalForCausalLM:
    """Random tiny model with "vision" and "speech" adapters whose lora_b is non-zero (so lora_a gets gradient)."""
    model = Phi4MultimodalForCausalLM(CONFIG, rngs=nnx.Rngs(seed))
    add_adapter(model, "vision", LoRAConfig(rank=4, alpha=8), rngs=nnx.Rngs(seed + 1))
    add_adapter(model, "speech", LoRAConfig(rank=6, alpha=12), rngs=nnx.Rngs(seed + 2))
    # A random LM's tied embeddings (std 0.02) cap every logit near +-1.3, so that no frozen-base fine-tune could
    # bring the loss far below log(vocab); a trained LM's logits span tens, as this final norm scale makes them.
    model.language_model.norm.weight[...] = np.full(CONFIG.text.hidden_size, NORM_SCALE, np.float32)
    # The audio buffers hold the log-mel statistics of the training data (as in a released checkpoint), here of
    # these tones: without them the encoder sees values around 17 and the pitch is a small part of its input.
    features = audio_batch(np.random.default_rng([seed, 1])).audio_input_features
    model.audio_embed.encoder.global_mean[...] = np.full(80, features.mean(), np.float32)
    model.audio_embed.encoder.global_invstd[...] = np.full(80, 1 / features.std(), np.float32)
    rng = np.random.default_rng(seed)
    for path, var in nnx.state(model, nnx.LoRAParam).flat_state():
        if path[-1] == "lora_b":
            var[...] = rng.normal(0.0, 0.02, var.shape).astype(np.float32)
    return model


def snapshot(node) -> dict:
    """Host copies of every variable of a model or optimizer (the step donates its inputs)."""
    return {path: np.array(var[...], copy=True) for path, var in nnx.state(node).flat_state()}


def changed(before: dict, after: dict) -> set:
    assert before.keys() == after.keys()
    return {path for path in before if not np.array_equal(before[path], after[path])}


def moment_of(path: tuple) -> tuple | None:
    """The parameter path of an AdamW moment's path in the optimizer state (None for other leaves)."""
    for marker in ("mu", "nu"):
        if marker in path:
            return path[path.index(marker) + 1:]
    return None


def moved_by(kind: str, paths) -> set:
    return {p for p in paths if any(pair in zip(p, p[1:]) for pair in MOVES[kind])}


def train(seed: int, steps: int = STEPS) -> dict:
    """Alternating image and audio steps on a fresh model; returns the model and optimizer, the losses per kind, host
    snapshots around the first image and the first audio step, and the compile events of each step."""
    model = adapted_model(seed)
    optimizer = make_mm_optimizer(model, LEARNING_RATE, warmup_steps=0, total_steps=steps, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    losses = {"image": [], "audio": []}
    snapshots, compiles, events = [], [], []

    def listener(name, *args, **kwargs):
        if name in COMPILE_EVENTS:
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for step in range(steps):
            kind = ("image", "audio")[step % 2]
            batch = (image_batch if kind == "image" else audio_batch)(rng)
            if step < 3:  # before and after the first image step and the first audio step
                snapshots.append((snapshot(model), snapshot(optimizer)))
            events.clear()
            losses[kind].append(float(mm_train_step(model, optimizer, batch)["loss"]))
            compiles.append(len(events))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return {"model": model, "optimizer": optimizer, "losses": losses, "snapshots": snapshots, "compiles": compiles}


@pytest.fixture(scope="module")
def run():
    return train(SEED)


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
@pytest.mark.parametrize("step, kind", [(0, "image"), (1, "audio")])
def test_a_step_moves_exactly_the_adapter_and_projector_its_batch_uses(run, step, kind):
    """Image batch: the "vision" adapter and the image projector; audio-only batch: the "speech" adapter and the
    speech projector. Everything else (the other adapter, the other projectors, the language model, both
    encoders, the separators, the audio buffers) stays bit-identical, and so do the AdamW moments of the rest:
    after the image step the "vision" adapter has momentum, which the audio step must not apply."""
    (model_before, optimizer_before), (model_after, optimizer_after) = run["snapshots"][step:step + 2]
    trainable = {path for path, _ in trainable_state(run["model"]).flat_state()}
    expected = moved_by(kind, trainable)
    assert len(expected) == 2 * 4 * 2 + 4  # 2 layers x 4 targets x (lora_a, lora_b) + 2 projector layers x 2
    assert changed(model_before, model_after) == expected
    assert {moment_of(path) for path in changed(optimizer_before, optimizer_after)} - {None} == expected


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_trainable_is_the_adapters_and_projectors_and_only_they_have_optimizer_state(run):
    model = run["model"]
    every = {path for path, _ in nnx.state(model).flat_state()}
    trainable = {path for path, _ in trainable_state(model).flat_state()}
    frozen = {path for path, _ in frozen_state(model).flat_state()}
    assert trainable | frozen == every and not trainable & frozen
    projectors = {p for p in every if p[:2] in {("image_embed", "img_projection_up"), ("image_embed",
                  "img_projection_down")} or p[0] == "audio_embed" and p[1].endswith(("_for_speech",
                                                                                       "_for_vision_speech"))}
    assert trainable == {p for p in every if "adapters" in p} | projectors
    assert len(trainable) == 2 * 4 * 2 * 2 + 6 * 2  # 2 layers x 4 targets x 2 adapters x (a, b) + 6 projector layers
    moments = [moment_of(path) for path, _ in nnx.state(run["optimizer"]).flat_state()]
    assert set(moments) - {None} == trainable
    assert len(moments) - moments.count(None) == 2 * len(trainable)  # AdamW's mu and nu


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_the_loss_falls_on_synthetic_image_and_audio_to_text_tasks(run):
    """From the untrained loss (7 to 10 here) to below log 3, the loss of knowing the three answers but not which:
    the model reads the image's colour and the tone's pitch through the projectors and adapters. Each batch is
    fresh, so this is learning the task, not memorising the batches."""
    for kind, losses in run["losses"].items():
        first, last = losses[0], np.mean(losses[-3:])
        assert last < 0.7 * first, (kind, losses)
        assert last < np.log(len(CLASSES)), (kind, losses)


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_a_repeated_step_with_the_same_sizes_does_not_recompile(run):
    compiles = run["compiles"]
    assert compiles[0] > 0 and compiles[1] > 0  # the listener sees the first image and the first audio compile
    assert compiles[2:] == [0] * (len(compiles) - 2)


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_a_batch_of_image_rows_and_audio_rows_moves_both_adapters_and_the_vision_speech_projector(run):
    """Each row gets its own adapter; next to images the audio goes through the vision-speech projector (the
    batch's mode, as in transformers), so the speech projector stays as it was."""
    rng = np.random.default_rng(1)
    images, audio = image_batch(rng), audio_batch(rng)
    pad = images.input_ids.shape[1] - audio.input_ids.shape[1]
    right_padded = lambda x: np.pad(x[:3], ((0, 0), (0, pad)))  # noqa: E731
    attention_mask = np.concatenate([np.ones_like(images.input_ids[:3]), right_padded(np.ones_like(audio.input_ids))])
    batch = MMBatch(np.concatenate([images.input_ids[:3], right_padded(audio.input_ids)]),
                    np.concatenate([images.loss_mask[:3], right_padded(audio.loss_mask)]), attention_mask,
                    images.image_pixel_values[:3], images.image_sizes[:3], images.image_attention_mask[:3],
                    audio.audio_input_features[:3], audio.audio_embed_sizes[:3], audio.audio_attention_mask[:3])
    before = snapshot(run["model"])
    mm_train_step(run["model"], run["optimizer"], batch)
    trainable = {path for path, _ in trainable_state(run["model"]).flat_state()}
    vision_speech = {p for p in trainable if p[:2] in {("audio_embed", "up_proj_for_vision_speech"),
                                                       ("audio_embed", "down_proj_for_vision_speech")}}
    expected = {p for p in trainable if ("adapters" in p or p[0] == "image_embed")} | vision_speech
    assert changed(before, snapshot(run["model"])) == expected


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_a_step_reports_the_cross_entropy_and_greedy_accuracy_of_the_models_logits_on_the_targets(run):
    """The step's loss, accuracy and tokens are those of the model's own forward before the update, computed in
    NumPy over the loss_mask targets."""
    batch = image_batch(np.random.default_rng(2))
    model = run["model"]
    forward = nnx.jit(lambda model, ids, pixels: model(  # compiled: faster than running the model op by op
        ids, image_pixel_values=pixels, image_sizes=batch.image_sizes,
        image_attention_mask=batch.image_attention_mask).logits)
    logits = np.asarray(forward(model, batch.input_ids, batch.image_pixel_values), np.float64)[:, :-1]
    targets, is_target = batch.input_ids[:, 1:], batch.loss_mask[:, 1:].astype(bool)
    top = logits.max(-1)
    log_z = top + np.log(np.exp(logits - top[..., None]).sum(-1))
    nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    metrics = mm_train_step(model, run["optimizer"], batch)
    assert float(metrics["tokens"]) == ROWS
    np.testing.assert_allclose(float(metrics["loss"]), nll[is_target].mean(), rtol=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx((logits.argmax(-1) == targets)[is_target].mean())


def test_a_model_without_adapters_is_refused():
    model = Phi4MultimodalForCausalLM(CONFIG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="has no LoRA adapters.*add_adapter.*load_peft_adapter"):
        make_mm_optimizer(model, 1e-3)


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_a_loss_mask_of_another_shape_is_refused(run):
    batch = image_batch(np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"loss_mask has shape \[6, 5\] but input_ids has \[6, 17\]"):
        mm_train_step(run["model"], run["optimizer"], batch._replace(loss_mask=batch.loss_mask[:, :5]))
    with pytest.raises(ValueError, match="marks no target token"):
        mm_train_step(run["model"], run["optimizer"], batch._replace(loss_mask=np.zeros_like(batch.loss_mask)))


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_placeholders_that_do_not_match_the_inputs_are_refused(run):
    batch = image_batch(np.random.default_rng(0))
    ids = batch.input_ids.copy()
    ids[0, 1] = 5
    with pytest.raises(ValueError, match=r"hold 77 image placeholder tokens \(id 500\) but the batch's image inputs "
                                         "make 78"):
        mm_train_step(run["model"], run["optimizer"], batch._replace(input_ids=ids))


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_an_optimizer_over_other_parameters_is_refused(run):
    batch = image_batch(np.random.default_rng(0))
    optimizer = make_optimizer(run["model"], TrainConfig(), wrt=nnx.LoRAParam)
    with pytest.raises(ValueError, match="not built by make_mm_optimizer"):
        mm_train_step(run["model"], optimizer, batch)
