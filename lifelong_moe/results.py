"""The results directory (schema_version 1; documented in docs/results.md).

    config.yaml       resolved configuration
    results.json      record: provenance, tasks, zero-shot row, matrix, metrics, params, timings
    matrix.csv        the accuracy matrix, zero-shot row first
    log.jsonl         per-step loss and learning rate
    checkpoints/exp_NNN.safetensors   trainable state after experience NNN
    .lock             held by the process running in the directory (its pid inside)

Every file is replaced atomically; ``results.json`` is written last, so its ``matrix`` never
claims an experience whose checkpoint is missing. One process at a time runs in a directory: it
holds an OS file lock (``filelock``, flock on Unix) on ``.lock`` for the life of the run, which the
OS drops when the process ends, however it ends.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml

from .evaluation import metrics as M
from .config import RunConfig
from .errors import UserError
from .io import atomic_path, read_json, read_jsonl, write_json, write_jsonl, write_text, write_yaml
from .provenance import versions

SCHEMA_VERSION = 1
LOCK_NAME = ".lock"


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
        "skipped_images": dict(getattr(stream, "skipped_images", {})),  # stream.on_bad_image: skip
    }


# config keys added after runs were saved with this schema, with the value a saved run without them used
ADDED_KEYS = {"backbone": {"dtype": "fp32"}}


def record_runtime(record: dict, device: str, precision: str, dtype: str | None = None) -> None:
    """``runtime``: the device (resolved, with the GPU's name) and precision the run computes with, and
    (backbones with ``backbone.dtype``) ``dtype``, the dtype its frozen weights are stored in; a
    resume on another device keeps the first and lists the others under ``resumed_on``; a resume in
    another precision is refused (UserError, raised before anything is written)."""
    run = record.get("runtime")
    if run and run["precision"] != precision:
        raise UserError(f"--resume: the run computes in {run['precision']}, runtime.precision is now "
                        f"{precision}; resume with runtime.precision={run['precision']}")
    if not run:
        record["runtime"] = {"device": device, "precision": precision, **({"dtype": dtype} if dtype else {})}
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


def _numbers(row, n: int) -> bool:
    return isinstance(row, list) and len(row) == n and all(
        v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in row)


def validate_record(rec, rj: Path) -> dict:
    """Check what the loaders rely on in a results.json; a UserError names the file and the key."""
    if not isinstance(rec, dict):
        raise UserError(f"{rj}: expected a JSON object at the top level, got {type(rec).__name__}")
    if rec.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{rj} has schema_version {rec.get('schema_version')!r}; this version reads {SCHEMA_VERSION}")
    tasks = rec.get("tasks")
    if not isinstance(tasks, list) or not tasks or \
            not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tasks):
        raise UserError(f"{rj}: 'tasks' must be a non-empty list of objects with a 'name'")
    T = len(tasks)
    rows = rec.get("matrix")
    if not isinstance(rows, list) or len(rows) > T or not all(_numbers(r, T) for r in rows):
        raise UserError(f"{rj}: 'matrix' must be a list of at most {T} rows of {T} numbers or null")
    if rec.get("zero_shot") is not None and not _numbers(rec["zero_shot"], T):
        raise UserError(f"{rj}: 'zero_shot' must be null or a list of {T} numbers or null")
    for key, kind in (("name", str), ("status", str), ("metrics", dict), ("extra", dict), ("timings", dict)):
        if rec.get(key) is not None and not isinstance(rec[key], kind):
            raise UserError(f"{rj}: '{key}' must be a{'n object' if kind is dict else ' string'}, "
                            f"got {type(rec[key]).__name__}")
    if rec.get("timings") and not isinstance(rec["timings"].get("experiences"), list):
        raise UserError(f"{rj}: 'timings.experiences' must be a list")
    return rec


def read_record(rj: Path) -> dict:
    try:
        rec = read_json(rj)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{rj} is not valid JSON ({e}); the file is damaged") from None
    return validate_record(rec, rj)


def _writable_dir(path: Path) -> None:
    """Refuse, before anything is written, an output path that cannot become a directory."""
    if path.exists() and not path.is_dir():
        raise UserError(f"output directory {path} exists and is not a directory; choose another -o / output.dir")
    parent = next((p for p in path.parents if p.exists()), None)
    if path.exists() or parent is None:
        return
    if not parent.is_dir():
        raise UserError(f"output directory {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"output directory {path}: no permission to create it in {parent}")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = None  # filelock.FileLock while this process runs in the directory

    def ckpt(self, i: int) -> Path:
        return self.path / "checkpoints" / f"exp_{i:03d}.safetensors"

    # ------------------------------------------------------------------------------------ lock
    def _file_lock(self, **kw):
        from filelock import FileLock

        return FileLock(self.path / LOCK_NAME, timeout=0, thread_local=False, **kw)

    def _held_error(self) -> UserError:
        try:
            holder = (self.path / LOCK_NAME).read_text(encoding="utf-8").split()
        except (OSError, UnicodeDecodeError):
            holder = []
        who = f"pid {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 and holder[1] != socket.gethostname()
                                     else "") if holder else "a process whose pid is not recorded"
        return UserError(f"{self.path} is in use by another run ({who}); wait for it to finish or stop it, "
                         "then --resume")

    def check_unlocked(self) -> None:
        """Refuse a directory another process is running in; writes nothing."""
        from filelock import Timeout

        if (self._lock is not None and self._lock.is_locked) or not (self.path / LOCK_NAME).is_file():
            return
        probe = self._file_lock()
        try:
            probe.acquire(blocking=False)
        except Timeout:
            raise self._held_error() from None
        probe.release()

    def hold(self) -> None:
        """Hold the directory (created if needed) for this process, our pid and host in the lock
        file; a UserError naming the holder if another process holds it."""
        from filelock import Timeout

        def note_holder(fd: int) -> None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)

        self.path.mkdir(parents=True, exist_ok=True)
        lock = self._file_lock(on_acquired=note_holder)
        try:
            lock.acquire(blocking=False)
        except Timeout:
            raise self._held_error() from None
        self._lock = lock

    def acquire(self, cfg: RunConfig, *, resume: bool, overwrite: bool) -> dict:
        """:meth:`hold`, then :meth:`check_start` again now that no other process can change the directory.
        A resume with nothing to resume (``{}``) is said on stderr, once per run: the run starts from the
        beginning."""
        self.hold()
        state = self.check_start(cfg, resume=resume, overwrite=overwrite)
        if resume and not state:
            print(f"--resume: nothing to resume in {self.path} (no results.json): starting from the beginning",
                  file=sys.stderr, flush=True)
        return state

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @contextmanager
    def releasing(self):
        """Release the lock :meth:`acquire` may take inside this block when the block ends."""
        try:
            yield self
        finally:
            self.release()

    # ------------------------------------------------------------------------------------ state
    def check_start(self, cfg: RunConfig, *, resume: bool, overwrite: bool) -> dict:
        """Validate the directory for a new run or a resume; return the saved record, or {} for a run
        that starts from the beginning: a new run, or a resume with nothing to resume (no directory,
        or one a run killed before its first results.json left; its config.yaml, if written, must be
        this configuration's)."""
        if resume and overwrite:
            raise UserError("give one of --resume (continue the run) and --overwrite (start it again), not both")
        rj = self.path / "results.json"
        _writable_dir(self.path)
        self.check_unlocked()
        if resume:
            if not rj.exists():
                if (self.path / "config.yaml").exists():
                    self._check_saved_config(cfg)
                return {}
            if not rj.is_file():
                raise UserError(f"--resume: {rj} is not a file")
            try:
                state = read_record(rj)
            except UserError as e:
                raise UserError(f"--resume: {e}") from None
            self._check_saved_config(cfg)
            return state
        if rj.exists() and not overwrite:
            raise UserError(f"{self.path} already holds a run; use --resume to continue it "
                            f"or --overwrite to start again")
        return {}

    def _check_saved_config(self, cfg: RunConfig) -> None:
        """Refuse to resume a directory whose config.yaml is not ``cfg`` (output, runtime, logging aside)."""
        cy = self.path / "config.yaml"
        try:
            saved = yaml.safe_load(cy.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise UserError(f"--resume: cannot read the saved configuration {cy}: "
                            f"{' '.join(str(e).split())}") from None
        if not isinstance(saved, dict):
            raise UserError(f"--resume: {cy} does not hold a configuration (a mapping of keys)")
        now = cfg.to_dict()
        for section, keys in ADDED_KEYS.items():  # a run saved before a key existed ran with its default
            if isinstance(saved.get(section), dict) and isinstance(now.get(section), dict):
                for k, v in keys.items():
                    if now[section].get(k) == v:
                        saved[section].setdefault(k, v)
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in ("output", "runtime", "logging"))
        if diff:
            raise UserError(f"--resume: the configuration differs from the saved run in: {', '.join(diff)}")

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
    """The validated record of a run directory (or of its results.json)."""
    path = Path(path)
    rj = path if path.name == "results.json" and path.is_file() else path / "results.json"
    if not rj.is_file():
        raise UserError(f"no results.json in {path}")
    return read_record(rj)
