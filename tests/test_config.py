"""ModelConfig refuses inconsistent architectures with a message naming the value; presets have the published
derived sizes (phi_models.md §1.1)."""

import dataclasses
import math
import re

import pytest

from jaxmoe.config import PRESETS, LongRoPE, MoEConfig, TaskAdapterConfig, get_preset

TINY = get_preset("tiny")


def test_heads_not_a_multiple_of_kv_heads_is_refused():
    with pytest.raises(ValueError, match=r"num_heads=6 is not a multiple of num_kv_heads=4"):
        TINY.replace(num_heads=6, num_kv_heads=4)


@pytest.mark.parametrize("which", ["short_factor", "long_factor"])
def test_longrope_factor_list_of_wrong_length_is_refused(which):
    # tiny: head_dim 16 x partial_rotary_factor 0.75 = rotary_dim 12, so 6 factors per list.
    factors = {"short_factor": TINY.longrope.short_factor, "long_factor": TINY.longrope.long_factor}
    factors[which] = factors[which][:5]
    longrope = dataclasses.replace(TINY.longrope, **factors)
    with pytest.raises(ValueError, match=rf"{which} has 5 entries; expected rotary_dim // 2 = 6"):
        TINY.replace(longrope=longrope)


@pytest.mark.parametrize("factor", [0.0, -0.5, 1.5])
def test_partial_rotary_factor_out_of_range_is_refused(factor):
    with pytest.raises(ValueError, match=rf"partial_rotary_factor={factor}"):
        TINY.replace(partial_rotary_factor=factor)


def test_odd_rotary_dim_is_refused():
    with pytest.raises(ValueError, match=r"rotary_dim=11"):
        TINY.replace(partial_rotary_factor=0.7, longrope=None)  # 16 x 0.7 -> 11 channels: no whole pairs


@pytest.mark.parametrize("field, value", [("bos_token_id", 512), ("pad_token_id", -1), ("eos_token_id", (2, 700))])
def test_special_token_outside_vocabulary_is_refused(field, value):
    bad = value[-1] if isinstance(value, tuple) else value
    with pytest.raises(ValueError, match=rf"special token id {bad} is outside the vocabulary \[0, 512\)"):
        TINY.replace(**{field: value})


@pytest.mark.parametrize("value", [2, [2]])
def test_eos_token_id_must_be_a_tuple(value):
    with pytest.raises(ValueError, match=re.escape(f"eos_token_id={value!r}")):
        TINY.replace(eos_token_id=value)


@pytest.mark.parametrize("field", ["vocab_size", "num_layers", "head_dim"])
def test_sizes_must_be_positive_integers(field):
    with pytest.raises(ValueError, match=rf"{field}=0"):
        TINY.replace(**{field: 0})


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(KeyError, match="'phi9'") as error:
        get_preset("phi9")
    assert all(name in str(error.value) for name in PRESETS)


@pytest.mark.parametrize("name", ["phi4-mini", "phi3.5-mini"])
def test_real_presets_rotate_96_channels_and_fill_hidden_size(name):
    config = get_preset(name)
    assert config.rotary_dim == 96
    assert config.num_heads * config.head_dim == config.hidden_size == 3072
    assert len(config.longrope.short_factor) == len(config.longrope.long_factor) == 48


def test_phi4_mini_groups_three_query_heads_per_kv_head():
    assert get_preset("phi4-mini").num_groups == 3
    assert get_preset("phi3.5-mini").num_groups == 1


def test_longrope_attention_factor_is_derived_from_the_context_extension():
    lr = LongRoPE.from_lengths([1.0] * 4, [2.0] * 4, max_position_embeddings=131072,
                               original_max_position_embeddings=4096)
    assert lr.attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)), abs=1e-12)
    assert lr.attention_factor == pytest.approx(1.1902380714, abs=1e-10)
    no_extension = LongRoPE.from_lengths([1.0] * 4, [1.0] * 4, max_position_embeddings=4096,
                                         original_max_position_embeddings=4096)
    assert no_extension.attention_factor == 1.0
    given = LongRoPE.from_lengths([1.0] * 4, [2.0] * 4, max_position_embeddings=8192,
                                  original_max_position_embeddings=4096, attention_factor=1.25)
    assert given.attention_factor == 1.25


def test_configs_are_frozen_and_hashable():
    """Configs travel as static data (jit, checkpoints): immutable, hashable, equal by value."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.vocab_size = 1024
    assert hash(TINY) == hash(get_preset("tiny").replace()) and TINY == get_preset("tiny").replace()
    assert len({get_preset(name) for name in PRESETS}) == len(PRESETS)


def test_moe_top_k_larger_than_the_expert_count_is_named():
    with pytest.raises(ValueError, match=r"top_k=5 with num_experts=4"):
        MoEConfig(num_experts=4, top_k=5, router="topk")
    with pytest.raises(ValueError, match=r"exactly 2 experts, got top_k=1"):
        MoEConfig(num_experts=4, top_k=1)


def test_unknown_expert_parallel_strategy_is_named():
    with pytest.raises(ValueError, match="expert_parallel='ring'; expected 'auto', 'all_gather', 'all_to_all' or 'ragged_all_to_all'"):
        MoEConfig(num_experts=8, expert_parallel="ring")


def test_task_adapter_settings_are_checked_with_the_value_named():
    with pytest.raises(ValueError, match=r"invalid TaskAdapterConfig: mode='tokens'; expected 'static', 'dynamic'"):
        TaskAdapterConfig("tokens", num_tasks=4)
    with pytest.raises(ValueError, match=r"num_tasks=0; expected a positive integer"):
        TaskAdapterConfig("static", num_tasks=0)
    with pytest.raises(ValueError, match=r"pool_top_k=3 with pool_size=2"):
        TaskAdapterConfig("dynamic", num_tasks=4, pool_size=2, pool_top_k=3)
    with pytest.raises(ValueError, match=re.escape("unknown fields ['tasks'] and lacks ['num_tasks']")):
        MoEConfig(num_experts=4, task_adapters={"mode": "static", "tasks": 4})


def test_task_adapters_round_trip_through_the_checkpoint_dict_and_run_config_overrides():
    """Checkpoints carry the config as JSON (jaxmoe.quant.checkpoint) and run configs give MoE changes as a dict
    (jaxmoe.train.trainer.build_model): both arrive at the same frozen, hashable TaskAdapterConfig."""
    import json

    from jaxmoe.quant.checkpoint import config_from_dict, config_to_dict

    tasks = TaskAdapterConfig("dynamic", num_tasks=6, bottleneck=8, task_embed_dim=4, pool_size=3, pool_top_k=2)
    config = get_preset("tiny-moe").replace(moe=dataclasses.replace(get_preset("tiny-moe").moe, task_adapters=tasks))
    again = config_from_dict(json.loads(json.dumps(config_to_dict(config))))
    assert again == config and hash(again) == hash(config)
    overridden = dataclasses.replace(get_preset("tiny-moe").moe, **{"task_adapters": dataclasses.asdict(tasks)})
    assert overridden.task_adapters == tasks
