"""Backbone families: how a config's ``backbone`` section becomes a model, and which images it eats.

``clip``: a frozen open_clip CLIP with its prompt classifier (:class:`lifelong_moe.clip.ClipClassifier`).
``vlm``: a frozen Hugging Face LLaVA-style generative VLM (:class:`lifelong_moe.vlm.VisionLanguageModel`).
The runner, results, metrics and compare are the same for both; strategies declare their family in
:data:`lifelong_moe.registry.STRATEGIES`.
"""
from __future__ import annotations


def build_backbone(b, progress: bool = True):
    """The frozen backbone a ``backbone`` config section names (every failure is a UserError)."""
    if b.family == "vlm":
        from .vlm import VisionLanguageModel

        return VisionLanguageModel.from_config(b.name, b.pretrained, pretrain=b.pretrain, download=b.download,
                                               prompt_template=b.prompt_template, progress=progress)
    from .clip import ClipClassifier

    return ClipClassifier.from_config(b.name, b.pretrained, b.cache_text_features, b.pretrain, progress,
                                      quick_gelu=b.quick_gelu)


def prepare_assets(b, progress: bool = True) -> None:
    """Pretrain (or find cached) the embedded backbone a config names, so that parallel variants
    find it ready instead of each training it."""
    if b.pretrained != "synthetic":
        return
    if b.family == "vlm":
        from .pretrain_vlm import resolve_synthetic_vlm

        resolve_synthetic_vlm(b.name, b.pretrain, progress=progress)
    else:
        from .clip import resolve_synthetic

        resolve_synthetic(b.name, b.pretrain, progress=progress)


def image_transform(model, augment: str = "none"):
    """The stream-side preprocessing the backbone expects: resize, centre crop, normalise (and, for
    training images, ``augment``: see :class:`~lifelong_moe.streams.transforms.ImageTransform`)."""
    import torch

    from .streams.transforms import ImageTransform

    mean, std = (torch.as_tensor(v).flatten().tolist() for v in (model.mean, model.std))  # buffers or tuples
    return ImageTransform(model.image_size, mean, std, augment)
