"""PEMA: plug-in external memory adaptation (Kim, Kim, Bak, NAACL 2024, arXiv 2311.08590).

The data owner adapts a language model without its weights: it sees only context representations (the last
layer's output BEFORE the final norm, f(c_i)) and the output side of the model (final norm + LM head, W_hd).

1. `build_memory`: teacher-force prompt + source + target through the frozen model and store, for every target
   position i, the key f(c_i) [d] and the value y_i (the target token at i), as safetensors shards on disk;
   `Memory` streams them back in batches (memory.py).
2. `PEMA`: A [r, d] (Kaiming-uniform), B_rct and B_pd [d, r] (zero), scale alpha / r, input dropout. Its output is
   only the low-rank path s * B_pd A f; P_PEMA = softmax(W_hd LN(s B_pd A f)) (module.py, with `Head`).
3. `train_reconstruction` (phase 1: min MSE(s B_rct A f, f)) and `train_joint` (phase 2: B_rct frozen, A
   re-initialised as the reference code does, min kappa MSE + (1 - kappa) CE(W_hd LN(s B_pd A f), y)). Both take
   the memory and, for phase 2, a `Head` (final norm + LM head params, `lm_head_of(model)`), never the model (train.py).
4. `gradual_unrolling`: a logits processor for `jaxmoe.generate` (greedy, sampled or beam search) that mixes
   P = c_t P_PEMA + (1 - c_t) P_LM in probability space, c_t from Gradual Unrolling's decaying lambda (decode.py).
5. `knn_lm`: the kNN-LM baseline over the same memory, P = lam P_kNN + (1 - lam) P_LM with P_kNN from the k nearest
   keys, as a logits processor too (knn.py).
"""

from jaxmoe.mt.pema.decode import GradualUnrolling, gradual_unrolling, gu_coefficients
from jaxmoe.mt.pema.knn import KNNLM, knn_lm, knn_log_probs, memory_arrays, nearest
from jaxmoe.mt.pema.memory import (EN_DE_PROMPT, FORMALITY_PROMPT, Memory, MemoryInfo, build_memory, encode_examples,
                                   model_fingerprint)
from jaxmoe.mt.pema.module import PEMA, Head, lm_head_of
from jaxmoe.mt.pema.train import TrainResult, exceeds_previous_two, memory_loss, train_joint, train_reconstruction

__all__ = ["EN_DE_PROMPT", "FORMALITY_PROMPT", "GradualUnrolling", "Head", "KNNLM", "Memory", "MemoryInfo", "PEMA",
           "TrainResult", "build_memory", "encode_examples", "exceeds_previous_two", "gradual_unrolling",
           "gu_coefficients", "knn_lm", "knn_log_probs", "lm_head_of", "memory_arrays", "memory_loss",
           "model_fingerprint", "nearest", "train_joint", "train_reconstruction"]

