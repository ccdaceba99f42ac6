"""Learning without Forgetting (Li & Hoiem, TPAMI 2017) on answer logits, for continual VQA:
sequential LoRA on the LLM with a distillation term on the current batch's answer positions,

    L = CE(answer) + alpha * T^2 * mean_t KL( softmax(z_old_t / T) || softmax(z_t / T) ),

where z_t are the vocabulary logits at answer position t and z_old_t those of the model as it was
after the previous experience. The teacher is not a copy of the VLM: its trainable weights (the
LoRA factors) are substituted for one extra no-grad forward (``torch.func.functional_call``), so the
cost is one forward pass and the memory one adapter, whatever the backbone's size.
"""
from typing import Literal

import torch
from avalanche.core import SupervisedPlugin
from pydantic import Field

from lifelong_moe.training.distillation import lwf_distillation

from .vlm_base import StatefulPlugin, VlmStrategy
from .vlm_lora import Params as LoraParams
from .vlm_lora import inject_lora


class Params(LoraParams):
    name: Literal["lwf"] = "lwf"
    alpha: float = Field(1.0, ge=0)
    temperature: float = Field(2.0, gt=0)


class AnswerLwFPlugin(SupervisedPlugin, StatefulPlugin, supports_distributed=True):  # docs/distributed.md
    def __init__(self, alpha: float, temperature: float):
        super().__init__()
        self.alpha, self.t = alpha, temperature
        self.old: dict[str, torch.Tensor] | None = None  # trainable state after the previous experience

    def snapshot(self, strategy) -> None:
        params = dict(strategy.model.named_parameters())
        self.old = {n: params[n].detach().clone() for n in strategy.state_names}

    @torch.no_grad()
    def teacher_logits(self, strategy) -> torch.Tensor:
        """The previous model's logits: its trainable weights substituted for this one forward
        (``torch.func.functional_call``: the live parameters, which the student's graph holds, are
        never written), without dropout."""
        was_training = strategy.model.training
        strategy.model.eval()
        try:
            with strategy.autocast():
                return torch.func.functional_call(strategy.model, self.old, (strategy._batch,), strict=False)
        finally:
            strategy.model.train(was_training)

    def before_backward(self, strategy, **kwargs):
        if self.old is None or self.alpha == 0:
            return
        labels = strategy._batch.labels  # -100 except the answer tokens (and EOS) it predicts
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != -100  # logits at t predict token t + 1
        teacher = self.teacher_logits(strategy)[mask]
        strategy.loss += lwf_distillation(strategy.mb_output[mask], teacher, self.t, weight=self.alpha)

    def after_training_exp(self, strategy, **kwargs):
        self.snapshot(strategy)

    def restore(self, strategy) -> None:
        # The teacher is the model as it stood after the last completed experience: the checkpoint.
        self.snapshot(strategy)


class Strategy(VlmStrategy):
    Params = Params
    cost_hint = 1.5

    def setup(self, model) -> None:
        inject_lora(model, self.params)

    def make_plugins(self):
        return [AnswerLwFPlugin(self.params.alpha, self.params.temperature)]
