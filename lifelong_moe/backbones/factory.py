"""How a config's ``backbone`` section becomes a frozen model, and which images it eats (the loaders
that :mod:`lifelong_moe.families` names).

``clip``: a frozen open_clip CLIP with its prompt classifier (:class:`lifelong_moe.backbones.clip.ClipClassifier`).
``vlm``: a frozen Hugging Face LLaVA-style generative VLM (:class:`lifelong_moe.backbones.vlm.VisionLanguageModel`).
``pretrained: synthetic`` names the embedded tiny models pretrained on the synthetic world: it is
resolved first, by the family's ``embedded`` resolver, to their shipped weights (:mod:`.shipped`) or,
for another recipe, their cached checkpoint (:mod:`.pretrain_clip`, :mod:`.pretrain_vlm`), so the
loaders below it take the path a real checkpoint takes.
"""
from __future__ import annotations

from ..errors import UserError

SYNTHETIC = "synthetic"  # pretrained=synthetic: the embedded model pretrained on the offline synthetic world


def resolve_embedded(family: str, name: str, pretrained: str | None, pretrain: dict | None = None,
                     progress: bool = True) -> str | None:
    """``pretrained`` as a loader takes it: ``synthetic`` becomes the checkpoint of the family's embedded
    model (its ``embedded`` resolver: the shipped weights, or, with ``pretrain`` overriding the recipe,
    cached or trained on first use); anything else is returned as is."""
    if pretrained != SYNTHETIC:
        if pretrain:
            raise UserError("backbone.pretrain is only used with backbone.pretrained: synthetic")
        return pretrained
    from ..families import FAMILIES

    return FAMILIES[family].embedded_checkpoint(name, pretrain, progress)


def load_clip(name: str, pretrained: str | None, *, cache_text: bool = True, pretrain: dict | None = None,
              progress: bool = True, quick_gelu: bool | None = None):
    """A frozen :class:`~.clip.ClipClassifier` (``pretrained``: open_clip tag, checkpoint path, ``synthetic``
    or None)."""
    from .clip import ClipClassifier, resolve_quick_gelu

    quick_gelu = resolve_quick_gelu(name, pretrained, quick_gelu)  # decided on the name the user gave
    return ClipClassifier.from_config(name, resolve_embedded("clip", name, pretrained, pretrain, progress),
                                      cache_text, quick_gelu=quick_gelu)


def load_vlm(name: str, pretrained: str | None = None, *, pretrain: dict | None = None, download: bool = False,
             prompt_template: str | None = None, progress: bool = True, dtype=None, image_size: int | None = None):
    """A frozen :class:`~.vlm.VisionLanguageModel` (``name``: shipped tiny VLM, hub id or directory;
    ``pretrained``: for a shipped name, ``synthetic``, a directory of its weights or None). ``dtype``:
    the frozen weights' dtype, ``fp32`` / ``bf16`` / ``fp16`` or a torch dtype (None: fp32, whatever
    dtype a checkpoint was saved in)."""
    import torch

    from ..runtime.device import PRECISIONS
    from .vlm import VisionLanguageModel

    dtype = PRECISIONS[dtype] if isinstance(dtype, str) else (dtype or torch.float32)
    return VisionLanguageModel.from_config(name, resolve_embedded("vlm", name, pretrained, pretrain, progress),
                                           download=download, prompt_template=prompt_template, dtype=dtype,
                                           image_size=image_size)


def build_clip(b, progress: bool = True):
    """The ``clip`` family's loader: a validated ``backbone`` section -> :class:`~.clip.ClipClassifier`."""
    return load_clip(b.name, b.pretrained, cache_text=b.cache_text_features, pretrain=b.pretrain,
                     progress=progress, quick_gelu=b.quick_gelu)


def build_vlm(b, progress: bool = True):
    """The ``vlm`` family's loader: a validated ``backbone`` section -> :class:`~.vlm.VisionLanguageModel`."""
    return load_vlm(b.name, b.pretrained, pretrain=b.pretrain, download=b.download,
                    prompt_template=b.prompt_template, progress=progress, image_size=b.image_size,
                    dtype=getattr(b, "dtype", "fp32"))


def prepare_embedded(b, progress: bool = True) -> None:
    """Pretrain (or find cached) the embedded backbone a ``backbone`` section names, so that parallel
    variants find it ready instead of each training it."""
    if b.pretrained == SYNTHETIC:
        resolve_embedded(b.family, b.name, b.pretrained, b.pretrain, progress)


def image_transform(model, augment: str = "none"):
    """The stream-side preprocessing the backbone expects: resize, centre crop, normalise (and, for
    training images, ``augment``: see :class:`~lifelong_moe.streams.transforms.ImageTransform`)."""
    import torch

    from ..streams.transforms import ImageTransform

    mean, std = (torch.as_tensor(v).flatten().tolist() for v in (model.mean, model.std))  # buffers or tuples
    return ImageTransform(model.image_size, mean, std, augment)
