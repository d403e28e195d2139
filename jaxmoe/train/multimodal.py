"""Fine-tuning Phi-4-multimodal as it was trained: the language model and the encoders frozen, only the LoRA
adapters and the modality projectors learn (../shared/docs/phi_models.md §3.1, §3.5).

    add_adapter(model, "vision", LoRAConfig(rank=..., alpha=...), rngs=rngs)     # or load_peft_adapter
    optimizer = make_mm_optimizer(model, 1e-4, warmup_steps=50, total_steps=2000)
    for batch in batches:                                          # MMBatch: ids, loss_mask, processor outputs
        metrics = mm_train_step(model, optimizer, batch)

`TRAINABLE` selects what learns: every adapter matrix (`nnx.LoRAParam`) and the projectors' kernels and biases
(`image_embed.img_projection_up/_down`, `audio_embed.{up,down}_proj_for_speech` and `_for_vision_speech`).
Everything else stays bit-identical and has no optimizer state: the language model's weights, both encoders,
the audio normalisation buffers, and the image separators (`global_/sub_img_feature_extensor`). The separators
are pretrained embeddings that mark the tile-row and global/sub-image boundaries for every task alike; the
projector that reads them learns, so it can re-map them if a task needs that.

A step moves only what its batch uses, like torch's AdamW skipping parameters whose gradient is None: the adapter
of each row's input mode ("vision" for rows with images, "speech" for audio-only rows), the image projector when
the batch has images, and the audio projector of the batch's mode ("vision_speech" next to images, else
"speech"). The others keep their values and their AdamW moments, so alternating vision and speech batches
neither decays nor drifts (by momentum) the adapter that a batch does not touch. The moments' step count and the
learning-rate schedule are shared and advance every step.

The sizes that set token counts (image_sizes, image_attention_mask, audio_embed_sizes) must be host values (see
jaxmoe/models/phi4mm/vision.py, audio.py): the step is compiled once per distinct value of them (and per set of
used adapters and projectors), with them as constants and the pixels, audio features, ids and masks traced.
Batches that keep their images' and clips' sizes fixed (or bucketed) compile once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxmoe.models.phi4mm.model import ADAPTERS, MODE_ADAPTER, Phi4MultimodalForCausalLM
from jaxmoe.models.phi4mm.vision import num_image_tokens
from jaxmoe.nn.multi_lora import adapter_names
from jaxmoe.train.loop import Batch, TrainConfig, current_learning_rate, make_optimizer, next_token_stats_from_hidden

__all__ = ["MMBatch", "TRAINABLE", "frozen_state", "make_mm_optimizer", "mm_train_step", "trainable_state"]

# (owner, layer) -> its projector: "image", or the audio projector "speech" (audio alone) / "vision_speech" (audio
# next to images).
_PROJECTORS = {
    ("image_embed", "img_projection_up"): "image", ("image_embed", "img_projection_down"): "image",
    ("audio_embed", "up_proj_for_speech"): "speech", ("audio_embed", "down_proj_for_speech"): "speech",
    ("audio_embed", "up_proj_for_vision_speech"): "vision_speech",
    ("audio_embed", "down_proj_for_vision_speech"): "vision_speech",
}


def _group(path: tuple) -> tuple[str, str] | None:
    """("adapter", name) for an adapter matrix, ("projector", which) for a projector parameter, else None."""
    for owner, name in zip(path, path[1:]):
        if owner == "adapters":
            return ("adapter", name)
        if (owner, name) in _PROJECTORS:
            return ("projector", _PROJECTORS[owner, name])
    return None


def _on_projector(path: tuple, value) -> bool:
    group = _group(path)
    return group is not None and group[0] == "projector"


# The parameters fine-tuning trains (an nnx filter): the LoRA adapters and the modality projectors.
TRAINABLE = nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, _on_projector))


def trainable_state(model: nnx.Module) -> nnx.State:
    """The model's `TRAINABLE` variables (adapters and projectors)."""
    return nnx.state(model, TRAINABLE)


