"""The Python API at the package top level: run -> load_run -> compare, sweep; the CLI goes
through the same functions."""
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from matplotlib.figure import Figure

import lifelong_moe as lm
from lifelong_moe.cli import main

from helpers import tiny_config

FAST = dict(stream__classes_per_experience=[4, 3, 3], stream__num_experiences=None,
            stream__samples_per_class={"train": 8, "test": 4})


@pytest.fixture
def config_file(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(tiny_config({"name": "finetune"}, runtime__threads=1, **FAST).to_dict()))
    return p


def test_import_is_light():
    code = "import sys, lifelong_moe; print(sorted(m for m in ('torch', 'matplotlib', 'avalanche') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_run_load_compare_round_trip(config_file, tmp_path):
    dirs = lm.run(config_file, overrides=["training.epochs=2"], output=tmp_path / "r")
    assert dirs == [tmp_path / "r"]
    rec = json.loads((dirs[0] / "results.json").read_text())
    r = lm.load_run(dirs[0])
    assert isinstance(r.matrix, np.ndarray) and r.matrix.shape == (3, 3)
    np.testing.assert_array_equal(r.matrix, np.asarray(rec["matrix"]))
    np.testing.assert_array_equal(r.zero_shot, np.asarray(rec["zero_shot"]))
    assert r.tasks == [t["name"] for t in rec["tasks"]] and r.seed == 0 and r.status == "complete"
    assert r.metrics["last"] == rec["metrics"]["last"]["value"]
    assert r.config == yaml.safe_load((dirs[0] / "config.yaml").read_text()) and r.config["training"]["epochs"] == 2
    again = lm.run(tiny_config({"name": "finetune"}, runtime__threads=1, training__epochs=2, **FAST),
                   output=tmp_path / "c")
    assert json.loads((again[0] / "results.json").read_text())["matrix"] == rec["matrix"]  # a RunConfig runs as is
    figs = lm.compare([dirs[0], again[0]], output=tmp_path / "cmp")
    assert set(figs) == {"forgetting_curves", "average_accuracy", "heatmaps"}
    assert all(isinstance(f, Figure) for f in figs.values())
    assert (tmp_path / "cmp" / "results.tex").is_file()
    line = figs["average_accuracy"].axes[0].lines[0]
    np.testing.assert_allclose(line.get_ydata(), r.curve())


def test_sweep_api_and_seed_bands(config_file, tmp_path):
    res = lm.sweep(config_file, seeds=[0, 1], grid={"training.optimizer.lr": [1e-3]}, output=tmp_path / "sw",
                   local=True, progress=False)
    assert [(s.dir, s.status) for s in res.runs] == [("t-lr=0.001-seed0", "complete"),
                                                    ("t-lr=0.001-seed1", "complete")]
    assert res.compare == [tmp_path / "sw" / "compare"] and not res.failed
    runs = [lm.load_run(tmp_path / "sw" / s.dir) for s in res.runs]
    figs = lm.compare(runs)
    labels = [t.get_text() for t in figs["average_accuracy"].axes[0].get_legend().get_texts()]
    assert labels == ["t[lr=0.001] (n=2)"]


def test_cli_run_goes_through_the_api(config_file, tmp_path, monkeypatch):
    done = lm.run(config_file, output=tmp_path / "r")
    calls = []

    def fake(config, overrides, output, **kw):
        calls.append((config, overrides, output, kw))
        return done

    monkeypatch.setattr("lifelong_moe.api.run", fake)
    assert main(["run", str(config_file), "training.epochs=3", "-o", str(tmp_path / "x"), "--stop-after", "2"]) == 0
    assert calls == [(str(config_file), ["training.epochs=3"], str(tmp_path / "x"),
                      {"only": None, "resume": False, "overwrite": False, "stop_after": 2, "jobs": None,
                       "quiet": False})]
