"""Learning without Forgetting (Li & Hoiem, TPAMI 2017) for CLIP, as the ZSCL line of work runs it:
fine-tune (image tower by default) with a distillation term on the current batch,

    L = CE(y, f(x)) + alpha * T^2 * KL( softmax(f_old(x) / T) || softmax(f(x) / T) ),

where f_old is the model as it was after the previous experience and the logits range over the
current head's classes (the old model's text tower encodes the same prompts).
"""
import copy
from typing import Literal

import torch
from avalanche.core import SupervisedPlugin
from pydantic import Field

from lifelong_moe.training.distillation import lwf_distillation

from .base import ClipStrategy, StatefulPlugin, StrategyParams
from .finetune import unfreeze_towers


class Params(StrategyParams):
    name: Literal["lwf"] = "lwf"
    alpha: float = Field(1.0, ge=0)
    temperature: float = Field(2.0, gt=0)
    towers: list[Literal["image", "text"]] = Field(["image"], min_length=1)


class LwFPlugin(SupervisedPlugin, StatefulPlugin, supports_distributed=True):  # docs/distributed.md
    def __init__(self, alpha: float, temperature: float):
        super().__init__()
        self.alpha, self.t = alpha, temperature
        self.old = None

    def snapshot(self, strategy) -> None:
        self.old = copy.deepcopy(strategy.model).eval()
        for p in self.old.parameters():
            p.requires_grad_(False)

    def before_backward(self, strategy, **kwargs):
        if self.old is None or self.alpha == 0:
            return
        with torch.no_grad(), strategy.autocast():
            old = self.old(strategy.mb_x, strategy.head)
        strategy.loss += lwf_distillation(strategy.mb_output, old, self.t, weight=self.alpha)

    def after_training_exp(self, strategy, **kwargs):
        self.snapshot(strategy)

    def restore(self, strategy) -> None:
        # The teacher is the model as it stood after the last completed experience: the checkpoint.
        self.snapshot(strategy)


class Strategy(ClipStrategy):
    Params = Params

    def setup(self, model) -> None:
        unfreeze_towers(model, self.params.towers)

    def make_plugins(self):
        return [LwFPlugin(self.params.alpha, self.params.temperature)]
