import csv
import re
import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from lifelong_moe.report.compare import compare_runs, format_metrics_table, load_run, load_runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TASKS = ["digits/0-1", "digits/2-3", "digits/4-5"]


def make_run(path: Path, *, name="quickstart/finetune", strategy="finetune", matrix=None, zero_shot=None,
             metrics=None, status="complete", schema_version=1) -> Path:
    path.mkdir(parents=True)
    rec = {
        "schema_version": schema_version,
        "name": name,
        "strategy": strategy,
        "status": status,
        "metric_kind": "accuracy",
        "tasks": [{"index": i, "name": t, "class_names": [str(2 * i), str(2 * i + 1)]} for i, t in enumerate(TASKS)],
        "zero_shot": zero_shot,
        "matrix": matrix if matrix is not None else [],
        "metrics": {k: {"value": v, "definition": f"definition of {k}"} for k, v in (metrics or {}).items()},
    }
    (path / "results.json").write_text(json.dumps(rec))
    return path


@pytest.fixture
def two_runs(tmp_path):
    full = make_run(tmp_path / "runs" / "finetune", matrix=[[0.9, 0.1, 0.0], [0.5, 0.95, 0.2], [0.3, 0.6, 0.97]],
                    zero_shot=[0.5, 0.4, 0.3], metrics={"last": 0.8, "forgetting": 0.125, "bwt": -0.5})
    partial = make_run(tmp_path / "runs" / "moe", name="quickstart/moe", strategy="moe", status="running",
                       matrix=[[0.92, 0.2, 0.1], [0.9, None, 0.3]], zero_shot=None,
                       metrics={"last": 0.90123, "forgetting": None, "fwt": None})
    return full, partial


def test_compare_writes_valid_files(two_runs, tmp_path):
    out = tmp_path / "cmp" / "nested"
    paths = compare_runs(two_runs, out)
    assert set(paths) == {"forgetting_curves.png", "average_accuracy.png", "heatmaps.png", "metrics.md", "metrics.csv",
                          "results.md", "results.tex"}
    for name, p in paths.items():
        assert p == out / name and p.is_file()
        if name.endswith(".png"):
            assert p.read_bytes()[:8] == PNG_SIGNATURE
            img = imread(p)
            assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_metrics_table_markdown(two_runs, tmp_path):
    paths = compare_runs(two_runs, tmp_path / "cmp")
    md = paths["metrics.md"].read_text()
    table = format_metrics_table(load_runs(two_runs))
    assert table in md
    lines = table.splitlines()
    assert lines[0] == "| run | strategy | status | trained | last | forgetting | bwt | fwt |"
    assert len(lines) == 2 + 2  # header, separator, one row per run
    assert lines[2] == "| quickstart/finetune | finetune | complete | 3/3 | 80.00 | 12.50 | -50.00 | – |"
    assert lines[3] == "| quickstart/moe | moe | running | 2/3 | 90.12 | – | – | – |"
    for k in ("last", "forgetting", "bwt", "fwt"):
        assert f"- `{k}`: definition of {k}" in md


