"""Backbone families and task kinds: one pipeline, strategies declared per family, clear errors for
pairings that cannot work."""
import pytest

from lifelong_moe.config import load_config
from lifelong_moe.errors import ConfigError
from lifelong_moe.registry import STRATEGIES, strategy_modules

from conftest import write

VQA = """
stream: {kind: vqa, dataset: synthetic_vqa, question_types: [color, count]}
backbone: {family: vlm, name: lmoe-tiny-llava}
strategy: {name: lora}
"""
CLS = """
stream: {kind: class_incremental, dataset: digits, num_experiences: 2}
strategy: {name: lora}
"""


def test_same_strategy_name_resolves_per_family(tmp_path):
    [vqa] = load_config(write(tmp_path / "v.yaml", VQA))
    [cls] = load_config(write(tmp_path / "c.yaml", CLS))
    assert vqa.backbone.family == "vlm" and cls.backbone.family == "clip"
    assert type(vqa.strategy_params()).__module__.endswith("vlm_lora")
    assert type(cls.strategy_params()).__module__.endswith(".lora")
    assert "q_proj" in vqa.strategy_params().targets  # the LLM's linears, not CLIP's c_fc
    assert cls.to_dict()["backbone"]["family"] == "clip"  # recorded next to every result


@pytest.mark.parametrize("text, overrides, expected", [
    (VQA, ["strategy.name=moe_adapters"], "strategy 'moe_adapters' works on backbone family 'clip', not on "
                                          "backbone.family 'vlm'"),
    (VQA, ["strategy.name=finetune"], "strategies for 'vlm': "),
    (VQA, ["backbone.family=clip", "backbone.name=lmoe-tiny-vit"], "stream.kind 'vqa' asks questions: it needs "
                                                                   "backbone.family: vlm, got backbone.family 'clip'"),
    (CLS, ["backbone.family=vlm"], "stream.kind 'class_incremental' is classification: it needs backbone.family: clip"),
    (CLS, ["backbone.family=llm"], "backbone.family must be 'clip' or 'vlm'"),
    (VQA, ["backbone.templates=[x]"], "backbone: unknown key 'templates'"),
    (VQA, ["stream.question_types=null"], "a vqa stream needs exactly one of 'question_types' and 'order'"),
    (VQA, ["stream.dataset=null"], "a vqa stream needs 'dataset'"),
    (VQA, ["strategy.r=0"], "strategy.r: Input should be greater than 0"),
])
def test_bad_pairings_give_one_clear_error(tmp_path, text, overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path / "bad.yaml", text), overrides)
    assert expected in str(e.value)


def test_every_registered_module_defines_params_and_strategy():
    import importlib

    for module in strategy_modules():
        m = importlib.import_module(f"lifelong_moe.strategies.{module}")
        assert hasattr(m, "Params") and hasattr(m, "Strategy"), module
    assert {f for per in STRATEGIES.values() for f in per} == {"clip", "vlm"}


def test_each_family_declares_what_its_strategies_build_on_and_its_stream_kind():
    from lifelong_moe.families import FAMILIES
    from lifelong_moe.families.base import resolve
    from lifelong_moe.registry import TASK_KINDS, strategy_class

    for name, family in FAMILIES.items():
        assert family.task_kind in TASK_KINDS.values()
        assert family.config.model_validate({"family": name}).family == name
        base = family.base_strategy_class()
        for strategy in family.strategies:
            assert issubclass(strategy_class(strategy, name), base), (name, strategy)
        for ref in (family.loader, family.prepare, family.evaluator):
            assert callable(resolve(ref)), ref
