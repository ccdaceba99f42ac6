"""VLM strategies on a randomly initialised tiny LLaVA: the backbone never changes, LwF's teacher is
the previous model, replay replays earlier question types, and a stopped run resumes exactly."""
import json

import pytest
import torch

from lifelong_moe.config import RunConfig, validate
from lifelong_moe.runs.runner import build, run


def vqa_config(strategy: dict, **training) -> "RunConfig":
    return validate({
        "name": "v", "seed": 0,
        "stream": {"kind": "vqa", "dataset": "synthetic_vqa", "question_types": ["color", "type"],
                   "questions_per_type": {"train": 24, "test": 8}},
        "backbone": {"family": "vlm", "name": "lmoe-tiny-llava"},
        "strategy": strategy,
        "training": {"iterations": 3, "batch_size": 8, "optimizer": {"lr": 1e-2}, **training},
        "evaluation": {"batch_size": 16, "max_new_tokens": 2},
        "runtime": {"device": "cpu", "threads": 1},
    })


def train_all(strategy, stream):
    for exp in stream.train_stream:
        strategy.train(exp, eval_streams=[])


@pytest.mark.parametrize("params", [{"name": "lora", "r": 4}, {"name": "replay", "r": 4, "memory_size": 8},
                                    {"name": "lwf", "r": 4}])
def test_backbone_stays_bit_identical_and_only_lora_trains(params):
    stream, strategy, _ = build(vqa_config(params), progress=False)
    model = strategy.model
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert frozen and lora and all(n.split(".")[-3] in {"lora_A", "lora_B"} for n in lora)
    assert set(strategy.state_names) == set(lora)
    train_all(strategy, stream)
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in frozen.items())
    assert any(not torch.equal(now[n], v) for n, v in lora.items())  # it learned something


def test_lwf_teacher_is_the_previous_model():
    stream, strategy, _ = build(vqa_config({"name": "lwf", "r": 4}), progress=False)
    plugin = strategy.plugins[0]
    strategy.train(stream.train_stream[0], eval_streams=[])
    task = stream.tasks[1]
    x = torch.stack([stream.train_stream[1].dataset[i][0] for i in range(4)])
    strategy._batch = strategy.qa_batch(x, task.train_records[:4])
    model = strategy.model.eval()
    with torch.no_grad():
        same = model.logits(strategy._batch)
        assert torch.equal(plugin.teacher_logits(strategy), same)  # just snapshotted: teacher == student
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
        moved = model.logits(strategy._batch)
        assert not torch.allclose(moved, same)
        assert torch.equal(plugin.teacher_logits(strategy), same)  # the old weights, substituted
    assert all(torch.equal(p, p.detach()) for p in model.parameters())


def test_replay_memory_holds_earlier_question_types():
    stream, strategy, _ = build(vqa_config({"name": "replay", "r": 4, "memory_size": 10}), progress=False)
    train_all(strategy, stream)
    memory = strategy.plugins[0].memory
    assert sorted(memory) == [0, 1] and [len(v) for v in memory.values()] == [5, 5]
    assert all(int(i) < len(stream.tasks[e].train_records) for e, idx in memory.items() for i in idx)


@pytest.mark.slow
def test_stopped_vqa_run_resumes_to_the_same_results(tmp_path):
    cfg = vqa_config({"name": "lwf", "r": 4})
    whole = run(cfg, tmp_path / "whole", progress=False, log=lambda *_: None)
    part = run(cfg, tmp_path / "part", stop_after=1, progress=False, log=lambda *_: None)
    run(cfg, part, resume=True, progress=False, log=lambda *_: None)
    a, b = (json.loads((d / "results.json").read_text()) for d in (whole, part))
    assert a["matrix"] == b["matrix"] and a["zero_shot"] == b["zero_shot"]
    assert a["extra"]["answer_metrics"] == b["extra"]["answer_metrics"]
    assert [r["loss"] for r in map(json.loads, (whole / "log.jsonl").read_text().splitlines())] == \
           [r["loss"] for r in map(json.loads, (part / "log.jsonl").read_text().splitlines())]
