"""``lifelong-moe sweep``: expansion, skip / resume / restart on re-launch, failing runs reported
while the others finish, the seed-aggregated comparison; --local here, Ray in the slow test."""
import json

import pytest
import yaml

from lifelong_moe.cli import main
from lifelong_moe.config import validate
from lifelong_moe.errors import UserError
from lifelong_moe.runs.runner import run
from lifelong_moe.runs.sweeps import expand, parse_grid, parse_seeds, split_values, sweep

TINY = {"name": "tiny", "seed": 0,
        "stream": {"kind": "class_incremental", "dataset": "digits", "classes_per_experience": [4, 3, 3],
                   "samples_per_class": {"train": 8, "test": 4}},
        "backbone": {"name": "lmoe-tiny-vit"}, "strategy": {"name": "finetune"},
        "training": {"epochs": 1, "batch_size": 8, "optimizer": {"lr": 1.0e-3}},
        "evaluation": {"batch_size": 64}, "runtime": {"device": "cpu", "threads": 1}}


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


def record(d):
    return json.loads((d / "results.json").read_text())


def test_parsing():
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("3-5") == [3, 4, 5] and parse_seeds(None) is None
    for bad in ("a", "1,1", "-1", ""):
        with pytest.raises(UserError, match="--seeds"):
            parse_seeds(bad)
    assert split_values("a,[1,2],{x: 1, y: 2}") == ["a", "[1,2]", "{x: 1, y: 2}"]
    assert parse_grid(["training.optimizer.lr=1e-3,3e-3"]) == [("training.optimizer.lr", ["1e-3", "3e-3"])]
    for bad, msg in ((["lr"], "key.path=value1"), (["a=1", "a=2"], "more than once"), (["seed=1,2"], "--seeds"),
                     (["a=1,1"], "repeat")):
        with pytest.raises(UserError, match=msg):
            parse_grid(bad)


def test_expand_names_dirs_and_configs(tiny):
    runs = expand([tiny], seeds="0,1", grid=["training.optimizer.lr=1e-3,0.01", "strategy.name=finetune,lwf"])
    assert len(runs) == 8
    r = runs[-1]
    assert r.dir == "tiny-lr=0.01-name=lwf-seed1" and r.name == "tiny[lr=0.01,name=lwf]" and r.seed == 1
    assert r.config["seed"] == 1 and r.config["training"]["optimizer"]["lr"] == 0.01
    assert r.config["strategy"]["name"] == "lwf" and "temperature" in r.config["strategy"]  # resolved params
    assert validate(r.config).to_dict() == r.config and r.cpus == 1 and r.gpus == 0
    assert {x.name for x in runs if x.grid == r.grid} == {r.name}  # one name over the seeds of a setting
    with pytest.raises(UserError, match=r"grid point training.epochs=0.*training.epochs"):
        expand([tiny], grid=["training.epochs=1,0"])  # a bad value fails before anything runs


def test_local_sweep_skip_resume_restart_and_failure(tiny, tmp_path, capsys):
    out = tmp_path / "sw"
    args = ["sweep", str(tiny), "--seeds", "0,1,2", "-o", str(out), "--local", "-q"]
    # seed 1 stopped after its first experience (as a killed run leaves it); seed 2 killed before its
    # first write (a directory without results.json)
    (s1,) = [r for r in expand([tiny], seeds="1")]
    run(validate(s1.config), out / s1.dir, stop_after=1, progress=False, log=lambda *_: None)
    ckpt = out / s1.dir / "checkpoints" / "exp_000.safetensors"
    before = (ckpt.stat().st_ino, ckpt.read_bytes())
    (out / "tiny-seed2").mkdir()
    (out / "tiny-seed2" / "config.yaml").write_text("half written")
    assert main(args) == 0
    printed = capsys.readouterr().out
    actions = {s["dir"]: s["action"] for s in json.loads((out / "sweep.json").read_text())["runs"]}
    assert actions == {"tiny-seed0": "started", "tiny-seed1": "resumed", "tiny-seed2": "restarted"}
    assert (ckpt.stat().st_ino, ckpt.read_bytes()) == before  # experience 1 kept, not trained again
    for s in (0, 1, 2):
        rec = record(out / f"tiny-seed{s}")
        assert rec["status"] == "complete" and len(rec["matrix"]) == 3 and rec["seed"] == s
        assert rec["name"] == "tiny"
    table = (out / "compare" / "metrics.md").read_text()
    assert "| tiny | finetune | 0, 1, 2 | 3/3 |" in table and "tiny-seed1" in printed
    # the same command again: every run skipped, nothing rewritten
    stamp = (out / "tiny-seed0" / "results.json").stat().st_mtime_ns
    assert main(args) == 0
    assert {s["status"] for s in json.loads((out / "sweep.json").read_text())["runs"]} == {"skipped"}
    assert (out / "tiny-seed0" / "results.json").stat().st_mtime_ns == stamp
    # a failing run (a checkpoint that does not exist) is reported; the other grid point completes
    bad = str(tmp_path / "missing.safetensors")
    code = main(["sweep", str(tiny), "--grid", f"backbone.pretrained=null,{bad}", "-o", str(tmp_path / "g"),
                 "--local", "-q"])
    assert code == 1
    printed = capsys.readouterr().out
    runs = {s["dir"].split("-seed")[0]: s for s in json.loads((tmp_path / "g" / "sweep.json").read_text())["runs"]}
    assert runs["tiny-pretrained=null"]["status"] == "complete"
    failed = [s for s in runs.values() if s["status"] == "failed"]
    assert len(failed) == 1 and "checkpoint file not found" in failed[0]["error"]
    assert "1 of 2 runs failed" in printed and "checkpoint file not found" in printed