def frozen_state(model: nnx.Module) -> nnx.State:
    """Every other variable of the model: language model, encoders, separators, buffers."""
    return nnx.state(model, nnx.Not(TRAINABLE))


class MMBatch(NamedTuple):
    """One fine-tuning batch.

    input_ids int [b, t] with the image / audio placeholders expanded (Phi4MMProcessor.expand_prompt);
    loss_mask [b, t], 1 where token t is a target (the answer tokens: its prediction, the logits at t - 1,
    counts in the loss); attention_mask [b, t], 1 = real token (None: no padding). The image and audio fields are
    the processor's outputs (`Phi4MMProcessor.images` without num_img_tokens, `.audio`), in the order their
    placeholders appear; image_sizes, image_attention_mask and audio_embed_sizes must be host (NumPy) values.
    """

    input_ids: np.ndarray | jax.Array
    loss_mask: np.ndarray | jax.Array
    attention_mask: np.ndarray | jax.Array | None = None
    image_pixel_values: np.ndarray | jax.Array | None = None
    image_sizes: np.ndarray | None = None
    image_attention_mask: np.ndarray | None = None
    audio_input_features: np.ndarray | jax.Array | None = None
    audio_embed_sizes: np.ndarray | None = None
    audio_attention_mask: np.ndarray | jax.Array | None = None


_HOST_FIELDS = ("image_sizes", "image_attention_mask", "audio_embed_sizes")
_TRACED_FIELDS = ("input_ids", "loss_mask", "attention_mask", "image_pixel_values", "audio_input_features",
                  "audio_attention_mask")


@dataclasses.dataclass(frozen=True)
class _Host:
    """The step's compile key: the host-side sizes (dtype, shape, bytes) and the groups the batch trains."""

    constants: tuple[tuple[str, str, tuple[int, ...], bytes] | None, ...]
    used: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, batch: MMBatch, used) -> "_Host":
        constants = []
        for name in _HOST_FIELDS:
            value = getattr(batch, name)
            if value is None:
                constants.append(None)
            else:
                array = np.ascontiguousarray(value)
                constants.append((name, array.dtype.str, array.shape, array.tobytes()))
        return cls(tuple(constants), tuple(sorted(used)))

    def arrays(self) -> dict[str, np.ndarray | None]:
        out = dict.fromkeys(_HOST_FIELDS)
        for entry in self.constants:
            if entry is not None:
                name, dtype, shape, data = entry
                out[name] = np.frombuffer(data, dtype).reshape(shape)
        return out


def _check_model(model, what: str) -> None:
    if not isinstance(model, Phi4MultimodalForCausalLM):
        raise TypeError(f"{what}: model is a {type(model).__name__}; expected a Phi4MultimodalForCausalLM "
                        "(for text-only models use jaxmoe.train.make_optimizer / train_step)")
    names = adapter_names(model)
    if not names:
        raise ValueError(f"{what}: the model has no LoRA adapters, so fine-tuning would train the projectors only; "
                         "add them first with jaxmoe.nn.multi_lora.add_adapter(model, 'vision', LoRAConfig(rank=..., "
                         "alpha=...), rngs=...) (and 'speech'), or load the released ones with load_peft_adapter")
    if not set(names) & set(ADAPTERS):
        raise ValueError(f"{what}: the model's adapters are {list(names)}, but it applies only adapters named "
                         f"{list(ADAPTERS)} (by each row's input mode); add or load them under those names")


def make_mm_optimizer(model: Phi4MultimodalForCausalLM, learning_rate: float, **settings) -> nnx.Optimizer:
    """AdamW (jaxmoe.train.make_optimizer: warmup, cosine or linear decay, global-norm clipping) over the
    model's `TRAINABLE` parameters only; the frozen ones get no optimizer state.

    settings: any other `TrainConfig` field (warmup_steps, total_steps, weight_decay, clip_norm, b1, b2, ...),
    with TrainConfig's defaults. Raises ValueError when the model has no "vision" / "speech" adapter yet.
    """
    _check_model(model, "make_mm_optimizer")
    return make_optimizer(model, TrainConfig(learning_rate=learning_rate, **settings), wrt=TRAINABLE)


