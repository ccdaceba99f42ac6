"""Compare saved runs: forgetting curves, average-accuracy curves, heatmaps and a metrics table.

Reads only ``results.json`` (schema_version 1, see docs/results.md): the stored ``metrics`` are
shown as saved, and the small per-step curve is recomputed here, so this module needs neither
torch nor ``lifelong_moe.metrics``. Figures use the object-oriented matplotlib API (no pyplot, so
no global backend state); PNGs are rendered by Agg. Every file is written atomically.
"""
from __future__ import annotations

import csv
import io
import json
import math
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from .aggregate import aggregated, group_runs, paired
from .errors import UserError
from .io import atomic_path, write_text
from .paper_tables import latex_table, markdown_table

SCHEMA_VERSIONS = (1,)
MARKERS = "osD^vPX*<>"
MAX_COLS = 4  # panels per row in the forgetting-curve grid


class RunFormatError(UserError, ValueError):
    """results.json is malformed or has an unknown schema_version (a ValueError the CLI prints)."""


@dataclass
class RunResult:
    path: Path
    label: str
    strategy: str
    tasks: list[str]
    zero_shot: np.ndarray | None  # (T,) fractions, NaN where not evaluated
    matrix: np.ndarray  # (k, T) completed rows, NaN for null
    metrics: dict[str, float | None] = field(default_factory=dict)
    definitions: dict[str, str] = field(default_factory=dict)
    status: str = "complete"
    metric_kind: str = "accuracy"
    task_classes: list = field(default_factory=list)  # per task: its class names as saved (or None)
    name: str = ""  # results.json ``name`` ('' when absent); runs of one name may form a seed group
    seed: int | None = None
    config: dict | None = None  # the resolved configuration (config.yaml beside results.json), if any
    stream_kind: str = ""  # results.json ``stream_kind`` (vqa, multi_domain, class_incremental)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def rows(self) -> int:
        return self.matrix.shape[0]

    @property
    def percent(self) -> bool:
        """Whether the matrix holds fractions in [0, 1] shown as percent (accuracy-like)."""
        return "acc" in self.metric_kind.lower()

    def curve(self) -> np.ndarray:
        """Average accuracy over seen tasks after each completed experience: mean_{j<=t} A[t, j]."""
        out = []
        for t, row in enumerate(self.matrix):
            seen = row[: t + 1][~np.isnan(row[: t + 1])]
            out.append(float(seen.mean()) if seen.size else math.nan)
        return np.asarray(out, dtype=float)


def _floats(values, what: str, rj: Path) -> np.ndarray:
    try:
        return np.asarray([math.nan if v is None else float(v) for v in values], dtype=float)
    except (TypeError, ValueError) as e:
        raise RunFormatError(f"{rj}: '{what}' must hold numbers or null ({e})") from None