def test_changed_config_is_not_skipped(tiny, tmp_path):
    out = tmp_path / "sw"
    sweep([tiny], seeds=[0], output=out, local=True, progress=False)
    res = sweep([tiny], seeds=[0], overrides=["training.epochs=2"], output=out, local=True, progress=False)
    assert res.runs[0].status == "failed" and "differs from the saved run in: training" in res.runs[0].error


def test_without_ray_sweep_says_how_to_install(tiny, tmp_path, monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert main(["sweep", str(tiny), "-o", str(tmp_path / "sw")]) == 2
    assert "pip install 'lifelong-moe[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()


@pytest.mark.slow
def test_ray_sweep(tiny, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.chdir(tmp_path)  # a relative -o: the workers write where this process means
    out = tmp_path / "sw"
    bad = "missing.safetensors"  # relative: the runs look for it in this directory (and fail)
    args = ["sweep", str(tiny), "--seeds", "0,1,2", "--grid", f"backbone.pretrained=null,{bad}", "-o", "sw",
            "--cpus", "2", "-q"]
    assert main(args) == 1  # the three runs on a missing checkpoint fail, the other three complete
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert sorted(s["status"] for s in runs) == ["complete"] * 3 + ["failed"] * 3
    assert all("checkpoint file not found" in s["error"] for s in runs if s["status"] == "failed")
    assert "| tiny[pretrained=null] | finetune | 0, 1, 2 | 3/3 |" in (out / "compare" / "metrics.md").read_text()
    local = sweep([tiny], seeds=[0], output=tmp_path / "local", local=True, progress=False)
    # a Ray worker computes what this process computes (the names differ by the grid suffix only)
    assert record(out / "tiny-pretrained=null-seed0")["matrix"] == record(local.output / "tiny-seed0")["matrix"]
    assert main(args + ["--gpus-per-run", "64"]) == 1  # more than any machine: the complete runs are skipped,
    again = json.loads((out / "sweep.json").read_text())["runs"]  # the others fail at once instead of waiting
    assert sorted(s["status"] for s in again) == ["failed"] * 3 + ["skipped"] * 3
    assert all("asks for 64 GPU per run; the Ray cluster has 2 CPU" in s["error"]
               for s in again if s["status"] == "failed")


@pytest.mark.slow
def test_a_ray_worker_that_dies_mid_run_fails_that_run_only_and_the_rerun_resumes_it(tiny, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    import os

    from lifelong_moe.runs import sweeps

    real = sweeps.execute

    def dying(run_, root, cwd=None):  # shipped to the Ray workers by value (a closure)
        if run_["seed"] == 1:
            from pathlib import Path

            from lifelong_moe.config import validate
            from lifelong_moe.runs.runner import run as run_one
            run_one(validate(run_["config"]), Path(root) / run_["dir"], stop_after=1, progress=False,
                    log=lambda *_: None)
            os._exit(1)  # the worker process dies after one experience, as when killed or out of memory
        return real(run_, root, cwd)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweeps, "execute", dying)
    args = ["sweep", str(tiny), "--seeds", "0,1,2", "-o", "sw", "--cpus", "2", "-q"]
    assert main(args) == 1
    runs = {s["seed"]: s for s in json.loads((tmp_path / "sw" / "sweep.json").read_text())["runs"]}
    assert [runs[s]["status"] for s in (0, 1, 2)] == ["complete", "failed", "complete"]
    assert runs[1]["error"]  # the driver reports the dead worker instead of hanging or crashing
    assert len(record(tmp_path / "sw" / "tiny-seed1")["matrix"]) == 1  # what it wrote before dying is kept
    monkeypatch.setattr(sweeps, "execute", real)
    assert main(args) == 0  # the same command: the complete runs are skipped, the stopped one resumed
    again = {s["seed"]: s for s in json.loads((tmp_path / "sw" / "sweep.json").read_text())["runs"]}
    assert [again[s]["status"] for s in (0, 1, 2)] == ["skipped", "complete", "skipped"]
    assert again[1]["action"] == "resumed"
    whole = run(validate({**TINY, "seed": 1}), tmp_path / "whole", progress=False, log=lambda *_: None)
    assert record(tmp_path / "sw" / "tiny-seed1")["matrix"] == record(whole)["matrix"]