def _host(value, name: str) -> np.ndarray:
    if isinstance(value, jax.core.Tracer):
        raise ValueError(f"MMBatch.{name} is a traced value; call mm_train_step outside jax.jit (it compiles "
                         "itself) with host arrays")
    return np.asarray(value)


def _check_batch(model: Phi4MultimodalForCausalLM, batch: MMBatch) -> set[tuple[str, str]]:
    """Checks the batch on the host; returns the adapter and projector groups it trains."""
    if not isinstance(batch, MMBatch):
        raise TypeError(f"batch is a {type(batch).__name__}; expected an MMBatch(input_ids, loss_mask, ...)")
    c = model.config
    ids = _host(batch.input_ids, "input_ids")
    if ids.ndim != 2 or ids.shape[1] < 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"MMBatch.input_ids is {ids.dtype} {list(ids.shape)}; expected integers [batch, time] "
                         "with time >= 2")
    for name in ("loss_mask", "attention_mask"):
        value = getattr(batch, name)
        if value is not None and tuple(np.shape(value)) != ids.shape:
            raise ValueError(f"MMBatch.{name} has shape {list(np.shape(value))} but input_ids has {list(ids.shape)}; "
                             "expected one entry per token")
    loss_mask = _host(batch.loss_mask, "loss_mask")
    if not loss_mask[:, 1:].any():
        raise ValueError("MMBatch.loss_mask marks no target token after position 0, so the step would learn "
                         "nothing; set it to 1 on the answer tokens")

    has_image = batch.image_pixel_values is not None
    image_fields = [getattr(batch, n) is not None for n in ("image_pixel_values", "image_sizes",
                                                            "image_attention_mask")]
    if any(image_fields) and not all(image_fields):
        raise ValueError("MMBatch: image_pixel_values, image_sizes and image_attention_mask come together (the "
                         "processor's images(...) returns all three); give all or none")
    if (batch.audio_input_features is None) != (batch.audio_embed_sizes is None) or (
            batch.audio_attention_mask is not None and batch.audio_input_features is None):
        raise ValueError("MMBatch: audio_input_features needs audio_embed_sizes (and audio_attention_mask goes with "
                         "them); the processor's audio(...) returns them together")
    has_audio = batch.audio_input_features is not None
    image_tokens = sum(num_image_tokens(_host(batch.image_sizes, "image_sizes"),
                                        _host(batch.image_attention_mask, "image_attention_mask"), c.vision)
                       ) if has_image else 0
    audio_tokens = int(_host(batch.audio_embed_sizes, "audio_embed_sizes").sum()) if has_audio else 0
    for what, token, expected in (("image", c.image_token_id, image_tokens), ("audio", c.audio_token_id,
                                                                               audio_tokens)):
        found = int((ids == token).sum())
        if found != expected:
            raise ValueError(f"MMBatch.input_ids hold {found} {what} placeholder tokens (id {token}) but the batch's "
                             f"{what} inputs make {expected}; expand each placeholder with "
                             "Phi4MMProcessor.expand_prompt and pass the inputs in placeholder order")

    used = {("adapter", ADAPTERS[i]) for i in MODE_ADAPTER[np.asarray(model.input_modes(ids))] if i >= 0}
    if has_image:
        used.add(("projector", "image"))
    if has_audio:
        used.add(("projector", "vision_speech" if has_image else "speech"))
    return used


