"""Phi4MultimodalForCausalLM equals transformers' Phi4MultimodalForCausalLM (the oracle, tiny random config,
fp32, eager attention) on text, image + text and audio + text; checkpoints round-trip through folders
transformers loads; each row's input mode selects its LoRA adapter as PEFT applies it; placeholder counts that
do not match the inputs fail clearly."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import jaxmoe
from jaxmoe.io.peft import load_peft_adapter
from jaxmoe.io.phi4mm import config_to_hf
from jaxmoe.models.phi4mm.model import InputMode, Phi4MMConfig, Phi4MultimodalForCausalLM, get_mm_preset
from jaxmoe.models.phi4mm.vision import num_image_tokens

TOL = 1e-4
CONFIG = get_mm_preset("tiny-mm")
IMAGE, AUDIO = CONFIG.image_token_id, CONFIG.audio_token_id
RNG = np.random.default_rng(0)
TEXT = RNG.integers(3, IMAGE, size=(2, 24))
# One 56 x 112 image: a global crop and 1 x 2 tiles of 56-pixel crops (4 x 4 patches each), no padding.
PIXELS = RNG.normal(size=(1, 3, 3, 56, 56)).astype(np.float32)
IMAGE_SIZES = np.array([[56, 112]])
IMAGE_MASK = np.ones((1, 3, 4, 4), np.int64)
IMAGE_TOKENS = num_image_tokens(IMAGE_SIZES, IMAGE_MASK, CONFIG.vision)[0]
# One 40-frame clip: 5 audio tokens after the 8x subsampling.
FEATURES = RNG.normal(size=(1, 40, 80)).astype(np.float32)
AUDIO_SIZES = np.array([5])
AUDIO_MASK = np.ones((1, 40), bool)


def _with_placeholders(token: int, count: int, length: int = 24) -> np.ndarray:
    """[1, length]: text, `count` placeholders from position 4, text."""
    if 4 + count >= length:
        raise ValueError(f"{count} placeholders do not fit a row of {length} tokens")
    ids = np.random.default_rng(count).integers(3, IMAGE, size=(1, length))
    ids[0, :24] = TEXT[0, :min(24, length)]
    ids[0, 4:4 + count] = token
    return ids


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(transformers model with every weight random, separators and audio buffers included; its folder)."""
    hf = config_to_hf(CONFIG)
    config = transformers.Phi4MultimodalConfig(**{k: v for k, v in hf.items()
                                                  if k not in ("architectures", "model_type", "torch_dtype")})
    config._attn_implementation = "eager"  # the encoders' SDPA path would attend causally without a mask
    torch.manual_seed(0)
    model = transformers.Phi4MultimodalForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1 if name.endswith("bias") else 0.2)
        for name, buffer in model.named_buffers():
            if name.endswith("global_mean"):
                buffer.normal_(0.0, 1.0)
            elif name.endswith("global_invstd"):
                buffer.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("phi4mm")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def model(reference):
    loaded = jaxmoe.load_hf(reference[1])
    assert isinstance(loaded, Phi4MultimodalForCausalLM) and loaded.config == CONFIG
    return loaded


