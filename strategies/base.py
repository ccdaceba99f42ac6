"""The template every CLIP strategy builds on: :class:`~lifelong_moe.strategies.template.ContinualTemplate`
(Avalanche's ``SupervisedTemplate``: optimizer, schedule, budget, step log, checkpoints) with CLIP's
prompt head: a minibatch of images is scored against the class prompts of its experience. Methods
override ``setup`` (what to inject or unfreeze) and add side effects as plugins."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lifelong_moe.backbones.clip import ClipClassifier, Head
from lifelong_moe.data import TaskInfo
from lifelong_moe.streams.builder import eval_classes

from .template import ContinualTemplate, StatefulPlugin, StrategyParams

__all__ = ["ClipStrategy", "StatefulPlugin", "StrategyParams"]


class ClipStrategy(ContinualTemplate):
    def __init__(self, *, model: ClipClassifier, **kwargs):
        self.head: Head | None = None
        self.target_map: torch.Tensor | None = None
        super().__init__(model=model, **kwargs)

    def setup(self, model: ClipClassifier) -> None:
        """Inject adapters / unfreeze parameters. The backbone arrives fully frozen."""

    # ---------------------------------------------------------------- heads
    def templates(self, task: TaskInfo, prompt: str) -> tuple[str, ...]:
        own = task.label_space.templates if self.cfg.backbone.dataset_templates else None
        templates = tuple(own or self.cfg.backbone.templates)
        return templates[:1] if prompt == "first" else templates

    def head_for(self, task: TaskInfo, classes, prompt: str) -> Head:
        names = tuple(task.label_space.class_names[c] for c in classes)
        return Head(names, self.templates(task, prompt))

    def training_classes(self, task: TaskInfo, now: int | None = None) -> tuple[int, ...]:
        """Classes the loss ranges over for ``task``'s samples while training experience ``now``."""
        now = task.index if now is None else now
        return eval_classes(self.tasks, now, task.index, self.cfg.training.label_space)

    def loss_on(self, groups: list[tuple[TaskInfo, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Mean training loss over samples ``(task, x, y)`` of one or more tasks at the current
        experience (replay): one image-tower pass for all of them, each group scored against its
        own task's head."""
        with self.autocast():
            feats = self.model.encode_image(torch.cat([x for _, x, _ in groups]).to(self.device))
        total, start = feats.new_zeros((), dtype=torch.float32), 0
        for task, _, y in groups:
            f, start = feats[start:start + len(y)], start + len(y)
            classes = self.training_classes(task, self.experience_index)
            head = self.head_for(task, classes, self.cfg.training.prompt)
            lut = self.target_lookup(task, classes).to(self.device)
            with self.autocast():
                logits = (self.model.logit_scale * f @ self.model.text_features(head).t()).float()
            total = total + F.cross_entropy(logits, lut[y.to(self.device)],
                                            label_smoothing=self.cfg.training.label_smoothing) * len(y)
        return total / max(1, start)

    @staticmethod
    def target_lookup(task: TaskInfo, classes) -> torch.Tensor:
        lut = torch.full((len(task.label_space.class_names),), -1, dtype=torch.long)
        lut[torch.as_tensor(list(classes))] = torch.arange(len(classes))
        return lut

    # ---------------------------------------------------------------- training
    def begin_experience(self, task: TaskInfo) -> None:
        classes = self.training_classes(task)
        self.head = self.head_for(task, classes, self.cfg.training.prompt)
        self.target_map = self.target_lookup(task, classes).to(self.device)
        self.model.clear_text_cache()

    def end_experience(self) -> None:
        self.head = self.target_map = None

    def after_load(self) -> None:
        self.model.clear_text_cache()

    def forward(self):
        with self.autocast():
            return self.model(self.mb_x, self.head)

    def criterion(self):
        if self.target_map is None:  # Avalanche eval loop: not used by our evaluator
            return torch.zeros((), device=self.device)
        y = self.target_map[self.mb_y]
        return F.cross_entropy(self.mb_output.float(), y, label_smoothing=self.cfg.training.label_smoothing)

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def eval_logits(self, x: torch.Tensor, task: TaskInfo, classes) -> torch.Tensor:
        """Logits over ``classes`` of ``task``'s label space (evaluation prompts)."""
        self.model.eval()
        with self.autocast():
            return self.model(x.to(self.device), self.head_for(task, classes, self.cfg.evaluation.prompt))
