"""Experiment trackers (config ``logging``): TensorBoard through ``torch.utils.tensorboard.SummaryWriter``
and Weights & Biases through ``wandb``, both off by default. They receive copies of what the results
directory records, which stays the source of truth:

- ``train/loss``, ``train/lr`` per logged optimiser step (x: the step counted over all experiences);
- ``accuracy/<task>`` for every matrix row and ``metrics/<name>`` after it (x: ``experience``, 0 = the
  zero-shot row, ``i`` = after training experience ``i``).

W&B groups the runs of one name (the seeds of a sweep setting) and gets the resolved config; its
summary holds the final metrics. A resumed run continues the step count from ``log.jsonl``.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..io import read_jsonl

INSTALL = "pip install 'lifelong-moe[tracking]'"


class Trackers:
    """The trackers a config asks for. Created before anything is written (a missing library is a
    UserError then); :meth:`start` opens them once the run's directory is settled; a context manager
    that closes them however the run ends."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.tb = self.wb = None
        self._offset = 0  # optimiser steps of the experiences before the current one
        log = cfg.logging
        for lib, wanted in (("tensorboard", log.tensorboard), ("wandb", log.wandb)):
            if wanted:
                try:
                    __import__(lib)
                except ImportError:
                    raise UserError(f"logging.{lib} needs the {lib} package: {INSTALL}") from None

    @property
    def active(self) -> bool:
        return self.tb is not None or self.wb is not None

    def start(self, run_dir: Path, done: int) -> None:
        """Open the trackers for the run in ``run_dir`` that has ``done`` experiences behind it."""
        log, cfg = self.cfg.logging, self.cfg
        prior = [r for r in read_jsonl(run_dir / "log.jsonl") if r.get("experience", -1) < done]
        per_exp: dict = {}
        for r in prior:
            per_exp[r["experience"]] = max(per_exp.get(r["experience"], 0), int(r.get("step", 0)))
        self._offset = sum(per_exp.values())
        if log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(log.tensorboard) / cfg.name / f"seed{cfg.seed}"))
        if log.wandb:
            import wandb

            w = log.wandb
            self.wb = wandb.init(project=w.project, entity=w.entity, mode=w.mode, dir=w.dir, tags=w.tags,
                                 name=f"{cfg.name} seed{cfg.seed}", group=cfg.name, config=cfg.to_dict(),
                                 reinit="finish_previous")
            self.wb.define_metric("train/global_step")
            self.wb.define_metric("train/*", step_metric="train/global_step")
            self.wb.define_metric("experience")
            for prefix in ("accuracy/*", "metrics/*"):
                self.wb.define_metric(prefix, step_metric="experience")

    def steps(self, step_log: list[dict]) -> None:
        """One experience's logged optimiser steps (``runner`` passes ``strategy.step_log`` of it)."""
        if not self.active or not step_log:
            return
        for s in step_log:
            step = self._offset + int(s["step"])
            if self.tb is not None:
                self.tb.add_scalar("train/loss", s["loss"], step)
                self.tb.add_scalar("train/lr", s["lr"], step)
            if self.wb is not None:
                self.wb.log({"train/loss": s["loss"], "train/lr": s["lr"], "train/global_step": step})
        self._offset += max(int(s["step"]) for s in step_log)

    def row(self, experience: int, row, tasks: list[dict], metrics: dict) -> None:
        """Matrix row ``row`` after ``experience`` (0: zero-shot) and the metrics computed with it."""
        if not self.active:
            return
        values = {f"accuracy/{t['name']}": v for t, v in zip(tasks, row) if v is not None}
        values.update({f"metrics/{k}": m["value"] for k, m in metrics.items() if m.get("value") is not None})
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, experience)
            self.tb.flush()
        if self.wb is not None:
            self.wb.log({**values, "experience": experience})

    def finish(self, metrics: dict) -> None:
        if self.wb is not None:
            self.wb.summary.update({k: m["value"] for k, m in metrics.items() if m.get("value") is not None})

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wb is not None:
            self.wb.finish()
            self.wb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
