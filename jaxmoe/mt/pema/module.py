"""PEMA's module and what it needs of the model: `Head` (final norm + LM head parameters, `lm_head_of(model)`)
and `PEMA` (A [r, d], B_rct and B_pd [d, r]; output s B_pd A dropout(f))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxmoe.mt.pema.memory import model_fingerprint
from jaxmoe.nn.lm_loss import OutputHead

__all__ = ["Head", "PEMA", "check_unit", "lm_head_of", "project"]


def check_unit(name: str, value, meaning: str) -> None:
    """Raises ValueError unless `value` is a number in [0, 1] (kappa, lambda_max); `meaning` says what it is."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not 0 <= value <= 1:
        raise ValueError(f"{name}={value!r}; expected a number in [0, 1] ({meaning})")


@struct.dataclass
class Head:
    """What the data owner receives of the model: the final norm (its module structure and parameters) and the
    output head. With tied embeddings the output head is the embedding table [v, d]: W_hd IS the table. The
    `fingerprint` is the model's `model_fingerprint`, checked against memories. norm_params is a plain nested dict
    of arrays (`nnx.to_pure_dict`), so a Head is an ordinary pytree of arrays."""

    norm_def: nnx.GraphDef = struct.field(pytree_node=False)
    norm_params: dict
    output: OutputHead
    fingerprint: str = struct.field(pytree_node=False)

    @property
    def hidden_size(self) -> int:
        return self.output.weight.shape[1 if self.output.layout == "vd" else 0]

    @property
    def vocab_size(self) -> int:
        return self.output.vocab_size

    def logits(self, h_nd: jax.Array) -> jax.Array:
        """Pre-norm hidden states float [..., d] -> logits float32 [..., v] = W_hd LN(h)."""
        return self.output.logits(nnx.merge(self.norm_def, nnx.State(self.norm_params))(h_nd))


def lm_head_of(model) -> Head:
    """The `Head` (final norm + LM head, nothing else) of a Phi3ForCausalLM, PhimoeForCausalLM or multimodal
    model (its language model's)."""
    lm = getattr(model, "language_model", model)
    norm_def, norm_params = nnx.split(lm.norm)
    return Head(norm_def=norm_def, norm_params=nnx.to_pure_dict(norm_params), output=lm.output_head(),
                fingerprint=model_fingerprint(lm.config))


def project(a_rd, b_dr, scale, f_nd):
    """s * B A f: float [n, d] -> float32 [n, d] (A [r, d], B [d, r])."""
    z = jnp.einsum("nd,rd->nr", f_nd.astype(jnp.float32), a_rd.astype(jnp.float32))
    return scale * jnp.einsum("nr,dr->nd", z, b_dr.astype(jnp.float32))


class PEMA(nnx.Module):
    """The PEMA adapter over context representations f float [n, d]: A [r, d] (Kaiming-uniform, bound
    1 / sqrt(d), torch's nn.Linear init), B_rct and B_pd [d, r] (zero), scale alpha / r, dropout on f."""

    def __init__(self, hidden_size: int, rank: int, *, alpha: float = 1.0, dropout: float = 0.2,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        for name, n in (("hidden_size", hidden_size), ("rank", rank)):
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise ValueError(f"PEMA: {name}={n!r}; expected an integer >= 1")
        self.a_rd = nnx.Param(self._a_init(rngs.params(), (rank, hidden_size), param_dtype))
        self.b_rct_dr = nnx.Param(jnp.zeros((hidden_size, rank), param_dtype))
        self.b_pd_dr = nnx.Param(jnp.zeros((hidden_size, rank), param_dtype))
        self.scale = float(alpha) / rank
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    _a_init = staticmethod(nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=-1, out_axis=-2))

    @property
    def hidden_size(self) -> int:
        return self.a_rd.shape[1]

    def reset_a(self, rngs: nnx.Rngs) -> None:
        """Draws A afresh (phase 2 starts from a new A, as the reference code does)."""
        self.a_rd[...] = self._a_init(rngs.params(), self.a_rd.shape, self.a_rd.dtype)

    def both(self, f_nd: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(reconstruction s B_rct A f', prediction s B_pd A f'), float32 [n, d] each, f' = dropout(f) drawn once."""
        f = self.dropout(f_nd.astype(jnp.float32))
        return (project(self.a_rd[...], self.b_rct_dr[...], self.scale, f),
                project(self.a_rd[...], self.b_pd_dr[...], self.scale, f))

    def __call__(self, f_nd: jax.Array) -> jax.Array:
        """PEMA's output, only the low-rank path: s B_pd A dropout(f), float32 [n, d] (no residual)."""
        return self.both(f_nd)[1]
