"""Phi-4-Multimodal's image embedding equals transformers' PyTorch `Phi4MultimodalImageEmbedding` (the oracle):
tiny random configs, fp32, eager attention; the rows HF writes into the image placeholder positions."""

import functools

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from jaxmoe.io.names_phi4mm import VISION_IGNORED, vision_param_specs
from jaxmoe.models.phi4mm.processor import Phi4MMProcessor
from jaxmoe.models.phi4mm.vision import ImageEmbedding, VisionConfig, num_image_tokens

TOL = 1e-5
TEXT_HIDDEN = 48
IMAGE_TOKEN = 200010
# 4 x 4 patches a crop (2 x 2 tokens after compression), and 3 x 3 (odd: reflection-padded before pooling).
VISION = {"even": dict(image_size=56, crop_size=56), "odd": dict(image_size=42, crop_size=42)}


def hf_config(name: str):
    import transformers

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=14,
                  **VISION[name])
    audio = dict(hidden_size=32, intermediate_size=32, num_blocks=1, num_attention_heads=2, nemo_conv_channels=8,
                 ext_pw_out_channel=32, depthwise_separable_out_channel=32)
    return transformers.Phi4MultimodalConfig(
        vocab_size=64, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, vision_config=vision, audio_config=audio,
        attn_implementation="eager")


@functools.cache
def hf_embedding(name: str, seed: int = 0):
    """transformers' image embedding with every parameter random (the separators too, which it zero-inits).
    Weights are scaled by 1/sqrt(fan-in) so that activations stay O(1) and fp32 rounding stays far below TOL."""
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalImageEmbedding

    torch.manual_seed(seed)
    module = Phi4MultimodalImageEmbedding(hf_config(name)).eval()
    with torch.no_grad():
        for key, p in module.named_parameters():
            if "extensor" in key:
                p.normal_(0.0, 1.0)
            elif "layer_norm" in key and key.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)
            else:
                p.normal_(0.0, 0.1)
    return module


