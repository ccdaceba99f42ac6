"""The comparison figures: forgetting curves (one panel per task), the average-accuracy curve and the
accuracy-matrix heatmaps, one line (or mean line with a +-1 std band over seeds) per run group.
Object-oriented matplotlib (no pyplot, so no global backend state); PNGs rendered by Agg and written
atomically. :mod:`lifelong_moe.report.compare` loads the runs and calls these.

Edit runs (``lifelong-moe edit``: the "tasks" are consecutive parts of the edits, the matrix the
reliability of each part as later edits are made) are drawn in editing words (:data:`EDIT`): x is the
number of edits so far, y the reliability of earlier edits."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from ..io import atomic_path

MARKERS = "osD^vPX*<>"
MAX_COLS = 4  # panels per row in the forgetting-curve grid

__all__ = ["forgetting_curves", "average_accuracy", "heatmaps", "palette", "save_png", "Words", "CONTINUAL", "EDIT"]


@dataclass(frozen=True)
class Words:
    """What the figures call things: continual learning (tasks, experiences) or editing (edits)."""

    after: str            # x axis of the curves
    on_part: str          # y axis of one forgetting panel
    part_made: str        # the shaded span of a panel
    average: str          # y axis of the average curve
    average_title: str
    zero: str             # the row / tick before anything is learnt
    test: str             # heatmap columns
    value: str            # colour bar
    made: str             # "(r/T ...)" of a partial run
    edits: bool = False   # ticks: the number of edits so far (parsed from "edits a-b") instead of the part names


CONTINUAL = Words("after training experience", "accuracy on this task", "task trained",
                  "average accuracy over seen tasks",
                  "Average accuracy over seen tasks  $A_t = \\mathrm{mean}_{j\\leq t}\\, A[t, j]$",
                  "zero-shot", "test task", "accuracy", "trained")
EDIT = Words("edits so far", "reliability of these edits", "these edits made", "reliability of earlier edits",
             "Reliability of earlier edits as edits accumulate  $R_t = \\mathrm{mean}_{j\\leq t}\\, A[t, j]$",
             "unedited", "edits tested", "reliability (token accuracy)", "parts edited", edits=True)


def _short(name: str, n: int = 16) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def save_png(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130)
    return path


def _drop_common_prefix(tasks: list[str]) -> list[str]:
    """``synthetic/shapes, synthetic/counts`` -> ``shapes, counts`` (a shared ``family/`` prefix)."""
    heads = {t.split("/", 1)[0] for t in tasks}
    if len(tasks) > 1 and len(heads) == 1 and all("/" in t for t in tasks):
        return [t.split("/", 1)[1] for t in tasks]
    return tasks


def _edits_so_far(tasks: list[str]) -> list[str] | None:
    """``edits 1-100, edits 101-200`` -> ``100, 200`` (None if a name is not of that form)."""
    ends = [re.fullmatch(r"edits (\d+)-(\d+)", t) for t in tasks]
    return None if not all(ends) else [m.group(2) for m in ends]


def _xticks(ax, tasks: list[str], zero_shot: bool = True, words: Words = CONTINUAL) -> None:
    T = len(tasks)
    ticks = list(range(0 if zero_shot else 1, T + 1))
    names = _drop_common_prefix(tasks)
    positional = all(t == f"experience {i + 1}" for i, t in enumerate(names))  # see task_axis
    counts = _edits_so_far(names) if words.edits else None
    if counts is not None:
        labels = (["0"] if zero_shot else []) + counts
    else:
        labels = ([words.zero] if zero_shot else []) + [str(i + 1) if positional else f"{i + 1}:{_short(t, 14)}"
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


def forgetting_curves(groups, tasks, colors, show_n: bool = False, words: Words = CONTINUAL) -> Figure:
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
        ax.axvspan(j + 0.5, j + 1.5, color="0.85", zorder=0, label=words.part_made)
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
            ax.set_ylabel(words.on_part, fontsize=9)
        if j + ncols >= T:  # bottom panel of its column
            _xticks(ax, tasks, words=words)
            ax.xaxis.set_tick_params(labelbottom=True)
    fig.supxlabel(words.after + ("  (mean over seeds, band: ±1 std)" if show_n else ""), fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=min(len(labels), 4), fontsize=9,
               frameon=False)
    return fig


def average_accuracy(groups, tasks, colors, show_n: bool = False, words: Words = CONTINUAL) -> Figure:
    T = len(tasks)
    fig = Figure(figsize=(max(6.0, 0.7 * T + 3.0), 4.6), layout="constrained")
    ax = fig.subplots()
    for g, c, m in zip(groups, colors, MARKERS * len(groups)):
        y, s = g.curve()
        _line_and_band(ax, np.arange(1, len(y) + 1), y, s, c, m, _legend(g, show_n), ms=5, lw=1.8)
    _xticks(ax, tasks, zero_shot=False, words=words)
    ax.set_xlim(0.6, T + 0.4)
    ax.set_ylim(-0.02, 1.02)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.tick_params(axis="y", labelsize=9)
    ax.grid(alpha=0.3)
    ax.set_xlabel(words.after + ("  (mean over seeds, band: ±1 std)" if show_n else ""), fontsize=10)
    ax.set_ylabel(words.average, fontsize=10)
    ax.set_title(words.average_title, fontsize=11)
    ax.legend(fontsize=9, loc="best")
    return fig


def heatmaps(groups, tasks, show_n: bool = False, words: Words = CONTINUAL) -> Figure:
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
        counts = _edits_so_far(names) if words.edits else None
        rows = [f"after {c} edits" for c in counts] if counts is not None else \
            [f"after {i + 1}:{_short(t, 14)}" for i, t in enumerate(names)]
        ylabels = ([words.zero] if zs else []) + rows
        ax.set_yticks(range(len(ylabels)), ylabels, fontsize=fs + 1)
        ax.set_xticks(range(T), [_short(t, 14) for t in names], rotation=45, ha="right",
                      rotation_mode="anchor", fontsize=fs + 1)
        if zs:
            ax.axhline(0.5, color="white", lw=2)
        ax.set_title(g.label + (f"  (mean of {g.n} seeds)" if g.n > 1 else "")
                     + ("" if g.rows == T else f"  ({g.rows}/{T} {words.made})"), fontsize=10)
        ax.set_xlabel(words.test, fontsize=9)
    for ax in axes[n:]:
        ax.set_visible(False)
    cb = fig.colorbar(im, ax=axes[:n].tolist(), shrink=0.8, format=PercentFormatter(1.0, decimals=0))
    cb.set_label(words.value, fontsize=9)
    return fig


def palette(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
