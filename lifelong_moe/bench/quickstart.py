"""Wall time of the CLIP quickstart, cold and warm, so that the README figure can be re-measured.

Cold: ``lifelong-moe run CONFIG`` in a fresh process with an empty cache directory
(``$LIFELONG_MOE_CACHE``, ``$LIFELONG_MOE_DATA``): the tiny CLIP is pretrained first. Warm: the same
command again on that cache. Each run writes to its own fresh results directory; all of it is
deleted afterwards unless ``--keep DIR``.

``lifelong-moe bench quickstart [--config configs/quickstart.yaml] [--only a,b] [--keep DIR]``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import UserError

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def time_quickstart(config: Path, work: Path, only: str | None = None) -> dict[str, float]:
    """Seconds of a cold run (empty caches under ``work``) and of a warm run on those caches."""
    env = {**os.environ, "LIFELONG_MOE_CACHE": str(work / "cache"), "LIFELONG_MOE_DATA": str(work / "data")}
    times = {}
    for phase in ("cold", "warm"):
        cmd = [sys.executable, "-m", "lifelong_moe", "run", str(config), "-o", str(work / f"run_{phase}"), "-q"]
        if only:
            cmd += ["--only", only]
        t = time.perf_counter()
        done = subprocess.run(cmd, env=env)
        times[phase] = time.perf_counter() - t
        if done.returncode != 0:
            raise UserError(f"the {phase} quickstart run failed (exit {done.returncode}): {' '.join(cmd)}")
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lifelong-moe bench quickstart", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="default: the repository's configs/quickstart.yaml")
    ap.add_argument("--only", help="comma-separated variant names to run")
    ap.add_argument("--keep", help="keep the caches and results in this (new or empty) directory")
    a = ap.parse_args(argv)
    config = Path(a.config)
    if not config.is_file():
        raise UserError(f"--config: no such file: {config}")
    if a.keep:
        work = Path(a.keep)
        if work.exists() and any(work.iterdir()):
            raise UserError(f"--keep: {work} is not empty (the cold run needs empty caches)")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="lmoe-quickstart-"))
    try:
        t = time_quickstart(config, work, a.only)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    fmt = lambda s: f"{int(s // 60)} min {s % 60:.0f} s"  # noqa: E731
    print(f"quickstart {config.name}{' (' + a.only + ')' if a.only else ''}: cold (empty cache, pretraining "
          f"included) {fmt(t['cold'])}; warm {fmt(t['warm'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
