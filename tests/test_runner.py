"""The run loop and the results directory: files, reproducibility, resume, bad input."""
import json

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from lifelong_moe.errors import UserError
from lifelong_moe.runs.runner import run
from lifelong_moe.strategies.base import ClipStrategy

from helpers import tiny_config

FAST = dict(stream__classes_per_experience=[4, 3, 3], stream__num_experiences=None,
            stream__samples_per_class={"train": 8, "test": 4})


def cfg(name="finetune", **kw):
    return tiny_config({"name": name, **kw}, **FAST)


def record(d):
    return json.loads((d / "results.json").read_text())


def test_results_directory_contents(tmp_path):
    out = run(cfg("lora"), tmp_path / "r", progress=False, log=lambda *_: None)
    r = record(out)
    assert r["schema_version"] == 1 and r["status"] == "complete" and r["strategy"] == "lora"
    assert len(r["tasks"]) == 3 and [len(t["classes"]) for t in r["tasks"]] == [4, 3, 3]
    assert np.asarray(r["matrix"]).shape == (3, 3) and len(r["zero_shot"]) == 3
    assert all(0.0 <= v <= 1.0 for row in r["matrix"] for v in row)
    assert {"last", "avg_incremental", "forgetting", "bwt", "fwt", "mtil_transfer"} <= set(r["metrics"])
    assert r["metrics"]["last"]["value"] == pytest.approx(np.mean(r["matrix"][-1]))
    assert all(r["versions"][k] for k in ("python", "torch", "open_clip", "avalanche", "lifelong_moe"))
    assert r["params"]["trainable"] > 0 and len(r["timings"]["experiences"]) == 3
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["strategy"]["name"] == "lora" and saved["strategy"]["r"] == 8
    csv_rows = (out / "matrix.csv").read_text().splitlines()
    assert csv_rows[1].startswith("zero_shot") and len(csv_rows) == 5
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {e["experience"] for e in log} == {0, 1, 2} and all(np.isfinite(e["loss"]) for e in log)
    for i in range(3):
        state = load_file(str(out / "checkpoints" / f"exp_{i:03d}.safetensors"))
        assert state and all(k.startswith("model.") and "lora_" in k for k in state)
    assert not list(out.rglob("*.tmp"))


def test_same_config_and_seed_give_identical_numbers(tmp_path):
    a = record(run(cfg("replay"), tmp_path / "a", progress=False, log=lambda *_: None))
    b = record(run(cfg("replay"), tmp_path / "b", progress=False, log=lambda *_: None))
    assert a["matrix"] == b["matrix"] and a["zero_shot"] == b["zero_shot"]


@pytest.mark.parametrize("name", ["finetune", "lwf", "ewc", "replay", "lora"])
def test_stopped_run_resumes_to_identical_matrix(tmp_path, name):
    full = record(run(cfg(name), tmp_path / "full", progress=False, log=lambda *_: None))
    part = run(cfg(name), tmp_path / "part", progress=False, stop_after=1, log=lambda *_: None)
    assert record(part)["status"] == "running" and len(record(part)["matrix"]) == 1
    resumed = record(run(cfg(name), part, resume=True, progress=False, log=lambda *_: None))
    assert resumed["status"] == "complete"
    assert resumed["matrix"] == full["matrix"]
    steps = [json.loads(x)["experience"] for x in (part / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and set(steps) == {0, 1, 2}


def test_crash_mid_experience_resumes_to_identical_matrix(tmp_path, monkeypatch):
    full = record(run(cfg("ewc"), tmp_path / "full", progress=False, log=lambda *_: None))
    calls = {"n": 0}
    original = ClipStrategy.optimizer_step

    def crashing(self):
        calls["n"] += 1
        if self.experience_index == 2 and self._steps_in_exp == 1:
            raise KeyboardInterrupt("killed")
        return original(self)

    monkeypatch.setattr(ClipStrategy, "optimizer_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        run(cfg("ewc"), tmp_path / "crash", progress=False, log=lambda *_: None)
    assert len(record(tmp_path / "crash")["matrix"]) == 2  # consistent state after experience 2
    monkeypatch.setattr(ClipStrategy, "optimizer_step", original)
    resumed = record(run(cfg("ewc"), tmp_path / "crash", resume=True, progress=False, log=lambda *_: None))
    assert resumed["matrix"] == full["matrix"]


def test_existing_run_is_not_overwritten_by_accident(tmp_path):
    out = run(cfg("zeroshot"), tmp_path / "r", progress=False, log=lambda *_: None)
    before = (out / "results.json").read_bytes()
    with pytest.raises(UserError, match="already holds a run; use --resume"):
        run(cfg("zeroshot"), out, progress=False, log=lambda *_: None)
    assert (out / "results.json").read_bytes() == before


def test_resume_with_changed_config_is_refused(tmp_path):
    out = run(cfg("finetune"), tmp_path / "r", progress=False, stop_after=1, log=lambda *_: None)
    changed = tiny_config({"name": "finetune"}, training__epochs=2, **FAST)
    with pytest.raises(UserError, match="differs from the saved run in: training"):
        run(changed, out, resume=True, progress=False, log=lambda *_: None)


def test_missing_dataset_fails_before_writing(tmp_path):
    bad = tiny_config({"name": "finetune"}, stream__dataset="cifar10", stream__root=str(tmp_path / "data"))
    with pytest.raises(UserError, match="cifar10.*download"):
        run(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_fails_before_writing(tmp_path):
    bad = tiny_config({"name": "finetune"}, backbone__pretrained=str(tmp_path / "nope.safetensors"))
    with pytest.raises(UserError, match="checkpoint file not found"):
        run(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_pretrained_tag_is_explained(tmp_path):
    bad = tiny_config({"name": "finetune"}, backbone__pretrained="openai")
    with pytest.raises(UserError, match="neither an existing file nor an open_clip tag"):
        run(bad, tmp_path / "out", progress=False)
