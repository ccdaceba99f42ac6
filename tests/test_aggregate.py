"""Seed groups in ``compare``: exact mean / sample std on hand-made results, the paired view, the
paper tables (Markdown, LaTeX booktabs, best in bold) and the bands in the figures."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.collections import PolyCollection

from lifelong_moe.report.aggregate import group_runs, paired
from lifelong_moe.cli import main
from lifelong_moe.report.compare import compare_figures, compare_runs, load_runs
from lifelong_moe.report.paper_tables import latex_table, markdown_table

TASKS = ["a", "b"]
CONFIG = {"name": "m", "stream": {"kind": "class_incremental"}, "training": {"lr": 0.1}, "output": {"dir": "x"}}


def make(root: Path, name: str, seed, last: float, forgetting: float, *, strategy="s", lr=0.1, matrix=None,
         zero_shot=None) -> Path:
    d = root / f"{name.replace('/', '-')}-lr{lr}-seed{seed}"
    d.mkdir(parents=True)
    rec = {"schema_version": 1, "name": name, "strategy": strategy, "status": "complete", "seed": seed,
           "metric_kind": "accuracy", "tasks": [{"name": t} for t in TASKS], "zero_shot": zero_shot,
           "matrix": matrix if matrix is not None else [[last, 0.0], [last, last]],
           "metrics": {"last": {"value": last}, "forgetting": {"value": forgetting}}}
    (d / "results.json").write_text(json.dumps(rec))
    cfg = {**CONFIG, "name": name, "seed": seed, "training": {"lr": lr},
           "output": {"dir": str(d)}, "runtime": {"threads": (seed or 0) + 1}}  # output/runtime never split a group
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    return d


@pytest.fixture
def sweep(tmp_path):
    a = [make(tmp_path, "m/ft_lr", s, v, f) for s, v, f in [(0, 0.7, 0.1), (1, 0.8, 0.2), (2, 0.9, 0.3)]]
    b = [make(tmp_path, "m/moe", s, v, 0.05) for s, v in [(0, 0.6), (1, 0.6), (2, 0.9)]]
    return a, b


def test_groups_mean_and_sample_std_exact(sweep):
    a, b = sweep
    groups = group_runs(load_runs(a + b))
    assert [(g.label, g.seeds) for g in groups] == [("m/ft_lr", [0, 1, 2]), ("m/moe", [0, 1, 2])]
    ga, gb = groups
    assert ga.metric("last").mean == pytest.approx(0.8) and ga.metric("last").std == pytest.approx(0.1)
    assert ga.metric("forgetting").mean == pytest.approx(0.2) and ga.metric("forgetting").std == pytest.approx(0.1)
    assert gb.metric("last").mean == pytest.approx(0.7) and gb.metric("last").std == pytest.approx(np.sqrt(0.03))
    assert gb.metric("forgetting").std == pytest.approx(0.0) and gb.metric("last").n == 3
    mean, std = ga.matrix()
    np.testing.assert_allclose(mean, [[0.8, 0.0], [0.8, 0.8]])
    np.testing.assert_allclose(std, [[0.1, 0.0], [0.1, 0.1]])
    m, s = ga.curve()  # average over seen tasks per run: [last, last] -> mean 0.8, std 0.1 at both points
    np.testing.assert_allclose(m, [0.8, 0.8]) and np.testing.assert_allclose(s, [0.1, 0.1])


def test_only_seed_may_differ_within_a_group(sweep, tmp_path):
    a, _ = sweep
    other_lr = make(tmp_path, "m/ft_lr", 3, 0.5, 0.1, lr=0.2)  # another learning rate: its own group
    dup = make(tmp_path / "again", "m/ft_lr", 0, 0.5, 0.1, lr=0.3)
    dup2 = make(tmp_path / "again2", "m/ft_lr", 0, 0.5, 0.1, lr=0.3)  # same seed twice: no group
    groups = group_runs(load_runs(a + [other_lr, dup, dup2]))
    assert [g.n for g in groups] == [3, 1, 1, 1]
    assert groups[0].label == "m/ft_lr" and len({g.label for g in groups}) == 4  # lone runs told apart


def test_paired_differences_per_seed(sweep):
    a, b = sweep
    (p,) = paired(group_runs(load_runs(a + b)))
    assert p.seeds == [0, 1, 2] and p.a.label == "m/ft_lr"
    np.testing.assert_allclose(p.diffs["last"], [0.1, 0.2, 0.0], atol=1e-12)
    assert p.stat("last").mean == pytest.approx(0.1) and p.stat("last").std == pytest.approx(0.1)
    assert paired(group_runs(load_runs(a + b[:1]))) == []  # one shared seed is no paired comparison


def test_markdown_and_latex_tables_exact(sweep):
    a, b = sweep
    groups = group_runs(load_runs(a + b))
    assert markdown_table(groups) == "\n".join([
        "| method | last ↑ | forgetting ↓ |",
        "|---|---:|---:|",
        "| m/ft_lr | **80.00** ± 10.00 | 20.00 ± 10.00 |",
        "| m/moe | 70.00 ± 17.32 | **5.00** ± 0.00 |"])
    assert latex_table(groups) == "\n".join([
        r"\begin{tabular}{lrr}",
        r"\toprule",
        r"Method & last $\uparrow$ & forgetting $\downarrow$ \\",
        r"\midrule",
        r"m/ft\_lr & \textbf{80.00} $\pm$ 10.00 & 20.00 $\pm$ 10.00 \\",
        r"m/moe & 70.00 $\pm$ 17.32 & \textbf{5.00} $\pm$ 0.00 \\",
        r"\bottomrule",
        r"\end{tabular}"])


def test_table_ties_undefined_and_single_runs(tmp_path):
    x = make(tmp_path, "x", None, 0.5, 0.2)
    y = make(tmp_path, "y", None, 0.5, 0.1)
    rj = json.loads((y / "results.json").read_text())
    rj["metrics"]["bwt"] = {"value": None}
    (y / "results.json").write_text(json.dumps(rj))
    groups = group_runs(load_runs([x, y]))
    assert markdown_table(groups).splitlines()[2:] == ["| x | **50.00** | 20.00 |", "| y | **50.00** | **10.00** |"]
    assert "bwt" not in markdown_table(groups)  # undefined everywhere: no column


def test_compare_writes_aggregated_views(sweep, tmp_path, capsys):
    a, b = sweep
    assert main(["compare", *map(str, a + b), "-o", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "| m/ft_lr | s | 0, 1, 2 | 2/2 | 80.00 ± 10.00 | 20.00 ± 10.00 |" in printed
    out = tmp_path / "cmp"
    assert {"paired.md", "results.md", "results.tex", "metrics.md", "metrics.csv"} <= {p.name for p in out.iterdir()}
    assert "| last | 10.00 | 20.00 | 0.00 | 10.00 ± 10.00 |" in (out / "paired.md").read_text()
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == "run,strategy,n,seeds,last_mean,last_std,forgetting_mean,forgetting_std"
    assert csv_lines[1] == "m/ft_lr,s,3,0 1 2,80.00,10.00,20.00,10.00"


def test_figures_draw_mean_and_band(sweep):
    a, b = sweep
    figs = compare_figures(a + b[:1])  # a: three seeds, b: one run
    ax = figs["average_accuracy"].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["m/ft_lr (n=3)", "m/moe (n=1)"]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.8, 0.8])
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1  # one seed has no band
    ys = bands[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(0.7) and ys.max() == pytest.approx(0.9)


def test_single_runs_unchanged(tmp_path):
    x = make(tmp_path, "x", 0, 0.5, 0.2)
    y = make(tmp_path, "y", 0, 0.6, 0.1)
    figs = compare_figures([x, y])
    ax = figs["average_accuracy"].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["x", "y"]
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]
    paths = compare_runs([x, y], tmp_path / "cmp")
    assert "paired.md" not in paths and "| x | s | complete | 2/2 | 50.00 | 20.00 |" in paths["metrics.md"].read_text()
