"""The template every strategy builds on, whatever the backbone family: Avalanche's
``SupervisedTemplate`` with a trainable-only optimizer, epochs or an iteration budget, warm-up + cosine
schedule, seeded data order, a per-step log, and a checkpoint of only what training changes.

Family templates fill in what a minibatch means: :class:`~lifelong_moe.strategies.base.ClipStrategy`
(images -> class logits over CLIP's prompt head) and
:class:`~lifelong_moe.strategies.vlm_base.VlmStrategy` (image + question -> answer tokens). Methods
override ``setup`` (what to inject or unfreeze) and add side effects as plugins."""
from __future__ import annotations

import math
import warnings
from typing import Iterable

import torch
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from tqdm.auto import tqdm

from lifelong_moe.runtime import distributed
from lifelong_moe.config import RunConfig, Strict
from lifelong_moe.runtime.device import autocast, full_precision, grad_scaler, keep_trainable_fp32


class StrategyParams(Strict):
    """Strategy-specific hyper-parameters; each strategy file subclasses this as ``Params``."""

    name: str


class StatefulPlugin:
    """Mixin for plugins whose state must survive a resume: tensors only (safetensors)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def restore(self, strategy: "ContinualTemplate") -> None:
        """Called after a checkpoint was loaded into ``strategy`` (resume)."""


class ContinualTemplate(SupervisedTemplate):
    Params = StrategyParams
    trains = True  # False: evaluation only (zero-shot)
    cost_hint = 1.0  # rough wall time relative to fine-tuning; parallel variants start the costliest first

    def __init__(self, *, model: nn.Module, cfg: RunConfig, params: StrategyParams, tasks: list,
                 device: str | torch.device = "cpu", precision: str = "fp32", progress: bool = True):
        """``device``: where the model, everything ``setup`` creates and plugin state live (the runner
        passes the resolved ``runtime.device``); ``precision``: see :mod:`lifelong_moe.runtime.device`."""
        self.cfg, self.params, self.tasks, self.progress = cfg, params, tasks, progress
        self.precision = precision
        self.scaler = grad_scaler(device, precision)
        self.train_datasets: list = []  # set by the runner: every experience's train set (replay)
        self.step_log: list[dict] = []
        self.experience_index = -1
        self._bar = None
        self._budget: int | None = None
        self._steps_in_exp = 0
        self._global_loss: float | None = None  # data-parallel: the loss over all ranks' samples
        self.device = torch.device(device)  # Avalanche sets it again; setup needs it first
        model.to(self.device)  # before setup: what it injects or creates follows the model's device
        original = {id(p) for p in model.parameters()}
        self.setup(model)
        keep_trainable_fp32(model)  # a half-precision backbone: its adapters train in fp32 (runtime.device)
        self.state_names = [n for n, p in model.named_parameters() if p.requires_grad or id(p) not in original]
        placeholder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
        with warnings.catch_warnings():  # our evaluator scores the matrix; Avalanche's has no loggers
            warnings.filterwarnings("ignore", message="No loggers specified")
            super().__init__(model=model, optimizer=placeholder, train_mb_size=cfg.training.batch_size,
                             train_epochs=cfg.training.epochs, eval_mb_size=cfg.evaluation.batch_size,
                             device=device, plugins=list(self.make_plugins()), evaluator=None, eval_every=-1)

    # ---------------------------------------------------------------- method hooks
    def setup(self, model: nn.Module) -> None:
        """Inject adapters / unfreeze parameters. The backbone arrives fully frozen."""

    def make_plugins(self) -> Iterable:
        return []

    def extra_results(self) -> dict:
        """Method-specific records for results.json (e.g. expert usage)."""
        return {}

    def autocast(self):
        """Context for forward passes in ``runtime.precision`` (nothing in fp32)."""
        return autocast(self.device, self.precision)

    def full_precision(self):
        """Context that suspends the forward passes' autocast (fp32 islands)."""
        return full_precision(self.device)

    # ---------------------------------------------------------------- family hooks
    def begin_experience(self, task) -> None:
        """Prepare what a minibatch of ``task`` is scored against (a head, a record table)."""

    def end_experience(self) -> None:
        """Drop what :meth:`begin_experience` prepared, after the plugins ran."""

    def after_load(self) -> None:
        """Invalidate caches derived from weights after a checkpoint was loaded."""

    # ---------------------------------------------------------------- training loop
    def _before_training_exp(self, **kwargs):
        task = self.experience.task_info
        self.experience_index = task.index
        torch.manual_seed(self.cfg.seed * 100003 + task.index + 7919 * distributed.rank())  # dropout/noise
        distributed.broadcast_tensors([p.data for p in self.model.parameters() if p.requires_grad])  # rank 0's start
        self.begin_experience(task)
        self._stop_training = False
        super()._before_training_exp(**kwargs)

    def make_train_dataloader(self, num_workers=0, **kwargs):
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.experience_index)
        self.dataloader = distributed.train_loader(self.adapted_dataset, self.train_mb_size, g,
                                                   num_workers=num_workers, pin_memory=self.device.type == "cuda")
        per_epoch = max(1, len(self.dataloader))
        it = self.cfg.training.iterations
        self._budget = it if it else per_epoch * self.cfg.training.epochs
        self.train_epochs = math.ceil(self._budget / per_epoch)

    def make_optimizer(self, **kwargs):
        t = self.cfg.training
        params = [p for p in self.model.parameters() if p.requires_grad]
        lr = t.optimizer.lr
        if t.lr_per_experience:
            lr = t.lr_per_experience[min(self.experience_index, len(t.lr_per_experience) - 1)]
        o = t.optimizer
        if o.name == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
        else:
            cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
            self.optimizer = cls(params, lr=lr, betas=o.betas, weight_decay=o.weight_decay)
        warm, total, cosine = t.schedule.warmup_steps, self._budget, t.schedule.name == "cosine"

        def factor(step: int) -> float:
            if warm and step < warm:
                return (step + 1) / warm
            if not cosine:
                return 1.0
            progress = (step - warm) / max(1, total - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self._steps_in_exp = 0
        if self.progress:
            self._bar = tqdm(total=self._budget, desc=f"train {self.experience.task_name}", leave=False)

    def backward(self):
        self.scaler.scale(self.loss).backward(retain_graph=self.retain_graph)  # fp16: scaled loss
        if distributed.active():  # mean gradient over the ranks' slices of the global batch
            params = [p for p in self.model.parameters() if p.requires_grad]
            self._global_loss = distributed.average_gradients(params, self.loss, len(self.mbatch[0]))

    def training_epoch(self, **kwargs):
        if self._steps_in_exp >= self._budget:
            self.stop_training()
            return
        super().training_epoch(**kwargs)

    def optimizer_step(self):
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer.param_groups else 0.0
        self.scaler.step(self.optimizer)  # fp16: unscales, skips the step on inf/NaN gradients
        self.scaler.update()
        self.scheduler.step()
        self._steps_in_exp += 1
        loss = self.loss.item() if self._global_loss is None else self._global_loss
        if self._steps_in_exp % self.cfg.training.log_every == 0 or self._steps_in_exp == self._budget:
            self.step_log.append({"experience": self.experience_index, "step": self._steps_in_exp,
                                  "loss": round(loss, 6), "lr": lr})
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.3f}")
        if self._steps_in_exp >= self._budget:
            self.stop_training()

    def _after_training_exp(self, **kwargs):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        super()._after_training_exp(**kwargs)  # plugins may still use the experience's head / records
        self.end_experience()

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes: trainable / injected parameters and plugin state, as CPU
        copies (a checkpoint does not depend on the device it was written from)."""
        params = dict(self.model.named_parameters())
        state = {f"model.{n}": params[n].detach().clone().contiguous() for n in self.state_names}
        for i, p in enumerate(self.plugins):
            if isinstance(p, StatefulPlugin):
                state.update({f"plugin{i}.{k}": v.contiguous() for k, v in p.state_dict().items()})
        return {k: v.cpu() for k, v in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        missing = [n for n in self.state_names if f"model.{n}" not in state]
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]}")
        with torch.no_grad():
            for n in self.state_names:
                params[n].copy_(state[f"model.{n}"])
        for i, p in enumerate(self.plugins):
            if isinstance(p, StatefulPlugin):
                prefix = f"plugin{i}."
                p.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        self.after_load()
        for p in self.plugins:
            if isinstance(p, StatefulPlugin):
                p.restore(self)  # plugins move what they loaded to self.device here

    def parameter_counts(self) -> dict[str, int]:
        ps = list(self.model.parameters())
        return {"trainable": sum(p.numel() for p in ps if p.requires_grad), "total": sum(p.numel() for p in ps)}
