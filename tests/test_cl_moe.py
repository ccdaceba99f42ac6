"""CL-MoE on the tiny VLM (randomly initialised lmoe-tiny-llava), end to end through the runner:
the backbone stays bit-identical but for the projector, which trains with the experts (the release)
unless switched off, the task boundary merges every expert, prototypes and task inference are
recorded, every switch runs, and a resumed run equals an uninterrupted one. The merge's values:
tests/test_cl_moe_merge.py."""
import json

import pytest
import torch

from lifelong_moe.runs import runner
from lifelong_moe.config import validate
from lifelong_moe.errors import UserError

LAYERS, MODULES, EXPERTS = 4, 7, 4  # tiny LLaVA: 4 decoder layers x q,k,v,o,gate,up,down
PROJECTOR = "multi_modal_projector"  # LLaVA's two linears (weight, bias each)


def config(**strategy):
    return validate({
        "name": "clmoe", "seed": 0,
        "stream": {"kind": "vqa", "dataset": "synthetic_vqa", "question_types": ["color", "type"],
                   "questions_per_type": {"train": 40, "test": 20}},
        "backbone": {"family": "vlm", "name": "lmoe-tiny-llava"},
        "strategy": {"name": "cl_moe", **strategy},
        "training": {"iterations": 3, "batch_size": 8, "optimizer": {"lr": 1e-2}},
        "evaluation": {"batch_size": 64, "max_new_tokens": 3},
        "runtime": {"threads": 1},
    })


def run(cfg, out, monkeypatch, **kw):
    """``runner.run``, keeping the strategy and the backbone's weights as they were before training."""
    seen = {}
    build = runner.build

    def spy(cfg, progress=True):
        stream, strategy, evaluator = build(cfg, progress)
        seen["strategy"] = strategy
        seen["backbone"] = {n: p.detach().clone() for n, p in strategy.model.named_parameters()
                            if ".experts." not in n and ".router." not in n}
        return stream, strategy, evaluator

    monkeypatch.setattr(runner, "build", spy)
    path = runner.run(cfg, out, progress=False, log=lambda *_: None, **kw)
    return json.loads((path / "results.json").read_text()), seen


def test_cl_moe_end_to_end_keeps_the_backbone_and_records_every_component(tmp_path, monkeypatch):
    res, seen = run(config(), tmp_path / "run", monkeypatch)
    strategy = seen["strategy"]
    params = dict(strategy.model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in seen["backbone"].items() if PROJECTOR not in n)
    projector = [n for n in seen["backbone"] if PROJECTOR in n]
    assert len(projector) == 4 and all(not torch.equal(params[n], seen["backbone"][n]) for n in projector)
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable - set(projector) == {n for n in params if ".experts." in n or ".router." in n}
    assert len(trainable) == LAYERS * MODULES * 3 + 4
    assert not any("vision_tower" in n or "lm_head" in n for n in trainable)
    # one AdamW group at the experts' lr: the release's DeepSpeed optimizer (its --mm_projector_lr is unused)
    [group] = strategy.optimizer.param_groups
    assert {id(p) for p in group["params"]} == {id(params[n]) for n in trainable}
    assert len(res["matrix"]) == 2
    rec = res["extra"]["cl_moe"]
    tasks = ["synthetic_vqa/color", "synthetic_vqa/type"]
    assert list(rec["usage"]) == tasks and len(rec["usage"][tasks[0]]) == LAYERS * MODULES
    assert all(len(g) == EXPERTS and sum(g) == pytest.approx(1) and sum(v > 0 for v in g) <= 2
               for g in rec["task_gates"][tasks[1]].values())
    assert list(rec["prototypes"]) == tasks and all(p["radius"] > 0 for p in rec["prototypes"].values())
    assert list(rec["merge"]) == [tasks[1]]  # the first task has no theta_{t-1}
    merge = rec["merge"][tasks[1]]
    assert merge["merged_tensors"] == LAYERS * MODULES * EXPERTS * 2
    lam = {"new": 0.7, "previous": 0.3, "both": 0.7, "neither": 0.7}
    assert all(merge["lambdas"][k] == [lam[r] for r in roles] for k, roles in merge["roles"].items())
    switches = rec["switches"]
    assert (switches["previous_experts"], switches["train_projector"]) == ("last_task", True)
    assert rec["params"]["projector"] == sum(params[n].numel() for n in projector) > 0
    inference = rec["task_inference"]
    assert set(inference) == {"0", "1"} and inference["1"][tasks[0]]["samples"] == 20
    assert inference["1"][tasks[0]]["accuracy"] == 1.0  # question types separate in the input embeddings
    assert inference["0"][tasks[1]]["accuracy"] is None  # an untrained task has no right answer


