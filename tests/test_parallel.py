"""Variants side by side (runtime.jobs / --jobs), thread settings, and the static-model evaluator cache."""
import json

import torch

from lifelong_moe.cli import main
from lifelong_moe.runs.runner import run, torch_threads

from conftest import write
from helpers import tiny_config

CONFIG = """
name: par
seed: 0
stream: {kind: class_incremental, dataset: digits, num_experiences: 2, samples_per_class: {train: 10, test: 5}}
backbone: {name: lmoe-tiny-vit}
training: {iterations: 3, batch_size: 8, optimizer: {lr: 1.0e-3}}
evaluation: {batch_size: 64}
runtime: {threads: 1}
strategy: {name: finetune}
variants:
  - {name: zeroshot, strategy: {name: zeroshot}}
  - {name: finetune}
  - {name: lwf, strategy: {name: lwf}}
"""


def matrices(root):
    return {d: json.loads((root / d / "results.json").read_text())["matrix"] for d in ("zeroshot", "finetune", "lwf")}


def test_parallel_variants_give_the_numbers_of_a_sequential_run(tmp_path, capsys):
    cfg = write(tmp_path / "par.yaml", CONFIG)
    assert main(["run", str(cfg), "-o", str(tmp_path / "seq"), "-q", "--jobs", "1"]) == 0
    assert main(["run", str(cfg), "-o", str(tmp_path / "par"), "-q", "--jobs", "2"]) == 0
    seq, par = matrices(tmp_path / "seq"), matrices(tmp_path / "par")
    assert seq == par and len(seq["finetune"]) == 2
    assert (tmp_path / "par" / "compare").is_dir()
    rec = json.loads((tmp_path / "par" / "lwf" / "results.json").read_text())
    assert rec["status"] == "complete" and rec["timings"]["torch_threads"] == 1


def test_parallel_run_refuses_an_existing_run_before_starting(tmp_path, capsys):
    cfg = write(tmp_path / "par.yaml", CONFIG)
    out = tmp_path / "r"
    assert main(["run", str(cfg), "-o", str(out), "-q", "--only", "lwf"]) == 0
    before = (out / "lwf" / "results.json").read_text()
    assert main(["run", str(cfg), "-o", str(out), "-q", "--jobs", "2"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert not (out / "zeroshot").exists() and (out / "lwf" / "results.json").read_text() == before


def test_runtime_threads_apply_inside_the_run_only(tmp_path):
    before = torch.get_num_threads()
    with torch_threads(1) as n:
        assert n == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None) as n:
        assert n == before


def test_a_static_model_is_scored_once_per_test_set(tmp_path, monkeypatch):
    from lifelong_moe.strategies.zeroshot import Strategy

    calls = []
    original = Strategy.eval_logits
    monkeypatch.setattr(Strategy, "eval_logits", lambda self, x, task, classes: calls.append(task.index)
                        or original(self, x, task, classes))
    c = tiny_config({"name": "zeroshot"}, evaluation__label_space="task")
    r = json.loads((run(c, tmp_path / "z", progress=False, log=lambda *_: None) / "results.json").read_text())
    assert sorted(set(calls)) == [0, 1] and len(calls) == 2  # one batch per test set, scored once
    assert r["matrix"] == [r["zero_shot"], r["zero_shot"]]


def test_static_scores_follow_the_classes_in_play(tmp_path, monkeypatch):
    from lifelong_moe.strategies.zeroshot import Strategy

    calls = []
    original = Strategy.eval_logits
    monkeypatch.setattr(Strategy, "eval_logits", lambda self, x, task, classes: calls.append(
        (task.index, tuple(classes))) or original(self, x, task, classes))
    c = tiny_config({"name": "zeroshot"}, evaluation__label_space="seen")
    r = json.loads((run(c, tmp_path / "z", progress=False, log=lambda *_: None) / "results.json").read_text())
    # class-incremental: after experience 2 the first test set competes with all ten classes
    assert len(calls) == len(set(calls)) and {len(k) for i, k in calls if i == 0} == {5, 10}
    assert r["matrix"][1][0] <= r["matrix"][0][0]


def test_a_dead_worker_is_one_clear_error(tmp_path, capsys, monkeypatch):
    from lifelong_moe.runs import jobs

    monkeypatch.setattr(jobs, "_run_variant", _die)  # submitted by reference: the workers run _die
    cfg = write(tmp_path / "par.yaml", CONFIG)
    assert main(["run", str(cfg), "-o", str(tmp_path / "r"), "-q", "--jobs", "2"]) == 2
    assert "worker process died" in capsys.readouterr().err


def _die(*args, **kwargs):
    import os

    os._exit(9)
