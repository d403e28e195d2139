"""kNN-LM over PEMA's external memory (Khandelwal et al., ICLR 2020), the baseline PEMA is compared with: the k
memory keys nearest a context representation vote for their next tokens, P_kNN(y) = sum over those neighbours j
with value y of softmax_j(-||q - k_j||^2 / T), and `knn_lm` mixes P = lam P_kNN + (1 - lam) P_LM as a
`jaxmoe.generate` logits processor. The keys are PEMA's (pre-norm final states), held in memory whole."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxmoe.mt.pema.memory import Memory
from jaxmoe.mt.pema.module import check_unit

__all__ = ["KNNLM", "knn_lm", "knn_log_probs", "memory_arrays", "nearest"]


def nearest(query_nd, keys_md, k: int) -> tuple[jax.Array, jax.Array]:
    """The k keys nearest each query by squared L2 distance (FAISS's, which kNN-LM uses): (distances float32 [n, k],
    ascending; indices int32 [n, k] into keys). query [n, d], keys [m, d], k <= m."""
    q, keys = query_nd.astype(jnp.float32), keys_md.astype(jnp.float32)
    d2_nm = (jnp.sum(q * q, -1, keepdims=True) - 2 * q @ keys.T + jnp.sum(keys * keys, -1)[None, :])
    neg_nk, idx_nk = jax.lax.top_k(-d2_nm, k)
    return jnp.maximum(-neg_nk, 0.0), idx_nk.astype(jnp.int32)


def knn_log_probs(query_nd, keys_md, values_m, vocab_size: int, *, k: int, temperature) -> jax.Array:
    """log P_kNN float32 [n, v]: softmax(-distance / temperature) over each query's k nearest keys, summed per
    value (token id); -inf for tokens no neighbour holds."""
    d2_nk, idx_nk = nearest(query_nd, keys_md, k)
    w_nk = jax.nn.softmax(-d2_nk / temperature, axis=-1)
    rows = jnp.arange(d2_nk.shape[0])[:, None]
    p_nv = jnp.zeros((d2_nk.shape[0], vocab_size), jnp.float32).at[rows, values_m[idx_nk]].add(w_nk)
    return jnp.log(p_nv)


@struct.dataclass
class KNNLM:
    """A `jaxmoe.generate` logits processor: next-token log-probabilities log(lam P_kNN + (1 - lam) P_LM), P_kNN
    from the pre-norm hidden state's nearest memory keys (`knn_log_probs`). Built by `knn_lm`."""

    keys_md: jax.Array  # float32 [m, d]
    values_m: jax.Array  # int32 [m]
    temperature: jax.Array
    lam: jax.Array
    k: int = struct.field(pytree_node=False)

    def __call__(self, step, logits_rv, hidden_rd):
        logp_lm = jax.nn.log_softmax(logits_rv.astype(jnp.float32), axis=-1)
        logp_knn = knn_log_probs(hidden_rd, self.keys_md, self.values_m, logits_rv.shape[-1], k=self.k,
                                 temperature=self.temperature)
        return jax.nn.logsumexp(jnp.stack([jnp.log(self.lam) + logp_knn, jnp.log1p(-self.lam) + logp_lm]), axis=0)


def memory_arrays(memory: Memory) -> tuple[np.ndarray, np.ndarray]:
    """Every row of `memory` at once: keys float32 [m, d], values int32 [m], in build order."""
    shards = [memory.read_shard(i) for i in range(len(memory.info.shards))]
    return np.concatenate([k for k, _ in shards]), np.concatenate([v for _, v in shards])


def knn_lm(memory: Memory, *, k: int = 16, temperature: float = 1.0, lam: float = 0.25) -> KNNLM:
    """The kNN-LM mixture over all of `memory` (loaded whole: keys take m x d x 4 bytes) for
    `jaxmoe.generate(..., logits_processor=...)`. temperature > 0 divides the squared distances; lam in [0, 1] is
    P_kNN's weight (kNN-LM's lambda, 0.25 in its paper; 0 is plain generation)."""
    check_unit("lam", lam, "the weight of the kNN distribution; kNN-LM uses 0.25, 0 turns it off")
    if not (isinstance(temperature, (int, float, np.floating)) and not isinstance(temperature, bool)
            and temperature > 0):
        raise ValueError(f"temperature={temperature!r}; expected a positive number (it divides squared distances)")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(memory):
        raise ValueError(f"k={k!r}; expected an integer in [1, {len(memory)}] (the memory's rows)")
    keys, values = memory_arrays(memory)
    return KNNLM(keys_md=jnp.asarray(keys), values_m=jnp.asarray(values), temperature=jnp.float32(temperature),
                 lam=jnp.float32(lam), k=int(k))