def load_run(path: str | Path, label: str | None = None) -> RunResult:
    """Read ``path/results.json`` into a :class:`RunResult` (``path`` may also be the file)."""
    path = Path(path)
    rj = path if path.name == "results.json" else path / "results.json"
    run_dir = rj.parent
    if not rj.is_file():
        raise FileNotFoundError(f"no results.json in {run_dir} (expected {rj}); is this a run directory?")
    try:
        rec = json.loads(rj.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFormatError(f"{rj} is not valid JSON: {e}") from None
    if not isinstance(rec, dict):
        raise RunFormatError(f"{rj}: expected a JSON object at the top level")
    if rec.get("schema_version") not in SCHEMA_VERSIONS:
        raise RunFormatError(f"{rj} has schema_version {rec.get('schema_version')!r}; this version "
                             f"reads {', '.join(map(str, SCHEMA_VERSIONS))}")
    tasks = rec.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise RunFormatError(f"{rj}: 'tasks' must be a non-empty list")
    names = [str(t.get("name", f"task {i}")) if isinstance(t, dict) else str(t) for i, t in enumerate(tasks)]
    T = len(names)
    rows = rec.get("matrix") or []
    if not isinstance(rows, list) or len(rows) > T or any(not isinstance(r, list) or len(r) != T for r in rows):
        raise RunFormatError(f"{rj}: 'matrix' must be a list of at most {T} rows of {T} entries")
    matrix = np.stack([_floats(r, "matrix", rj) for r in rows]) if rows else np.empty((0, T))
    zs = rec.get("zero_shot")
    if zs is not None and (not isinstance(zs, list) or len(zs) != T):
        raise RunFormatError(f"{rj}: 'zero_shot' must be null or a list of {T} entries")
    if not isinstance(rec.get("metrics") or {}, dict):
        raise RunFormatError(f"{rj}: 'metrics' must be an object of metric name -> {{value, definition}}")
    metrics, definitions = {}, {}
    for name, m in (rec.get("metrics") or {}).items():
        m = m if isinstance(m, dict) else {"value": m}
        v = m.get("value")
        metrics[name] = float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None
        if m.get("definition"):
            definitions[name] = str(m["definition"])
    return RunResult(path=run_dir, label=label or str(rec.get("name") or run_dir.resolve().name),
                     strategy=str(rec.get("strategy", "")), tasks=names,
                     zero_shot=None if zs is None else _floats(zs, "zero_shot", rj), matrix=matrix,
                     metrics=metrics, definitions=definitions, status=str(rec.get("status", "")),
                     metric_kind=str(rec.get("metric_kind") or "accuracy"),
                     task_classes=[tuple(map(str, t["class_names"])) if isinstance(t, dict) and
                                   isinstance(t.get("class_names"), list) else None for t in tasks],
                     name=str(rec.get("name") or ""), seed=rec["seed"] if isinstance(rec.get("seed"), int) else None,
                     config=_saved_config(run_dir), stream_kind=str(rec.get("stream_kind") or ""))


def _saved_config(run_dir: Path) -> dict | None:
    """``config.yaml`` of a run directory (None when absent); a damaged one is a RunFormatError."""
    import yaml

    cy = run_dir / "config.yaml"
    if not cy.is_file():
        return None
    try:
        cfg = yaml.safe_load(cy.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RunFormatError(f"{cy} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(cfg, dict):
        raise RunFormatError(f"{cy}: expected a mapping of configuration keys")
    return cfg


def _disambiguate(runs: list[RunResult]) -> list[RunResult]:
    """Make labels unique (in place): a repeated label gets its parent directory name, then a counter."""
    for step in (lambda r, i: f"{r.label} ({r.path.resolve().parent.name})", lambda r, i: f"{r.label} #{i + 1}"):
        labels = [r.label for r in runs]
        for lab in {lab for lab in labels if labels.count(lab) > 1}:
            for i, r in enumerate([r for r in runs if r.label == lab]):
                r.label = step(r, i)
    return runs


def load_runs(run_dirs, labels=None) -> list[RunResult]:
    run_dirs = list(run_dirs)
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"got {len(labels)} labels for {len(run_dirs)} runs")
    return _disambiguate([load_run(d, None if labels is None else labels[i]) for i, d in enumerate(run_dirs)])


# ----------------------------------------------------------------------------------------- tables
def _fmt(v: float | None, percent: bool) -> str | None:
    if v is None or not math.isfinite(v):
        return None
    return f"{100 * v:.2f}" if percent else f"{v:.4f}"


def _table(runs: list[RunResult]) -> tuple[list[str], list[list[str | None]]]:
    keys = list(dict.fromkeys(k for r in runs for k in r.metrics))
    header = ["run", "strategy", "status", "trained"] + keys
    rows = [[r.label, r.strategy, r.status, f"{r.rows}/{r.num_tasks}"]
            + [_fmt(r.metrics.get(k), r.percent) for k in keys] for r in runs]
    return header, rows


def format_metrics_table(runs: list[RunResult]) -> str:
    """A markdown table, one row per run, one column per metric (percent, 2 decimals; – if null)."""
    header, rows = _table(_disambiguate(list(runs)))

    def line(cells):
        return "| " + " | ".join("–" if c is None else str(c).replace("|", "\\|") for c in cells) + " |"

    sep = "|" + "|".join("---" if i < 4 else "---:" for i in range(len(header))) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def _metrics_markdown(runs: list[RunResult]) -> str:
    units = {"percent" if r.percent else "raw" for r in runs}
    note = ("Values in percent (differences such as forgetting/bwt/fwt in percentage points)"
            if units == {"percent"} else "Accuracy-like runs in percent, others as raw values")
    defs = {}
    for r in runs:
        for k, d in r.definitions.items():
            defs.setdefault(k, d)
    out = ["# Metrics", "", format_metrics_table(runs), "", f"{note}; – = undefined or not computed.", "",
           "## Definitions", ""]
    out += [f"- `{k}`: {defs.get(k, '(no definition saved)')}" for k in _table(runs)[0][4:]]
    out += ["", "## Runs", ""] + [f"- **{r.label}**: `{r.path}` ({r.metric_kind})" for r in runs]
    return "\n".join(out) + "\n"


def _metrics_csv(runs: list[RunResult]) -> str:
    header, rows = _table(runs)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows([["" if c is None else c for c in r] for r in rows])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- figures
def _short(name: str, n: int = 16) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130)
    return path


def _drop_common_prefix(tasks: list[str]) -> list[str]:
    """``synthetic/shapes, synthetic/counts`` -> ``shapes, counts`` (a shared ``family/`` prefix)."""
    heads = {t.split("/", 1)[0] for t in tasks}
    if len(tasks) > 1 and len(heads) == 1 and all("/" in t for t in tasks):
        return [t.split("/", 1)[1] for t in tasks]
    return tasks


def _xticks(ax, tasks: list[str], zero_shot: bool = True) -> None:
    T = len(tasks)
    ticks = list(range(0 if zero_shot else 1, T + 1))
    names = _drop_common_prefix(tasks)
    positional = all(t == f"experience {i + 1}" for i, t in enumerate(names))  # see task_axis
    labels = (["zero-shot"] if zero_shot else []) + [str(i + 1) if positional else f"{i + 1}:{_short(t, 14)}"
                                                     for i, t in enumerate(names)]
    long = T > 3 or max(len(s) for s in labels) > 8
    ax.set_xticks(ticks, labels, rotation=45 if long else 0, ha="right" if long else "center",
                  rotation_mode="anchor", fontsize=8)


def _legend(g, show_n: bool) -> str:
    return f"{g.label} (n={g.n})" if show_n else g.label


def _line_and_band(ax, x, y, s, color, marker, label, ms, lw) -> None:
    """The mean ``y`` as a line; ``y +- s`` (one standard deviation over seeds) as a band where defined."""
    ok = ~np.isnan(y)
    ax.plot(x[ok], y[ok], color=color, marker=marker, ms=ms, lw=lw, label=label)
    band = ok & ~np.isnan(s)
    if band.any():
        ax.fill_between(x[band], (y - s)[band], (y + s)[band], color=color, alpha=0.2, lw=0)


def _forgetting_curves(groups, tasks, colors, show_n: bool = False) -> Figure:
    T = len(tasks)
    ncols = min(MAX_COLS, T)
    nrows = math.ceil(T / ncols)
    fig = Figure(figsize=((3.4 + 0.12 * max(0, T - 6)) * ncols + 0.6, 2.9 * nrows + 1.0), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
    stats = [(g.matrix(), g.zero_shot()) for g in groups]
    for j, ax in enumerate(axes):
        if j >= T:
            ax.set_visible(False)
            continue
        ax.axvspan(j + 0.5, j + 1.5, color="0.85", zorder=0, label="task trained")
        for g, ((M, S), zs), c, m in zip(groups, stats, colors, MARKERS * len(groups)):
            x, y, s = np.arange(1, M.shape[0] + 1), M[:, j], S[:, j]
            if zs is not None:
                x, y, s = np.r_[0, x], np.r_[zs[0][j], y], np.r_[zs[1][j], s]
            _line_and_band(ax, x, y, s, c, m, _legend(g, show_n), ms=4.5, lw=1.6)
        ax.set_title(_short(tasks[j], 32), fontsize=10)
        ax.set_ylim(-0.02, 1.02)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.set_xlim(-0.4, T + 0.4)
        if j % ncols == 0:
            ax.set_ylabel("accuracy on this task", fontsize=9)
        if j + ncols >= T:  # bottom panel of its column
            _xticks(ax, tasks)
            ax.xaxis.set_tick_params(labelbottom=True)
    fig.supxlabel("after training experience" + ("  (mean over seeds, band: ±1 std)" if show_n else ""),
                  fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=min(len(labels), 4), fontsize=9,
               frameon=False)
    return fig


def _average_accuracy(groups, tasks, colors, show_n: bool = False) -> Figure:
    T = len(tasks)
    fig = Figure(figsize=(max(6.0, 0.7 * T + 3.0), 4.6), layout="constrained")
    ax = fig.subplots()
    for g, c, m in zip(groups, colors, MARKERS * len(groups)):
        y, s = g.curve()
        _line_and_band(ax, np.arange(1, len(y) + 1), y, s, c, m, _legend(g, show_n), ms=5, lw=1.8)
    _xticks(ax, tasks, zero_shot=False)
    ax.set_xlim(0.6, T + 0.4)
    ax.set_ylim(-0.02, 1.02)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.tick_params(axis="y", labelsize=9)
    ax.grid(alpha=0.3)
    ax.set_xlabel("after training experience" + ("  (mean over seeds, band: ±1 std)" if show_n else ""),
                  fontsize=10)
    ax.set_ylabel("average accuracy over seen tasks", fontsize=10)
    ax.set_title("Average accuracy over seen tasks  $A_t = \\mathrm{mean}_{j\\leq t}\\, A[t, j]$", fontsize=11)
    ax.legend(fontsize=9, loc="best")
    return fig


def _heatmaps(groups, tasks, show_n: bool = False) -> Figure:
    T, n = len(tasks), len(groups)
    ncols = min(n, 3 if T <= 5 else 2)
    nrows = math.ceil(n / ncols)
    cell = 0.62 if T <= 6 else 0.5
    fig = Figure(figsize=(ncols * (cell * T + 2.2) + 1.0, nrows * (cell * (T + 1) + 2.2)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    fs = 8 if T <= 6 else 7 if T <= 9 else 6
    cmap = colormaps["viridis"].with_extremes(bad=to_rgba("0.93"))
    im = None
    zs = any(g.zero_shot() is not None for g in groups)  # same rows in every panel
    for ax, g in zip(axes, groups):
        M = np.full((T + zs, T), np.nan)
        gz = g.zero_shot()
        if gz is not None:
            M[0] = gz[0]
        M[zs: zs + g.rows] = g.matrix()[0]
        done = np.zeros_like(M, dtype=bool)  # rows that exist in results.json: NaN there = not evaluated
        done[zs: zs + g.rows] = True
        done[0] |= gz is not None
        im = ax.imshow(np.ma.masked_invalid(M), cmap=cmap, vmin=0, vmax=1, aspect="auto")
        for (i, j), v in np.ndenumerate(M):
            if not np.isnan(v) or done[i, j]:
                ax.text(j, i, "–" if np.isnan(v) else f"{100 * v:.0f}" if T > 8 else f"{100 * v:.1f}",
                        ha="center", va="center", fontsize=fs, color="white" if v < 0.55 else "black")
        names = _drop_common_prefix(tasks)
        ylabels = (["zero-shot"] if zs else []) + [f"after {i + 1}:{_short(t, 14)}" for i, t in enumerate(names)]
        ax.set_yticks(range(len(ylabels)), ylabels, fontsize=fs + 1)
        ax.set_xticks(range(T), [_short(t, 14) for t in names], rotation=45, ha="right",
                      rotation_mode="anchor", fontsize=fs + 1)
        if zs:
            ax.axhline(0.5, color="white", lw=2)
        ax.set_title(g.label + (f"  (mean of {g.n} seeds)" if g.n > 1 else "")
                     + ("" if g.rows == T else f"  ({g.rows}/{T} trained)"), fontsize=10)
        ax.set_xlabel("test task", fontsize=9)
    for ax in axes[n:]:
        ax.set_visible(False)
    cb = fig.colorbar(im, ax=axes[:n].tolist(), shrink=0.8, format=PercentFormatter(1.0, decimals=0))
    cb.set_label("accuracy", fontsize=9)
    return fig


def check_same_tasks(runs: list[RunResult]) -> None:
    """Refuse runs on different streams: one run's task would be drawn under another's name."""
    first = runs[0]
    for r in runs[1:]:
        diffs = [f"{first.num_tasks} tasks vs {r.num_tasks}"] if r.num_tasks != first.num_tasks else []
        diffs += [f"task {j + 1}: {a!r} vs {b!r}" for j, (a, b) in enumerate(zip(first.tasks, r.tasks)) if a != b]
        diffs += [f"task {j + 1} ({a!r}): other classes" for j, (a, b, ca, cb) in  # e.g. another class order
                  enumerate(zip(first.tasks, r.tasks, first.task_classes, r.task_classes))
                  if a == b and None not in (ca, cb) and ca != cb]
        if not diffs:
            continue
        diff = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise RunFormatError(f"runs on different streams cannot be compared: {first.path} and {r.path} differ "
                             f"({diff}); compare runs of one stream at a time")


def _colors(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def task_axis(runs: list[RunResult]) -> list[str]:
    """The task names the figures draw: the runs' own; or, where the seeds order the tasks differently
    (a class order drawn from the seed) but the runs of each seed share one stream, the positions
    ``experience 1..T`` (results over seeds are then averaged per position, as class-incremental papers
    report them). Raises RunFormatError for runs on different streams."""
    try:
        check_same_tasks(runs)
        return runs[0].tasks
    except RunFormatError as e:
        by_seed: dict = {}
        for r in runs:
            by_seed.setdefault(r.seed, []).append(r)
        if None in by_seed or len(by_seed) < 2 or len({r.num_tasks for r in runs}) != 1:
            raise e from None
        for same_seed in by_seed.values():
            check_same_tasks(same_seed)
        return [f"experience {j + 1}" for j in range(runs[0].num_tasks)]


def _as_runs(runs, labels=None) -> list[RunResult]:
    """Run directories (or already loaded :class:`RunResult`) -> RunResults on one stream."""
    runs = list(runs)
    if not runs:
        raise ValueError("compare: no run directories given")
    if all(isinstance(r, RunResult) for r in runs):
        loaded = _disambiguate(list(runs))
    else:
        loaded = load_runs([r.path if isinstance(r, RunResult) else r for r in runs], labels)
    task_axis(loaded)
    return loaded


def compare_figures(runs, *, labels=None) -> dict[str, Figure]:
    """The comparison figures as matplotlib objects: ``forgetting_curves``, ``average_accuracy``,
    ``heatmaps``; runs that differ only by seed are drawn as one mean line with a +-1 std band."""
    runs = _as_runs(runs, labels)
    groups = group_runs(runs)
    show_n, tasks, colors = aggregated(groups), task_axis(runs), _colors(len(groups))
    return {"forgetting_curves": _forgetting_curves(groups, tasks, colors, show_n),
            "average_accuracy": _average_accuracy(groups, tasks, colors, show_n),
            "heatmaps": _heatmaps(groups, tasks, show_n)}


def compare_runs(run_dirs, out_dir, *, labels=None) -> dict[str, Path]:
    """Write forgetting_curves.png, average_accuracy.png, heatmaps.png, metrics.md, metrics.csv and the
    paper tables results.md / results.tex (and expert_usage.png when a run routes over experts; paired.md
    when two methods share seeds) into ``out_dir`` (created) for the runs in ``run_dirs``; return
    ``{file name: path}``. Runs that differ only by seed are aggregated (mean +- std, see
    :mod:`lifelong_moe.aggregate`)."""
    runs = _as_runs(run_dirs, labels)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    paths = {f"{name}.png": _save(fig, out / f"{name}.png") for name, fig in compare_figures(runs).items()}
    from .usage_plot import expert_usage_figure

    usage = expert_usage_figure([(r.label, json.loads((r.path / "results.json").read_text(encoding="utf-8")))
                                 for r in runs], out / "expert_usage.png")
    if usage is not None:  # only runs that route (CL-MoE, MoE-Adapters) have expert usage
        paths["expert_usage.png"] = usage
    groups = group_runs(runs)
    keys = paper_keys(groups)
    texts = {"metrics.md": _metrics_markdown(runs), "metrics.csv": _metrics_csv(runs)}
    if aggregated(groups):
        texts = {"metrics.md": _group_markdown(groups, runs), "metrics.csv": _group_csv(groups)}
        pairs = paired(groups)
        if pairs:
            texts["paired.md"] = paired_markdown(pairs, keys)
    texts["results.md"] = markdown_table(groups, keys) + "\n"
    texts["results.tex"] = latex_table(groups, keys) + "\n"
    for name, text in texts.items():
        write_text(out / name, text)
        paths[name] = out / name
    return paths


# ------------------------------------------------------------------------------- seed groups
ALIASES = {"vqa": ("mtil_transfer", "mtil_avg", "mtil_last"), "": ("vqacl_ap", "vqacl_af")}


def paper_keys(groups) -> list[str]:
    """The paper table's columns: every metric with a value, less the other family's names for the same
    numbers (VQACL's AP/AF on classification streams, MTIL's on VQA)."""
    from .paper_tables import table_keys

    vqa = all(r.stream_kind == "vqa" for g in groups for r in g.runs)
    drop = ALIASES["vqa" if vqa else ""]
    return [k for k in table_keys(groups) if k not in drop]


def format_group_table(groups) -> str:
    """Markdown, one row per seed group: ``mean ± std`` per metric (percent for accuracy-like runs)."""
    keys = list(dict.fromkeys(k for g in groups for k in g.metric_keys()))

    def cell(g, k):
        s = g.metric(k)
        if s.mean is None:
            return "–"
        return _fmt(s.mean, g.percent) + ("" if s.std is None else f" ± {_fmt(s.std, g.percent)}")

    lines = ["| run | strategy | seeds | trained | " + " | ".join(keys) + " |",
             "|---|---|---|---|" + "".join("---:|" for _ in keys)]
    for g in groups:
        seeds = ", ".join("?" if s is None else str(s) for s in g.seeds)
        trained = "/".join(map(str, sorted({r.rows for r in g.runs}))) + f"/{g.num_tasks}"
        lines.append(f"| {g.label.replace('|', chr(92) + '|')} | {g.strategy} | {seeds} | {trained} | "
                     + " | ".join(cell(g, k) for k in keys) + " |")
    return "\n".join(lines)


def format_summary(runs) -> str:
    """The table ``lifelong-moe compare`` prints: per seed group when any run has seed siblings, else per run."""
    runs = _as_runs(runs)
    groups = group_runs(runs)
    return format_group_table(groups) if aggregated(groups) else format_metrics_table(runs)


def _group_markdown(groups, runs) -> str:
    out = ["# Metrics over seeds", "", format_group_table(groups), "",
           "mean ± sample standard deviation (ddof=1) over the seeds listed; values in percent for accuracy-like "
           "runs (forgetting/bwt/fwt in percentage points); – = undefined or not computed.", "",
           "## Per run", "", format_metrics_table(runs), ""]
    return "\n".join(out) + "\n"


def _group_csv(groups) -> str:
    keys = list(dict.fromkeys(k for g in groups for k in g.metric_keys()))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", "strategy", "n", "seeds"] + [f"{k}_{s}" for k in keys for s in ("mean", "std")])
    for g in groups:
        cells = []
        for k in keys:
            s = g.metric(k)
            cells += [_fmt(s.mean, g.percent) or "", _fmt(s.std, g.percent) or ""]
        w.writerow([g.label, g.strategy, g.n, " ".join(str(s) for s in g.seeds)] + cells)
    return buf.getvalue()


def paired_markdown(pairs, keys: list[str] | None = None) -> str:
    """Per pair of methods sharing seeds: ``a - b`` per seed and its mean ± std, one row per metric
    (those in ``keys``, default all)."""
    out = ["# Paired differences over shared seeds", "",
           "Each cell is a - b on the same seed (same data order and initialisation); the last column the mean "
           "± sample std of those differences.", ""]
    for p in pairs:
        pct = p.a.percent and p.b.percent
        out += [f"## {p.a.label} - {p.b.label} (seeds {', '.join(map(str, p.seeds))})", "",
                "| metric | " + " | ".join(f"seed {s}" for s in p.seeds) + " | mean ± std |",
                "|---|" + "".join("---:|" for _ in p.seeds) + "---:|"]
        for k, d in p.diffs.items():
            if keys is not None and k not in keys:
                continue
            st = p.stat(k)
            mean = _fmt(st.mean, pct) or "–"
            out.append(f"| {k} | " + " | ".join(_fmt(v, pct) or "–" for v in d) + f" | {mean}"
                       + ("" if st.std is None else f" ± {_fmt(st.std, pct)}") + " |")
        out.append("")
    return "\n".join(out)


class _CallableModule(types.ModuleType):
    """``lifelong_moe.compare(runs)`` is the API function (:func:`lifelong_moe.api.compare`), while
    ``lifelong_moe.compare`` is also this module: importing a submodule binds its name on the package,
    so the module is made callable (a module's ``__class__`` may be set to a ModuleType subclass)."""

    def __call__(self, runs, output=None, *, labels=None) -> dict:
        from .api import compare

        return compare(runs, output, labels=labels)


sys.modules[__name__].__class__ = _CallableModule
