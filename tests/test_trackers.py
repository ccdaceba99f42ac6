"""``logging: {tensorboard, wandb}``: the trackers receive the per-step loss / lr and every matrix row
and metric the results directory records (read back with TensorBoard's EventAccumulator)."""
import json

import pytest

from lifelong_moe.errors import UserError
from lifelong_moe.runs.runner import run

from helpers import tiny_config

FAST = dict(stream__classes_per_experience=[4, 3, 3], stream__num_experiences=None,
            stream__samples_per_class={"train": 8, "test": 4})


def scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_steps_rows_and_metrics(tmp_path):
    tb = tmp_path / "tb"
    cfg = tiny_config({"name": "finetune"}, logging={"tensorboard": str(tb)}, **FAST)
    out = run(cfg, tmp_path / "r", progress=False, log=lambda *_: None)
    rec = json.loads((out / "results.json").read_text())
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    s = scalars(tb / "t" / "seed0")
    assert [v for _, v in s["train/loss"]] == pytest.approx([e["loss"] for e in log])
    assert [v for _, v in s["train/lr"]] == pytest.approx([e["lr"] for e in log])
    steps = [k for k, _ in s["train/loss"]]
    assert steps == list(range(1, len(log) + 1))  # one count over all experiences
    for j, task in enumerate(rec["tasks"]):
        series = s[f"accuracy/{task['name']}"]
        assert series == [(0, pytest.approx(rec["zero_shot"][j]))] + \
            [(i + 1, pytest.approx(row[j])) for i, row in enumerate(rec["matrix"])]
    assert s["metrics/last"][-1] == (3, pytest.approx(rec["metrics"]["last"]["value"]))
    assert "logging" in (out / "config.yaml").read_text()


def test_tensorboard_resume_continues_the_step_count(tmp_path):
    tb = tmp_path / "tb"
    cfg = tiny_config({"name": "finetune"}, logging={"tensorboard": str(tb)}, **FAST)
    out = run(cfg, tmp_path / "r", progress=False, stop_after=1, log=lambda *_: None)
    run(cfg, out, resume=True, progress=False, log=lambda *_: None)
    s = scalars(tb / "t" / "seed0")
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [k for k, _ in s["train/loss"]] == list(range(1, len(log) + 1))
    assert [k for k, _ in s["metrics/last"]] == [1, 2, 3]  # undefined on the zero-shot row: not logged


def test_off_by_default_and_missing_library(tmp_path, monkeypatch):
    cfg = tiny_config({"name": "zeroshot"}, **FAST)
    assert cfg.logging.tensorboard is None and cfg.logging.wandb is None
    import builtins

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "wandb"
                        else real(name, *a, **k))
    bad = tiny_config({"name": "zeroshot"}, logging={"wandb": {"project": "p"}}, **FAST)
    with pytest.raises(UserError, match=r"logging.wandb needs the wandb package: pip install"):
        run(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_wandb_offline_writes_a_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    cfg = tiny_config({"name": "finetune"}, logging={"wandb": {"project": "lmoe-test", "mode": "offline"}}, **FAST)
    run(cfg, tmp_path / "r", progress=False, log=lambda *_: None)
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (log,) = runs[0].glob("run-*.wandb")  # the run's record log (protobuf records; keys stored as text)
    data = log.read_bytes()
    for key in (b"train/loss", b"train/lr", b"accuracy/", b"metrics/last", b"lmoe-test"):
        assert key in data