def test_metrics_csv(two_runs, tmp_path):
    paths = compare_runs(two_runs, tmp_path / "cmp")
    with open(paths["metrics.csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["quickstart/finetune", "quickstart/moe"]
    assert rows[0]["last"] == "80.00" and rows[0]["forgetting"] == "12.50" and rows[0]["bwt"] == "-50.00"
    assert rows[0]["fwt"] == ""  # present in another run only
    assert rows[1]["last"] == "90.12" and rows[1]["forgetting"] == "" and rows[1]["trained"] == "2/3"


def test_load_run_fields(two_runs):
    r = load_run(two_runs[1])
    assert r.label == "quickstart/moe" and r.strategy == "moe" and r.tasks == TASKS
    assert r.zero_shot is None and r.matrix.shape == (2, 3) and np.isnan(r.matrix[1, 1])
    assert r.metrics == {"last": 0.90123, "forgetting": None, "fwt": None}
    assert r.definitions["last"] == "definition of last"
    np.testing.assert_allclose(r.curve(), [0.92, 0.9])  # NaN skipped in the mean over seen tasks
    full = load_run(two_runs[0] / "results.json")
    np.testing.assert_allclose(full.curve(), [0.9, 0.725, (0.3 + 0.6 + 0.97) / 3])
    np.testing.assert_allclose(full.zero_shot, [0.5, 0.4, 0.3])


def test_label_falls_back_to_directory_name(tmp_path):
    d = make_run(tmp_path / "my_run", name=None, matrix=[[0.5, 0.5, 0.5]])
    assert load_run(d).label == "my_run"


def test_duplicate_labels_disambiguated(tmp_path):
    a = make_run(tmp_path / "seed0" / "ft", matrix=[[0.5, 0.1, 0.1]], metrics={"last": 0.5})
    b = make_run(tmp_path / "seed1" / "ft", matrix=[[0.6, 0.1, 0.1]], metrics={"last": 0.6})
    c = make_run(tmp_path / "other", name="other", matrix=[[0.6, 0.1, 0.1]])
    runs = load_runs([a, b, c])
    assert [r.label for r in runs] == ["quickstart/finetune (seed0)", "quickstart/finetune (seed1)", "other"]
    paths = compare_runs([a, b, c], tmp_path / "cmp")
    with open(paths["metrics.csv"], newline="") as f:
        assert [r["run"] for r in csv.DictReader(f)] == [r.label for r in runs]
    # same label and same parent name: a counter
    same = load_runs([a, a])
    assert [r.label for r in same] == ["quickstart/finetune (seed0) #1", "quickstart/finetune (seed0) #2"]
    # explicit labels are used as given
    assert [r.label for r in load_runs([a, b], labels=["x", "y"])] == ["x", "y"]
    assert "| quickstart/finetune (seed1) |" in format_metrics_table([load_run(a), load_run(b)])


def test_missing_results_json(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_run(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        compare_runs([tmp_path / "nowhere"], tmp_path / "cmp")


def test_unknown_schema_version(tmp_path):
    d = make_run(tmp_path / "future", schema_version=99, matrix=[[0.5, 0.5, 0.5]])
    with pytest.raises(ValueError, match=r"future.*schema_version 99"):
        load_run(d)


@pytest.mark.parametrize("bad", ["{not json", "[]", json.dumps({"schema_version": 1, "tasks": []}),
                                 json.dumps({"schema_version": 1, "tasks": [{"name": "a"}], "matrix": [[0.1, 0.2]]}),
                                 json.dumps({"schema_version": 1, "tasks": [{"name": "a"}], "zero_shot": [1, 2]})])
def test_malformed_results_json(tmp_path, bad):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "results.json").write_text(bad)
    with pytest.raises(ValueError, match="bad"):
        load_run(d)


def test_many_tasks_and_runs_render(tmp_path):
    names = [f"dataset-number-{i}" for i in range(12)]
    rng = np.random.default_rng(0)
    dirs = []
    for r in range(3):
        d = tmp_path / f"r{r}"
        d.mkdir()
        k = 12 if r else 7
        rec = {"schema_version": 1, "name": f"run{r}", "strategy": "s", "status": "complete",
               "tasks": [{"index": i, "name": n} for i, n in enumerate(names)],
               "zero_shot": rng.random(12).tolist() if r != 1 else None,
               "matrix": rng.random((k, 12)).tolist(), "metrics": {}}
        (d / "results.json").write_text(json.dumps(rec))
        dirs.append(d)
    paths = compare_runs(dirs, tmp_path / "cmp")
    assert imread(paths["forgetting_curves.png"]).shape[0] > 300
    assert "| run0 | s | complete | 7/12 |" in paths["metrics.md"].read_text()


def _figure_texts(fig) -> str:
    """Every label, title, tick and legend text of a figure (and of its colour bars)."""
    from matplotlib.text import Text

    fig.canvas.draw()  # tick labels exist once drawn
    return "\n".join(t.get_text() for t in fig.findobj(Text) if t.get_text())


def test_edit_runs_are_plotted_in_edits_so_far_and_reliability_of_earlier_edits(tmp_path):
    from lifelong_moe.report.compare import compare_figures

    parts = ["edits 1-50", "edits 51-100"]
    dirs = []
    for name in ("liveedit", "retrieval"):
        d = tmp_path / name
        d.mkdir()
        rec = {"schema_version": 1, "name": f"edit_quickstart/{name}", "strategy": name, "status": "complete",
               "stream_kind": "edit", "metric_kind": "edit reliability (token accuracy)",
               "tasks": [{"name": p, "edits": 50} for p in parts], "zero_shot": [0.4, 0.5],
               "matrix": [[0.9, 0.5], [0.8, 0.95]], "metrics": {}}
        (d / "results.json").write_text(json.dumps(rec))
        dirs.append(d)
    figs = compare_figures(dirs)
    curves, average, heat = (_figure_texts(figs[k]) for k in ("forgetting_curves", "average_accuracy", "heatmaps"))
    assert "edits so far" in curves and "reliability of these edits" in curves
    assert figs["average_accuracy"].axes[0].get_xlabel() == "edits so far"
    assert figs["average_accuracy"].axes[0].get_ylabel() == "reliability of earlier edits"
    assert [t.get_text() for t in figs["average_accuracy"].axes[0].get_xticklabels()] == ["50", "100"]
    assert "after 100 edits" in heat and "unedited" in heat
    for text in (curves, average, heat):
        assert "training experience" not in text and "task" not in text.lower() and "zero-shot" not in text
    cl = compare_figures([make_run(tmp_path / "cl", matrix=[[0.9, 0.1, 0.0]], zero_shot=[0.5, 0.4, 0.3])])
    assert cl["average_accuracy"].axes[0].get_xlabel() == "after training experience"  # continual runs unchanged
    assert cl["average_accuracy"].axes[0].get_ylabel() == "average accuracy over seen tasks"