def load(config: VisionConfig, state_dict: dict) -> ImageEmbedding:
    """Our module built from a torch state dict through the specs (piece by piece, in our layout), the way the
    parent loader builds it: abstract module, filled pure dict, merge."""
    abstract = nnx.eval_shape(lambda: ImageEmbedding(config, TEXT_HIDDEN, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    for spec in vision_param_specs(config, (), ""):
        *parents, leaf = spec.path
        node = functools.reduce(lambda d, k: d[k], parents, pure)
        buffer = np.zeros(node[leaf].shape, np.float32)
        for piece in spec.pieces:
            buffer[piece.region] = piece.to_ours(state_dict[piece.name].numpy())
        node[leaf] = buffer
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


@functools.cache
def ours(name: str) -> ImageEmbedding:
    return load(VisionConfig.from_hf(hf_config(name).vision_config.to_dict()), hf_embedding(name).state_dict())


def hf_rows(name: str, pixels, sizes, mask, count: int | None = None) -> np.ndarray:
    """The rows HF writes at `count` image-token positions (default: our count) of a prompt with text tokens
    around them."""
    if count is None:
        count = sum(num_image_tokens(sizes, mask, ours(name).config))
    ids = torch.tensor([[5, 6] + [IMAGE_TOKEN] * count + [7]])
    embeds = torch.zeros(1, ids.shape[1], TEXT_HIDDEN)
    with torch.no_grad():
        out = hf_embedding(name)(ids, embeds, torch.tensor(pixels), torch.tensor(sizes), torch.tensor(mask))
    assert torch.all(out[0, :2] == 0) and torch.all(out[0, -1] == 0)
    return out[0, 2:-1].numpy()


def processor_masks(config: VisionConfig, images: list[tuple[int, int, int, int]]):
    """image_sizes and image_attention_mask as transformers' processor makes them. Each image is (tile rows, tile
    cols, padded patch columns, padded patch rows): those are masked at the right / bottom of the HD image (the
    white padding of its resize); images with fewer crops than the most are padded with all-ones masks."""
    p = config.patches_per_side
    crops = 1 + max(r * c for r, c, _, _ in images)
    mask = np.ones((len(images), crops, p, p), np.float32)
    sizes = np.zeros((len(images), 2), np.int64)
    for i, (rows, cols, pad_w, pad_h) in enumerate(images):
        hd = np.ones((rows * p, cols * p), np.float32)
        hd[:, hd.shape[1] - pad_w:] = 0
        hd[hd.shape[0] - pad_h:, :] = 0
        mask[i, 1:1 + rows * cols] = hd.reshape(rows, p, cols, p).transpose(0, 2, 1, 3).reshape(-1, p, p)
        sizes[i] = rows * config.crop_size, cols * config.crop_size
    return sizes, mask


def processor_like(rng, name: str, images: list[tuple[int, int, int, int]]):
    """(pixels, image_sizes, image_attention_mask) for `processor_masks(images)`; padded crops have zero pixels."""
    config = ours(name).config
    sizes, mask = processor_masks(config, images)
    pixels = np.zeros((*mask.shape[:2], 3, config.image_size, config.image_size), np.float32)
    for i, (rows, cols, _, _) in enumerate(images):
        pixels[i, :1 + rows * cols] = rng.uniform(-1, 1, (1 + rows * cols, 3, config.image_size, config.image_size))
    return pixels, sizes, mask


def assert_matches_transformers(name, pixels, sizes, mask):
    expected = hf_rows(name, pixels, sizes, mask)
    # Jitted with the pixels traced and the sizes and masks closed over as host constants.
    got = np.asarray(nnx.jit(lambda module, px: module(px, sizes, mask))(ours(name), pixels))
    assert got.shape == expected.shape == (sum(num_image_tokens(sizes, mask, ours(name).config)), TEXT_HIDDEN)
    diff = np.abs(got - expected).max()
    assert diff <= TOL, diff
    return diff


def test_one_crop_and_global_match_transformers(rng):
    pixels, sizes, mask = processor_like(rng, "even", [(1, 1, 0, 0)])
    assert_matches_transformers("even", pixels, sizes, mask)
    assert num_image_tokens(sizes, mask, ours("even").config) == [2 * 3 + 1 + 2 * 3]


def test_padded_crops_and_batch_of_two_match_transformers(rng):
    # Image 0: 2 x 3 tiles, 5 patch columns and 3 patch rows of padding (partially masked crops, fractional
    # position ids; the trimmed sub grid is 3 x 4 tokens). Image 1: 1 x 2 tiles padded to image 0's 7 crops.
    pixels, sizes, mask = processor_like(rng, "even", [(2, 3, 5, 3), (1, 2, 0, 2)])
    assert_matches_transformers("even", pixels, sizes, mask)
    assert num_image_tokens(sizes, mask, ours("even").config) == [3 * 5 + 1 + 6, 1 * 5 + 1 + 6]


def test_odd_patch_grid_reflection_pads_like_transformers(rng):
    pixels, sizes, mask = processor_like(rng, "odd", [(2, 1, 1, 2), (1, 1, 0, 0)])
    assert_matches_transformers("odd", pixels, sizes, mask)


def test_specs_cover_every_parameter_once_and_every_used_hub_tensor():
    module, config = ours("even"), ours("even").config
    specs = list(vision_param_specs(config, ("model", "image_embed"), "pre.fix."))
    paths = [s.path for s in specs]
    assert len(paths) == len(set(paths))
    leaves = {("model", "image_embed", *path) for path, _ in nnx.to_flat_state(nnx.state(module))}
    assert set(paths) == leaves
    names = [piece.name for s in specs for piece in s.pieces]
    hub = {"pre.fix." + k for k in hf_embedding("even").state_dict()}
    ignored = {k for k in hub if k.startswith(tuple("pre.fix." + i for i in VISION_IGNORED))}
    assert ignored and len(names) == len(set(names)) and set(names) == hub - ignored


def test_config_round_trips_through_transformers_dict():
    d = hf_config("odd").vision_config.to_dict()
    config = VisionConfig.from_hf(d)
    assert config.num_layers == 3 and config.patches_per_side == 3 and config.tokens_per_side == 2
    assert VisionConfig.from_hf(config.to_hf()) == config
    assert {k: d[k] for k in config.to_hf()} == config.to_hf()
    with pytest.raises(ValueError, match="hidden_act"):
        VisionConfig.from_hf({**d, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="feature_layer"):
        VisionConfig(num_layers=2, feature_layer=3)


def test_released_model_token_counts_equal_the_processors():
    """The count transformers' processor puts in the prompt: 256 + 1 + valid sub tokens + sub rows + 16, from the
    2x-downsampled HD mask (a single 448 x 448 image: 545)."""
    config = VisionConfig()
    assert config.layers_run == 26
    images = [(1, 1, 0, 0), (2, 3, 37, 5), (3, 1, 0, 17)]
    sizes, mask = processor_masks(config, images)
    expected = []
    for i, (rows, cols, _, _) in enumerate(images):
        tiles = mask[i, 1:1 + rows * cols, 0::2, 0::2].reshape(rows, cols, 16, 16)
        downsampled = tiles.transpose(0, 2, 1, 3).reshape(rows * 16, cols * 16)
        expected.append(256 + 1 + int(downsampled.sum()) + int(downsampled[:, 0].sum()) + 16)
    assert expected[0] == 545
    assert num_image_tokens(sizes, mask, config) == expected


def test_traced_sizes_are_refused(rng):
    pixels, sizes, mask = processor_like(rng, "even", [(1, 1, 0, 0)])
    with pytest.raises(ValueError, match="image_sizes is a traced value"):
        jax.jit(lambda s: ours("even")(pixels, s, mask))(sizes)


@pytest.mark.parametrize("name", ["even", "odd"])
def test_processor_token_counts_fit_the_features_at_other_crop_sizes(rng, name):
    """At 56- and 42-pixel crops (4 x 4 and 3 x 3 patches), the processor's num_img_tokens is, per image, the
    number of rows transformers' image embedding makes for it (it refuses a prompt with another count), and a
    batch's rows from ours equal transformers'."""
    config = ours(name).config
    processor = Phi4MMProcessor(size={"height": config.image_size, "width": config.image_size},
                                patch_size=config.patch_size, dynamic_hd=6)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((30, 100, 3), (90, 33, 3), (56, 56, 3))]
    out = processor.images(images)
    counts = out["num_img_tokens"].tolist()
    for i, image in enumerate(images):
        alone = processor.images([image])
        assert alone["num_img_tokens"].tolist() == [counts[i]]
        rows = hf_rows(name, alone["image_pixel_values"], alone["image_sizes"], alone["image_attention_mask"],
                       count=counts[i])
        assert rows.shape == (counts[i], TEXT_HIDDEN)
    pixels, sizes, mask = out["image_pixel_values"], out["image_sizes"], out["image_attention_mask"]
    expected = hf_rows(name, pixels, sizes, mask, count=sum(counts))
    got = np.asarray(nnx.jit(lambda module, px: module(px, sizes, mask))(ours(name), pixels))
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOL
