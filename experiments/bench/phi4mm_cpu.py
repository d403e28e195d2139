"""Phi-4-multimodal forward passes: jaxmoe (jit) vs transformers (eager attention) on the same random weights (fp32).

A scaled-down model with the real structure: real 448-pixel crops of 14-pixel patches (1,024 patches a crop),
a SigLIP-style encoder of width 256 (features from its 4th of 5 layers), a 4-block conformer of width 256, and a 4-layer Phi-4-mini-style
decoder of width 512 (vocabulary 32,064). Cases:
  image  one 448 x 672 image (global view + 1 x 2 tiles = 3 crops, 673 image tokens) + 32 text tokens
  audio  one 5 s clip at 16 kHz (498 log-mel frames, 63 audio tokens) + 32 text tokens
The inputs come from jaxmoe.Phi4MMProcessor (bit-exact with transformers' processors). transformers runs with
attn_implementation="eager" (its SDPA path would make the encoders attend causally). Median of `--repeats` calls
each, the two sides alternating call by call; compile time excluded (one warm-up call). One JSON line per case.

    python experiments/bench/phi4mm_cpu.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

import jaxmoe  # noqa: E402
from jaxmoe.io.phi4mm import config_to_hf  # noqa: E402
from jaxmoe.models.phi4mm.audio import AudioConfig  # noqa: E402
from jaxmoe.models.phi4mm.vision import VisionConfig, num_image_tokens  # noqa: E402

IMAGE_ID, AUDIO_ID = 32010, 32011


def config() -> jaxmoe.Phi4MMConfig:
    text = jaxmoe.get_preset("tiny").replace(
        vocab_size=32064, hidden_size=512, intermediate_size=1536, num_layers=4, num_heads=8, num_kv_heads=4,
        head_dim=64, longrope=None, max_position_embeddings=4096, partial_rotary_factor=0.75)
    vision = VisionConfig(hidden_size=256, intermediate_size=1024, num_layers=5, num_heads=4, image_token_id=IMAGE_ID)
    audio = AudioConfig(hidden_size=256, intermediate_size=512, num_blocks=4, num_heads=4, nemo_conv_channels=256,
                        ext_pw_out_channel=256, depthwise_separable_out_channel=256, bias_max_distance=500,
                        audio_token_id=AUDIO_ID)
    return jaxmoe.Phi4MMConfig(text=text, vision=vision, audio=audio)


def models(c: jaxmoe.Phi4MMConfig):
    hf = config_to_hf(c)
    reference_config = transformers.Phi4MultimodalConfig(
        **{k: v for k, v in hf.items() if k not in ("architectures", "model_type", "torch_dtype")})
    reference_config._attn_implementation = "eager"
    torch.manual_seed(0)
    reference = transformers.Phi4MultimodalForCausalLM(reference_config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if not ("norm" in name and name.endswith("weight")):
                p.normal_(0.0, 0.02)
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        model = jaxmoe.load_hf(folder)
    return reference, model


def inputs(c: jaxmoe.Phi4MMConfig) -> dict:
    rng = np.random.default_rng(0)
    processor = jaxmoe.Phi4MMProcessor()
    image = processor.images([rng.integers(0, 256, size=(448, 672, 3), dtype=np.uint8)])
    image.pop("num_img_tokens")
    n_image = num_image_tokens(image["image_sizes"], image["image_attention_mask"], c.vision)[0]
    audio = processor.audio([rng.normal(0, 0.1, size=5 * 16000).astype(np.float32)], sampling_rate=16000)
    n_audio = int(audio["audio_embed_sizes"][0])
    text = rng.integers(3, 32000, size=32)
    return {
        "image": (np.concatenate([text[:16], [IMAGE_ID] * n_image, text[16:]])[None], image),
        "audio": (np.concatenate([text[:16], [AUDIO_ID] * n_audio, text[16:]])[None], audio),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    c = config()
    reference, model = models(c)
    for case, (ids, extra) in inputs(c).items():
        host = {k: v for k, v in extra.items() if k not in ("image_pixel_values", "audio_input_features")}
        traced_key = "image_pixel_values" if case == "image" else "audio_input_features"

        @nnx.jit
        def forward(model, values, ids=ids, host=host, traced_key=traced_key):
            return model(ids, **{traced_key: values}, **host).logits  # sizes and masks stay host constants

        def ours():
            return np.asarray(forward(model, extra[traced_key]))

        torch_inputs = {k: torch.tensor(v) for k, v in extra.items()}

        def theirs():
            with torch.no_grad():
                return reference(torch.tensor(ids), **torch_inputs).logits.numpy()

        difference = float(np.abs(ours() - theirs()).max())  # also the warm-up (compiles ours)
        times = {"jaxmoe": [], "transformers": []}
        for _ in range(args.repeats):
            for name, run in (("jaxmoe", ours), ("transformers", theirs)):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
        print(json.dumps({"case": case, "tokens": int(ids.shape[1]), "jaxmoe_ms": round(ms["jaxmoe"], 1),
                          "transformers_ms": round(ms["transformers"], 1),
                          "speedup": round(ms["transformers"] / ms["jaxmoe"], 2),
                          "max_abs_logit_diff": difference}), flush=True)


if __name__ == "__main__":
    main()
