"""Data-parallel runs (lifelong_moe/runtime/distributed.py) on the CPU with gloo and 2 processes: the sharded
order is the single-process one, the gradient reduction is a weighted mean, a torchrun run keeps both
ranks' trainable state identical after every experience and agrees with the single-process run at
the same global batch, MoE-Adapters freezes the same experts on every rank, and a killed or stalled
rank stops the run with one error that ``--resume`` recovers from."""
import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from lifelong_moe.runtime import distributed
from lifelong_moe.config import load_config
from lifelong_moe.errors import UserError
from lifelong_moe.results import RunDir
from lifelong_moe.runs.runner import run

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).with_name("dist_probe.py")
PARAM_TOL = 1e-5  # |data-parallel - single process| of every trained value (measured: <= 1.2e-7, float sums)
LOSS_TOL = 1e-5  # logged per-step loss (rounded to 1e-6 in log.jsonl)

TINY = {
    "name": "tiny", "seed": 0,
    "stream": {"kind": "class_incremental", "dataset": "digits", "classes_per_experience": [4, 3, 3],
               "samples_per_class": {"train": 8, "test": 4}},
    "backbone": {"name": "lmoe-tiny-vit"},
    "strategy": {"name": "finetune"},
    # SGD: Adam would scale float noise in gradients that are zero in exact arithmetic (attention key
    # biases) up to +-lr in either run; SGD keeps the comparison about the reduction itself
    "training": {"epochs": 1, "batch_size": 8, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
    "evaluation": {"batch_size": 64},
    "runtime": {"device": "cpu", "threads": 1},
}
MOE = {"name": "moe_adapters", "num_experts": 6, "bottleneck": 8, "dropout": 0.0, "noise": False, "freeze_top_k": 2,
       "ddas": {"iterations": 40, "batch_size": 16, "reference_data": "none"}}


# ------------------------------------------------------------------------------------ in-process units
def test_rank_slices_of_each_batch_are_the_single_process_batches():
    """Concatenated over ranks, the sharded loaders yield exactly the single-process batches."""
    n, bs, world = 37, 8, 2

    def gen():
        return torch.Generator().manual_seed(5)

    one = DataLoader(range(n), batch_size=bs, shuffle=True, generator=gen())  # as the template built it alone
    single = [b.tolist() for _ in range(2) for b in one]
    shards = []
    for r in range(world):
        g = gen()  # what train_loader builds on rank r: the same generator drives the same global order
        loader = DataLoader(range(n), batch_sampler=distributed.ShardedBatches(n, bs, g, r, world), generator=g)
        shards.append([b.tolist() for _ in range(2) for b in loader])
    assert [sum(parts, []) for parts in zip(*shards)] == single
    assert [len(b) for b in shards[0]][:4] == [4, 4, 4, 4] and len(shards[0][4]) == 3  # tail 5 -> 3 + 2


def test_tail_batch_smaller_than_the_ranks_is_refused():
    with pytest.raises(UserError, match=r"17 training samples .* batch of 1, fewer than the 2 processes"):
        distributed.ShardedBatches(17, 8, torch.Generator(), 0, 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(r: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        a = torch.nn.Parameter(torch.zeros(2))
        b = torch.nn.Parameter(torch.zeros(1))  # no gradient on any rank
        c = torch.nn.Parameter(torch.zeros(1))  # a gradient on rank 1 only
        a.grad = torch.tensor([1.0, 2.0]) if r == 0 else torch.tensor([3.0, 4.0])
        if r == 1:
            c.grad = torch.tensor([8.0])
        loss = distributed.average_gradients([a, b, c], torch.tensor(2.0 if r == 0 else 6.0), 3 if r == 0 else 1)
        batch_error = []
        for bs, sizes in ((7, []), (8, [16, 17])):
            try:
                distributed.check_batch(bs, sizes)
            except UserError as e:
                batch_error.append(str(e))
        distributed.check_batch(8, [16, 18, 3])  # tails 0, 2, 3: fine

        def decide():  # rank 0's decision (here: its error) reaches every rank
            if r != 0:
                raise AssertionError("only rank 0 decides")
            raise UserError("held by another run")
        try:
            distributed.on_main(decide)
            decision = ""
        except UserError as e:
            decision = str(e)
        state = distributed.on_main(lambda: {"matrix": [[0.5]], "rank": r})
        counts = distributed.sum_dict({("image", 0): torch.tensor([r, 1, 0]), ("text", 1): torch.tensor([2 * r])})
        rows = distributed.gather_rows(lambda idx: torch.tensor(idx, dtype=torch.float32)[:, None] * 10, 5,
                                       torch.device("cpu"))
        json.dump({"a": a.grad.tolist(), "b": b.grad is None, "c": c.grad.tolist(), "loss": loss,
                   "batch_error": batch_error, "counts": {str(k): v.tolist() for k, v in counts.items()},
                   "rows": rows.flatten().tolist(), "decision": decision, "state": state,
                   "gathered": distributed.gather_json({"rank": r, "text": "é" * r})}, open(f"{out}/{r}.json", "w"))
    finally:
        dist.destroy_process_group()


def test_reductions_on_hand_made_values(tmp_path):
    """Gradients: mean weighted by each rank's sample count (3 and 1); a parameter no rank touched
    keeps no gradient; counts are summed; rows and JSON are gathered in rank order; rank 0's
    decisions and errors reach every rank; bad batch sizes are refused."""
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert got[0] == got[1]
    g = got[0]
    assert g["a"] == [(3 * 1 + 3) / 4, (3 * 2 + 4) / 4] and g["b"] and g["c"] == [8 / 4]
    assert g["loss"] == pytest.approx((3 * 2 + 6) / 4)
    assert "training.batch_size=7 does not split over 2 processes" in g["batch_error"][0]
    assert "17 training samples ends each epoch with a batch of 1" in g["batch_error"][1]
    assert g["counts"] == {"('image', 0)": [1, 2, 0], "('text', 1)": [2]}
    assert g["rows"] == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert g["decision"] == "held by another run" and g["state"] == {"matrix": [[0.5]], "rank": 0}
    assert g["gathered"] == [{"rank": 0, "text": ""}, {"rank": 1, "text": "é"}]


# ------------------------------------------------------------------------------------ torchrun, 2 processes
def torchrun(args: list[str], *, module: bool = False, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2`` of the CLI (``-m lifelong_moe``) or of the probe."""
    target = ["-m", "lifelong_moe"] if module else [str(PROBE)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "LIFELONG_MOE_DIST_TIMEOUT": "60", **env}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *target, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def write_config(path: Path, strategy: dict) -> Path:
    path.write_text(yaml.safe_dump({**TINY, "strategy": strategy}))
    return path


def record(d: Path) -> dict:
    return json.loads((d / "results.json").read_text())


def losses(d: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (d / "log.jsonl").read_text().splitlines()]


def data_parallel_and_single(tmp_path: Path, strategy: dict):
    cfg = write_config(tmp_path / "c.yaml", strategy)
    states = tmp_path / "states"
    states.mkdir()
    p = torchrun(["run", str(cfg), "-o", str(tmp_path / "dp"), "-q"], PROBE_STATES=str(states))
    assert p.returncode == 0, p.stderr[-3000:]
    single = run(load_config(cfg)[0], tmp_path / "single", progress=False, log=lambda *_: None)
    return tmp_path / "dp", single, states


def assert_ranks_identical_and_close_to_single(dp: Path, single: Path, states: Path, n: int) -> None:
    for i in range(n):  # the trainable state after every experience: bit for bit the same on both ranks
        r0, r1 = (load_file(str(states / f"rank{r}_exp{i}.safetensors")) for r in (0, 1))
        assert r0.keys() == r1.keys()
        for k in r0:  # NaN = not yet set (DDAS calibration of later tasks)
            torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0, equal_nan=True, msg=f"{k} after {i}")
        one = load_file(str(single / "checkpoints" / f"exp_{i:03d}.safetensors"))
        ours = load_file(str(dp / "checkpoints" / f"exp_{i:03d}.safetensors"))
        assert one.keys() == ours.keys()
        for k in one:
            assert torch.allclose(ours[k].double(), one[k].double(), atol=PARAM_TOL, rtol=0, equal_nan=True), k
    a, b = record(dp), record(single)
    assert a["status"] == b["status"] == "complete"
    np.testing.assert_allclose(a["matrix"], b["matrix"], atol=0)  # accuracies: the same predictions
    np.testing.assert_allclose(losses(dp), losses(single), atol=LOSS_TOL)


@pytest.fixture(scope="module")
def finetune_runs(tmp_path_factory):
    return data_parallel_and_single(tmp_path_factory.mktemp("ft"), {"name": "finetune"})


@pytest.mark.slow
def test_data_parallel_run_matches_single_process(finetune_runs):
    dp, single, states = finetune_runs
    assert_ranks_identical_and_close_to_single(dp, single, states, 3)
    RunDir(dp).check_unlocked()  # rank 0 held the directory's lock and released it


@pytest.mark.slow
def test_moe_adapters_ranks_freeze_the_same_experts(tmp_path):
    """Usage counts summed over the ranks' shards: the single-process counts, so the same frozen
    experts on both ranks and as in one process; DDAS autoencoders identical on both ranks."""
    dp, single, states = data_parallel_and_single(tmp_path, MOE)
    assert_ranks_identical_and_close_to_single(dp, single, states, 3)
    a, b = record(dp)["extra"]["moe_adapters"], record(single)["extra"]["moe_adapters"]
    assert a["usage"] == b["usage"] and a["frozen_after_task"] == b["frozen_after_task"]
    assert any(ids for task in a["frozen_after_task"].values() for tower in task.values() for ids in tower.values())
    assert a["ddas"]["selection"] == b["ddas"]["selection"]  # DDAS counts summed over the test shards
    last = load_file(str(states / "rank1_exp2.safetensors"))
    assert any(k.startswith("ddas.") for k in last)


@pytest.mark.slow
def test_killed_rank_stops_the_run_and_resume_continues(finetune_runs, tmp_path):
    dp, _, _ = finetune_runs
    cfg = write_config(tmp_path / "c.yaml", {"name": "finetune"})
    out = tmp_path / "run"
    p = torchrun(["run", str(cfg), "-o", str(out), "-q"], PROBE_KILL="1", PROBE_AT="1")
    assert p.returncode != 0
    assert "error: data-parallel run stopped on rank 0 of 2" in p.stderr or "SIGKILL" in p.stderr, p.stderr[-2000:]
    assert len(record(out)["matrix"]) == 1 and record(out)["status"] != "complete"  # experience 1 kept
    p = torchrun(["run", str(cfg), "-o", str(out), "-q", "--resume"], module=True)  # the user's command
    assert p.returncode == 0, p.stderr[-3000:]
    assert record(out)["status"] == "complete"
    assert record(out)["matrix"] == record(dp)["matrix"]
    np.testing.assert_allclose(losses(out), losses(dp), atol=LOSS_TOL)


@pytest.mark.slow
def test_stalled_rank_times_out_with_one_error(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", {"name": "finetune"})
    p = torchrun(["run", str(cfg), "-o", str(tmp_path / "run"), "-q"], PROBE_STALL="1", PROBE_AT="0",
                 LIFELONG_MOE_DIST_TIMEOUT="5")
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "did not answer within 5 s" in errors[0] and "--resume" in errors[0], p.stderr[-2000:]


CLIP_VARIANTS = [{"name": "zeroshot"}, {"name": "lora", "r": 4}, {"name": "lwf"}, {"name": "ewc", "fisher_batches": 3},
                 {"name": "replay", "memory_size": 20},
                 {"name": "cl_moe", "num_experts": 4, "r": 8, "alpha": 16, "dropout": 0.0}]
VQA = {"stream": {"kind": "vqa", "dataset": "synthetic_vqa", "question_types": ["color", "type"],
                  "questions_per_type": {"train": 24, "test": 8}},
       "backbone": {"family": "vlm", "name": "lmoe-tiny-llava"},
       "training": {"iterations": 3, "batch_size": 8, "optimizer": {"name": "sgd", "lr": 0.05}},
       "evaluation": {"batch_size": 16, "max_new_tokens": 2}}
VLM_VARIANTS = [{"name": "zeroshot"}, {"name": "lora", "r": 4, "dropout": 0.0}, {"name": "lwf", "r": 4, "dropout": 0.0},
                {"name": "replay", "r": 4, "memory_size": 8, "dropout": 0.0}, {"name": "cl_moe", "dropout": 0.0}]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["clip", "vlm"])
def test_every_strategy_matches_one_process(family, tmp_path):
    """The other strategies (finetune and moe_adapters above), all variants in one torchrun launch:
    the same matrix, records and answer metrics as one process; trained values and losses within
    the tolerances. Dropout off so that both runs draw nothing at random in training."""
    variants = CLIP_VARIANTS if family == "clip" else VLM_VARIANTS
    data = {**TINY, **({} if family == "clip" else VQA), "strategy": {"name": "zeroshot"},
            "variants": [{"name": v["name"], "strategy": v} for v in variants]}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    p = torchrun(["run", str(cfg), "-o", str(tmp_path / "dp"), "-q"], module=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for c in load_config(cfg):
        v = c.name.rsplit("/", 1)[-1]
        dp, single = tmp_path / "dp" / v, run(c, tmp_path / "single" / v, progress=False, log=lambda *_: None)
        a, b = record(dp), record(single)
        assert a["status"] == "complete" and a["matrix"] == b["matrix"] and a["zero_shot"] == b["zero_shot"], v
        extra_a, extra_b = a.get("extra") or {}, b.get("extra") or {}
        metrics_a, metrics_b = extra_a.pop("answer_metrics", None), extra_b.pop("answer_metrics", None)
        assert extra_a == extra_b, v  # CL-MoE's inferred-task counts, VQA answer examples, ...
        if metrics_b is not None:  # per-question scores summed per rank, then over ranks
            for m, rows in metrics_b["matrix"].items():
                np.testing.assert_allclose(metrics_a["matrix"][m], rows, atol=1e-12)
        np.testing.assert_allclose(losses(dp), losses(single), atol=LOSS_TOL)
        for ck in sorted((single / "checkpoints").glob("*.safetensors")):
            one, ours = load_file(str(ck)), load_file(str(dp / "checkpoints" / ck.name))
            for k in one:
                assert torch.allclose(ours[k].double(), one[k].double(), atol=PARAM_TOL, rtol=0, equal_nan=True), (v, k)
