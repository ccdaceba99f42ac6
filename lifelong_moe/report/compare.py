"""Compare saved runs: forgetting curves, average-accuracy curves, heatmaps (drawn by
:mod:`lifelong_moe.report.plots`) and the metrics and paper tables.

Reads only ``results.json`` (schema_version 1, see docs/results.md): the stored ``metrics`` are
shown as saved, and the small per-step curve is recomputed here, so this module needs neither
torch nor ``lifelong_moe.evaluation.metrics``. Figures use the object-oriented matplotlib API (no pyplot, so
no global backend state); PNGs are rendered by Agg. Every file is written atomically.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .aggregate import aggregated, group_runs, paired
from ..errors import UserError
from ..io import write_text
from .paper_tables import latex_table, markdown_table
from .plots import CONTINUAL, EDIT, average_accuracy, forgetting_curves, heatmaps, palette, save_png

SCHEMA_VERSIONS = (1,)


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
    drop = _other_families(runs)
    keys = [k for k in dict.fromkeys(k for r in runs for k in r.metrics) if k not in drop]
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
    ``heatmaps``; runs that differ only by seed are drawn as one mean line with a +-1 std band. Edit
    runs (``stream_kind: edit``, :mod:`lifelong_moe.runs.edit_runner`) are labelled in edits so far and
    reliability of earlier edits (:data:`.plots.EDIT`)."""
    runs = _as_runs(runs, labels)
    groups = group_runs(runs)
    show_n, tasks, colors = aggregated(groups), task_axis(runs), palette(len(groups))
    words = EDIT if all(r.stream_kind == "edit" for r in runs) else CONTINUAL  # edit runs: edits, not tasks
    return {"forgetting_curves": forgetting_curves(groups, tasks, colors, show_n, words),
            "average_accuracy": average_accuracy(groups, tasks, colors, show_n, words),
            "heatmaps": heatmaps(groups, tasks, show_n, words)}


def compare_runs(run_dirs, out_dir, *, labels=None) -> dict[str, Path]:
    """Write forgetting_curves.png, average_accuracy.png, heatmaps.png, metrics.md, metrics.csv and the
    paper tables results.md / results.tex (and expert_usage.png when a run routes over experts; paired.md
    when two methods share seeds) into ``out_dir`` (created) for the runs in ``run_dirs``; return
    ``{file name: path}``. Runs that differ only by seed are aggregated (mean +- std, see
    :mod:`lifelong_moe.report.aggregate`)."""
    runs = _as_runs(run_dirs, labels)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    paths = {f"{name}.png": save_png(fig, out / f"{name}.png") for name, fig in compare_figures(runs).items()}
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
# edit runs: chunks of edits are not domains (no MTIL transfer) and AP / AF repeat last / forgetting
ALIASES["edit"] = ALIASES["vqa"] + ALIASES[""]


def _other_families(runs) -> tuple[str, ...]:
    """Metric names that only repeat (or do not apply to) the runs' kind of stream."""
    kinds = {r.stream_kind for r in runs}
    kind = kinds.pop() if len(kinds) == 1 else ""
    return ALIASES.get(kind, ALIASES[""])


def paper_keys(groups) -> list[str]:
    """The paper table's columns: every metric with a value, less the other family's names for the same
    numbers (VQACL's AP/AF on classification streams, MTIL's on VQA)."""
    from .paper_tables import table_keys

    drop = _other_families([r for g in groups for r in g.runs])
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

