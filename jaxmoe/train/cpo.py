"""Contrastive Preference Optimization (CPO, ALMA-R: Xu et al. 2024, arXiv 2401.08417) for jaxmoe's causal LMs.

CPO is DPO without a reference model, plus a behaviour-cloning NLL term on the preferred translation:

    loss = mean_pairs(L_prefer(beta * (log pi(y_w | x) - log pi(y_l | x)))) + cpo_alpha * NLL(y_w | x)

with log pi summed over the target tokens (prompt and padding excluded), and NLL the mean token cross-entropy
of the chosen rows. `cpo_loss` is TRL's `CPOTrainer` (trl.experimental.cpo) formula for formula: loss types
sigmoid (with label smoothing), hinge, ipo and simpo, and its logged rewards (beta x log-prob).

The pieces, in the order a run uses them:
  data       `read_triplets` / `write_triplets` (ALMA-R's JSON layout, or jaxmoe's candidate JSONL), and
             `build_triplets`, which samples and scores candidates from a model (jaxmoe.train.triplets);
  batches    `encode_preference`, `PreferenceBatch`, `PreferenceStream` (training) and `preference_eval_batches`
             (jaxmoe.train.triplets);
  training   `sequence_logps`, `cpo_objective`, `cpo_train_step` (jitted, AdamW from
             `jaxmoe.train.loop.make_optimizer`) and `cpo_evaluate`, all set by a `CPOConfig`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxmoe.sharding import on_auto_axes
from jaxmoe.train.loop import (Batch, check_batch, current_learning_rate, keep_param_layout, param_layout,
                               target_weights)
# The triplet data and batches live in jaxmoe.train.triplets; a CPO run needs both, so they are importable here too.
from jaxmoe.train.triplets import (PreferenceBatch, PreferenceStream, Triplet, build_triplets, is_number,
                                   encode_preference, preference_eval_batches, read_triplets, write_triplets)

__all__ = ["LOSS_TYPES", "METRICS", "CPOConfig", "PreferenceBatch", "PreferenceStream", "SequenceLogps", "Triplet",
           "build_triplets", "cpo_evaluate", "cpo_loss", "cpo_objective", "cpo_train_step", "encode_preference",
           "preference_eval_batches", "read_triplets", "sequence_logps", "write_triplets"]

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
LENGTH_AVERAGED = ("ipo", "simpo")  # TRL scores these with per-token average log-probs, the others with sums
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


# --- The loss ----------------------------------------------------------------------------------------------------

def _check_settings(beta, loss_type, label_smoothing, simpo_gamma, cpo_alpha, where: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"{where}: loss_type={loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if not is_number(beta) or beta <= 0:
        raise ValueError(f"{where}: beta={beta!r}; expected a finite number > 0 (ALMA-R uses 0.1)")
    if not is_number(label_smoothing) or not 0 <= label_smoothing < 0.5:
        raise ValueError(f"{where}: label_smoothing={label_smoothing!r}; expected a number in [0, 0.5) (0: none)")
    if label_smoothing and loss_type not in ("sigmoid", "simpo"):
        raise ValueError(f"{where}: label_smoothing={label_smoothing!r} with loss_type={loss_type!r}; label "
                         "smoothing applies to the sigmoid and simpo losses only: set it to 0")
    if not is_number(simpo_gamma):
        raise ValueError(f"{where}: simpo_gamma={simpo_gamma!r}; expected a finite number (SimPO's margin, 0.5)")
    if not is_number(cpo_alpha) or cpo_alpha < 0:
        raise ValueError(f"{where}: cpo_alpha={cpo_alpha!r}; expected a finite number >= 0 (1.0: CPO; 0: no NLL "
                         "term)")


@dataclasses.dataclass(frozen=True, slots=True)
class CPOConfig:
    """CPO's settings, TRL's names and defaults: `beta` scales the log-prob margin (ALMA-R: 0.1); `loss_type`
    one of LOSS_TYPES; `label_smoothing` in [0, 0.5) for sigmoid and simpo; `simpo_gamma` SimPO's target margin;
    `cpo_alpha` the weight of the chosen rows' NLL (0: pure preference loss, e.g. SimPO)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0

    def __post_init__(self):
        _check_settings(self.beta, self.loss_type, self.label_smoothing, self.simpo_gamma, self.cpo_alpha,
                        "CPOConfig")

    @property
    def length_averaged(self) -> bool:
        """Whether the loss compares per-token average log-probs (ipo, simpo) instead of sums."""
        return self.loss_type in LENGTH_AVERAGED


