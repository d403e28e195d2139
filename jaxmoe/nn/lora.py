"""Low-rank adapters (LoRA) on a model's `nnx.Linear` layers: add, train, merge back.

`apply_lora` wraps the named linear layers in place; `merge_lora` folds each adapter into its kernel and restores
the plain `nnx.Linear`, so the merged model has the original structure (and `save_hf` writes it).

The adapter matrices are `nnx.LoRAParam`, a subclass of `nnx.Param`. Filters therefore select:
  `nnx.LoRAParam`                              the adapters only (fine-tune: `nnx.Optimizer(model, tx,
                                               wrt=nnx.LoRAParam)`, `nnx.grad(..., argnums=nnx.DiffState(0,
                                               nnx.LoRAParam))`);
  `nnx.Param`                                  base weights and adapters together;
  `nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))` the base weights only.

Only `nnx.Linear` layers called through `__call__` can be targets. `lm_head` and the MoE `router` are read
through `.kernel` directly by their owners, so a wrapper there would be skipped (and the router must stay as
trained); MoE expert weights (`w_gate_up`, `w_down`) are raw parameter arrays, not `nnx.Linear`, and are not
adapted either.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.nn.graph import set_submodule, submodules

__all__ = ["UNSUPPORTED_TARGETS", "LoRAAdapter", "LoRAConfig", "LoRALinear", "apply_lora", "merge_lora"]

# Linear layers whose owners read `.kernel` instead of calling the layer, with the reason shown to the user.
# Single (`apply_lora`) and mixture (`jaxmoe.nn.multi_lora`, `jaxmoe.io.peft`) adapters skip them alike.
UNSUPPORTED_TARGETS = {
    "lm_head": "the model reads lm_head.kernel directly (an adapter there would be silently skipped)",
    "router": "the MoE block reads router.kernel directly and its routing must stay as trained",
}


@dataclasses.dataclass(frozen=True, slots=True)
class LoRAConfig:
    """rank r and alpha of every adapter (its update is scaled by alpha / r), the attribute names of the
    `nnx.Linear` layers to adapt, and the dropout rate on each adapter's input in training mode (PEFT's
    `lora_dropout`; 0: none)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    dropout: float = 0.0

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank is {self.rank!r}; expected an integer >= 1 (typically 4 to 64)")
        if not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha is {self.alpha!r}; expected a positive number (often 2 x rank)")
        if isinstance(self.targets, str) or not self.targets:
            raise ValueError(f"LoRAConfig.targets is {self.targets!r}; expected a non-empty tuple of layer names, "
                             "e.g. ('qkv_proj', 'o_proj')")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRAConfig.dropout is {self.dropout!r}; expected a number in [0, 1) (PEFT's "
                             "lora_dropout, e.g. 0.05)")
        for name in self.targets:
            if name in UNSUPPORTED_TARGETS:
                raise ValueError(f"LoRAConfig.targets contains {name!r}, which cannot be adapted: "
                                 f"{UNSUPPORTED_TARGETS[name]}; remove it from targets")


