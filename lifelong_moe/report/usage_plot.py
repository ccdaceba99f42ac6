"""Expert usage made visible: per run, one heatmap per layer group of tasks x experts, the share of
each task's routing decisions that went to each expert (rows sum to 1).

Reads the per-task usage counts a run stored in ``results.json`` ``extra``:

- CL-MoE (``extra.cl_moe.usage``: task -> layer key -> counts [E]; top-k instance selections over
  the task's training data after training it). Layer keys ``"3.q_proj"`` (VLM) or ``"image.3.c_fc"``
  (CLIP); grouped by block (``group_by="block"``: ``layer 3`` / ``image 3``) or by module
  (``"module"``: ``q_proj`` / ``image c_fc``).
- MoE-Adapters (``extra.moe_adapters.usage``: task -> tower -> layer -> counts [E]; samples routed
  while training the task), grouped by block (``image 3``) or by tower (``"module"``: ``image``).

Within a group, each layer's counts are normalised per task and averaged over the group's layers.
Object-oriented matplotlib (no pyplot), written atomically, like :mod:`lifelong_moe.report.compare`.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from ..io import atomic_path

GROUPINGS = ("block", "module")


def _group_cl_moe(key: str, group_by: str) -> str:
    parts = key.split(".")
    if len(parts) == 2:  # VLM: "<layer>.<module>"
        return f"layer {parts[0]}" if group_by == "block" else parts[1]
    tower, block, module = parts[0], parts[1], parts[-1]  # CLIP: "<tower>.<block>.<module>"
    return f"{tower} {block}" if group_by == "block" else f"{tower} {module}"


def usage_layers(record: dict) -> tuple[str, dict[str, dict[str, list[float]]]] | None:
    """``(method, {task: {layer key: counts}})`` from a results.json record; None without usage."""
    extra = record.get("extra") or {}
    if isinstance((extra.get("cl_moe") or {}).get("usage"), dict) and extra["cl_moe"]["usage"]:
        return "cl_moe", extra["cl_moe"]["usage"]
    usage = (extra.get("moe_adapters") or {}).get("usage")
    if isinstance(usage, dict) and usage:
        flat = {task: {f"{tower}.{layer}.experts": counts for tower, layers in towers.items()
                       for layer, counts in layers.items()} for task, towers in usage.items()}
        return "moe_adapters", flat
    return None


def usage_table(record: dict, group_by: str = "block") -> tuple[list[str], dict[str, np.ndarray]] | None:
    """``(tasks, {group: array [tasks, experts]})``: per task the mean over the group's layers of
    its normalised usage (rows sum to 1; a task with no counts in a group is a row of NaN)."""
    if group_by not in GROUPINGS:
        raise ValueError(f"group_by must be one of {GROUPINGS}, got {group_by!r}")
    found = usage_layers(record)
    if found is None:
        return None
    method, usage = found
    tasks = list(usage)
    groups: dict[str, dict[str, list[np.ndarray]]] = {}
    for task, layers in usage.items():
        for key, counts in layers.items():
            if method == "moe_adapters":
                tower, block = key.split(".")[:2]
                g = f"{tower} {block}" if group_by == "block" else tower
            else:
                g = _group_cl_moe(key, group_by)
            c = np.asarray(counts, dtype=float)
            total = c.sum()
            groups.setdefault(g, {}).setdefault(task, []).append(c / total if total > 0 else np.full_like(c, np.nan))
    out = {}
    for g, per_task in groups.items():
        width = max(len(v) for vs in per_task.values() for v in vs)
        table = np.full((len(tasks), width), np.nan)
        for i, t in enumerate(tasks):
            rows = [np.pad(v, (0, width - len(v)), constant_values=np.nan) for v in per_task.get(t, [])]
            if rows:
                with warnings.catch_warnings():  # a group where the task has no counts: NaN, silently
                    warnings.simplefilter("ignore", RuntimeWarning)
                    table[i] = np.nanmean(np.stack(rows), axis=0)
        out[g] = table
    return tasks, out


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.replace(".", " ").split()]


def expert_usage_figure(runs: list[tuple[str, dict]], path: str | Path, group_by: str = "block") -> Path | None:
    """Draw ``path`` (PNG) for the runs ``(label, results.json record)`` that recorded expert usage:
    one row of heatmaps per run, one panel per layer group. Returns None (nothing written) when no
    run has usage."""
    tables = [(label, t) for label, rec in runs if (t := usage_table(rec, group_by)) is not None]
    if not tables:
        return None
    ncols = max(len(g) for _, (_, g) in tables)
    nrows = len(tables)
    T = max(len(tasks) for _, (tasks, _) in tables)
    E = max(a.shape[1] for _, (_, g) in tables for a in g.values())
    cell = 0.32 if E > 8 else 0.45
    fig = Figure(figsize=(ncols * (cell * E + 0.6) + 2.6, nrows * (cell * T + 1.4) + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    cmap = colormaps["viridis"].with_extremes(bad="0.93")
    # colour range from 0 to the largest share drawn: near-uniform routing still shows its structure
    vmax = max(float(np.nanmax(a)) if not np.isnan(a).all() else 0.0 for _, (_, g) in tables for a in g.values())
    vmax = max(vmax, 1e-6)
    im = None
    for r, (label, (tasks, groups)) in enumerate(tables):
        names = [t.split("/", 1)[-1] for t in tasks]
        for c, g in enumerate(sorted(groups, key=_natural)):
            ax = axes[r, c]
            a = groups[g]
            im = ax.imshow(np.ma.masked_invalid(a), cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
            ax.set_title(f"{label}: {g}" if c == 0 else g, fontsize=8)
            ax.set_xticks(range(a.shape[1]), [str(i) if a.shape[1] <= 12 or i % 2 == 0 else "" for i in range(a.shape[1])],
                          fontsize=6)
            ax.set_yticks(range(len(names)), names if c == 0 else [""] * len(names), fontsize=7)
            if r == nrows - 1:
                ax.set_xlabel("expert", fontsize=7)
        for c in range(len(groups), ncols):
            axes[r, c].set_visible(False)
    cb = fig.colorbar(im, ax=[ax for ax in axes.ravel() if ax.get_visible()], shrink=0.8,
                      format=PercentFormatter(1.0, decimals=0))
    cb.set_label("share of the task's routing", fontsize=8)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def expert_usage_figure_for_dirs(run_dirs, path, labels=None, group_by: str = "block") -> Path | None:
    """:func:`expert_usage_figure` on run directories (their ``results.json``)."""
    runs = []
    for i, d in enumerate(run_dirs):
        d = Path(d)
        rj = d if d.name == "results.json" else d / "results.json"
        rec = json.loads(rj.read_text(encoding="utf-8"))
        runs.append((labels[i] if labels else str(rec.get("name") or rj.parent.name), rec))
    return expert_usage_figure(runs, path, group_by)


__all__ = ["expert_usage_figure", "expert_usage_figure_for_dirs", "usage_table", "usage_layers"]