def _pair_terms(chosen_logps, rejected_logps, config: CPOConfig) -> dict[str, jax.Array]:
    """float32 [b] per pair: "losses" (the preference loss) and the METRICS before averaging."""
    chosen_logps = jnp.asarray(chosen_logps, jnp.float32)
    rejected_logps = jnp.asarray(rejected_logps, jnp.float32)
    beta, smoothing = config.beta, config.label_smoothing
    logits = chosen_logps - rejected_logps
    if config.loss_type in ("sigmoid", "simpo"):
        if config.loss_type == "simpo":
            logits = logits - config.simpo_gamma / beta
        losses = -jax.nn.log_sigmoid(beta * logits) * (1 - smoothing) - jax.nn.log_sigmoid(-beta * logits) * smoothing
    elif config.loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * logits)
    else:  # ipo: beta is IPO's regularisation tau
        losses = (logits - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * jax.lax.stop_gradient(chosen_logps)
    rejected_rewards = beta * jax.lax.stop_gradient(rejected_logps)
    return {"losses": losses, "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
            "logps/chosen": jax.lax.stop_gradient(chosen_logps),
            "logps/rejected": jax.lax.stop_gradient(rejected_logps)}


def cpo_loss(chosen_logps, rejected_logps, chosen_nll, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, simpo_gamma: float = 0.5, cpo_alpha: float = 1.0
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """TRL CPOTrainer's loss over a batch of b preference pairs.

    chosen_logps, rejected_logps: float [b], each row's target-token log-probs, summed for sigmoid and hinge,
    averaged per token for ipo and simpo (as TRL computes them; `sequence_logps` gives sums and token counts,
    and `cpo_objective` divides for those two). chosen_nll: float [], the mean token cross-entropy over the
    chosen rows' targets (TRL's nll_loss), or float [b], one value per chosen row, which is averaged.

    Returns (loss float32 [] = mean of the per-pair losses + cpo_alpha x chosen_nll, metrics float32 [] means
    over the pairs: rewards/chosen, rewards/rejected (beta x logps), rewards/margins, rewards/accuracies (the
    fraction with chosen reward > rejected), logps/chosen, logps/rejected, and nll_loss). Unlike TRL, which
    logs nll_loss 0 when cpo_alpha=0, nll_loss is always the chosen_nll given, so an ablation can watch it.
    """
    _check_settings(beta, loss_type, label_smoothing, simpo_gamma, cpo_alpha, "cpo_loss")
    shapes = tuple(jnp.shape(chosen_logps)), tuple(jnp.shape(rejected_logps)), tuple(jnp.shape(chosen_nll))
    if len(shapes[0]) != 1 or shapes[0] != shapes[1] or shapes[0][0] < 1 or shapes[2] not in ((), shapes[0]):
        raise ValueError(f"cpo_loss: chosen_logps {shapes[0]}, rejected_logps {shapes[1]} and chosen_nll "
                         f"{shapes[2]}; expected [b], the same [b] (b >= 1) and a scalar [] (or [b] per row)")
    config = CPOConfig(beta, loss_type, label_smoothing, simpo_gamma, cpo_alpha)
    terms = _pair_terms(chosen_logps, rejected_logps, config)
    nll = jnp.mean(jnp.asarray(chosen_nll, jnp.float32))
    loss = jnp.mean(terms["losses"])
    if cpo_alpha:  # TRL adds cpo_alpha * nll, and sets nll to 0 when cpo_alpha == 0
        loss = loss + cpo_alpha * nll
    metrics = {key: jnp.mean(terms[key]) for key in METRICS}
    metrics["nll_loss"] = jax.lax.stop_gradient(nll)
    return loss, metrics


# --- Log-probs, objective, step, evaluation ----------------------------------------------------------------------

class SequenceLogps(NamedTuple):
    """Per row of a PreferenceBatch [2b, t]: `logps` float32 [2b], the summed log-probs of its target tokens;
    `tokens` float32 [2b], how many there are; `chosen_nll` float32 [], the mean token cross-entropy over the
    chosen rows' targets (rows 0..b-1), = -sum(logps[:b]) / sum(tokens[:b])."""

    logps: jax.Array
    tokens: jax.Array
    chosen_nll: jax.Array


def _check_preference_batch(batch) -> Batch:
    """The batch as a loop.Batch (same checks), or ValueError unless it is a [2b, t] PreferenceBatch."""
    if not isinstance(batch, PreferenceBatch):
        raise TypeError(f"expected a PreferenceBatch; got a {type(batch).__name__}")
    as_batch = Batch(jnp.asarray(batch.input_ids), jnp.asarray(batch.loss_mask), jnp.asarray(batch.attention_mask))
    check_batch(as_batch, rank=2)
    if as_batch.input_ids.shape[0] % 2:
        raise ValueError(f"PreferenceBatch has {as_batch.input_ids.shape[0]} rows; expected 2b: b chosen rows, then "
                         "b rejected rows")
    return as_batch


def _forward(model, batch: PreferenceBatch, rngs) -> tuple[SequenceLogps, Any]:
    as_batch = _check_preference_batch(batch)
    out = model(as_batch.input_ids, attention_mask=as_batch.attention_mask, rngs=rngs)
    weight_bt = target_weights(as_batch)
    nll_bt = optax.softmax_cross_entropy_with_integer_labels(out.logits[:, :-1].astype(jnp.float32),
                                                             as_batch.input_ids[:, 1:])
    # where, not a product: a filler row (no tokens at all) must not leak a NaN into the sums.
    logps = -jnp.sum(jnp.where(weight_bt > 0, nll_bt, 0.0), axis=1)
    tokens = jnp.sum(weight_bt, axis=1)
    b = logps.shape[0] // 2
    chosen_nll = -jnp.sum(logps[:b]) / jnp.maximum(jnp.sum(tokens[:b]), 1.0)
    return SequenceLogps(logps, tokens, chosen_nll), out


def sequence_logps(model: nnx.Module, batch: PreferenceBatch, rngs: nnx.Rngs | None = None) -> SequenceLogps:
    """One forward pass of the model over the batch's 2b rows: each row's summed target-token log-prob, its
    target count, and the chosen rows' mean token NLL (see SequenceLogps). `rngs` feeds MoE routing in training
    mode."""
    return _forward(model, batch, rngs)[0]


def cpo_objective(model: nnx.Module, batch: PreferenceBatch, rngs: nnx.Rngs | None = None, *,
                  config: CPOConfig = CPOConfig()) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CPO's training objective on one batch: `cpo_loss` of the model's sequence log-probs (length-averaged for
    ipo and simpo, as TRL) plus, for MoE models, the config's aux_loss_coef x load-balancing loss and z_loss_coef
    x router z-loss. Every pair counts (training batches have no fillers; use cpo_evaluate for padded ones).

    Returns (objective float32 [], metrics float32 []: "loss" (the CPO loss, without the MoE terms), the
    cpo_loss metrics, and for MoE models "aux_loss", "router_z_loss" and "expert_load" [layers, experts]).
    """
    scores, out = _forward(model, batch, rngs)
    logps = scores.logps / jnp.maximum(scores.tokens, 1.0) if config.length_averaged else scores.logps
    b = logps.shape[0] // 2
    loss, metrics = cpo_loss(logps[:b], logps[b:], scores.chosen_nll, **dataclasses.asdict(config))
    metrics["loss"] = loss
    objective = loss
    if out.aux_loss is not None:
        moe = model.config.moe
        metrics.update(aux_loss=out.aux_loss, router_z_loss=out.router_z_loss, expert_load=out.expert_load)
        objective = objective + moe.aux_loss_coef * out.aux_loss + moe.z_loss_coef * out.router_z_loss
    return objective, metrics


@on_auto_axes  # a mesh with Explicit axes: see jaxmoe.sharding
def cpo_train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: PreferenceBatch,
                   rngs: nnx.Rngs | None = None, *, config: CPOConfig = CPOConfig()) -> dict[str, jax.Array]:
    """One optimizer step on cpo_objective, in place, on the parameters the optimizer was built for (use
    `jaxmoe.train.loop.make_optimizer`: all `nnx.Param`s, or `wrt=nnx.LoRAParam` for the adapters only, as
    ALMA-R trains). Compiled once per (shapes, config).

    Returns float32 scalars: loss (the CPO loss), grad_norm (before clipping), learning_rate (the rate this step
    used) and cpo_objective's metrics; MoE models add aux_loss, router_z_loss and expert_load [layers, experts]
    and, in training mode, need `rngs`.
    """
    if not isinstance(config, CPOConfig):
        raise TypeError(f"cpo_train_step: config is a {type(config).__name__}; expected a CPOConfig")
    _check_preference_batch(batch)
    return _cpo_train_step(model, optimizer, batch, rngs, config, param_layout(model, optimizer))


@functools.partial(nnx.jit, donate_argnames=("model", "optimizer"), static_argnames=("config", "layout"))
def _cpo_train_step(model, optimizer, batch, rngs, config: CPOConfig, layout) -> dict[str, jax.Array]:
    # Keys drawn here, streams rebuilt inside the differentiated function (as loop._train_step does).
    keys = None if rngs is None else {name: stream() for name, stream in rngs.items()}
    graphdef, trained, rest = nnx.split(model, optimizer.wrt, ...)

    def objective(trained):
        step_rngs = None if keys is None else nnx.Rngs(**keys)
        return cpo_objective(nnx.merge(graphdef, trained, rest), batch, step_rngs, config=config)

    (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(trained)
    optimizer.update(model, grads)
    if layout is not None:
        keep_param_layout(model, optimizer, layout)
    metrics.update(grad_norm=optax.global_norm(grads), learning_rate=current_learning_rate(optimizer))
    return metrics


@functools.partial(nnx.jit, static_argnames=("config",))
def _eval_sums(model, batch: PreferenceBatch, config: CPOConfig) -> dict[str, jax.Array]:
    scores = sequence_logps(model, batch)
    logps = scores.logps / jnp.maximum(scores.tokens, 1.0) if config.length_averaged else scores.logps
    b = logps.shape[0] // 2
    weight = (scores.tokens[:b] > 0).astype(jnp.float32)
    terms = _pair_terms(logps[:b], logps[b:], config)
    sums = {key: jnp.sum(value * weight) for key, value in terms.items()}
    sums.update(pairs=jnp.sum(weight), nll_sum=-jnp.sum(scores.logps[:b]), chosen_tokens=jnp.sum(scores.tokens[:b]))
    return sums


def cpo_evaluate(model: nnx.Module, batches: Iterable[PreferenceBatch], *, config: CPOConfig = CPOConfig()
                 ) -> dict[str, float]:
    """cpo_loss over every real pair of `batches` (e.g. preference_eval_batches; filler pairs weigh 0), exactly
    as if they formed one batch: pair metrics are means over all pairs, nll_loss is token-weighted over all
    chosen rows, loss = mean preference loss + cpo_alpha x nll_loss. Returns {"loss", the cpo_loss metrics,
    "pairs"}. Runs the model as it is (call model.eval() first for deterministic MoE routing)."""
    if not isinstance(config, CPOConfig):
        raise TypeError(f"cpo_evaluate: config is a {type(config).__name__}; expected a CPOConfig")
    totals: dict[str, float] = {}
    for batch in batches:
        _check_preference_batch(batch)
        for key, value in _eval_sums(model, batch, config).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    if not totals.get("pairs"):
        raise ValueError("cpo_evaluate: the batches hold no pairs (no batches, or only filler rows)")
    result = {key: totals[key] / totals["pairs"] for key in METRICS}
    result["nll_loss"] = totals["nll_sum"] / max(totals["chosen_tokens"], 1.0)
    result["loss"] = totals["losses"] / totals["pairs"] + (config.cpo_alpha * result["nll_loss"]
                                                           if config.cpo_alpha else 0.0)
    result["pairs"] = int(totals["pairs"])
    return result
