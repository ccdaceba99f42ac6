"""The template every VLM strategy builds on: :class:`~lifelong_moe.strategies.template.ContinualTemplate`
with a generative VLM: a minibatch is ``(image, record index)`` into its experience's question records,
trained by teacher forcing on the answer tokens, and evaluated by greedy generation.

    L = - mean over answer tokens a_t of log p(a_t | image, question, a_<t)

(the LLaVA / VQACL objective: cross-entropy on the answer span only)."""
from __future__ import annotations

import torch

from lifelong_moe.data import QARecord, QATask
from lifelong_moe.backbones.vlm import VisionLanguageModel

from .template import ContinualTemplate, StatefulPlugin, StrategyParams

__all__ = ["VlmStrategy", "StatefulPlugin", "StrategyParams"]


class VlmStrategy(ContinualTemplate):
    def __init__(self, *, model: VisionLanguageModel, **kwargs):
        self.records: tuple[QARecord, ...] | None = None
        self._batch = None
        super().__init__(model=model, **kwargs)

    def setup(self, model: VisionLanguageModel) -> None:
        """Inject adapters. The backbone arrives fully frozen."""

    # ---------------------------------------------------------------- batches
    def qa_batch(self, x: torch.Tensor, records) -> object:
        """The backbone's tokenised batch of ``records`` (questions and training answers) on ``x``."""
        return self.model.batch(x.to(self.device), [r.question for r in records], [r.answer for r in records])

    def loss_on(self, groups: list[tuple[QATask, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Mean answer loss over samples ``(task, x, record index)`` of one or more tasks (replay),
        in one forward pass."""
        records = [task.train_records[int(i)] for task, _, idx in groups for i in idx]
        batch = self.qa_batch(torch.cat([x for _, x, _ in groups]), records)
        with self.autocast():
            logits = self.model.logits(batch)
        return self.model.answer_loss(batch, logits)  # in fp32

    # ---------------------------------------------------------------- training
    def begin_experience(self, task: QATask) -> None:
        self.records = task.train_records

    def end_experience(self) -> None:
        self.records = self._batch = None

    def forward(self):
        self._batch = self.qa_batch(self.mb_x, [self.records[int(i)] for i in self.mb_y])
        with self.autocast():
            return self.model.logits(self._batch)

    def criterion(self):
        if self._batch is None:  # Avalanche eval loop: not used by our evaluator
            return torch.zeros((), device=self.device)
        return self.model.answer_loss(self._batch, self.mb_output)  # in fp32

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def answer(self, x: torch.Tensor, questions: list[str], task: QATask | None = None) -> list[str]:
        """Greedy answers to ``questions`` about images ``x`` (``task`` is the test set's, for
        strategies that evaluate task-aware; the default ignores it)."""
        self.model.eval()
        with self.autocast():
            return self.model.generate(x.to(self.device), questions,
                                       max_new_tokens=self.cfg.evaluation.max_new_tokens)

    @torch.no_grad()
    def token_accuracy(self, x: torch.Tensor, questions: list[str], answers: list[str],
                       task: QATask | None = None) -> torch.Tensor:
        """Per sample: the fraction of answer tokens ranked first under teacher forcing."""
        self.model.eval()
        batch = self.model.batch(x.to(self.device), questions, answers)
        with self.autocast():
            logits = self.model.logits(batch)
        return self.model.token_accuracy(batch, logits).cpu()
