"""`Phi4MMProcessor`: NumPy-only inputs for Phi-4-multimodal, matching transformers 5.24's processors.

* `.images(list of uint8 [H, W, 3])` == `Phi4MultimodalImageProcessor()(images, return_tensors="np")`
  (dynamic-HD crops: global bicubic view + row-major 448-pixel tiles, patch masks, token counts). The token
  counts come from the layout the model assembles its image features in (`image_tokens`), so they fit the model
  at every crop size; transformers hard-codes the 448-pixel numbers (256 + 16) and agrees only at 448.
* `.audio(list of 1-D waveforms, sampling_rate)` == `Phi4MultimodalFeatureExtractor()(waves, sampling_rate=...,
  return_tensors="np")` (log-mel features, token counts, frame mask when batched).
* `.expand_prompt(text, num_img_tokens, audio_embed_sizes)` does what `Phi4MultimodalProcessor` does to the text: each
  image / audio placeholder becomes that many copies of the placeholder token, ready for the tokenizer.

Neither torch nor torchvision is needed; the resampling kernels are reproduced in `image_processing`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from jaxmoe.models.phi4mm.audio_features import audio_embed_sizes, fbank_features, kaldi_mel_filters
from jaxmoe.models.phi4mm.image_processing import hd_transform
from jaxmoe.models.phi4mm.image_tokens import num_image_tokens


class Phi4MMProcessor:
    """Image + audio preprocessing for Phi-4-multimodal. Constructor arguments mirror transformers':

    Image (`Phi4MultimodalImageProcessor`): `size` (int or {"height": s, "width": s}; square only), `patch_size`,
    `dynamic_hd` (max number of tiles), `image_mean`, `image_std`, `rescale_factor`.
    Audio (`Phi4MultimodalFeatureExtractor`): `feature_size`, `sampling_rate`, `hop_length`, `n_fft`, `win_length`,
    `preemphasis`, `padding_value`, `audio_compression_rate`, `audio_downsample_rate`, `audio_feat_stride`,
    `mel_min_frequency`, `mel_max_frequency`.
    Text: `image_token` / `audio_token`, the placeholder strings of the tokenizer (transformers' Phi-4-multimodal
    tokenizer uses "<|image|>" / "<|audio|>"; with the original tokenizer pass "<|endoftext10|>" / "<|endoftext11|>",
    ids 200010 / 200011).
    """

    def __init__(self, *, size: int | dict = 448, patch_size: int = 14, dynamic_hd: int = 36,
                 image_mean: Sequence[float] = (0.5, 0.5, 0.5), image_std: Sequence[float] = (0.5, 0.5, 0.5),
                 rescale_factor: float = 1 / 255,
                 feature_size: int = 80, sampling_rate: int = 16000, hop_length: int = 160, n_fft: int = 512,
                 win_length: int = 400, preemphasis: float = 0.97, padding_value: float = 0.0,
                 audio_compression_rate: int = 8, audio_downsample_rate: int = 1, audio_feat_stride: int = 1,
                 mel_min_frequency: float = 0.0, mel_max_frequency: float = 7690.0,
                 image_token: str = "<|image|>", audio_token: str = "<|audio|>"):
        if isinstance(size, dict):
            height, width = size.get("height"), size.get("width")
            if height is None or width is None:
                raise ValueError(f"size must be an int or {{'height': s, 'width': s}}, got {size}")
            if height != width:
                raise ValueError(f"Phi-4-multimodal crops are square; got size {size}")
            size = height
        for name, value, unit in (("size", size, "pixels"), ("patch_size", patch_size, "pixels"),
                                  ("dynamic_hd", dynamic_hd, "tiles at most")):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}={value!r}; expected a positive integer ({unit})")
        if size % patch_size:
            raise ValueError(f"size={size} is not a multiple of patch_size={patch_size}; a crop must tile into whole "
                             f"patches (e.g. size={max(1, size // patch_size) * patch_size}), as the vision config's "
                             "image_size does")
        self.size, self.patch_size, self.dynamic_hd = int(size), int(patch_size), int(dynamic_hd)
        self.image_mean, self.image_std, self.rescale_factor = tuple(image_mean), tuple(image_std), rescale_factor
        # transformers fuses rescale into normalize: mean and std (float32) times 1 / rescale_factor.
        inv = np.float32(1.0 / rescale_factor)
        self._mean = (np.asarray(image_mean, np.float32) * inv).astype(np.float32)
        self._std = (np.asarray(image_std, np.float32) * inv).astype(np.float32)
        if self._mean.shape != (3,) or self._std.shape != (3,):
            raise ValueError("image_mean and image_std need one value per RGB channel")

        self.feature_size, self.sampling_rate = feature_size, sampling_rate
        self.hop_length, self.n_fft, self.win_length = hop_length, n_fft, win_length
        self.preemphasis, self.padding_value = preemphasis, padding_value
        self.audio_compression_rate, self.audio_downsample_rate = audio_compression_rate, audio_downsample_rate
        self.audio_feat_stride = audio_feat_stride
        self.mel_filters = kaldi_mel_filters(n_fft // 2 + 1, feature_size, mel_min_frequency, mel_max_frequency,
                                             sampling_rate)
        self.image_token, self.audio_token = image_token, audio_token

    # ----------------------------------------------------------------------------------------------------------------
    # images

    def images(self, images) -> dict:
        """uint8 RGB images [H, W, 3] (a list, or one array, or a [B, H, W, 3] array) -> dict of NumPy arrays:
        `image_pixel_values` float32 [B, crops, 3, size, size] (crop 0 is the global view; images with fewer crops
        are zero-padded), `image_sizes` int64 [B, 2] (height, width of the HD canvas), `image_attention_mask`
        float32 [B, crops, size/patch, size/patch] (padding crops are all ones), `num_img_tokens` int64 [B] (the
        image placeholders each image takes in the prompt: the rows the image embedding makes for it)."""
        images = self._check_images(images)
        crops, masks, sizes = [], [], []
        for i, image in enumerate(images):
            c, m, hw = hd_transform(image, self.size, self.patch_size, self.dynamic_hd, self._mean, self._std,
                                    index=i)
            crops.append(c)
            masks.append(m)
            sizes.append(hw)
        max_crops = max(c.shape[0] for c in crops)
        s, ms = self.size, self.size // self.patch_size
        pixel_values = np.zeros((len(crops), max_crops, 3, s, s), np.float32)
        attention_mask = np.ones((len(crops), max_crops, ms, ms), np.float32)
        for i, (c, m) in enumerate(zip(crops, masks)):
            pixel_values[i, : c.shape[0]] = c
            attention_mask[i, : m.shape[0]] = m
        sizes = np.asarray(sizes, dtype=np.int64)
        return {
            "image_pixel_values": pixel_values,
            "image_sizes": sizes,
            "image_attention_mask": attention_mask,
            "num_img_tokens": np.asarray(num_image_tokens(sizes, attention_mask, self.size), dtype=np.int64),
        }

    @staticmethod
    def _check_images(images) -> list[np.ndarray]:
        if isinstance(images, np.ndarray):
            images = [images] if images.ndim == 3 else list(images) if images.ndim == 4 else [images]
        images = list(images)
        if not images:
            raise ValueError("no images given: pass a list of uint8 [height, width, 3] arrays")
        out = []
        for i, image in enumerate(images):
            if not isinstance(image, np.ndarray):
                if type(image).__module__.startswith("PIL"):
                    raise ValueError(f"image {i} is a PIL image; pass np.asarray(image.convert('RGB')) instead")
                image = np.asarray(image)
            if image.dtype != np.uint8:
                raise ValueError(
                    f"image {i} has dtype {image.dtype}; expected uint8 RGB values 0-255 as a [height, width, 3] "
                    "array (convert floats in [0, 1] with (x * 255).round().astype(np.uint8))")
            if image.ndim != 3 or image.shape[-1] != 3:
                hint = (" (grayscale: np.repeat(img[..., None], 3, -1); RGBA: composite or drop alpha)"
                        if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 4)) else
                        " (channels-first? use img.transpose(1, 2, 0))" if image.ndim == 3 and image.shape[0] == 3
                        else "")
                raise ValueError(f"image {i} has shape {image.shape}; expected [height, width, 3] RGB{hint}")
            if image.shape[0] < 1 or image.shape[1] < 1:
                raise ValueError(f"image {i} is empty: shape {image.shape}")
            out.append(image)
        return out

    # ----------------------------------------------------------------------------------------------------------------
    # audio

    def audio(self, waveforms, sampling_rate: int) -> dict:
        """Mono float waveforms (a list of 1-D arrays, or one 1-D array) at `sampling_rate` Hz -> dict of NumPy
        arrays: `audio_input_features` float32 [B, frames, feature_size], `audio_embed_sizes` int64 [B], and, for
        B > 1 only (as upstream), `audio_attention_mask` bool [B, max valid frames]."""
        if sampling_rate != self.sampling_rate:
            raise ValueError(
                f"audio sampled at {sampling_rate} Hz, but Phi-4-multimodal's feature extractor expects "
                f"{self.sampling_rate} Hz; resample the waveforms to {self.sampling_rate} Hz first "
                f"(e.g. scipy.signal.resample_poly(wave, {self.sampling_rate}, {sampling_rate}))")
        if isinstance(waveforms, np.ndarray) and waveforms.ndim == 1:
            waveforms = [waveforms]
        waveforms = list(waveforms)
        if not waveforms:
            raise ValueError("no waveforms given: pass a list of 1-D float arrays")
        waves = []
        for i, w in enumerate(waveforms):
            w = np.asarray(w)
            if w.ndim != 1:
                raise ValueError(f"waveform {i} has shape {w.shape}; expected mono audio as a 1-D array "
                                 "(for [samples, channels] audio use wave.mean(-1))")
            if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
                raise ValueError(f"waveform {i} has dtype {w.dtype}; expected float samples")
            if len(w) < self.win_length:
                raise ValueError(
                    f"waveform {i} has {len(w)} samples; at least win_length={self.win_length} "
                    f"({1000 * self.win_length / self.sampling_rate:g} ms) are needed for one feature frame")
            waves.append(w.astype(np.float32))
        features = fbank_features(waves, self.mel_filters, win_length=self.win_length, hop_length=self.hop_length,
                                  n_fft=self.n_fft, preemphasis=self.preemphasis, padding_value=self.padding_value)
        lengths = np.array([len(w) for w in waves], dtype=np.int64)
        feature_lengths = ((lengths - self.win_length) // self.hop_length + 1) * self.audio_feat_stride
        out = {
            "audio_input_features": features,
            "audio_embed_sizes": audio_embed_sizes(feature_lengths, self.audio_compression_rate,
                                                   self.audio_downsample_rate),
        }
        if len(waves) > 1:
            out["audio_attention_mask"] = np.arange(feature_lengths.max())[None, :] < feature_lengths[:, None]
        return out

    # ----------------------------------------------------------------------------------------------------------------
    # text

    def expand_prompt(self, text: str, num_img_tokens: Sequence[int] = (), audio_embed_sizes: Sequence[int] = ()
                      ) -> str:
        """Replace the i-th image placeholder with `image_token * num_img_tokens[i]` and the i-th audio placeholder
        with `audio_token * audio_embed_sizes[i]`, in order of appearance, as `Phi4MultimodalProcessor` does.

        Placeholders are `self.image_token` / `self.audio_token` (default "<|image|>" / "<|audio|>") and also the
        original Phi-4-multimodal numbered tags "<|image_k|>" / "<|audio_k|>" (1-based: tag k takes input k). The
        number of placeholders must match the number of counts given."""
        num_img_tokens = [int(n) for n in np.asarray(num_img_tokens).reshape(-1)]
        audio_embed_sizes = [int(n) for n in np.asarray(audio_embed_sizes).reshape(-1)]
        groups = {"image": (self.image_token, num_img_tokens), "audio": (self.audio_token, audio_embed_sizes)}
        pattern = "|".join(f"(?P<{kind}>{re.escape(tok)})|<\\|{kind}_(?P<{kind}_k>\\d+)\\|>"
                           for kind, (tok, _) in groups.items())
        counters = {"image": 0, "audio": 0}

        def replace(m: re.Match) -> str:
            kind = next(k for k in groups if m.group(k) is not None or m.group(k + "_k") is not None)
            token, counts = groups[kind]
            if m.group(kind + "_k") is not None:  # numbered tag <|image_k|>: 1-based input index
                k = int(m.group(kind + "_k"))
                if not 1 <= k <= len(counts):
                    raise ValueError(f"{m.group(0)} refers to {kind} {k}, but {len(counts)} {kind} count(s) were "
                                     "given")
                idx = k - 1
            else:
                idx = counters[kind]
                if idx >= len(counts):
                    raise ValueError(f"text has more {token} placeholders than the {len(counts)} {kind} count(s) "
                                     "given")
            counters[kind] += 1
            return token * counts[idx]

        out = re.sub(pattern, replace, text)
        for kind, (token, counts) in groups.items():
            if counters[kind] != len(counts):
                raise ValueError(f"text has {counters[kind]} {kind} placeholder(s) ({token}) but {len(counts)} {kind} "
                                 "count(s) were given")
        return out
