"""Frozen CLIP backbone over open_clip and its prompt classifier head.

A backbone is named as open_clip users name it: ``name`` plus ``pretrained`` (an open_clip tag such
as ``openai`` or a local checkpoint path). Tiny configs shipped in ``model_configs/`` are
registered with ``open_clip.add_model_config`` so that tests and the offline default need no
download. The classifier is CLIP's own head: ``logit_scale * cos(image, text(class prompt))``
against the class names in play, with no extra linear layer (as in ZSCL / MoE-Adapters).
"""
from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_REGISTERED = False


def register_model_configs() -> None:
    """Make the package's tiny open_clip model configs known to open_clip (idempotent)."""
    global _REGISTERED
    if not _REGISTERED:
        import open_clip

        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _REGISTERED = True


def shipped_model_names() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def _looks_like_path(s: str) -> bool:
    return "/" in s or "\\" in s or s.endswith((".pt", ".pth", ".bin", ".safetensors"))


def resolve_quick_gelu(name: str, pretrained: str | None, quick_gelu: bool | None = None) -> bool:
    """Whether ``name`` with weights ``pretrained`` is built with QuickGELU (``x * sigmoid(1.702 x)``).

    OpenAI trained CLIP with QuickGELU, but open_clip builds e.g. ``ViT-B-16`` with ``nn.GELU`` even
    for ``pretrained=openai`` (it only warns), which shifts every feature. ``None`` (auto): True when
    the open_clip tag was trained with it (its pretrained config says so: ``openai``, ``dfn2b``,
    ``metaclip_*``) or the model's own config uses it (the ``-quickgelu`` names); a local checkpoint
    path cannot tell, so auto gives False there: set ``backbone.quick_gelu: true`` for a local copy
    of OpenAI's weights."""
    import open_clip

    register_model_configs()
    model_cfg = open_clip.get_model_config(name) or {}
    built_in = bool(model_cfg.get("quick_gelu", False))
    if quick_gelu is False and built_in:
        raise UserError(f"backbone.quick_gelu: false, but open_clip's {name!r} is always built with QuickGELU; "
                        f"use the name without '-quickgelu' or drop the key")
    if quick_gelu is not None:
        return quick_gelu
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) if pretrained and not _looks_like_path(pretrained) else {}
    return built_in or bool((tag_cfg or {}).get("quick_gelu", False))


def create_clip(name: str, pretrained: str | None, quick_gelu: bool | None = None):
    """Return ``(model, tokenizer, image_size, mean, std)``; every failure is a UserError.
    ``pretrained``: an open_clip tag, a checkpoint path or None (random init); the embedded
    ``synthetic`` weights are resolved to a path first (:func:`lifelong_moe.backbones.factory.load_clip`).
    ``quick_gelu``: see :func:`resolve_quick_gelu`."""
    import open_clip

    register_model_configs()
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        raise UserError(f"backbone.name: unknown open_clip model {name!r}"
                        + (f" (did you mean {', '.join(map(repr, close))}?)" if close else "")
                        + f"; shipped tiny models: {', '.join(shipped_model_names())}")
    force_quick_gelu = resolve_quick_gelu(name, pretrained, quick_gelu)
    if pretrained is not None and _looks_like_path(pretrained):
        if not Path(pretrained).expanduser().is_file():
            raise UserError(f"backbone.pretrained: checkpoint file not found: {pretrained}")
        pretrained = str(Path(pretrained).expanduser())
    elif pretrained is not None:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise UserError(f"backbone.pretrained: {pretrained!r} is neither an existing file nor an "
                            f"open_clip tag of {name!r} (tags: {', '.join(tags) or 'none'})")
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # "no weights" chatter
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained,
                                                                     force_quick_gelu=force_quick_gelu)
    except Exception as e:  # offline download failure, corrupt file, shape mismatch
        hint = ("" if pretrained is None or _looks_like_path(pretrained) else
                " The weights of an open_clip tag are downloaded on first use; on a machine without "
                "network, download them elsewhere (they land in the Hugging Face cache) or set "
                "backbone.pretrained to a local checkpoint path.")
        raise UserError(f"could not load backbone {name!r} with pretrained={pretrained!r}: "
                        f"{type(e).__name__}: {e}.{hint}") from None
    finally:
        root.setLevel(level)
    tokenizer = open_clip.get_tokenizer(name)
    vis = model.visual
    size = vis.image_size if isinstance(vis.image_size, int) else vis.image_size[0]
    return (model, tokenizer, int(size), *image_stats(model))


