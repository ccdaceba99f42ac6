"""Invariants of the baseline strategies on a tiny CLIP and a tiny digits stream."""
import pytest
import torch

from lifelong_moe.runs.runner import build

from helpers import tiny_config

NAMES = ["zeroshot", "finetune", "lora", "lwf", "ewc", "replay"]


def backbone_state(strategy):
    """The frozen backbone's own weights, by identity (peft moves them under base_layer)."""
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in strategy.model.clip.named_parameters()
            if "lora_" not in n}


def train_two(strategy, stream):
    for exp in stream.train_stream:
        strategy.train(exp, eval_streams=[])


@pytest.mark.parametrize("name", NAMES)
def test_backbone_frozen_except_finetune(name):
    stream, strategy, _ = build(tiny_config({"name": name}), progress=False)
    before = backbone_state(strategy)
    if strategy.trains:
        train_two(strategy, stream)
    after = backbone_state(strategy)
    assert before.keys() == after.keys()
    changed = sorted(n for n in before if not torch.equal(before[n], after[n]))
    if name in ("finetune", "lwf", "ewc", "replay"):  # these fine-tune the image tower
        assert changed and all(n.startswith("visual.") for n in changed)
    else:
        assert changed == []


def test_lora_starts_as_noop_then_changes_outputs():
    stream, lora, _ = build(tiny_config({"name": "lora"}), progress=False)
    _, zs, _ = build(tiny_config({"name": "zeroshot"}), progress=False)
    task = stream.tasks[0]
    x = torch.stack([stream.test_stream[0].dataset[i][0] for i in range(4)])
    ref = zs.eval_logits(x, task, task.classes)
    assert torch.equal(lora.eval_logits(x, task, task.classes), ref)  # B = 0: exact no-op
    assert any(n.startswith("clip.transformer.") for n in lora.state_names)  # both towers
    lora.train(stream.train_stream[0], eval_streams=[])
    assert not torch.allclose(lora.eval_logits(x, task, task.classes), ref)


def test_lora_attention_target_is_not_a_silent_noop():
    """peft on MultiheadAttention.out_proj alone would not change outputs; on `attn` it must."""
    stream, lora, _ = build(tiny_config({"name": "lora", "targets": ["attn"]}), progress=False)
    task = stream.tasks[0]
    x = torch.stack([stream.test_stream[0].dataset[i][0] for i in range(4)])
    ref = lora.eval_logits(x, task, task.classes)
    with torch.no_grad():
        for n, p in lora.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    assert not torch.allclose(lora.eval_logits(x, task, task.classes), ref)


def test_trainable_state_is_what_training_changes():
    stream, strategy, _ = build(tiny_config({"name": "lora"}), progress=False)
    state = strategy.state_dict()
    assert state and all("lora_" in k for k in state)
    counts = strategy.parameter_counts()
    assert 0 < counts["trainable"] < counts["total"]


def test_wrong_image_shape_is_a_clear_error():
    _, strategy, _ = build(tiny_config({"name": "zeroshot"}), progress=False)
    with pytest.raises(ValueError, match=r"images must have shape \[batch, 3, 32, 32\].*got \[2, 3, 16, 16\]"):
        strategy.model.encode_image(torch.zeros(2, 3, 16, 16))


def test_text_features_cached_only_when_text_tower_frozen():
    stream, ft, _ = build(tiny_config({"name": "finetune"}), progress=False)
    task = stream.tasks[0]
    head = ft.head_for(task, task.classes, "first")
    ft.model.train()
    a = ft.model.text_features(head)
    assert a is ft.model.text_features(head)  # image-only finetune: cached
    _, lora, _ = build(tiny_config({"name": "lora"}), progress=False)
    lora.model.train()
    f = lora.model.text_features(head)
    assert f.requires_grad  # text tower adapted: recomputed with gradients
    assert f is not lora.model.text_features(head)
