"""What a backbone family is: everything the pipeline needs to know about one kind of frozen backbone,
declared in one place (its config section, loader, evaluator, base strategy and strategies).

The implementations are named as ``"module:attribute"`` strings and imported on first use, as
strategies and editing methods are: declaring a family stays light (the config schema imports it),
and the heavy modules it names (torch, open_clip, transformers) import the config, not the reverse.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field


def resolve(ref: str):
    """``"package.module:attribute"`` -> the attribute."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class BackboneFamily:
    name: str  # the value of ``backbone.family``
    description: str  # one line for ``lifelong-moe list``
    config: type  # its ``backbone`` config section (a :class:`~lifelong_moe.schema.Strict` model)
    task_kind: str  # what the streams it answers ask (``classification``, ``vqa``; see config.TASK_KINDS)
    loader: str  # "module:function": (config section, progress) -> the frozen backbone
    prepare: str  # "module:function": (config section, progress) -> None; readies embedded weights once
    embedded: str  # "module:function": (name, pretrain overrides, progress) -> checkpoint of the embedded model
                   # pretrained on the synthetic world (shipped, cached, or trained on first use)
    evaluator: str  # "module:Class": (stream, evaluation config, progress) scores one matrix cell
    base_strategy: str  # "module:Class" every strategy of the family derives from
    strategies: dict[str, str] = field(default_factory=dict)  # strategy name -> module under lifelong_moe.strategies

    def load(self, section, progress: bool = True):
        return resolve(self.loader)(section, progress)

    def prepare_assets(self, section, progress: bool = True) -> None:
        resolve(self.prepare)(section, progress)

    def embedded_checkpoint(self, name: str, pretrain: dict | None = None, progress: bool = True) -> str:
        return resolve(self.embedded)(name, pretrain, progress)

    def make_evaluator(self, stream, cfg, progress: bool = True):
        return resolve(self.evaluator)(stream, cfg, progress)

    def base_strategy_class(self):
        return resolve(self.base_strategy)