def image_stats(model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` the image tower expects its inputs normalised with (OpenAI's by default)."""
    vis = model.visual
    mean = getattr(vis, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
    std = getattr(vis, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
    return tuple(mean), tuple(std)


def encode_text(clip: nn.Module, tokens: torch.Tensor, buckets: int = 1) -> torch.Tensor:
    """``clip.encode_text(tokens)`` (unnormalised) without the padding after the longest prompt.

    In open_clip's CLIP text tower attention is causal and the feature is read at the EOT token
    (the argmax of the ids), so no position up to EOT sees the padding after it: running only the
    first ``max(EOT) + 1`` positions gives the same features for a fraction of the work (prompts are
    ~10 tokens in a context of 20 or 77). ``buckets > 1`` sorts prompts by length and trims each
    group separately. Other text towers (no causal mask, other pooling) take open_clip's path.
    ``tokens`` may stay on the CPU (the tokenizer's output): they are trimmed there and then moved to
    the model's device, so trimming costs no host synchronisation."""
    mask = getattr(clip, "attn_mask", None)
    if (getattr(clip, "text_pool_type", None) != "argmax" or not isinstance(mask, torch.Tensor)
            or not hasattr(clip, "token_embedding") or tokens.shape[0] == 0):
        return clip.encode_text(tokens.to(next(clip.parameters(), tokens).device))
    if buckets <= 1:
        return _encode_text_trimmed(clip, tokens)
    out = None
    for rows in tokens.argmax(dim=-1).argsort().tensor_split(min(buckets, tokens.shape[0])):
        x = _encode_text_trimmed(clip, tokens[rows])
        out = (x.new_empty(tokens.shape[0], x.shape[1]) if out is None else out).index_copy(0, rows.to(x.device), x)
    return out


def _encode_text_trimmed(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` on the first ``max(EOT) + 1`` positions only."""
    n = int(tokens.argmax(dim=-1).max()) + 1
    t = tokens[:, :n].to(clip.token_embedding.weight.device)
    cast = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(t).to(cast) + clip.positional_embedding[:n].to(cast)
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:n, :n]))
    x = x[torch.arange(x.shape[0], device=x.device), t.argmax(dim=-1)]
    proj = clip.text_projection
    return x if proj is None else (proj(x) if isinstance(proj, nn.Linear) else x @ proj)


@dataclass(frozen=True)
class Head:
    """The classes in play for one forward pass: names, their prompt templates, a cache key."""

    class_names: tuple[str, ...]
    templates: tuple[str, ...]

    @property
    def key(self) -> tuple:
        return (self.class_names, self.templates)


class ClipClassifier(nn.Module):
    """CLIP image and text towers plus the prompt head. Every backbone weight starts frozen.

    Adapters (LoRA, MoE experts) are injected into ``self.clip``'s blocks by strategies; they
    switch ``requires_grad`` on for what they train.
    """

    def __init__(self, clip: nn.Module, tokenizer, image_size: int, mean, std, cache_text: bool = True):
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.cache_text = cache_text
        self._text_cache: dict[tuple, torch.Tensor] = {}
        for p in self.clip.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_config(cls, name: str, pretrained: str | None, cache_text: bool = True,
                    quick_gelu: bool | None = None) -> "ClipClassifier":
        return cls(*create_clip(name, pretrained, quick_gelu), cache_text=cache_text)

    # ------------------------------------------------------------------ towers
    def check_images(self, x: torch.Tensor) -> None:
        s = self.image_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != s or x.shape[3] != s:
            raise ValueError(f"images must have shape [batch, 3, {s}, {s}] for this backbone, "
                             f"got {list(x.shape)}")

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        self.check_images(x)
        return F.normalize(self.clip.encode_image(x), dim=-1)

    def text_tower_trainable(self) -> bool:
        return any(p.requires_grad for n, p in self.clip.named_parameters() if not n.startswith("visual."))

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts))  # on the CPU: encode_text trims, then moves them
        return F.normalize(encode_text(self.clip, tokens), dim=-1)

    def encode_head(self, head: Head) -> torch.Tensor:
        """Class embeddings of ``head``, uncached: mean of normalised prompt features over templates,
        renormalised."""
        prompts = [t.format(c) for c in head.class_names for t in head.templates]
        feats = self.encode_prompts(prompts).view(len(head.class_names), len(head.templates), -1)
        return F.normalize(feats.mean(dim=1), dim=-1)

    def text_features(self, head: Head) -> torch.Tensor:
        """Class embeddings: mean of normalised prompt features over templates, renormalised. Cached
        in fp32 on the model's device (whatever autocast they were computed under)."""
        cacheable = self.cache_text and not (self.training and self.text_tower_trainable())
        if cacheable and head.key in self._text_cache:
            return self._text_cache[head.key]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not cacheable):
            feats = self.encode_head(head)
        if cacheable:
            feats = self._text_cache[head.key] = feats.detach().float()
        return feats

    def _apply(self, fn, *args, **kwargs):
        self._text_cache.clear()  # .to(device) / dtype casts: cached features belong to the old ones
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True) -> "ClipClassifier":
        if mode and self.text_tower_trainable():
            self._text_cache.clear()
        return super().train(mode)

    def clear_text_cache(self) -> None:
        self._text_cache.clear()

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def forward(self, x: torch.Tensor, head: Head) -> torch.Tensor:
        """Eq. (CLIP): logits = s * <f_img(x), f_txt(prompt(c))> for every class c of ``head``."""
        return self.logit_scale * self.encode_image(x) @ self.text_features(head).t()
