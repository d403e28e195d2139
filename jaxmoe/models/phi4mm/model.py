"""Phi-4-multimodal (`Phi4MultimodalForCausalLM`, model_type `phi4_multimodal`): the Phi-4-mini decoder reading
text with image and audio features spliced in at their placeholder tokens, plus one LoRA adapter per modality.

The forward pass (../shared/docs/phi_models.md §3.4, §3.5): embed the ids; overwrite the rows of image placeholder
ids with the image features and those of audio placeholder ids with the audio features, each in order; run the
language model with, in every batch row, the adapter of that row's input mode (language: none; vision and
vision+speech: "vision"; speech: "speech"). Adapters are added with `jaxmoe.io.peft.load_peft_adapter`
(the `vision-lora` / `speech-lora` folders) or `add_adapter`; without them the model is transformers'
Phi4MultimodalForCausalLM, which has no LoRA inside.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.config import ModelConfig, get_preset, require
from jaxmoe.models.outputs import CausalLMOutput
from jaxmoe.models.phi3 import Phi3ForCausalLM
from jaxmoe.models.phi4mm.audio import AudioConfig, AudioEmbedding
from jaxmoe.models.phi4mm.vision import ImageEmbedding, VisionConfig
from jaxmoe.nn.attention import KVCache
from jaxmoe.nn.lm_loss import OutputHead
from jaxmoe.nn.multi_lora import adapter_names, select_adapters

__all__ = ["ADAPTERS", "InputMode", "MM_PRESETS", "MODE_ADAPTER", "Phi4MMConfig", "Phi4MultimodalForCausalLM",
           "get_mm_preset"]


class InputMode(enum.IntEnum):
    """What a row holds (the original model's `input_mode`); it picks the row's LoRA adapter."""

    LANGUAGE = 0
    VISION = 1
    SPEECH = 2
    VISION_SPEECH = 3


ADAPTERS = ("vision", "speech")
# The adapter each InputMode selects, as an index into ADAPTERS (-1: no adapter).
MODE_ADAPTER = np.array([-1, 0, 1, 0], np.int32)


@dataclasses.dataclass(frozen=True, slots=True)
class Phi4MMConfig:
    """The language model (Phi-4-mini's architecture) and the vision and audio encoders. The placeholder ids
    live where transformers keeps them, vision.image_token_id and audio.audio_token_id; `image_token_id` and
    `audio_token_id` read them."""

    text: ModelConfig
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    audio: AudioConfig = dataclasses.field(default_factory=AudioConfig)

    def __post_init__(self):
        for name, kind in (("text", ModelConfig), ("vision", VisionConfig), ("audio", AudioConfig)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"invalid Phi4MMConfig: {name} is a {type(getattr(self, name)).__name__}; expected "
                                f"a {kind.__name__}")
        need = functools.partial(require, self)
        need(self.text.moe is None, "text.moe is set; the Phi-4-multimodal language model is dense")
        vocab = self.text.vocab_size
        for name, value in (("vision.image_token_id", self.image_token_id),
                            ("audio.audio_token_id", self.audio_token_id)):
            need(isinstance(value, int) and 0 <= value < vocab,
                 f"{name}={value!r}; expected a token id in [0, text.vocab_size={vocab})")
        need(self.image_token_id != self.audio_token_id, f"vision.image_token_id and audio.audio_token_id are both "
             f"{self.image_token_id}; the placeholders must differ")

    @property
    def image_token_id(self) -> int:
        """The image placeholder id (vision.image_token_id)."""
        return self.vision.image_token_id

    @property
    def audio_token_id(self) -> int:
        """The audio placeholder id (audio.audio_token_id)."""
        return self.audio.audio_token_id

    @property
    def model_type(self) -> str:
        return "phi4_multimodal"

    def replace(self, **changes) -> "Phi4MMConfig":
        return dataclasses.replace(self, **changes)


MM_PRESETS: dict[str, Phi4MMConfig] = {
    # Phi-4-multimodal-instruct: Phi-4-mini, SigLIP-400M-shaped vision, 24-block conformer (relative-position table
    # [1000, 16], i.e. bias_max_distance 500).
    "phi4-mm": Phi4MMConfig(text=get_preset("phi4-mini"), vision=VisionConfig(),
                            audio=AudioConfig(bias_max_distance=500)),
    # Tiny shapes for tests: the same structure throughout (GQA, partial rotary, LongRoPE, tied embeddings; 56-pixel
    # crops of 4 x 4 patches -> 2 x 2 tokens; a 2-block conformer).
    "tiny-mm": Phi4MMConfig(
        text=get_preset("tiny"),
        vision=VisionConfig(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2, image_size=56,
                            patch_size=14, crop_size=56, image_token_id=500),
        audio=AudioConfig(hidden_size=32, intermediate_size=48, num_blocks=2, num_heads=2, nemo_conv_channels=16,
                          ext_pw_out_channel=32, depthwise_separable_out_channel=32, bias_max_distance=20,
                          audio_token_id=501)),
}


def get_mm_preset(name: str) -> Phi4MMConfig:
    """Returns the named Phi-4-multimodal preset; raises KeyError naming the known ones."""
    try:
        return MM_PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown multimodal preset {name!r}; known presets: {', '.join(sorted(MM_PRESETS))}") from None


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


class Phi4MultimodalForCausalLM(nnx.Module):
    """Token ids plus optional image / audio processor outputs -> logits. `dtype` is the compute dtype (default:
    the parameters'), `param_dtype` the storage. Submodules: `language_model` (a Phi3ForCausalLM, where the
    LoRA adapters go), `image_embed`, `audio_embed`."""

    def __init__(self, config: Phi4MMConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if not isinstance(config, Phi4MMConfig):
            raise TypeError(f"config is a {type(config).__name__}; expected a Phi4MMConfig (get_mm_preset)")
        self.config = config
        hidden = config.text.hidden_size
        self.language_model = Phi3ForCausalLM(config.text, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.image_embed = ImageEmbedding(config.vision, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.audio_embed = AudioEmbedding(config.audio, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty KV cache for the language model (see Phi3ForCausalLM.init_cache)."""
        return self.language_model.init_cache(batch, max_len, dtype)

    def output_head(self) -> OutputHead:
        """The language model's projection to the logits (see Phi3ForCausalLM.output_head)."""
        return self.language_model.output_head()

    def _splice(self, x_btd, is_ph_bt, features_nd, what: str, hint: str):
        """x with the rows at the placeholders replaced, in order, by features_nd [n, d]."""
        n = features_nd.shape[0]
        if _is_traced(is_ph_bt):
            # Under jit the count cannot be checked; surplus features are dropped and placeholders left over keep
            # their token embedding.
            rows, cols = jnp.nonzero(is_ph_bt, size=n, fill_value=is_ph_bt.shape)
        else:
            rows, cols = np.nonzero(np.asarray(is_ph_bt))
            if len(rows) != n:
                raise ValueError(f"input_ids hold {len(rows)} {what} placeholder tokens but the {what} inputs give "
                                 f"{n} feature rows; {hint}")
        return x_btd.at[rows, cols].set(features_nd.astype(x_btd.dtype), mode="drop")

    def input_modes(self, input_ids) -> jax.Array:
        """int32 [b]: each row's InputMode, from the placeholders it holds."""
        ids = jnp.asarray(input_ids)
        has_image = jnp.any(ids == self.config.image_token_id, axis=1)
        has_audio = jnp.any(ids == self.config.audio_token_id, axis=1)
        return has_image.astype(jnp.int32) * InputMode.VISION + has_audio.astype(jnp.int32) * InputMode.SPEECH

    def __call__(self, input_ids, *, image_pixel_values=None, image_sizes=None, image_attention_mask=None,
                 audio_input_features=None, audio_embed_sizes=None, audio_attention_mask=None, attention_mask=None,
                 input_mode=None, positions=None, cache: KVCache | None = None, logits_to_keep: int = 0,
                 return_hidden: bool = False, rngs: nnx.Rngs | None = None) -> CausalLMOutput:
        """input_ids int [b, t] -> CausalLMOutput(logits float32 [b, t, vocab], cache).

        The image and audio keywords are transformers' (the processor's outputs, NumPy or JAX arrays):
        image_pixel_values [images, crops, 3, S, S], image_sizes int [images, 2], image_attention_mask
        [images, crops, S/14, S/14]; audio_input_features [clips, frames, 80], audio_embed_sizes int [clips],
        audio_attention_mask [clips, frames]. Image features fill the image placeholders (id
        config.image_token_id) in order, audio features the audio placeholders; the audio projector is the
        "vision" one when images are given, else "speech". image_sizes, image_attention_mask and
        audio_embed_sizes must be concrete (they set token counts), so calls with images or audio run outside jit.

        input_mode: optional InputMode for the whole batch or int [b] per row; by default each row's mode follows
        from its placeholders. It selects the row's LoRA adapter (none, "vision" or "speech"). attention_mask,
        positions, cache, logits_to_keep, return_hidden and rngs as in Phi3ForCausalLM.
        """
        c = self.config
        ids = jnp.asarray(input_ids)
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be an integer array [batch, time]; got {ids.dtype} {tuple(ids.shape)}")
        b = ids.shape[0]
        is_image, is_audio = ids == c.image_token_id, ids == c.audio_token_id
        for what, present, given, keyword in (("image", is_image, image_pixel_values, "image_pixel_values"),
                                              ("audio", is_audio, audio_input_features, "audio_input_features")):
            if given is None and not _is_traced(present) and bool(np.asarray(present).any()):
                raise ValueError(f"input_ids hold {int(np.asarray(present).sum())} {what} placeholder tokens (id "
                                 f"{c.image_token_id if what == 'image' else c.audio_token_id}) but no {keyword} "
                                 f"was given; pass the processor's {what} outputs, or remove the placeholders")

        x = self.language_model.embed_tokens(ids)
        if image_pixel_values is not None:
            if image_sizes is None or image_attention_mask is None:
                raise ValueError("image_pixel_values needs image_sizes and image_attention_mask as well (all three "
                                 "come from the processor's images(...))")
            features = self.image_embed(image_pixel_values, image_sizes, image_attention_mask)
            x = self._splice(x, is_image, features, "image",
                             "expand each image's placeholder to exactly its num_img_tokens copies (the processor "
                             "reports them) and pass the images in the order their placeholders appear")
        if audio_input_features is not None:
            if audio_embed_sizes is None:
                raise ValueError("audio_input_features needs audio_embed_sizes as well (the processor's audio(...) "
                                 "returns both)")
            mode = "vision" if image_pixel_values is not None else "speech"
            features = self.audio_embed(audio_input_features, audio_embed_sizes, audio_attention_mask, mode=mode)
            x = self._splice(x, is_audio, features, "audio",
                             "expand each clip's placeholder to exactly its audio_embed_sizes copies and pass the "
                             "clips in the order their placeholders appear")

        if input_mode is None:
            modes_b = self.input_modes(ids)
        else:
            modes_b = jnp.broadcast_to(jnp.asarray(input_mode, jnp.int32), (b,))
            if not _is_traced(modes_b) and not np.isin(np.asarray(modes_b), list(InputMode)).all():
                raise ValueError(f"input_mode={np.asarray(input_mode).tolist()}; expected InputMode values 0 "
                                 "(language), 1 (vision), 2 (speech) or 3 (vision+speech), one for the batch or one "
                                 "per row")
        selection = (select_adapters(ADAPTERS, jnp.asarray(MODE_ADAPTER)[modes_b])
                     if adapter_names(self.language_model) else contextlib.nullcontext())
        with selection:
            return self.language_model(ids, inputs_embeds=x, attention_mask=attention_mask, positions=positions,
                                       cache=cache, logits_to_keep=logits_to_keep, return_hidden=return_hidden,
                                       rngs=rngs)