def test_reference_switches(tmp_path, monkeypatch):
    res, seen = run(config(task_router="reference", merge="reference_uniform"), tmp_path / "ref", monkeypatch)
    rec = res["extra"]["cl_moe"]
    assert rec["prototypes"] == {} and rec["task_inference"] == {}
    assert len(rec["task_gates"]) == 2  # the release's statistics, unused at test time
    merge = rec["merge"]["synthetic_vqa/type"]
    assert all(v == [0.7] * EXPERTS for v in merge["lambdas"].values())
    res, seen = run(config(task_router="off", merge="off", top_k=2, train_projector=False), tmp_path / "off",
                    monkeypatch)
    rec = res["extra"]["cl_moe"]
    assert rec["merge"] == {} and rec["task_gates"] == {} and rec["prototypes"] == {}
    assert len(rec["usage"]) == 2
    params = dict(seen["strategy"].model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in seen["backbone"].items())  # the projector too
    assert not any(PROJECTOR in n for n, p in params.items() if p.requires_grad)
    assert rec["switches"]["train_projector"] is False and rec["params"]["projector"] == 0


@pytest.mark.parametrize("strategy, match", [({"r": 30}, "strategy.r=30 must split evenly"),
                                             ({"task_experts": 5}, "strategy.task_experts=5 exceeds")])
def test_bad_settings_are_one_clear_error(tmp_path, strategy, match):
    with pytest.raises(UserError, match=match):
        runner.run(config(**strategy), tmp_path / "bad", progress=False, log=lambda *_: None)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
    full, _ = run(config(), tmp_path / "full", monkeypatch)
    run(config(), tmp_path / "half", monkeypatch, stop_after=1)
    resumed, _ = run(config(), tmp_path / "half", monkeypatch, resume=True)
    assert resumed["matrix"] == full["matrix"]
    assert resumed["extra"]["cl_moe"] == full["extra"]["cl_moe"]
    assert resumed["extra"]["answer_metrics"] == full["extra"]["answer_metrics"]


def test_generation_prefill_and_teacher_forcing_pool_the_same_prompt_features():
    """Task inference reads the image and question tokens only: from generation's left-padded prefill
    (masks from its input ids) as from a right-padded teacher-forced batch with the answer. The
    features are frozen ones (the vision tower's output before the projector, the question's word
    embeddings): training the projector does not move them."""
    stream, s, _ = runner.build(config(), progress=False)
    got = []
    s._probe.callback = got.append
    x, questions, answers = [], [], []
    for col in (0, 1):  # two question types: prompts of different lengths, so padding differs
        data, task = stream.test_stream[col].dataset, stream.tasks[col]
        for i in range(3):
            img, idx = data[i][:2]
            x.append(img)
            questions.append(task.test_records[int(idx)].question)
            answers.append(task.test_records[int(idx)].answer)
    x = torch.stack(x)
    assert len({len(q.split()) for q in questions}) > 1
    dim = 128 + 128  # the vision tower's width (the projector's input) + the LLM's
    s.prototypes.add(torch.randn(4, dim))  # a task router in place: the strategy pools prompts
    for m in s.moe.layers.values():
        m.add_task_gate(torch.tensor([1.0, 0, 0, 0]))
    s.answer(x, questions, stream.tasks[0])
    s.token_accuracy(x, questions, answers, stream.tasks[0])
    assert len(got) == 2 and got[0].shape == (6, dim)
    assert torch.allclose(got[0], got[1], atol=1e-5)
    assert torch.allclose(got[0][:, :128].norm(dim=1), torch.ones(6))  # an image half, L2-normalised
    with torch.no_grad():
        for p in s._projector.parameters():
            p.add_(0.5)
    s.token_accuracy(x, questions, answers, stream.tasks[0])
    assert torch.equal(got[2], got[1])


def test_bench_cl_moe_smoke():
    """The cost benchmark runs and compares like with like (timings are never asserted)."""
    from lifelong_moe.bench.cl_moe import cl_moe_cost

    r = cl_moe_cost(batch=4, infer_batch=4, max_new_tokens=2, repeats=1, warmup=0, threads=1)
    assert r["setup"]["adapted_linears"] == LAYERS * MODULES
    assert r["rows_without_eos"] == {"cl_moe": 4, "lora": 4}  # same number of decoding steps
    assert r["task_inference_fallback_rate"] == 0.0  # the bench's task router really mixed
    assert all(v > 0 for v in (r["train_ratio_vs_lora"], r["generation_ratio_vs_lora"]))


def test_yaml_switches_accept_a_bare_off(tmp_path):
    from lifelong_moe.config import load_config

    from conftest import write

    [cfg] = load_config(write(tmp_path / "c.yaml", """
stream: {kind: vqa, dataset: synthetic_vqa, question_types: [color]}
backbone: {family: vlm, name: lmoe-tiny-llava}
strategy: {name: cl_moe, merge: off, task_router: off, lambdas: {previous: 0.5}}
"""))
    p = cfg.strategy_params()
    assert (p.merge, p.task_router, p.lambdas.previous, p.lambdas.new) == ("off", "off", 0.5, 0.7)
    assert (p.previous_experts, p.train_projector) == ("last_task", True)  # the release's defaults
    with pytest.raises(Exception, match="merge"):
        load_config(write(tmp_path / "d.yaml", """
stream: {kind: vqa, dataset: synthetic_vqa, question_types: [color]}
backbone: {family: vlm, name: lmoe-tiny-llava}
strategy: {name: cl_moe, merge: uniform}
"""))