class LoRAAdapter(nnx.Module):
    """One adapter's matrices and scale: lora_a [in, r], lora_b [r, out] (float32 by default: PEFT's
    autocast_adapter_dtype, so that small updates on a bf16 model are not rounded away), scale alpha / r, or
    alpha / sqrt(r) with rsLoRA. `lora_a` starts as PEFT's (uniform in ±1/sqrt(in)) and `lora_b` at zero, so a
    fresh adapter's update is zero."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float, use_rslora: bool = False,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.rank, self.alpha, self.use_rslora = int(rank), float(alpha), bool(use_rslora)
        self.scale = self.alpha / (math.sqrt(rank) if use_rslora else rank)
        # variance_scaling(1/3, fan_in, uniform) is torch's kaiming_uniform_(a=sqrt(5)), PEFT's lora_A init.
        a_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
        self.lora_a = nnx.LoRAParam(a_init(rngs.params(), (in_features, rank), dtype))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_features), dtype))

    def update(self, x: jax.Array, compute) -> jax.Array:
        """x [..., in] -> (x @ lora_a @ lora_b) * scale [..., out], computed in the dtype `compute`."""
        return (x.astype(compute) @ self.lora_a[...].astype(compute)) @ self.lora_b[...].astype(compute) * self.scale


class LoRALinear(LoRAAdapter):
    """y = base(x) + (x @ lora_a @ lora_b) * alpha / rank, around an existing `nnx.Linear` kept as `.base`.

    x [..., in] -> y [..., out]. The adapter (`LoRAAdapter`: float32 matrices, a fresh one a no-op) runs its
    matmuls in the base's compute dtype. With `dropout` > 0 the adapter sees dropout(x) in training mode
    (`model.train()`; keys from the `rngs` of the call, which the model passes down from its own `rngs`) and x in
    eval mode, as PEFT's `lora_dropout`; the base layer always sees x.
    """

    takes_rngs = True

    def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, rngs: nnx.Rngs, dropout: float = 0.0):
        self.base = base
        super().__init__(base.in_features, base.out_features, rank=rank, alpha=alpha, rngs=rngs)
        self.dropout = nnx.Dropout(dropout) if dropout > 0 else None

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        y = self.base(x)
        adapter_in = x
        if self.dropout is not None and not self.dropout.deterministic:
            if rngs is None:
                raise ValueError(f"a LoRA adapter with dropout {self.dropout.rate} is in training mode but got no "
                                 "rngs; pass rngs= to the model call (train_step does), or call model.eval()")
            adapter_in = self.dropout(x, rngs=rngs)
        return y + self.update(adapter_in, self.base.dtype or y.dtype).astype(y.dtype)

    def merged_kernel(self) -> jax.Array:
        """base.kernel + lora_a @ lora_b * scale [in, out], summed in float32, in the kernel's dtype."""
        kernel = self.base.kernel[...]
        delta = self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32) * self.scale
        return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def apply_lora(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs) -> int:
    """Wraps, in place, every `nnx.Linear` whose attribute name is in `config.targets` in a `LoRALinear`.

    Returns the number of layers wrapped. Raises ValueError when the model already has adapters, or when a
    target names no `nnx.Linear` in the model (the message lists the names that exist).
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"apply_lora: config is a {type(config).__name__}; expected a LoRAConfig")
    if submodules(model, LoRALinear):
        raise ValueError(f"apply_lora: this {type(model).__name__} already has LoRA adapters; call merge_lora(model) "
                         "first to fold them in, or keep training the existing ones")
    linears = [(parent, key, linear) for parent, key, linear in submodules(model, nnx.Linear) if isinstance(key, str)]
    existing = sorted({key for _, key, _ in linears})
    missing = [name for name in config.targets if name not in existing]
    if missing:
        raise ValueError(
            f"apply_lora: targets {missing} match no nnx.Linear attribute of this {type(model).__name__}; its "
            f"linear layers are {existing} (not adaptable: {sorted(UNSUPPORTED_TARGETS)}; MoE expert weights are "
            "not nnx.Linear). Pass LoRAConfig(targets=...) with names from that list")
    chosen = [(parent, key, linear) for parent, key, linear in linears if key in config.targets]
    if config.dropout > 0:
        no_rngs = sorted({key for parent, key, _ in chosen if not getattr(parent, "forwards_rngs", False)})
        if no_rngs:
            raise ValueError(f"apply_lora: dropout={config.dropout} on targets {no_rngs}, whose owners do not pass "
                             "the dropout keys down; adapter dropout works on MLP projections (gate_up_proj, "
                             "down_proj): use those targets, or dropout=0")
    for parent, key, linear in chosen:
        set_submodule(parent, key, LoRALinear(linear, rank=config.rank, alpha=config.alpha, rngs=rngs,
                                              dropout=config.dropout))
    return len(chosen)


def merge_lora(model: nnx.Module) -> int:
    """Folds every adapter into its base kernel and puts the plain `nnx.Linear` back, in place.

    Returns the number of adapters merged (0 for a model without any). Logits are unchanged up to rounding.
    """
    adapted = submodules(model, LoRALinear)
    for parent, key, lora in adapted:
        lora.base.kernel[...] = lora.merged_kernel()
        set_submodule(parent, key, lora.base)
    return len(adapted)
