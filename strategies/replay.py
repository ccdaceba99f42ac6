"""Experience replay (Chaudhry et al., 2019 "On Tiny Episodic Memories"): a memory of
``memory_size`` training samples split evenly over the experiences seen so far; every step adds the
loss of a replayed minibatch, each sample scored against its own experience's head:

    L = CE(current batch) + weight * CE(replay batch).

Fine-tunes the image tower (or both towers) like ``finetune``. The memory stores sample indices,
not images, so it is small to checkpoint.
"""
from typing import Literal

import torch
from avalanche.core import SupervisedPlugin
from pydantic import Field

from .base import ClipStrategy, StatefulPlugin, StrategyParams
from .finetune import unfreeze_towers


class Params(StrategyParams):
    name: Literal["replay"] = "replay"
    memory_size: int = Field(200, gt=0)
    replay_batch_size: int | None = Field(None, gt=0)  # default: the training batch size
    weight: float = Field(1.0, ge=0)
    towers: list[Literal["image", "text"]] = Field(["image"], min_length=1)


class ReplayPlugin(SupervisedPlugin, StatefulPlugin, supports_distributed=True):  # docs/distributed.md
    def __init__(self, params: Params):
        super().__init__()
        self.p = params
        self.memory: dict[int, torch.Tensor] = {}  # experience -> indices into its train set
        self.rng: torch.Generator | None = None

    def before_training_exp(self, strategy, **kwargs):
        self.rng = torch.Generator().manual_seed(strategy.cfg.seed * 31 + strategy.experience_index)

    def before_backward(self, strategy, **kwargs):
        if not self.memory or self.p.weight == 0:
            return
        pool = [(e, int(i)) for e, idx in sorted(self.memory.items()) for i in idx]
        bs = self.p.replay_batch_size or strategy.train_mb_size
        pick = torch.randperm(len(pool), generator=self.rng)[:bs].tolist()
        by_exp: dict[int, list[int]] = {}
        for k in pick:
            e, i = pool[k]
            by_exp.setdefault(e, []).append(i)
        groups = []
        for e, idx in by_exp.items():
            ds = strategy.train_datasets[e]
            groups.append((strategy.tasks[e], torch.stack([ds[i][0] for i in idx]),
                           torch.as_tensor([int(ds[i][1]) for i in idx])))
        strategy.loss += self.p.weight * strategy.loss_on(groups)

    def after_training_exp(self, strategy, **kwargs):
        e = strategy.experience_index
        seen = sorted(set(self.memory) | {e})
        quota = self.p.memory_size // len(seen)
        for k in seen[:-1]:
            self.memory[k] = self.memory[k][:quota]  # indices are already a random order
        g = torch.Generator().manual_seed(strategy.cfg.seed * 131 + e)
        n = len(strategy.train_datasets[e])
        self.memory[e] = torch.randperm(n, generator=g)[:quota]

    def state_dict(self):
        return {str(e): idx for e, idx in self.memory.items()}

    def load_state_dict(self, state):
        self.memory = {int(e): idx for e, idx in state.items()}


class Strategy(ClipStrategy):
    Params = Params
    cost_hint = 1.4  # current and replayed mini-batches

    def setup(self, model) -> None:
        unfreeze_towers(model, self.params.towers)

    def make_plugins(self):
        return [ReplayPlugin(self.params)]
