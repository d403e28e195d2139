"""Peak host memory of `jaxmoe.load_hf` relative to the size of the model it loads.

Writes a random fp32 checkpoint of about 600 MB (sharded in 100 MB files) with `save_hf`, then loads it in a fresh
process and reports that process's peak resident memory above its baseline (after importing jax), as JSON lines.
Run: python experiments/bench/load_memory.py
"""

import subprocess
import sys
import tempfile

CHILD = """
import gc, json, sys
import jax, jax.numpy as jnp, numpy as np
import jaxmoe

def status(key):  # kB, from the kernel's accounting of this process
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

jnp.zeros(1).block_until_ready()
gc.collect()
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident size
model = jaxmoe.load_hf(sys.argv[1], dtype=jnp.dtype(sys.argv[2]))
from flax import nnx
nbytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
peak = status("VmHWM")
print(json.dumps({"dtype": sys.argv[2], "model_mb": round(nbytes / 2**20, 1),
                  "peak_rss_above_baseline_mb": round((peak - base) / 1024, 1),
                  "ratio": round((peak - base) * 1024 / nbytes, 2)}))
"""


def main():
    from flax import nnx

    import jaxmoe

    config = jaxmoe.ModelConfig(vocab_size=32064, hidden_size=1024, intermediate_size=2816, num_layers=8,
                                num_heads=16, num_kv_heads=4, head_dim=64)
    model = jaxmoe.Phi3ForCausalLM(config, rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as tmp:
        jaxmoe.save_hf(model, f"{tmp}/ckpt", max_shard_bytes=100 * 2**20)
        del model
        for dtype in ("float32", "bfloat16"):
            out = subprocess.run([sys.executable, "-c", CHILD, f"{tmp}/ckpt", dtype], check=True,
                                 capture_output=True, text=True).stdout
            print(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
