"""Model configurations: frozen dataclasses and named presets.

A config is data: the model is built from it, checkpoints carry it (as Hugging Face `config.json`, see
`jaxmoe.io.hf`), and the command line prints it. Sizes follow ../shared/docs/phi_models.md §1.1.
"""

from __future__ import annotations

import dataclasses
import functools
import math

__all__ = ["LongRoPE", "MoEConfig", "ModelConfig", "PRESETS", "TaskAdapterConfig", "get_preset"]


def require(config, ok: bool, what: str) -> None:
    """A config's `__post_init__` check: ValueError "invalid <ConfigClass>: <what>" unless `ok`."""
    if not ok:
        raise ValueError(f"invalid {type(config).__name__}: {what}")


def require_positive_ints(config, names) -> None:
    for name in names:
        value = getattr(config, name)
        require(config, isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"{name}={value!r}; expected a positive integer")


@dataclasses.dataclass(frozen=True, slots=True)
class LongRoPE:
    """LongRoPE frequency rescaling (Phi-3.5 / Phi-4): per-frequency factors, switched by sequence length.

    A forward pass whose largest position id + 1 exceeds `original_max_position_embeddings` uses
    `long_factor`, otherwise `short_factor`. cos and sin are both multiplied by `attention_factor`.
    """

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    attention_factor: float
    long_attention_factor: float | None = None  # Phi-3.5-MoE's long_mscale; None: the same as attention_factor

    @classmethod
    def from_lengths(
        cls,
        short_factor,
        long_factor,
        *,
        max_position_embeddings: int,
        original_max_position_embeddings: int,
        factor: float | None = None,
        attention_factor: float | None = None,
    ) -> "LongRoPE":
        """The attention factor as transformers derives it: sqrt(1 + ln(f) / ln(L_orig)) for f > 1, else 1."""
        if factor is None:
            factor = max_position_embeddings / original_max_position_embeddings
        if attention_factor is None:
            attention_factor = (
                math.sqrt(1.0 + math.log(factor) / math.log(original_max_position_embeddings)) if factor > 1.0 else 1.0
            )
        return cls(
            short_factor=tuple(float(x) for x in short_factor),
            long_factor=tuple(float(x) for x in long_factor),
            original_max_position_embeddings=int(original_max_position_embeddings),
            attention_factor=float(attention_factor),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class TaskAdapterConfig:
    """Task information inside every MoE layer (Pham et al. 2023, paper_methods.md §h; `jaxmoe.moe.task_adapters`).

    The model then takes one task id per batch row (e.g. the language pair), in [0, num_tasks). `mode` picks the
    granularity:
      "static":  one bottleneck adapter per task, chosen by the task id, applied to the MoE output;
      "dynamic": a pool of `pool_size` shared adapters; a router over a learned task embedding picks
                 `pool_top_k` of them per task (not per token);
      "token":   task-aware token routing: the expert router sees [x; t], t a learned task embedding.
    `bottleneck` is read by "static" and "dynamic", `task_embed_dim` by "dynamic" and "token", `pool_size` and
    `pool_top_k` by "dynamic" only. Reserve ids for tasks added later: their rows train alone
    (`jaxmoe.moe.task_adapters.new_task_optimizer`).
    """

    mode: str
    num_tasks: int
    bottleneck: int = 64
    task_embed_dim: int = 32
    pool_size: int = 4
    pool_top_k: int = 1

    def __post_init__(self):
        require(self, self.mode in ("static", "dynamic", "token"),
                f"mode={self.mode!r}; expected 'static', 'dynamic' or 'token'")
        require_positive_ints(self, ("num_tasks", "bottleneck", "task_embed_dim", "pool_size", "pool_top_k"))
        require(self, self.pool_top_k <= self.pool_size,
                f"pool_top_k={self.pool_top_k} with pool_size={self.pool_size}; expected pool_top_k <= pool_size")


# "auto" and the names of jaxmoe.moe.experts.IMPLEMENTATIONS (tests/moe/test_experts.py holds the two equal).
EXPERT_IMPLEMENTATIONS = ("auto", "blocked", "decode", "decode_int8", "pallas", "xla_ragged")
# The variants of jaxmoe.moe.router.sparsemixer (tests/moe/test_sparsemixer_variant.py holds the two equal).
SPARSEMIXER_VARIANTS = ("v2", "v2*")


@dataclasses.dataclass(frozen=True, slots=True)
class MoEConfig:
    """The sparse feed-forward block of Phi-3.5-MoE / GRIN-MoE (`model_type: phimoe`).

    `router`: "sparsemixer" (GRIN's SparseMixer top-2) or "topk" (softmax, top-k, renormalised).
    `sparsemixer_variant` (router "sparsemixer" only): "v2" (GRIN Alg. 1, as transformers' phimoe) or "v2*" (GRIN
    Alg. 2: MaskedSoftmax(z/2), in eval too; `jaxmoe.moe.router.sparsemixer`). transformers has no v2*: such models
    are saved in jaxmoe's format (`jaxmoe.io.hf.hf_problems`).
    `capacity_factor` < 0 means dropless (every token reaches its experts); > 0 keeps at most
    ceil(tokens * top_k / num_experts * capacity_factor) token copies per expert, in token order.
    `expert_parallel`: how tokens reach the experts' devices under a mesh with an `expert` axis ("auto",
    "all_gather", "all_to_all" or, on GPU / TPU, "ragged_all_to_all"; see `jaxmoe.moe.parallel`).
    `task_adapters`: task information at one of three granularities (`TaskAdapterConfig`; a dict of its fields,
    as config files and checkpoints carry it, is converted); None: the plain, task-agnostic MoE.
    `expert_implementation`: how the experts compute (`jaxmoe.moe.experts.IMPLEMENTATIONS`); "auto" takes, on CPU,
    "decode_int8" for a few token copies with quantized experts (activations as two int8 limbs, within about 1e-4
    of the dequantized weights' result), "decode" for a few copies with float experts, "blocked" for more, and
    "pallas" off CPU. "decode" keeps quantized experts exactly weight-only at decode.
    """

    num_experts: int
    top_k: int = 2
    router: str = "sparsemixer"
    sparsemixer_variant: str = "v2"
    router_jitter_noise: float = 0.01
    input_jitter_noise: float = 0.0
    capacity_factor: float = -1.0
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    expert_parallel: str = "auto"
    task_adapters: TaskAdapterConfig | None = None
    expert_implementation: str = "auto"

    def __post_init__(self):
        if isinstance(self.task_adapters, dict):
            known = {f.name for f in dataclasses.fields(TaskAdapterConfig)}
            unknown = sorted(set(self.task_adapters) - known)
            missing = [name for name in ("mode", "num_tasks") if name not in self.task_adapters]
            if unknown or missing:
                raise ValueError(f"invalid MoEConfig: task_adapters has unknown fields {unknown} and lacks "
                                 f"{missing}; the fields are {sorted(known)}, mode and num_tasks required")
            object.__setattr__(self, "task_adapters", TaskAdapterConfig(**self.task_adapters))
        if not (self.task_adapters is None or isinstance(self.task_adapters, TaskAdapterConfig)):
            raise ValueError(f"invalid MoEConfig: task_adapters={self.task_adapters!r}; expected a "
                             "TaskAdapterConfig, a dict of its fields, or None")
        if self.expert_parallel not in ("auto", "all_gather", "all_to_all", "ragged_all_to_all"):
            raise ValueError(f"invalid MoEConfig: expert_parallel={self.expert_parallel!r}; expected 'auto', "
                             "'all_gather', 'all_to_all' or 'ragged_all_to_all'")
        if self.expert_implementation not in EXPERT_IMPLEMENTATIONS:
            raise ValueError(f"invalid MoEConfig: expert_implementation={self.expert_implementation!r}; expected one "
                             f"of {list(EXPERT_IMPLEMENTATIONS)}")
        if not (isinstance(self.num_experts, int) and self.num_experts >= 1):
            raise ValueError(f"invalid MoEConfig: num_experts={self.num_experts!r}; expected an integer >= 1")
        if not (isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts):
            raise ValueError(f"invalid MoEConfig: top_k={self.top_k!r} with num_experts={self.num_experts}; "
                             "expected 1 <= top_k <= num_experts")
        if self.router not in ("sparsemixer", "topk"):
            raise ValueError(f"invalid MoEConfig: router={self.router!r}; expected 'sparsemixer' or 'topk'")
        if self.router == "sparsemixer" and self.top_k != 2:
            raise ValueError(f"invalid MoEConfig: the sparsemixer router picks exactly 2 experts, got "
                             f"top_k={self.top_k}; use router='topk' for other values")
        if self.sparsemixer_variant not in SPARSEMIXER_VARIANTS:
            raise ValueError(f"invalid MoEConfig: sparsemixer_variant={self.sparsemixer_variant!r}; expected one of "
                             f"{list(SPARSEMIXER_VARIANTS)}")
        if self.router != "sparsemixer" and self.sparsemixer_variant != "v2":
            raise ValueError(f"invalid MoEConfig: sparsemixer_variant={self.sparsemixer_variant!r} with "
                             f"router={self.router!r}; the variant is SparseMixer's: set router='sparsemixer' or "
                             "leave sparsemixer_variant at 'v2'")
        if self.capacity_factor == 0:
            raise ValueError("invalid MoEConfig: capacity_factor=0 would drop every token; use a negative value "
                             "for dropless routing or a positive one for a capacity")
        for name in ("router_jitter_noise", "input_jitter_noise", "aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"invalid MoEConfig: {name}={getattr(self, name)}; expected a value >= 0")


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture of a Phi-3 family decoder: dense (`model_type: phi3`) or with a sparse MoE feed-forward
    block (`moe` set, `model_type: phimoe`, which also uses LayerNorm and biases)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    longrope: LongRoPE | None = None
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    norm: str = "rms"  # "rms" (Phi3RMSNorm) or "layer" (LayerNorm with bias, PhiMoE)
    attention_bias: bool = False
    lm_head_bias: bool = False
    moe: MoEConfig | None = None
    # Memory, not architecture (checkpoints do not carry them): "none" keeps every decoder layer's activations
    # for the backward, "layer" recomputes each layer's forward in the backward (jax.checkpoint) and keeps only
    # its input. attention_impl: "dense" (whole score tensor), "blocked" (online softmax over key blocks) or
    # "auto" (blocked from jaxmoe.nn.attention.BLOCKED_FROM_LENGTH queries).
    remat: str = "none"
    attention_impl: str = "auto"

    def __post_init__(self):
        need = functools.partial(require, self)
        require_positive_ints(self, ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                                     "num_kv_heads", "head_dim", "max_position_embeddings"))
        need(self.num_heads % self.num_kv_heads == 0,
             f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}; "
             "grouped-query attention needs whole groups")
        need(0.0 < self.partial_rotary_factor <= 1.0,
             f"partial_rotary_factor={self.partial_rotary_factor}; expected a value in (0, 1]")
        need(self.rotary_dim % 2 == 0 and self.rotary_dim > 0,
             f"rotary_dim={self.rotary_dim} (head_dim {self.head_dim} x partial_rotary_factor "
             f"{self.partial_rotary_factor}); expected a positive even number")
        if self.longrope is not None:
            half = self.rotary_dim // 2
            for name in ("short_factor", "long_factor"):
                factors = getattr(self.longrope, name)
                need(len(factors) == half,
                     f"LongRoPE {name} has {len(factors)} entries; expected rotary_dim // 2 = {half}")
        need(self.sliding_window is None or self.sliding_window > 0,
             f"sliding_window={self.sliding_window}; expected a positive integer or None")
        need(isinstance(self.eos_token_id, tuple) and all(isinstance(i, int) for i in self.eos_token_id),
             f"eos_token_id={self.eos_token_id!r}; expected a tuple of ints, e.g. (2,) or ()")
        need(self.norm in ("rms", "layer"), f"norm={self.norm!r}; expected 'rms' or 'layer'")
        need(self.remat in ("none", "layer"), f"remat={self.remat!r}; expected 'none' or 'layer'")
        need(self.attention_impl in ("auto", "dense", "blocked"),
             f"attention_impl={self.attention_impl!r}; expected 'auto', 'dense' or 'blocked'")
        for token_id in (self.bos_token_id, self.pad_token_id, *self.eos_token_id):
            need(token_id is None or 0 <= token_id < self.vocab_size,
                 f"special token id {token_id} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates: int(head_dim * partial_rotary_factor)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def model_type(self) -> str:
        """The Hugging Face `model_type` this architecture is saved as."""
        return "phi3" if self.moe is None else "phimoe"

    @property
    def num_groups(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# Factor lists as published in the models' config.json files.
_PHI4_MINI_LONG = (
    1.0, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649,
    2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845, 5.351743533,
    5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651,
    14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884, 32.03,
    32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
)
_PHI35_MINI_LONG = (
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
    1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
    4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
    17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
    50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
    62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
    63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
    64.51000213623047, 64.52999877929688, 64.83999633789062,
)
_PHI35_MINI_SHORT = (
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, *(1.0499999523162842,) * 5,
    1.0699999332427979, 1.0999999046325684, 1.1099998950958252, 1.1599998474121094, 1.1599998474121094,
    1.1699998378753662, 1.2899998426437378, 1.339999794960022, 1.679999828338623, 1.7899998426437378,
    1.8199998140335083, 1.8499997854232788, 1.8799997568130493, 1.9099997282028198, 1.9399996995925903,
    1.9899996519088745, *(2.0199997425079346,) * 6, *(2.0299997329711914,) * 9, 2.0799996852874756,
    2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533, 2.729999542236328,
    2.749999523162842, 2.8399994373321533,
)

PRESETS: dict[str, ModelConfig] = {
    "phi4-mini": ModelConfig(
        vocab_size=200064, hidden_size=3072, intermediate_size=8192, num_layers=32, num_heads=24, num_kv_heads=8,
        head_dim=128, partial_rotary_factor=0.75,
        longrope=LongRoPE.from_lengths((1.0,) * 48, _PHI4_MINI_LONG, max_position_embeddings=131072,
                                       original_max_position_embeddings=4096),
        max_position_embeddings=131072, sliding_window=262144, tie_word_embeddings=True,
        bos_token_id=199999, eos_token_id=(199999, 200020), pad_token_id=199999,
    ),
    "phi3.5-mini": ModelConfig(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_layers=32, num_heads=32, num_kv_heads=32,
        head_dim=96,
        longrope=LongRoPE.from_lengths(_PHI35_MINI_SHORT, _PHI35_MINI_LONG, max_position_embeddings=131072,
                                       original_max_position_embeddings=4096),
        max_position_embeddings=131072, sliding_window=262144, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=(32000, 32001, 32007), pad_token_id=32000,
    ),
    # Tiny shapes for tests and demos: same structure (GQA, partial rotary, LongRoPE, tying) as phi4-mini.
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, partial_rotary_factor=0.75,
        longrope=LongRoPE.from_lengths(
            tuple(1.0 + 0.1 * i for i in range(6)), tuple(1.5 + 2.0 * i for i in range(6)),
            max_position_embeddings=256, original_max_position_embeddings=32),
        max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1, eos_token_id=(2,), pad_token_id=0,
    ),
    # GRIN-MoE (microsoft/GRIN-MoE config.json): Phi-3.5-MoE's architecture with plain RoPE and a 4K context.
    "grin-moe": ModelConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, max_position_embeddings=4096, sliding_window=2047, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=(32000,), norm="layer", attention_bias=True, lm_head_bias=True,
        moe=MoEConfig(num_experts=16, top_k=2, router_jitter_noise=0.01, input_jitter_noise=0.01),
    ),
    # Phi-3.5-MoE-instruct (../shared/docs/phi_models.md §2.1): GRIN-MoE's shapes with a 128K context. Its LongRoPE
    # factor lists (64 short, 64 long, mscale 1.2432) are not reproduced here, so this preset has plain RoPE: exact
    # parameter shapes and counts (memory planning, random-init runs); load_hf reads the real rope settings.
    "phi3.5-moe": ModelConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, max_position_embeddings=131072, sliding_window=131072, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=(32000, 32001, 32007), norm="layer", attention_bias=True,
        lm_head_bias=True,
        moe=MoEConfig(num_experts=16, top_k=2, router_jitter_noise=0.01, input_jitter_noise=0.01),
    ),
    "tiny-moe": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, max_position_embeddings=256, sliding_window=64, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=(2,), pad_token_id=0, norm="layer", attention_bias=True, lm_head_bias=True,
        moe=MoEConfig(num_experts=4, top_k=2, router_jitter_noise=0.01, input_jitter_noise=0.01),
    ),
    "tiny-untied": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=1,
        head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=(2,), pad_token_id=0,
    ),
}


def get_preset(name: str) -> ModelConfig:
    """Returns the named preset; raises KeyError naming the known presets for an unknown name."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
