"""AudioEmbedding equals transformers' PyTorch Phi4MultimodalAudioEmbedding (the oracle), fp32, tiny random config.

transformers adds the 0/1 key-padding mask to the attention logits instead of masking with -inf, so a padded
row's output depends on the padding; we reproduce that computation and compare against it as it is.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalAudioEmbedding

from jaxmoe.io.names_phi4mm import audio_param_specs
from jaxmoe.models.phi4mm.audio import CHUNK_FRAMES, AudioConfig, AudioEmbedding, Buffer

TOL = 1e-5
TEXT_HIDDEN = 48
# bias_max_distance 20 < the encoder lengths below, so the relative-distance clipping is exercised.
HF_AUDIO = dict(hidden_size=32, intermediate_size=48, num_blocks=2, num_attention_heads=4, nemo_conv_channels=8,
                ext_pw_out_channel=32, depthwise_separable_out_channel=32, bias_max_distance=20, input_size=80)
PREFIX = ("model", "embed_tokens_extend", "audio_embed")
HF_PREFIX = "model.embed_tokens_extend.audio_embed."


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    _get(tree, path[:-1])[path[-1]] = value


def _leaf_paths(tree, prefix=()):
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _leaf_paths(v, (*prefix, k))]
    return [prefix]


@pytest.fixture(scope="module")
def pair():
    """(transformers module with every parameter and buffer random, our module loaded from its state dict)."""
    hf_config = transformers.Phi4MultimodalConfig(hidden_size=TEXT_HIDDEN, audio_config=HF_AUDIO,
                                                  attn_implementation="eager")
    torch.manual_seed(0)
    hf = Phi4MultimodalAudioEmbedding(hf_config).eval()
    with torch.no_grad():
        for tensor in hf.state_dict().values():  # includes global_mean/invstd and glu b1/b2 (zeros/ones at init)
            tensor.copy_(torch.randn_like(tensor) * 0.3)
    config = AudioConfig.from_hf(hf_config.audio_config.to_dict())
    # Abstract (no initialisers run): every value comes from the state dict; the spec test checks coverage.
    model = nnx.eval_shape(lambda: AudioEmbedding(config, TEXT_HIDDEN, rngs=nnx.Rngs(0)))
    hub = {k: v.numpy() for k, v in hf.state_dict().items()}
    state = nnx.state(model)
    pure = nnx.to_pure_dict(state)
    for spec in audio_param_specs(config, (), ""):
        leaf = _get(pure, spec.path)
        buf = np.zeros(leaf.shape, leaf.dtype)
        for piece in spec.pieces:
            buf[piece.region] = piece.to_ours(hub[piece.name])
        _set(pure, spec.path, buf)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return hf, model


# __call__ jitted with the embed sizes static (they set the output length), one compile per shape and mode.
_rows = nnx.jit(AudioEmbedding.__call__, static_argnames=("audio_embed_sizes", "mode"))


def _ours(model, features, sizes, mask=None, mode="speech"):
    return np.asarray(_rows(model, jnp.asarray(features), audio_embed_sizes=tuple(int(n) for n in sizes),
                            audio_attention_mask=None if mask is None else jnp.asarray(mask), mode=mode))


def _hf_rows(hf, features, sizes, mask=None, mode="speech"):
    """What transformers writes into the audio placeholder positions: [sum(sizes), text hidden]."""
    n = int(sum(sizes))
    ids = torch.full((1, n), hf.config.audio_config.audio_token_id)
    with torch.no_grad():
        out = hf(ids, torch.zeros(1, n, TEXT_HIDDEN), torch.tensor(features), audio_embed_sizes=torch.tensor(sizes),
                 audio_attention_mask=None if mask is None else torch.tensor(mask), audio_projection_mode=mode)
    return out[0].numpy()


def _padded(rng, lengths):
    """Features [b, max(lengths), 80] (random padding, as a worst case), bool mask, embed sizes ceil(len / 8)."""
    t = max(lengths)
    features = rng.normal(size=(len(lengths), t, 80)).astype(np.float32)
    mask = np.arange(t)[None, :] < np.array(lengths)[:, None]
    return features, mask, np.array([-(-n // 8) for n in lengths])


@pytest.mark.parametrize("mode", ["speech", "vision"])
def test_unpadded_input_matches_transformers(pair, mode, rng):
    hf, model = pair
    features, _, sizes = _padded(rng, [203])  # 26 encoder frames > bias_max_distance
    expected = _hf_rows(hf, features, sizes, mode=mode)
    got = _ours(model, features, sizes, mode=mode)
    assert got.shape == expected.shape == (26, TEXT_HIDDEN)
    assert np.abs(got - expected).max() <= TOL


def test_jitted_encode_gives_the_rows_and_modes_differ(pair, rng):
    _, model = pair
    features, _, sizes = _padded(rng, [203])
    encoded = nnx.jit(lambda m, x: m.encode(x, mode="speech"))(model, jnp.asarray(features))
    speech, vision = (_ours(model, features, sizes, mode=m) for m in ("speech", "vision"))
    assert np.abs(np.asarray(encoded)[0] - speech).max() <= TOL
    assert np.abs(speech - vision).max() > 1e-2


def test_padded_batch_matches_transformers(pair, rng):
    """Every row of a padded batch equals transformers' batched result. The longest row also equals
    transformers' result for that row alone; a shorter row does not (transformers adds the key mask to the
    logits, so padded keys get +0 and real ones +1 instead of -inf, and the subsampling convs see the padding)."""
    hf, model = pair
    lengths = [203, 120]
    features, mask, sizes = _padded(rng, lengths)
    expected = _hf_rows(hf, features, sizes, mask)
    got = _ours(model, features, sizes, mask)
    assert got.shape == expected.shape == (26 + 15, TEXT_HIDDEN)
    assert np.abs(got - expected).max() <= TOL

    alone = [_hf_rows(hf, features[i:i + 1, :n], sizes[i:i + 1]) for i, n in enumerate(lengths)]
    assert np.abs(got[:26] - alone[0]).max() <= TOL
    assert np.abs(got[26:] - alone[1]).max() > 1e-3


def test_long_input_is_chunked_like_transformers(pair, rng):
    """More than CHUNK_FRAMES encoder frames (ceil(4010 / 8) = 502): zero-padded to two chunks of 500 encoded
    independently. Without a mask the padding frames count as valid keys."""
    hf, model = pair
    features, _, sizes = _padded(rng, [4010])
    assert sizes[0] > CHUNK_FRAMES
    expected = _hf_rows(hf, features, sizes)
    got = _ours(model, features, sizes)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOL


def test_long_padded_batch_is_chunked_like_transformers_per_row(pair, rng):
    """With a mask, chunk padding and padded frames are masked per chunk. transformers' chunking fails for
    batch > 1 (a `.view` in unfold_tensor), so each row is compared with transformers run on that row alone
    with its padded features and mask row (its computation is row-independent)."""
    hf, model = pair
    features, mask, sizes = _padded(rng, [4010, 3000])  # row 1: 375 real frames, its 2nd chunk all padding
    got = _ours(model, features, sizes, mask)
    expected = np.concatenate([_hf_rows(hf, features[i:i + 1], sizes[i:i + 1], mask[i:i + 1]) for i in range(2)])
    assert got.shape == expected.shape == (502 + 375, TEXT_HIDDEN)
    assert np.abs(got - expected).max() <= TOL


def test_call_refuses_traced_or_out_of_range_sizes(pair, rng):
    _, model = pair
    features = rng.normal(size=(1, 40, 80)).astype(np.float32)
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(lambda sizes: model(features, sizes))(jnp.array([5]))
    with pytest.raises(ValueError, match=r"\[6\]"):
        model(features, [6])
    with pytest.raises(ValueError, match="mode='audio'"):
        model(features, [5], mode="audio")
    with pytest.raises(ValueError, match="audio_attention_mask"):
        model(features, [5], np.ones((1, 39), bool))


def test_specs_cover_every_parameter_and_hf_key_once(pair):
    hf, model = pair
    pure = nnx.to_pure_dict(nnx.state({"model": {"embed_tokens_extend": {"audio_embed": model}}}))
    specs = list(audio_param_specs(model.config, PREFIX, HF_PREFIX))
    paths = [s.path for s in specs]
    assert len(paths) == len(set(paths))
    assert set(paths) == set(_leaf_paths(pure))
    names = [p.name for s in specs for p in s.pieces]
    hub = {HF_PREFIX + k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert len(names) == len(set(names)) and set(names) == set(hub)
    for spec in specs:
        (piece,) = spec.pieces
        assert piece.hub_shape(np.shape(_get(pure, spec.path))) == hub[piece.name]
    buffers = nnx.to_pure_dict(nnx.state(model, Buffer))
    assert set(_leaf_paths(buffers)) == {("encoder", "global_mean"), ("encoder", "global_invstd")}


def test_config_round_trips_through_transformers():
    config = AudioConfig(hidden_size=32, intermediate_size=48, num_blocks=2, num_heads=4, nemo_conv_channels=8,
                         ext_pw_out_channel=32, depthwise_separable_out_channel=32, bias_max_distance=500)
    hf = transformers.Phi4MultimodalAudioConfig(**config.to_hf())
    assert AudioConfig.from_hf(hf.to_dict()) == config
    defaults = transformers.Phi4MultimodalAudioConfig().to_dict()
    ours = AudioConfig().to_hf()
    assert {k: defaults[k] for k in ours} == ours
    assert AudioConfig().nemo_final_size == defaults["nemo_final_size"] == 10


@pytest.mark.parametrize("key, value", [("activation", "gelu"), ("conv_glu_type", "relu"),
                                        ("nemo_activation", "silu"), ("chunk_size", 18),
                                        ("bias_symmetric", True), ("downsample_rate", 2), ("nemo_final_size", 9)])
def test_from_hf_refuses_unsupported_values(key, value):
    d = {**AudioConfig().to_hf(), key: value}
    with pytest.raises(ValueError, match=f"{key}={value!r}" if key != "nemo_final_size" else "nemo_final_size=9"):
        AudioConfig.from_hf(d)


def test_config_validates_shapes():
    with pytest.raises(ValueError, match="num_heads=5"):
        AudioConfig(num_heads=5)
    with pytest.raises(ValueError, match="time_reduction=6"):
        AudioConfig(time_reduction=6)
    with pytest.raises(ValueError, match="ext_pw_out_channel=512"):
        dataclasses.replace(AudioConfig(), ext_pw_out_channel=512)
