"""The run loop: config -> stream -> backbone + strategy -> evaluator (matrix) -> results dir.

Everything that can fail on bad input (config, data, weights) fails before the output directory is
touched. After the zero-shot row and after every experience, the run directory is brought to a
consistent state (checkpoint, results.json, matrix.csv, log.jsonl, each written atomically), so a
killed run resumes from its last completed experience with ``resume=True``.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch

from ..runtime import distributed
from .. import results as R
from ..config import RunConfig
from ..runtime.device import check_precision, describe_device, dtype_name, resolve_device
from ..errors import UserError
from ..families import family_of
from ..registry import strategy_class
from ..runtime.threads import torch_threads
from .trackers import Trackers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def extra_results(strategy, evaluator) -> dict:
    """results.json ``extra``: the method's records and the evaluator's secondary metrics."""
    return {**strategy.extra_results(), **evaluator.extra_results()}


def output_dir(cfg: RunConfig, override: str | Path | None = None) -> Path:
    return Path(override) if override else Path(cfg.output.dir.format(name=cfg.name))


def resolve_runtime(cfg: RunConfig) -> torch.device:
    """The run's device (``runtime.device`` resolved); UserError if it or ``runtime.precision`` is not
    available here. Writes nothing."""
    device = resolve_device(cfg.runtime.device)
    check_precision(device, cfg.runtime.precision)
    return device


def build(cfg: RunConfig, progress: bool = True):
    """Backbone, stream, strategy, evaluator; raises UserError on bad input, writes nothing."""
    from ..backbones.factory import image_transform
    from ..streams.builder import build_stream

    device = distributed.setup(resolve_runtime(cfg))  # an unavailable device fails first; torchrun: this rank's
    seed_everything(cfg.seed)
    family = family_of(cfg.backbone)
    model = family.load(cfg.backbone, progress)
    try:
        stream = build_stream(cfg.stream, image_transform(model, cfg.training.augment), cfg.seed,
                              tokenizer=getattr(model, "tokenizer", None))
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"stream: {e}") from None
    if cfg.training.lr_per_experience and len(cfg.training.lr_per_experience) != len(stream.tasks):
        raise UserError(f"training.lr_per_experience has {len(cfg.training.lr_per_experience)} values "
                        f"for {len(stream.tasks)} experiences")
    seed_everything(cfg.seed)
    cls = strategy_class(cfg.strategy.name, cfg.backbone.family)
    strategy = cls(model=model, cfg=cfg, params=cfg.strategy_params(), tasks=stream.tasks, device=device,
                   precision=cfg.runtime.precision, progress=progress)
    strategy.train_datasets = [e.dataset for e in stream.train_stream]
    distributed.check_batch(cfg.training.batch_size, [len(d) for d in strategy.train_datasets])
    return stream, strategy, family.make_evaluator(stream, cfg.evaluation, progress)


def run(cfg: RunConfig, out: str | Path | None = None, *, resume: bool = False, overwrite: bool = False,
        stop_after: int | None = None, progress: bool = True, log=print) -> Path:
    """Run (or resume) one configuration; return the results directory."""
    run_dir = R.RunDir(output_dir(cfg, out))
    if distributed.launched():  # torchrun: rank 0 checks, locks and writes (lifelong_moe/runtime/distributed.py)
        run_dir = distributed.MainRunDir(run_dir, distributed.setup(resolve_runtime(cfg)))
        progress, log = progress and distributed.is_main(), log if distributed.is_main() else (lambda *_: None)
    with torch_threads(cfg.runtime.threads), run_dir.releasing(), Trackers(cfg) as trackers:  # lock, trackers: end with the run
        return _run(cfg, run_dir, resume=resume, overwrite=overwrite, stop_after=stop_after, progress=progress,
                    log=log, trackers=trackers)


def _run(cfg: RunConfig, run_dir: R.RunDir, *, resume, overwrite, stop_after, progress, log, trackers) -> Path:
    out = run_dir.path
    state = run_dir.check_start(cfg, resume=resume, overwrite=overwrite)  # raises before any write
    t0 = time.perf_counter()
    stream, strategy, evaluator = build(cfg, progress)
    state = run_dir.acquire(cfg, resume=resume, overwrite=overwrite)  # one process per directory, checked again
    resume = bool(state)  # {}: a new run, or --resume with nothing to resume (acquire said so): from the beginning
    timings = state.get("timings") or {"setup_s": 0.0, "zero_shot_eval_s": None, "experiences": []}
    timings["setup_s"] = round(time.perf_counter() - t0, 3)
    timings["torch_threads"] = torch.get_num_threads()
    done = len(state.get("matrix") or [])
    record = R.new_record(cfg, stream, evaluator.metric_kind, strategy.parameter_counts()) if not resume \
        else state
    record["timings"] = timings
    weights = dtype_name(strategy.model.dtype) if hasattr(cfg.backbone, "dtype") else None  # as loaded
    R.record_runtime(record, describe_device(strategy.device), strategy.precision, weights)
    if not resume:
        run_dir.start(cfg, record)
    else:
        evaluator.restore(record)
    if resume and done:
        strategy.load_state_dict(run_dir.load_checkpoint(done - 1))
        log(f"resuming {out} after experience {done}/{len(stream.tasks)}")
    if distributed.is_main():  # under torchrun only rank 0 logs, as only it writes
        trackers.start(out, done)  # TensorBoard / W&B copies of what the results directory records (logging:)
    if record.get("zero_shot") is None and cfg.evaluation.zero_shot_row:
        t = time.perf_counter()
        record["zero_shot"] = evaluator.row(strategy, -1)
        timings["zero_shot_eval_s"] = round(time.perf_counter() - t, 3)
        run_dir.save_progress(record, strategy, step_log=[], extra=evaluator.extra_results())
        trackers.row(0, record["zero_shot"], record["tasks"], record["metrics"])
        log(f"[{cfg.name}] zero-shot: " + " ".join(f"{a:.3f}" for a in record["zero_shot"]))
    for i in range(done, len(stream.tasks)):
        seed_everything(cfg.seed + i)
        t = time.perf_counter()
        if strategy.trains:
            strategy.train(stream.train_stream[i], eval_streams=[], num_workers=cfg.training.num_workers)
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        row = evaluator.row(strategy, i)
        timings["experiences"].append({"train_s": round(train_s, 3), "eval_s": round(time.perf_counter() - t, 3)})
        record["matrix"].append(row)
        log(f"[{cfg.name}] after {i + 1}/{len(stream.tasks)} ({stream.tasks[i].name}): "
            + " ".join(f"{a:.3f}" for a in row))
        step_log = [s for s in strategy.step_log if s["experience"] == i]
        run_dir.save_progress(record, strategy, step_log=step_log, checkpoint_index=i,
                              extra=extra_results(strategy, evaluator))
        trackers.steps(step_log)
        trackers.row(i + 1, row, record["tasks"], record["metrics"])
        if stop_after is not None and i + 1 >= stop_after and i + 1 < len(stream.tasks):
            log(f"[{cfg.name}] stopped after experience {i + 1} as asked; continue with --resume")
            return out
    run_dir.finish(record, extra_results(strategy, evaluator))
    trackers.finish(record["metrics"])
    return out
