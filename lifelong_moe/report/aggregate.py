"""Runs that differ only by seed, taken together: mean and standard deviation over seeds, and the
per-seed differences of two methods that share seeds (a paired comparison).

Two runs belong to one group when their results carry the same name and strategy, their saved
configurations (``config.yaml``) agree on every key but ``seed`` (and ``output``, ``runtime``,
``logging``, which do not change what is computed), and their seeds differ. The standard deviation is
the sample one (``ddof=1``, Bessel's correction), as numpy's ``std(ddof=1)``; a group of one run has
none. Matrix entries and curve points are averaged over the runs that have them (a run still
running contributes its completed rows).
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from itertools import combinations

import numpy as np

NOT_COMPUTED = ("seed", "output", "runtime", "logging")  # config keys that do not change the numbers


@dataclass
class Stat:
    mean: float | None
    std: float | None  # None for fewer than two values
    n: int


def stat(values) -> Stat:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if not v.size:
        return Stat(None, None, 0)
    return Stat(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else None, int(v.size))


def _padded(arrays: list[np.ndarray], rows: int, cols: int) -> np.ndarray:
    out = np.full((len(arrays), rows, cols), np.nan)
    for i, a in enumerate(arrays):
        a = np.asarray(a, dtype=float).reshape(-1, cols)
        out[i, : a.shape[0]] = a
    return out


def nan_mean_std(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per entry over axis 0, ignoring NaN: the mean, and the sample std where two or more values exist."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN entries / one value: NaN, as intended
        return np.nanmean(stack, axis=0), np.nanstd(stack, axis=0, ddof=1)


@dataclass
class RunGroup:
    label: str
    runs: list  # compare.RunResult, ordered by seed

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]

    @property
    def strategy(self) -> str:
        return self.runs[0].strategy

    @property
    def percent(self) -> bool:
        return self.runs[0].percent

    @property
    def num_tasks(self) -> int:
        return self.runs[0].num_tasks

    @property
    def status(self) -> str:
        states = {r.status for r in self.runs}
        return states.pop() if len(states) == 1 else "mixed"

    @property
    def rows(self) -> int:
        return max(r.rows for r in self.runs)

    def metric(self, key: str) -> Stat:
        return stat([r.metrics.get(key) for r in self.runs])

    def metric_keys(self) -> list[str]:
        return list(dict.fromkeys(k for r in self.runs for k in r.metrics))

    def matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std of the accuracy matrix, ``(rows, T)`` each."""
        return nan_mean_std(_padded([r.matrix for r in self.runs], self.rows, self.num_tasks))

    def zero_shot(self) -> tuple[np.ndarray, np.ndarray] | None:
        rows = [r.zero_shot for r in self.runs if r.zero_shot is not None]
        if not rows:
            return None
        m, s = nan_mean_std(_padded(rows, 1, self.num_tasks))
        return m[0], s[0]

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std over seeds of the average accuracy over seen tasks after each experience."""
        m, s = nan_mean_std(_padded([r.curve() for r in self.runs], self.rows, 1))
        return m[:, 0], s[:, 0]


def group_key(run) -> tuple:
    cfg = None if run.config is None else {k: v for k, v in run.config.items() if k not in NOT_COMPUTED}
    return run.name, run.strategy, json.dumps(cfg, sort_keys=True, default=str)


def group_runs(runs: list) -> list[RunGroup]:
    """Runs with the same :func:`group_key` and distinct known seeds form one group (in first-seen
    order, runs by seed); every other run is a group of its own under its label."""
    by_key: dict[tuple, list] = {}
    for r in runs:
        by_key.setdefault(group_key(r), []).append(r)
    groups = []
    for r in runs:
        members = by_key[group_key(r)]
        seeds = [m.seed for m in members]
        if len(members) > 1 and None not in seeds and len(set(seeds)) == len(seeds):
            if members[0] is r:
                groups.append(RunGroup(r.name or r.label, sorted(members, key=lambda m: m.seed)))
        else:
            groups.append(RunGroup(r.label, [r]))
    labels = [g.label for g in groups]  # a grouped name may equal a lone run's label: tell them apart
    for i, g in enumerate(groups):
        if labels.count(g.label) > 1:
            g.label = f"{g.label} #{labels[: i + 1].count(g.label)}"
    return groups


def aggregated(groups: list[RunGroup]) -> bool:
    """Whether any group holds more than one seed (else every view is the plain per-run one)."""
    return any(g.n > 1 for g in groups)


@dataclass
class Paired:
    a: RunGroup
    b: RunGroup
    seeds: list
    diffs: dict  # metric -> [a - b per shared seed] (None where either is undefined)

    def stat(self, key: str) -> Stat:
        return stat(self.diffs[key])


def paired(groups: list[RunGroup], min_seeds: int = 2) -> list[Paired]:
    """For every two groups sharing at least ``min_seeds`` seeds: per metric, ``a - b`` per shared seed."""
    out = []
    for a, b in combinations(groups, 2):
        ra, rb = {r.seed: r for r in a.runs}, {r.seed: r for r in b.runs}
        shared = sorted(set(ra) & set(rb) - {None})
        if len(shared) < min_seeds:
            continue
        keys = [k for k in a.metric_keys() if k in b.metric_keys()]
        diffs = {}
        for k in keys:
            d = [None if ra[s].metrics.get(k) is None or rb[s].metrics.get(k) is None
                 else ra[s].metrics[k] - rb[s].metrics[k] for s in shared]
            if any(x is not None for x in d):
                diffs[k] = d
        out.append(Paired(a, b, shared, diffs))
    return out
