"""The ``clip`` family: a frozen open_clip CLIP with its prompt classifier, on classification streams."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field

from ..schema import Strict, Template
from .base import BackboneFamily


class ClipBackboneConfig(Strict):
    """A CLIP backbone as open_clip users name it: ``name`` plus ``pretrained`` (tag or path)."""

    family: Literal["clip"] = "clip"
    name: str = "lmoe-tiny-vit"
    pretrained: Optional[str] = None  # open_clip tag, checkpoint path, or "synthetic" (pretrained here, cached)
    pretrain: Optional[dict[str, Any]] = None  # with pretrained: synthetic, overrides of PretrainConfig
    # QuickGELU activations (OpenAI's CLIP weights were trained with them); None: decided from the
    # weights (an open_clip tag trained with QuickGELU, e.g. openai, or a "-quickgelu" model name)
    quick_gelu: Optional[bool] = None
    templates: list[Template] = Field(["a photo of a {}."], min_length=1)
    dataset_templates: bool = True  # prefer a dataset's own templates when it ships some
    cache_text_features: bool = True


FAMILY = BackboneFamily(
    name="clip",
    description="open_clip CLIP (classification streams)",
    config=ClipBackboneConfig,
    task_kind="classification",
    loader="lifelong_moe.backbones.factory:build_clip",
    prepare="lifelong_moe.backbones.factory:prepare_embedded",
    embedded="lifelong_moe.backbones.pretrain_clip:resolve_synthetic",
    evaluator="lifelong_moe.evaluation.evaluator:ClassificationEvaluator",
    base_strategy="lifelong_moe.strategies.base:ClipStrategy",
    strategies={"zeroshot": "zeroshot", "finetune": "finetune", "lora": "lora", "lwf": "lwf", "ewc": "ewc",
                "replay": "replay", "moe_adapters": "moe_adapters", "cl_moe": "cl_moe_clip"},
)