def mm_train_step(model: Phi4MultimodalForCausalLM, optimizer: nnx.Optimizer, batch: MMBatch
                  ) -> dict[str, jax.Array]:
    """One AdamW step, in place, on the `TRAINABLE` parameters that `batch` uses (see the module docstring);
    the gradient is taken with respect to those only. Call it outside jit: it compiles itself, once per distinct
    image_sizes / image_attention_mask / audio_embed_sizes value.

    Returns float32 scalars: loss (mean next-token cross-entropy on the loss_mask targets), grad_norm (before
    clipping), learning_rate (the rate this step used), accuracy (greedy next-token, on the targets), tokens.
    """
    if not isinstance(model, Phi4MultimodalForCausalLM):  # adapters were checked when the optimizer was built
        raise TypeError(f"mm_train_step: model is a {type(model).__name__}; expected a Phi4MultimodalForCausalLM "
                        "(for text-only models use jaxmoe.train.train_step)")
    if getattr(optimizer, "wrt", None) is not TRAINABLE:
        raise ValueError("mm_train_step: the optimizer was not built by make_mm_optimizer (its wrt is "
                         f"{getattr(optimizer, 'wrt', None)!r}, not jaxmoe.train.multimodal.TRAINABLE); build it "
                         "with make_mm_optimizer(model, learning_rate, ...)")
    host = _Host.of(batch, _check_batch(model, batch))
    traced = {name: getattr(batch, name) for name in _TRACED_FIELDS}
    traced["input_ids"] = jnp.asarray(traced["input_ids"], jnp.int32)
    return _mm_step(model, optimizer, traced, host)


def _untouched(path: tuple, used: tuple) -> bool:
    group = _group(path)
    return group is not None and group not in used


def _values(node, keep) -> dict:
    """{path: value} of the node's variables whose path `keep` accepts."""
    return {path: var[...] for path, var in nnx.state(node).flat_state() if keep(path)}


def _restore(node, values: dict) -> None:
    for path, var in nnx.state(node).flat_state():
        if path in values:
            var[...] = values[path]


@functools.partial(nnx.jit, donate_argnames=("model", "optimizer"),  # update parameters and moments in place
                   static_argnames=("host",))
def _mm_step(model: Phi4MultimodalForCausalLM, optimizer: nnx.Optimizer, traced: dict, host: _Host
             ) -> dict[str, jax.Array]:
    constants = host.arrays()
    targets = Batch(traced["input_ids"], traced["loss_mask"], traced["attention_mask"])

    def objective(model):
        out = model(traced["input_ids"], attention_mask=traced["attention_mask"],
                    image_pixel_values=traced["image_pixel_values"], image_sizes=constants["image_sizes"],
                    image_attention_mask=constants["image_attention_mask"],
                    audio_input_features=traced["audio_input_features"],
                    audio_embed_sizes=constants["audio_embed_sizes"],
                    audio_attention_mask=traced["audio_attention_mask"], return_hidden=True)
        stats = next_token_stats_from_hidden(out.hidden_states, model.output_head(), targets)
        return stats["loss_sum"] / jnp.maximum(stats["tokens"], 1.0), stats

    (loss, stats), grads = nnx.value_and_grad(objective, argnums=nnx.DiffState(0, TRAINABLE),
                                                has_aux=True)(model)
    # What the batch does not use keeps its values and its moments, which the update would otherwise decay and
    # apply. The optimizer state holds each moment under its parameter's path (mu/<path>, nu/<path>).
    untouched = {path for path, _ in nnx.state(model, TRAINABLE).flat_state() if _untouched(path, host.used)}
    depths = {len(path) for path in untouched}
    kept_params = _values(model, lambda path: path in untouched)
    kept_moments = _values(optimizer, lambda path: any(path[-n:] in untouched for n in depths))
    optimizer.update(model, grads)
    _restore(model, kept_params)
    _restore(optimizer, kept_moments)
    tokens = stats["tokens"]
    return {"loss": loss, "grad_norm": optax.global_norm(grads), "learning_rate": current_learning_rate(optimizer),
            "accuracy": stats["correct"] / jnp.maximum(tokens, 1.0), "tokens": tokens}
