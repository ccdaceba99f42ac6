"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017), eq. (3), on the trained tower:

    L = CE + (lambda / 2) * sum_k sum_i F_{k,i} (theta_i - theta*_{k,i})^2,

with one diagonal empirical Fisher F_k and anchor theta*_k per past experience k
(``mode: separate``), or a single running pair (``mode: online``, Schwarz et al. 2018:
F <- gamma F + F_k, theta* <- theta*_k). F_k is the mean squared gradient of the training loss
over up to ``fisher_batches`` minibatches of experience k, estimated in eval mode (no dropout)
with the class text features re-encoded per batch when the text tower trains, so that the
gradient reaches its parameters (eval mode alone would use the cached, detached features).
"""
from typing import Literal

import torch
from avalanche.core import SupervisedPlugin
from pydantic import Field
from torch.utils.data import DataLoader

from lifelong_moe.runtime import distributed

from .base import ClipStrategy, StatefulPlugin, StrategyParams
from .finetune import unfreeze_towers


class Params(StrategyParams):
    name: Literal["ewc"] = "ewc"
    ewc_lambda: float = Field(100.0, ge=0)
    mode: Literal["separate", "online"] = "separate"
    decay: float = Field(1.0, ge=0)
    fisher_batches: int = Field(16, gt=0)
    towers: list[Literal["image", "text"]] = Field(["image"], min_length=1)


class EWCPlugin(SupervisedPlugin, StatefulPlugin, supports_distributed=True):  # Fisher reduced: docs/distributed.md
    def __init__(self, params: Params):
        super().__init__()
        self.p = params
        self.terms: list[tuple[dict, dict]] = []  # (fisher, anchor) per past experience

    def before_backward(self, strategy, **kwargs):
        if not self.terms or self.p.ewc_lambda == 0:
            return
        named = dict(strategy.model.named_parameters())
        penalty = strategy.loss.new_zeros(())
        for fisher, anchor in self.terms:
            for n, f in fisher.items():
                penalty = penalty + (f * (named[n] - anchor[n]) ** 2).sum()
        strategy.loss += 0.5 * self.p.ewc_lambda * penalty

    def after_training_exp(self, strategy, **kwargs):
        model = strategy.model
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        g = torch.Generator().manual_seed(strategy.cfg.seed + 17 * strategy.experience_index)
        loader = DataLoader(strategy.experience.dataset, batch_size=strategy.train_mb_size, shuffle=True, generator=g)
        model.eval()
        text_trains = model.text_tower_trainable()
        n_batches = 0
        for b, (x, y, *_) in enumerate(loader):
            if b >= self.p.fisher_batches:
                break
            if b % distributed.world() != distributed.rank():  # torchrun: batches dealt out, summed below
                continue
            model.zero_grad()
            if text_trains:  # uncached class features: the gradient flows through the text tower
                text = model.encode_head(strategy.head)
                out = model.logit_scale * model.encode_image(x.to(strategy.device)) @ text.t()
            else:
                out = model(x.to(strategy.device), strategy.head)
            torch.nn.functional.cross_entropy(out, strategy.target_map[y.to(strategy.device)]).backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach() ** 2
            n_batches += 1
        model.zero_grad()
        fisher = distributed.sum_dict(fisher, strategy.device)
        n_batches = int(distributed.sum_(torch.tensor(n_batches, device=strategy.device)))
        fisher = {n: f / max(1, n_batches) for n, f in fisher.items()}
        anchor = {n: p.detach().clone() for n, p in params.items()}
        if self.p.mode == "online" and self.terms:
            old_f, _ = self.terms[0]
            fisher = {n: self.p.decay * old_f[n] + f for n, f in fisher.items()}
            self.terms = []
        self.terms.append((fisher, anchor))

    def state_dict(self):
        out = {}
        for k, (fisher, anchor) in enumerate(self.terms):
            out.update({f"{k}.fisher.{n}": v for n, v in fisher.items()})
            out.update({f"{k}.anchor.{n}": v for n, v in anchor.items()})
        return out

    def load_state_dict(self, state):
        ks = sorted({int(k.split(".", 1)[0]) for k in state})
        self.terms = []
        for k in ks:
            f = {n[len(f"{k}.fisher."):]: v for n, v in state.items() if n.startswith(f"{k}.fisher.")}
            a = {n[len(f"{k}.anchor."):]: v for n, v in state.items() if n.startswith(f"{k}.anchor.")}
            self.terms.append((f, a))

    def restore(self, strategy) -> None:
        device = strategy.device  # checkpoints hold CPU copies
        self.terms = [({n: v.to(device) for n, v in f.items()}, {n: v.to(device) for n, v in a.items()})
                      for f, a in self.terms]


class Strategy(ClipStrategy):
    Params = Params

    def setup(self, model) -> None:
        unfreeze_towers(model, self.params.towers)

    def make_plugins(self):
        return [EWCPlugin(self.params)]
