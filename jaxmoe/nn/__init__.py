"""Building blocks of the Phi decoders: norms, rotary embeddings, attention with a KV cache, MLPs."""
