"""The sparse MoE feed-forward block of Phi-3.5-MoE / GRIN-MoE: router, routing, dropless experts.

The module owns parameters only; routing maths live in `router.py` (SparseMixer-v2 run through
`pallas_kernels.sparsemixer_top2`, v2* through `router.sparsemixer`), the expert computation in `experts.py`.
Parameter layout: `router` [d, e] (no bias), `w_gate_up` [e, d, 2f] ([..., :f] is the gate), `w_down` [e, f, d].
After `jaxmoe.quantize(..., target="experts")` the expert weights are `jaxmoe.quant.QuantizedParam`s holding a
`pallas_kernels.QuantizedWeight`, which goes into `moe_ffn` packed.
With `MoEConfig.task_adapters` set, the block also owns `task_adapter` (`jaxmoe.moe.task_adapters`) and takes one
task id per batch row: "token" mode adds the task's share to the router logits, "static" and "dynamic" adapt the
experts' output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct
from pallas_kernels import MixedQuantizedWeight, QuantizedWeight, sparsemixer_top2

from jaxmoe.config import MoEConfig
from jaxmoe.moe.experts import PerExpertWeights, moe_ffn, resolve_implementation, split_experts
from jaxmoe.moe.parallel import moe_ffn_sharded
from jaxmoe.moe.router import sparsemixer, sparsemixer_noise, topk_router
from jaxmoe.moe.task_adapters import check_task_ids, make_task_adapter


@struct.dataclass
class Routing:
    """What one MoE layer decided, returned upward for the auxiliary losses and logging."""

    router_logits: jax.Array  # float32 [tokens, experts]
    experts: jax.Array  # int32 [tokens, top_k]


class SparseMoeBlock(nnx.Module):
    """y = Σ_k w_k · Expert_{e_k}(x) over the experts the router picks; no token is dropped unless the config
    sets a positive capacity factor. `deterministic` (flipped by `model.train()` / `model.eval()`) selects
    SparseMixer's sampling and the input jitter; training mode needs `rngs` at call time. `mesh` (set by
    `jaxmoe.sharding.shard_model` / `load_hf(mesh=...)`): with an `expert` axis of size > 1 the experts run
    expert-parallel inside one shard_map (`jaxmoe.moe.parallel.moe_ffn_sharded`, dropless only).
    `task_adapter`: None, or the module `moe.task_adapters` configures (see `jaxmoe.moe.task_adapters`).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, moe: MoEConfig, *, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.moe = moe
        self.dtype = dtype
        e, d, f = moe.num_experts, hidden_size, intermediate_size
        init = nnx.initializers.normal(0.02)
        self.router = nnx.Linear(d, e, use_bias=False, kernel_init=init, param_dtype=param_dtype, rngs=rngs)
        self.w_gate_up = nnx.Param(init(rngs.params(), (e, d, 2 * f), param_dtype))
        self.w_down = nnx.Param(init(rngs.params(), (e, f, d), param_dtype))
        self.task_adapter = None if moe.task_adapters is None else make_task_adapter(
            moe.task_adapters, d, e, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.deterministic = True
        self.mesh = None

    @property
    def expert_parallel(self) -> bool:
        """Whether the experts run expert-parallel (a mesh with an `expert` axis of size > 1)."""
        return self.mesh is not None and dict(self.mesh.shape).get("expert", 1) > 1

    def __call__(self, x_btd: jax.Array, *, rngs: nnx.Rngs | None = None,
                 task_ids: jax.Array | None = None) -> tuple[jax.Array, Routing]:
        """x [b, t, d] -> (y [b, t, d], Routing). task_ids int [b]: each row's task, required exactly when the
        config has task adapters."""
        b, t, d = x_btd.shape
        tasks = self.moe.task_adapters
        task_ids = check_task_ids(task_ids, tasks, b)
        training = not self.deterministic
        if training and rngs is None:
            raise ValueError("the MoE block is in training mode (model.train()), where SparseMixer samples experts "
                             "and jitters its input: pass rngs=nnx.Rngs(...) to the model call, or call "
                             "model.eval() for deterministic routing")
        x_td = x_btd.reshape(b * t, d)
        if training and self.moe.input_jitter_noise > 0:
            eps = self.moe.input_jitter_noise
            x_td = x_td * jax.random.uniform(rngs.jitter(), x_td.shape, x_td.dtype, 1.0 - eps, 1.0 + eps)
        # The router runs in fp32: bf16 logits can flip SparseMixer's 2% threshold and the argmax.
        logits_te = x_td.astype(jnp.float32) @ self.router.kernel[...].astype(jnp.float32)
        if tasks is not None and tasks.mode == "token":
            logits_te = logits_te + self.task_adapter(task_ids, t)
        if self.moe.router == "sparsemixer":
            noise = sparsemixer_noise(rngs, *logits_te.shape) if training else None
            route = dict(jitter_eps=self.moe.router_jitter_noise, training=training, noise=noise)
            if self.moe.sparsemixer_variant == "v2":
                # The fused router of pallas_kernels (its Pallas kernel on GPU / TPU, its XLA twin elsewhere) with
                # the draws `jaxmoe.sparsemixer` makes; tests hold the two equal.
                weights_tk, experts_tk = sparsemixer_top2(logits_te, **route)
            else:  # pallas_kernels has v2 only; the reference takes the same draws
                weights_tk, experts_tk = sparsemixer(logits_te, variant=self.moe.sparsemixer_variant, **route)
        else:
            weights_tk, experts_tk = topk_router(logits_te, k=self.moe.top_k)
        compute = self.dtype or x_td.dtype
        sharded = self.expert_parallel
        args = (x_td.astype(compute), weights_tk, experts_tk, _expert_weight(self.w_gate_up, compute, sharded),
                _expert_weight(self.w_down, compute, sharded))
        if sharded:
            if self.moe.capacity_factor > 0:
                raise ValueError(f"capacity_factor={self.moe.capacity_factor} with expert parallelism: the sharded "
                                 "experts are dropless only; set capacity_factor=-1")
            y_td = moe_ffn_sharded(*args, mesh=self.mesh, strategy=self.moe.expert_parallel,
                                   implementation=self.moe.expert_implementation)
        else:
            y_td = moe_ffn(*args, capacity_factor=self.moe.capacity_factor,
                           implementation=self.moe.expert_implementation)
        y_btd = y_td.reshape(b, t, d)
        if tasks is not None and tasks.mode != "token":
            y_btd = self.task_adapter(y_btd, task_ids)
        return y_btd.astype(x_btd.dtype), Routing(router_logits=logits_te, experts=experts_tk)


def _expert_weight(variable: nnx.Variable, compute, sharded: bool):
    """The weight `moe_ffn` takes: a float parameter as read (`[...]`, which applies QAT's fake quantization) in
    the compute dtype; a quantized one packed, or dequantized for the expert-parallel path (whose shard_map takes
    plain arrays). Per-expert group sizes (a MixedQuantizedWeight) go in as its `uniform()` form."""
    value = _stored(variable)
    if isinstance(value, PerExpertWeights):  # set by split_experts_for_decode
        return value.stacked() if sharded else value
    if isinstance(value, QuantizedWeight):
        return value.dequantize(compute) if sharded else value
    return variable[...].astype(compute)


def _stored(variable: nnx.Variable):
    """An expert weight variable's value as stored, per-expert group sizes (a MixedQuantizedWeight) in their
    `uniform()` form."""
    value = variable.get_value()
    return value.uniform() if isinstance(value, MixedQuantizedWeight) else value


def split_experts_for_decode(model: nnx.Module, tokens: int) -> None:
    """Holds each MoE block's expert weights as one buffer per expert (`jaxmoe.moe.experts.PerExpertWeights`, float
    ones in the block's compute dtype), in place, where the block's experts take a "decode" path on CPU for
    `tokens` x top_k token copies (a decode step's batch): XLA:CPU copies the routed expert's slice out of a
    stacked [e, k, n] weight before each matmul, and a decode step then
    streams each active expert's weights three times instead of once. Meant for a model merged inside jit just
    before its decode loop (`jaxmoe.generate`): the split copies cost the experts' memory once more while that
    program runs. Blocks that are expert-parallel, or whose weights are not plain or quantized parameters (QAT's
    fake-quantized ones), are left as they are."""
    for _, node in nnx.iter_graph(model):
        if not isinstance(node, SparseMoeBlock) or node.expert_parallel:
            continue
        # Either decode path reads the split; which one "auto" takes (quantized or not) does not matter here.
        if resolve_implementation(node.moe.expert_implementation, rows=tokens * node.moe.top_k) not in (
                "decode", "decode_int8"):
            continue
        values = [_splittable(variable) for variable in (node.w_gate_up, node.w_down)]
        if any(value is None for value in values):
            continue
        for variable, value in zip((node.w_gate_up, node.w_down), values, strict=True):
            if node.dtype is not None and isinstance(value, jax.Array):
                value = value.astype(node.dtype)
            variable.set_value(split_experts(value))


def _splittable(variable: nnx.Variable):
    """The value `split_experts` takes for an expert weight: a plain parameter's float array or a quantized one's
    QuantizedWeight (`_stored`); None for other variables (QAT's fake-quantized parameters, whose reads quantize)."""
    value = _stored(variable)
    if isinstance(value, (QuantizedWeight, PerExpertWeights)) or type(variable) is nnx.Param:
        return value
    return None
