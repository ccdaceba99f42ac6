"""The ``vlm`` family: a frozen Hugging Face image-text-to-text VLM, on VQA streams."""
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
    image_size: Optional[int] = None  # picture side for any-resolution models (Qwen2-VL); None: the model's
    # the frozen weights' dtype; bf16 / fp16 compute under autocast in that dtype (runtime.precision
    # defaults to it), trainable state (adapters, experts, generators) stays fp32
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"


FAMILY = BackboneFamily(
    name="vlm",
    description="Hugging Face image-text-to-text VLM: LLaVA, Qwen2-VL, LLaVA-NeXT, Idefics3, BLIP-2 (vqa streams)",
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
