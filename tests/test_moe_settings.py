"""lifelong_moe.moe.settings: every MoE method and module refuses more experts than the pool holds
with the one message (naming the config key), and takes its defaults from the one place."""
from types import SimpleNamespace

import pytest
from torch import nn

from lifelong_moe.config import ConfigError
from lifelong_moe.errors import UserError
from lifelong_moe.moe import NoisyTopKRouter, inject_lora_experts
from lifelong_moe.moe.settings import CL_MOE, MOE_ADAPTERS, check_at_most_experts, check_rank_split
from lifelong_moe.strategies import cl_moe, cl_moe_clip, moe_adapters

from helpers import tiny_config


def test_check_names_the_setting_and_skips_unset_counts():
    check_at_most_experts(4, {"top_k": 4, "freeze_top_k": 0, "unset": None})  # in range: silent
    with pytest.raises(ValueError) as e:
        check_at_most_experts(4, {"top_k": 2, "task_experts": 5})
    assert str(e.value) == "task_experts=5 exceeds num_experts=4"
    with pytest.raises(UserError) as e:
        check_at_most_experts(4, {"top_k": 5}, prefix="strategy.", error=UserError)
    assert str(e.value) == "strategy.top_k=5 exceeds strategy.num_experts=4"
    with pytest.raises(ValueError) as e:
        check_at_most_experts(4, {"k": 0}, minimum=1)
    assert str(e.value) == "k=0 must be at least 1"
    check_rank_split(32, 4)
    with pytest.raises(UserError) as e:
        check_rank_split(30, 4, prefix="strategy.", error=UserError)
    assert str(e.value) == "the total rank strategy.r=30 must split evenly over strategy.num_experts=4"


@pytest.mark.parametrize("key", ["top_k", "freeze_top_k"])
def test_moe_adapters_config_refuses_more_experts_than_the_pool(key):
    with pytest.raises(ConfigError) as e:
        tiny_config({"name": "moe_adapters", "num_experts": 4, key: 5})
    assert str(e.value) == f"invalid configuration: strategy: {key}=5 exceeds num_experts=4"


@pytest.mark.parametrize("params", [cl_moe.Params, cl_moe_clip.Params], ids=["vlm", "clip"])
@pytest.mark.parametrize("key", ["top_k", "usage_top_k", "task_experts"])
def test_cl_moe_refuses_more_experts_than_the_pool_when_the_run_starts(params, key):
    strategy = SimpleNamespace(params=params(num_experts=4, **{key: 5}))  # valid as a config
    with pytest.raises(UserError) as e:
        cl_moe.ClMoEMethod.setup_cl_moe(strategy, model=None, feature_dim=8)
    assert str(e.value) == f"strategy.{key}=5 exceeds strategy.num_experts=4"


def test_modules_refuse_more_experts_than_the_pool():
    with pytest.raises(ValueError) as e:
        NoisyTopKRouter(8, 4, k=5)
    assert str(e.value) == "k=5 exceeds num_experts=4"
    with pytest.raises(ValueError) as e:
        inject_lora_experts(nn.Sequential(nn.Linear(4, 4)), ["0"], num_experts=4, r=8, top_k=5)
    assert str(e.value) == "top_k=5 exceeds num_experts=4"
    with pytest.raises(ValueError) as e:
        inject_lora_experts(nn.Sequential(nn.Linear(4, 4)), ["0"], num_experts=3, r=8)
    assert str(e.value) == "the total rank r=8 must split evenly over num_experts=3"


def test_each_method_keeps_its_papers_defaults():
    ma = moe_adapters.Params()
    assert (ma.num_experts, ma.top_k, ma.bottleneck, ma.scale, ma.dropout) == (22, 2, 64, 0.1, 0.1)
    assert (MOE_ADAPTERS.num_experts, MOE_ADAPTERS.top_k, MOE_ADAPTERS.bottleneck) == (22, 2, 64)
    for cls in (cl_moe.Params, cl_moe_clip.Params):
        p = cls()
        assert (p.num_experts, p.r, p.alpha, p.dropout, p.init_std, p.top_k, p.beta) == \
            (4, 32, 64.0, 0.05, 0.01, None, 0.5)
    assert (CL_MOE.num_experts, CL_MOE.r, CL_MOE.alpha, CL_MOE.top_k) == (4, 32, 64.0, None)
