"""Evaluation: one row of the accuracy matrix = a strategy scored on every test experience.

``Evaluator.score`` is the unit a new backbone family replaces (its ``evaluator`` in
:mod:`lifelong_moe.families`): classification scores argmax accuracy over the classes in play, the
VQA evaluator (:mod:`.vqa_evaluator`) answer match, and the runner, matrix and metrics stay the same.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..runtime import distributed
from ..config import EvaluationConfig
from ..streams.builder import Stream, eval_classes


class ClassificationEvaluator:
    metric_kind = "accuracy"

    def __init__(self, stream: Stream, cfg: EvaluationConfig, progress: bool = True):
        self.stream, self.cfg, self.progress = stream, cfg, progress
        self._static: dict[tuple, float] = {}  # scores of a model that never changes (zero-shot)

    def score(self, strategy, row: int, col: int) -> float:
        """Top-1 accuracy on test set ``col`` after experience ``row`` (-1: before training). A
        strategy that does not train is scored once per (test set, classes in play)."""
        tasks = self.stream.tasks
        task = tasks[col]
        classes = eval_classes(tasks, row, col, self.cfg.label_space)
        if not strategy.trains:
            key = (id(strategy), col, tuple(classes))
            if key not in self._static:
                self._static[key] = self._accuracy(strategy, task, classes, col)
            return self._static[key]
        return self._accuracy(strategy, task, classes, col)

    def _accuracy(self, strategy, task, classes, col: int) -> float:
        """Inputs, targets and the count stay on the strategy's device: one host sync per test set."""
        device = strategy.device
        lut = strategy.target_lookup(task, classes).to(device)
        data = distributed.shard(self.stream.test_stream[col].dataset)  # torchrun: this rank's part
        loader = DataLoader(data, batch_size=self.cfg.batch_size, shuffle=False,
                            pin_memory=device.type == "cuda")
        correct, total = torch.zeros((), dtype=torch.long, device=device), 0
        for x, y, *_ in tqdm(loader, desc=f"eval {task.name}", leave=False, disable=not self.progress):
            pred = strategy.eval_logits(x.to(device, non_blocking=True), task, classes).argmax(dim=-1)
            correct += (pred == lut[y.to(device, non_blocking=True)]).sum()
            total += len(y)
        correct, total = distributed.sum_(torch.stack([correct, torch.tensor(total, device=device)])).tolist()
        return int(correct) / max(1, total)

    @torch.no_grad()
    def row(self, strategy, row: int) -> list[float]:
        out = [self.score(strategy, row, j) for j in range(len(self.stream.tasks))]
        distributed.reduce_eval_records(strategy)
        return out

    def extra_results(self) -> dict:
        return {}

    def restore(self, record: dict) -> None:
        pass
