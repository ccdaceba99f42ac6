"""The ``vlm`` family: a frozen Hugging Face LLaVA-style generative VLM, on VQA streams."""
from __future__ import annotations

from typing import Any, Literal, Optional

from ..schema import Strict
from .base import BackboneFamily


class VlmBackboneConfig(Strict):
    """A generative VLM as Hugging Face users name it: ``name`` is a hub id or a local directory
    (``from_pretrained``), or a shipped tiny model (``lmoe-tiny-llava``) with ``pretrained: synthetic``
    (pretrained here on the synthetic world, cached). Nothing is downloaded unless ``download``."""

    family: Literal["vlm"]
    name: str = "lmoe-tiny-llava"
    pretrained: Optional[str] = None  # "synthetic" for the shipped tiny model; None: the name's own weights
    pretrain: Optional[dict[str, Any]] = None  # with pretrained: synthetic, overrides of the VLM pretraining config
    download: bool = False
    prompt_template: Optional[str] = None  # None: the model's own ("{question}" is replaced)


FAMILY = BackboneFamily(
    name="vlm",
    description="Hugging Face LLaVA-style generative VLM (vqa streams)",
    config=VlmBackboneConfig,
    task_kind="vqa",
    loader="lifelong_moe.backbones.factory:build_vlm",
    prepare="lifelong_moe.backbones.factory:prepare_embedded",
    embedded="lifelong_moe.backbones.pretrain_vlm:resolve_synthetic_vlm",
    evaluator="lifelong_moe.evaluation.vqa_evaluator:VqaEvaluator",
    base_strategy="lifelong_moe.strategies.vlm_base:VlmStrategy",
    strategies={"zeroshot": "vlm_zeroshot", "lora": "vlm_lora", "lwf": "vlm_lwf", "replay": "vlm_replay",
                "cl_moe": "cl_moe"},
)
