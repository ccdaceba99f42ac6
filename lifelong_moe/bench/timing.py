"""Timing shared by the benches: interleaved repeated medians."""
from __future__ import annotations

import statistics
import time


def median_times(fns: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds of each callable over ``repeats`` rounds, after ``warmup`` untimed rounds. The
    callables are interleaved within a round, so drifts of a shared machine hit every variant alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
