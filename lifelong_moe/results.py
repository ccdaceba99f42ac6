"""The results directory (schema_version 1; documented in docs/results.md).

    config.yaml       resolved configuration
    results.json      record: provenance, tasks, zero-shot row, matrix, metrics, params, timings
    matrix.csv        the accuracy matrix, zero-shot row first
    log.jsonl         per-step loss and learning rate
    checkpoints/exp_NNN.safetensors   trainable state after experience NNN

Every file is replaced atomically; ``results.json`` is written last, so its ``matrix`` never
claims an experience whose checkpoint is missing.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import yaml

from . import metrics as M
from .config import RunConfig
from .errors import UserError
from .io import atomic_path, read_json, read_jsonl, write_json, write_jsonl, write_text, write_yaml
from .provenance import versions

SCHEMA_VERSION = 1


def new_record(cfg: RunConfig, stream, metric_kind: str, params: dict) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "name": cfg.name,
        "strategy": cfg.strategy.name,
        "status": "running",
        "seed": cfg.seed,
        "stream_kind": stream.kind,
        "metric_kind": metric_kind,
        "versions": versions(),
        "tasks": stream.describe(),
        "zero_shot": None,
        "matrix": [],
        "metrics": {},
        "params": params,
        "timings": {},
        "extra": {},
    }


def record_runtime(record: dict, device: str, precision: str) -> None:
    """``runtime``: the device (resolved, with the GPU's name) and precision the run computes with; a
    resume on another device keeps the first and lists the others under ``resumed_on``; a resume in
    another precision is refused (UserError, raised before anything is written)."""
    run = record.get("runtime")
    if run and run["precision"] != precision:
        raise UserError(f"--resume: the run computes in {run['precision']}, runtime.precision is now "
                        f"{precision}; resume with runtime.precision={run['precision']}")
    if not run:
        record["runtime"] = {"device": device, "precision": precision}
    elif device != run["device"] and device not in run.get("resumed_on", []):
        run.setdefault("resumed_on", []).append(device)


def matrix_array(record: dict) -> np.ndarray:
    T = len(record["tasks"])
    rows = [[np.nan if v is None else v for v in r] for r in record["matrix"]]
    return np.asarray(rows, dtype=float).reshape(len(rows), T)


def compute_metrics(record: dict) -> dict:
    zs = record.get("zero_shot")
    return M.compute_all(matrix_array(record), None if zs is None else np.asarray(zs, dtype=float))


def matrix_csv(record: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["after"] + [t["name"] for t in record["tasks"]])
    if record.get("zero_shot") is not None:
        w.writerow(["zero_shot"] + [f"{v:.6f}" for v in record["zero_shot"]])
    for i, row in enumerate(record["matrix"]):
        w.writerow([record["tasks"][i]["name"]] + ["" if v is None else f"{v:.6f}" for v in row])
    return buf.getvalue()


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def ckpt(self, i: int) -> Path:
        return self.path / "checkpoints" / f"exp_{i:03d}.safetensors"

    def check_start(self, cfg: RunConfig, *, resume: bool, overwrite: bool) -> dict:
        """Validate the directory for a new run or a resume; return the saved record (or {})."""
        rj = self.path / "results.json"
        if resume:
            if not rj.is_file():
                raise UserError(f"--resume: no run to resume at {self.path} (results.json missing)")
            state = read_json(rj)
            if state.get("schema_version") != SCHEMA_VERSION:
                raise UserError(f"--resume: {rj} has schema_version {state.get('schema_version')}, "
                                f"this version writes {SCHEMA_VERSION}")
            saved = yaml.safe_load((self.path / "config.yaml").read_text())
            now = cfg.to_dict()
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in ("output", "runtime"))
            if diff:
                raise UserError(f"--resume: the configuration differs from the saved run in: {', '.join(diff)}")
            return state
        if rj.exists() and not overwrite:
            raise UserError(f"{self.path} already holds a run; use --resume to continue it "
                            f"or --overwrite to start again")
        return {}

    def start(self, cfg: RunConfig, record: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        for old in (self.path / "checkpoints").glob("exp_*.safetensors"):
            old.unlink()
        write_yaml(self.path / "config.yaml", cfg.to_dict())
        write_jsonl(self.path / "log.jsonl", [])
        self.write_record(record)

    def write_record(self, record: dict) -> None:
        write_text(self.path / "matrix.csv", matrix_csv(record))
        write_json(self.path / "results.json", _finite(record))

    def save_progress(self, record: dict, strategy, *, step_log: list[dict], checkpoint_index: int | None = None,
                      extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        if checkpoint_index is not None and strategy.cfg.output.checkpoints:
            with atomic_path(self.ckpt(checkpoint_index)) as tmp:
                save_file(strategy.state_dict(), str(tmp), metadata={"experience": str(checkpoint_index)})
        if step_log:
            done = len(record["matrix"])
            old = [r for r in read_jsonl(self.path / "log.jsonl") if r.get("experience", -1) < done - 1]
            write_jsonl(self.path / "log.jsonl", old + step_log)
        if extra:
            record["extra"] = extra
        record["metrics"] = compute_metrics(record)
        self.write_record(record)

    def load_checkpoint(self, i: int) -> dict:
        from safetensors.torch import load_file

        path = self.ckpt(i)
        if not path.is_file():
            raise UserError(f"--resume: checkpoint {path} is missing; cannot continue this run")
        return load_file(str(path))

    def finish(self, record: dict, extra: dict) -> None:
        record["status"] = "complete"
        record["extra"] = extra
        record["metrics"] = compute_metrics(record)
        self.write_record(record)


def load_record(path: str | Path) -> dict:
    rj = Path(path) / "results.json"
    if not rj.is_file():
        raise UserError(f"no results.json in {path}")
    return read_json(rj)