def _expected(reference, ids, **inputs) -> np.ndarray:
    with torch.no_grad():
        return reference[0](torch.tensor(ids), **{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()


@nnx.jit
def _logits(model, ids, input_mode=None):
    return model(ids, input_mode=input_mode).logits


@pytest.mark.parametrize("batch", [1, 2])
def test_text_logits_match_transformers(model, reference, batch):
    ids = TEXT[:batch]
    assert np.abs(np.asarray(_logits(model, ids)) - _expected(reference, ids)).max() <= TOL


def _processed(*shapes) -> dict:
    """The processor's outputs (56-pixel crops, as tiny-mm's encoder takes) for random images of `shapes`."""
    processor = jaxmoe.Phi4MMProcessor(size=CONFIG.vision.image_size, patch_size=CONFIG.vision.patch_size)
    rng = np.random.default_rng(1)
    out = processor.images([rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in shapes])
    return {k: v for k, v in out.items() if k != "num_img_tokens"}


# (images' inputs, rows of placeholders): one crop; 1 x 2 crops; a 70 x 100 image whose 2 x 2 crops are partly
# padding (patch masks with zeros); and a batch of two rows with one image each, of different crop counts.
IMAGE_CASES = {
    "one crop": lambda: _processed((56, 56)),
    "several crops": lambda: dict(image_pixel_values=PIXELS, image_sizes=IMAGE_SIZES, image_attention_mask=IMAGE_MASK),
    "padded crops": lambda: _processed((70, 100)),
    "two rows, two images": lambda: _processed((56, 56), (60, 120)),
}


@pytest.mark.parametrize("case", [case if case == "one crop" else pytest.param(case, marks=pytest.mark.slow)
                                  for case in IMAGE_CASES])  # the slow tier: the other crop layouts
def test_image_and_text_logits_match_transformers(model, reference, case):
    inputs = IMAGE_CASES[case]()
    counts = num_image_tokens(inputs["image_sizes"], inputs["image_attention_mask"], CONFIG.vision)
    ids = np.concatenate([_with_placeholders(IMAGE, n, length=40) for n in counts])
    expected = _expected(reference, ids, **inputs)
    assert np.abs(np.asarray(model(ids, **inputs).logits) - expected).max() <= TOL
    assert np.abs(expected - _expected(reference, ids)).max() > 0.1  # the image features do matter


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_image_audio_and_text_together_match_transformers(model, reference):
    """Both modalities in one row: the audio goes through the vision-speech projector."""
    ids = _with_placeholders(IMAGE, IMAGE_TOKENS, length=40)
    ids[0, 4 + IMAGE_TOKENS + 1:4 + IMAGE_TOKENS + 1 + int(AUDIO_SIZES[0])] = AUDIO
    inputs = dict(image_pixel_values=PIXELS, image_sizes=IMAGE_SIZES, image_attention_mask=IMAGE_MASK,
                  audio_input_features=FEATURES, audio_embed_sizes=AUDIO_SIZES, audio_attention_mask=AUDIO_MASK)
    assert np.abs(np.asarray(model(ids, **inputs).logits) - _expected(reference, ids, **inputs)).max() <= TOL


def test_audio_and_text_logits_match_transformers(model, reference):
    ids = _with_placeholders(AUDIO, int(AUDIO_SIZES[0]))
    inputs = dict(audio_input_features=FEATURES, audio_embed_sizes=AUDIO_SIZES, audio_attention_mask=AUDIO_MASK)
    expected = _expected(reference, ids, **inputs)
    assert np.abs(np.asarray(model(ids, **inputs).logits) - expected).max() <= TOL
    assert np.abs(expected - _expected(reference, ids)).max() > 0.1


def test_saved_folder_loads_in_transformers_with_the_same_logits(model, reference, tmp_path):
    folder = jaxmoe.save_hf(model, tmp_path / "saved")
    reloaded = transformers.Phi4MultimodalForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    ids = _with_placeholders(AUDIO, int(AUDIO_SIZES[0]))
    inputs = dict(audio_input_features=FEATURES, audio_embed_sizes=AUDIO_SIZES, audio_attention_mask=AUDIO_MASK)
    with torch.no_grad():
        got = reloaded(torch.tensor(ids), **{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()
    np.testing.assert_array_equal(got, _expected(reference, ids, **inputs))
    assert jaxmoe.load_hf(folder).config == CONFIG


@pytest.mark.parametrize("what", ["image", "audio"])
def test_placeholder_count_must_match_the_features(model, what):
    if what == "image":
        inputs = dict(image_pixel_values=PIXELS, image_sizes=IMAGE_SIZES, image_attention_mask=IMAGE_MASK)
        ids, expected = _with_placeholders(IMAGE, IMAGE_TOKENS - 1), IMAGE_TOKENS
    else:
        inputs = dict(audio_input_features=FEATURES, audio_embed_sizes=AUDIO_SIZES, audio_attention_mask=AUDIO_MASK)
        ids, expected = _with_placeholders(AUDIO, 6), 5
    found = int((ids == (IMAGE if what == "image" else AUDIO)).sum())
    with pytest.raises(ValueError, match=f"hold {found} {what} placeholder tokens but the {what} inputs give "
                                         f"{expected} feature rows; expand"):
        model(ids, **inputs)


@pytest.mark.parametrize("token, keyword", [(IMAGE, "image_pixel_values"), (AUDIO, "audio_input_features")])
def test_placeholders_without_their_inputs_are_refused(model, token, keyword):
    with pytest.raises(ValueError, match=f"hold 3 .* placeholder tokens \\(id {token}\\) but no {keyword}"):
        model(_with_placeholders(token, 3))


def test_each_rows_input_mode_selects_its_adapter_as_peft_applies_it(reference, tmp_path):
    """Rows in language, vision, speech and vision+speech mode get no adapter, "vision", "speech" and "vision",
    each as PEFT's set_adapter gives it (adapters restricted to the language model by a regex, as Phi-4-MM's)."""
    peft = pytest.importorskip("peft")
    targets = r"model\.layers\.\d+\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj)"
    wrapped = peft.get_peft_model(copy.deepcopy(reference[0]), peft.LoraConfig(r=4, lora_alpha=8,
                                                                                target_modules=targets),
                                  adapter_name="vision")
    wrapped.add_adapter("speech", peft.LoraConfig(r=6, lora_alpha=12, target_modules=targets))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    wrapped.eval().save_pretrained(tmp_path)
    ids = RNG.integers(3, IMAGE, size=(4, 24))
    expected = {}
    with torch.no_grad():
        for name in ("vision", "speech"):
            wrapped.set_adapter(name)
            expected[name] = wrapped(torch.tensor(ids)).logits.numpy()
        with wrapped.disable_adapter():
            expected[None] = wrapped(torch.tensor(ids)).logits.numpy()

    model = jaxmoe.load_hf(reference[1])
    for name in ("vision", "speech"):
        load_peft_adapter(model, tmp_path / name, name)
    modes = np.array([InputMode.LANGUAGE, InputMode.VISION, InputMode.SPEECH, InputMode.VISION_SPEECH], np.int32)
    got = np.asarray(_logits(model, ids, modes))
    for row, name in enumerate([None, "vision", "speech", "vision"]):
        assert np.abs(got[row] - expected[name][row]).max() <= TOL

    config_file = tmp_path / "vision" / "adapter_config.json"
    listed = {**json.loads(config_file.read_text()), "target_modules": ["qkv_proj", "o_proj", "gate_up_proj",
                                                                        "down_proj"]}
    config_file.write_text(json.dumps(listed))  # "o_proj" etc. also name the audio encoder's layers
    with pytest.raises(ValueError, match="audio_embed.encoder.*outside the language model's decoder layers"):
        load_peft_adapter(jaxmoe.load_hf(reference[1]), tmp_path / "vision", "vision")


@pytest.mark.slow  # 8-12 s: kept out of the default tier's 8-minute budget
def test_loading_onto_a_mesh_shards_the_language_model_and_keeps_the_logits(model, reference):
    from jaxmoe import sharding
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = jaxmoe.load_hf(reference[1], mesh=mesh)
    qkv = sharded.language_model.layers[0].self_attn.qkv_proj.kernel[...]
    assert not qkv.sharding.is_fully_replicated
    assert sharded.image_embed.img_projection_up.kernel[...].sharding.is_fully_replicated
    ids = _with_placeholders(AUDIO, int(AUDIO_SIZES[0]))
    inputs = dict(audio_input_features=FEATURES, audio_embed_sizes=AUDIO_SIZES, audio_attention_mask=AUDIO_MASK)
    np.testing.assert_allclose(np.asarray(sharded(ids, **inputs).logits), np.asarray(model(ids, **inputs).logits),
                               rtol=0, atol=1e-5)


def test_placeholder_ids_live_in_the_encoder_configs_and_reach_transformers_there():
    assert (IMAGE, AUDIO) == (CONFIG.vision.image_token_id, CONFIG.audio.audio_token_id) == (500, 501)
    moved = CONFIG.replace(vision=dataclasses.replace(CONFIG.vision, image_token_id=7))
    assert (moved.image_token_id, moved.audio_token_id) == (7, 501)
    hf = transformers.Phi4MultimodalConfig(**{k: v for k, v in config_to_hf(moved).items()
                                              if k not in ("architectures", "model_type", "torch_dtype")})
    assert (hf.vision_config.image_token_id, hf.audio_config.audio_token_id) == (7, 501)
    with pytest.raises(TypeError, match="image_token_id"):  # not a field: one place only
        Phi4MMConfig(text=CONFIG.text, vision=CONFIG.vision, audio=CONFIG.audio, image_token_id=500)
    with pytest.raises(ValueError, match="vision.image_token_id and audio.audio_token_id are both 501"):
        CONFIG.replace(vision=dataclasses.replace(CONFIG.vision, image_token_id=501))
    vocab = CONFIG.text.vocab_size
    with pytest.raises(ValueError, match=rf"audio.audio_token_id={vocab}; expected a token id in \[0, "
                                         rf"text.vocab_size={vocab}\)"):
        CONFIG.replace(audio=dataclasses.replace(CONFIG.audio, audio_token_id=vocab))


def _hf_generate(reference, ids, new, **inputs):
    with torch.no_grad():
        return reference[0].generate(torch.tensor(ids), **{k: torch.tensor(v) for k, v in inputs.items()},
                                     do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                                     pad_token_id=0).numpy()


MEDIA_CASES = {
    "image": lambda: (_with_placeholders(IMAGE, IMAGE_TOKENS, length=40),
                      dict(images=dict(image_pixel_values=PIXELS, image_sizes=IMAGE_SIZES,
                                       image_attention_mask=IMAGE_MASK))),
    "audio": lambda: (_with_placeholders(AUDIO, int(AUDIO_SIZES[0])),
                      dict(audio=dict(audio_input_features=FEATURES, audio_embed_sizes=AUDIO_SIZES,
                                      audio_attention_mask=AUDIO_MASK))),
}


# 8-10 s each: audio in the slow tier, to keep the default tier in its 8-minute budget.
@pytest.mark.parametrize("case", ["image", pytest.param("audio", marks=pytest.mark.slow)])
def test_greedy_generation_with_media_equals_transformers_generate(model, reference, case):
    ids, media = MEDIA_CASES[case]()
    flat = {k: v for inputs in media.values() for k, v in inputs.items()}
    expected = _hf_generate(reference, ids, 8, **flat)
    got = np.asarray(jaxmoe.generate(model, ids, max_new_tokens=8, eos_token_id=(), **media))
    np.testing.assert_array_equal(got, expected)
    # The media matter: the same placeholders with other features generate other tokens.
    other = {what: {k: (-v if k in ("image_pixel_values", "audio_input_features") else v) for k, v in inputs.items()}
             for what, inputs in media.items()}
    assert not (np.asarray(jaxmoe.generate(model, ids, max_new_tokens=8, eos_token_id=(), **other)) == got).all()


@pytest.mark.slow  # default tier's 8-minute budget (.ci/run); runs with -m slow
def test_each_row_generates_with_the_adapter_its_prompt_chose(reference):
    """A batch of an image row and a text row on a model with "vision" and "speech" adapters: every generated token
    is the argmax of the forward over the prompt plus the tokens before it (which picks each row's adapter from its
    placeholders), so the decode steps kept the image row's adapter; without it that row would decode otherwise."""
    from jaxmoe.nn.lora import LoRAConfig
    from jaxmoe.nn.multi_lora import add_adapter

    model = jaxmoe.load_hf(reference[1])
    for i, name in enumerate(("vision", "speech")):
        add_adapter(model, name, LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(i))
    rng = np.random.default_rng(3)
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.LoRAParam) and "lora_b" in str(path[-1]):
            variable[...] = rng.normal(0.0, 0.3, variable.get_value().shape).astype(np.float32)
    ids = np.concatenate([_with_placeholders(IMAGE, IMAGE_TOKENS, length=40), RNG.integers(3, IMAGE, (1, 40))])
    images = dict(image_pixel_values=PIXELS, image_sizes=IMAGE_SIZES, image_attention_mask=IMAGE_MASK)
    new = 6
    tokens = np.asarray(jaxmoe.generate(model, ids, max_new_tokens=new, eos_token_id=(), images=images))
    logits = np.asarray(model(tokens[:, :-1], **images).logits)[:, ids.shape[1] - 1:]
    np.testing.assert_array_equal(logits.argmax(-1), tokens[:, ids.shape[1]:])
    plain = np.asarray(model(tokens[:, :-1], input_mode=InputMode.LANGUAGE, **images).logits)[:, ids.shape[1] - 1:]
    assert not (plain[0].argmax(-1) == tokens[0, ids.shape[1]:]).all()


def test_media_for_a_text_model_or_with_beams_are_refused(model, tiny_model):
    ids = _with_placeholders(AUDIO, int(AUDIO_SIZES[0]))
    audio = dict(audio_input_features=FEATURES, audio_embed_sizes=AUDIO_SIZES, audio_attention_mask=AUDIO_MASK)
    with pytest.raises(ValueError, match="images= given to a Phi3ForCausalLM, which has no images encoder"):
        jaxmoe.generate(tiny_model("tiny"), np.ones((1, 4), np.int32), max_new_tokens=2, images={})
    with pytest.raises(ValueError, match="num_beams > 1 or prune_every"):
        jaxmoe.generate(model, ids, max_new_tokens=2, audio=audio, num_beams=2)
    with pytest.raises(ValueError, match="processor's output dict with 'audio_input_features'"):
        jaxmoe.generate(model, ids, max_new_tokens=2, audio=FEATURES)
