"""One small adapter per Hugging Face image-text-to-text architecture: where its parts are and how a
picture enters it. :class:`~.vlm.VisionLanguageModel` reads everything architecture-specific from here.

Every VLM takes one fixed-size picture per question, ``[B, 3, S, S]`` normalised with the processor's
mean and std (the stream transform and :meth:`~.vlm.VisionLanguageModel.pixels_from_image` make it);
an adapter's ``pixel_inputs`` turns that tensor into the model's own keyword arguments (Qwen2-VL's
flattened patches and ``image_grid_thw``, LLaVA-NeXT's anyres patches and ``image_sizes``, Idefics3's
``pixel_attention_mask``; LLaVA's and BLIP-2's as they are). Adding an architecture is one
:class:`VlmAdapter` in :data:`ADAPTERS`, keyed by the model's ``config.model_type``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from ..errors import UserError

# llava-1.5's short-answer VQA prompt (Liu et al., "Improved Baselines with Visual Instruction Tuning",
# CVPR 2024, Table 7; the llava-hf model cards' "USER: <image>\n... ASSISTANT:" chat format)
LLAVA_15_TEMPLATE = "USER: <image>\n{question} Answer the question using a single word or phrase. ASSISTANT:"
SHORT_ANSWER = "Answer the question using a single word or phrase."
QWEN2_VL_TEMPLATE = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question} " + SHORT_ANSWER
                     + "<|im_end|>\n<|im_start|>assistant\n")
IDEFICS3_TEMPLATE = "User:<image>{question} " + SHORT_ANSWER + "<end_of_utterance>\nAssistant:"
BLIP2_TEMPLATE = "<image>Question: {question} Answer:"

# canonical linear name (the strategies' ``targets``) -> its path inside one decoder layer
LLAMA_LINEARS = {n: f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")} | \
                {n: f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")}
OPT_LINEARS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
               "o_proj": "self_attn.out_proj", "up_proj": "fc1", "down_proj": "fc2"}


def _vision_size(vlm) -> int:
    return int(vlm.model.config.vision_config.image_size)


def plain_pixels(vlm, x: torch.Tensor, input_ids: torch.Tensor) -> dict:
    return {"pixel_values": x}


def _probe_tokens(vlm) -> int:
    """How many image tokens the processor writes for one ``S x S`` picture (counted, not derived)."""
    from PIL import Image

    s = vlm.image_size
    enc = vlm.processor(text=[vlm.image_token], images=[Image.new("RGB", (s, s))], return_tensors="pt")
    return int((enc["input_ids"][0] == vlm.image_token_id).sum())


# ------------------------------------------------------------------------------------------- LLaVA
def _llava_tokens(vlm) -> int:
    cfg = vlm.model.config
    vc = cfg.vision_config
    return (vlm.image_size // vc.patch_size) ** 2 + (cfg.vision_feature_select_strategy == "full")


# ---------------------------------------------------------------------------------------- Qwen2-VL
def _qwen2_vl_factor(vlm) -> int:
    vc = vlm.model.config.vision_config
    return int(vc.patch_size * vc.spatial_merge_size)


def _qwen2_vl_size(vlm) -> int:
    """About 448 px (256 image tokens at patch 14, merge 2), a multiple of patch x merge, inside the
    processor's pixel range."""
    f = _qwen2_vl_factor(vlm)
    size = getattr(getattr(vlm.processor, "image_processor", None), "size", None)
    lo = getattr(size, "shortest_edge", None) or 56 * 56
    hi = getattr(size, "longest_edge", None) or 28 * 28 * 1280
    s = max(f, round(448 / f) * f)
    while s * s > hi and s > f:
        s -= f
    while s * s < lo:
        s += f
    return s


def _qwen2_vl_tokens(vlm) -> int:
    vc = vlm.model.config.vision_config
    return (vlm.image_size // vc.patch_size) ** 2 // vc.spatial_merge_size ** 2


def _qwen2_vl_pixels(vlm, x: torch.Tensor, input_ids: torch.Tensor) -> dict:
    """Qwen2-VL's layout: per image, patches in merge-window order, each patch flattened as
    (channel, time, row, column) with the single frame repeated over ``temporal_patch_size``; the grid
    and the image-token type of each position (for M-RoPE) beside them."""
    vc = vlm.model.config.vision_config
    p, m, t = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
    b, c, h, w = x.shape
    gh, gw = h // p, w // p
    x = x.reshape(b, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1).reshape(b * gh * gw, c * t * p * p)
    grid = torch.tensor([[1, gh, gw]] * b, dtype=torch.long, device=x.device)
    return {"pixel_values": x, "image_grid_thw": grid, "mm_token_type_ids": (input_ids == vlm.image_token_id).int()}


# -------------------------------------------------------------------------------------- LLaVA-NeXT
def _llava_next_pixels(vlm, x: torch.Tensor, input_ids: torch.Tensor) -> dict:
    """Anyres for an ``S x S`` picture: the picture itself, then the tiles of it resized into the best
    grid resolution and padded black (the processor's order: base first, tiles row-major)."""
    from transformers.image_processing_utils import select_best_resolution

    b, c, s, _ = x.shape
    th, tw = select_best_resolution((s, s), vlm.model.config.image_grid_pinpoints)
    nh = nw = min(th, tw)  # a square keeps its aspect ratio: it fills the grid's shorter side
    resized = torch.nn.functional.interpolate(x.float(), size=(nh, nw), mode="bicubic", align_corners=False)
    mean = torch.tensor(vlm.mean, device=x.device).view(1, c, 1, 1)
    std = torch.tensor(vlm.std, device=x.device).view(1, c, 1, 1)
    canvas = ((0 - mean) / std).expand(b, c, th, tw).clone()
    top, left = (th - nh) // 2, (tw - nw) // 2
    canvas[:, :, top:top + nh, left:left + nw] = resized
    tiles = [canvas[:, :, i:i + s, j:j + s] for i in range(0, th, s) for j in range(0, tw, s)]
    pixels = torch.stack([x.float(), *tiles], dim=1).to(x.dtype)
    sizes = torch.tensor([[s, s]] * b, dtype=torch.long, device=x.device)
    return {"pixel_values": pixels, "image_sizes": sizes}


# ---------------------------------------------------------------------------------------- Idefics3
def _idefics3_tokens(vlm) -> int:
    cfg = vlm.model.config
    return int((vlm.image_size // cfg.vision_config.patch_size) ** 2 // cfg.scale_factor ** 2)


def _idefics3_expand(vlm, n: int) -> str:
    """The global image alone (no splitting into tiles): ``<fake><global-img><image>*n<fake>``."""
    fake = getattr(vlm.processor, "fake_image_token", "<fake_token_around_image>")
    glob = getattr(vlm.processor, "global_image_tag", "<global-img>")
    return fake + glob + vlm.image_token * n + fake


def _idefics3_pixels(vlm, x: torch.Tensor, input_ids: torch.Tensor) -> dict:
    b, _, h, w = x.shape
    return {"pixel_values": x.unsqueeze(1), "pixel_attention_mask": torch.ones(b, 1, h, w, dtype=torch.bool,
                                                                               device=x.device)}


@dataclass(frozen=True)
class VlmAdapter:
    """Where an architecture keeps its parts (dotted paths from the transformers model) and how a
    picture enters it.

    ``language_model``: the decoder stack (it holds ``layers`` and the final norm ``final_norm``);
    ``linears``: canonical name (``q_proj`` ... ``down_proj``) -> path inside a decoder layer, for
    LoRA targeting (a name the architecture lacks is skipped); ``projector``: the vision-language
    projector (its input is the frozen vision feature CL-MoE's prototypes pool); ``vision_dim``: that
    input's width (None: the projector's first linear's ``in_features``); ``image_size``: the picture
    side S; ``num_image_tokens``: the image tokens one picture becomes; ``expand``: the text one image
    token becomes (None: the image token n times); ``image_wrap``: tokens the template puts around the
    image token, dropped with it in text-only prompts; ``pixel_inputs``: ``(vlm, [B, 3, S, S] pictures,
    input_ids)`` -> model keyword arguments; ``resizable``: any picture side that is a multiple of
    ``size_factor(vlm)`` works (``backbone.image_size``), not only the adapter's ``image_size``;
    ``padding_positions``: the decoder's positions follow from the padding alone, so LiveEdit may re-pad
    cached hidden states (False where the pictures move them: Qwen2-VL's M-RoPE); ``text_only``: the
    model answers prompts without a picture; ``image_before_bos``: the image tokens come before BOS
    (BLIP-2's query tokens); ``call_module``: the module that every forward pass and every generation
    step calls (``""``: the model; BLIP-2's ``generate`` calls its language model directly)."""

    model_class: str
    template: str
    language_model: str
    projector: str
    image_size: Callable = _vision_size
    num_image_tokens: Callable = _probe_tokens
    pixel_inputs: Callable = plain_pixels
    final_norm: str = "norm"
    linears: Mapping[str, str] = field(default_factory=lambda: dict(LLAMA_LINEARS))
    vision_dim: Callable | None = None
    expand: Callable | None = None
    image_wrap: tuple[str, str] = ("", "")
    resizable: bool = False
    size_factor: Callable | None = None
    padding_positions: bool = True
    text_only: bool = True
    image_before_bos: bool = False
    call_module: str = ""


ADAPTERS: dict[str, VlmAdapter] = {
    "llava": VlmAdapter(  # its own class: the shipped tiny LLaVA loads exactly as before
        model_class="LlavaForConditionalGeneration", template=LLAVA_15_TEMPLATE,
        language_model="model.language_model", projector="model.multi_modal_projector",
        num_image_tokens=_llava_tokens),
    "qwen2_vl": VlmAdapter(
        model_class="AutoModelForImageTextToText", template=QWEN2_VL_TEMPLATE,
        language_model="model.language_model", projector="model.visual.merger",
        image_size=_qwen2_vl_size, num_image_tokens=_qwen2_vl_tokens, pixel_inputs=_qwen2_vl_pixels,
        vision_dim=lambda vlm: int(vlm.model.config.vision_config.embed_dim),
        image_wrap=("<|vision_start|>", "<|vision_end|>"), resizable=True, size_factor=_qwen2_vl_factor,
        padding_positions=False),
    "llava_next": VlmAdapter(
        model_class="AutoModelForImageTextToText", template=LLAVA_15_TEMPLATE,
        language_model="model.language_model", projector="model.multi_modal_projector",
        pixel_inputs=_llava_next_pixels),
    "idefics3": VlmAdapter(
        model_class="AutoModelForImageTextToText", template=IDEFICS3_TEMPLATE,
        language_model="model.text_model", projector="model.connector",
        num_image_tokens=_idefics3_tokens, pixel_inputs=_idefics3_pixels, expand=_idefics3_expand,
        vision_dim=lambda vlm: int(vlm.model.config.vision_config.hidden_size)),
    "blip-2": VlmAdapter(  # with a decoder-only (OPT) language model
        model_class="Blip2ForConditionalGeneration", template=BLIP2_TEMPLATE,
        language_model="language_model.model.decoder", final_norm="final_layer_norm", linears=OPT_LINEARS,
        projector="language_projection", num_image_tokens=lambda vlm: int(vlm.model.config.num_query_tokens),
        text_only=False, image_before_bos=True, call_module="language_model"),
}


def adapter_for(model_type: str, source: str = "") -> VlmAdapter:
    """The adapter of a transformers ``model_type``; an unsupported one is one UserError."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UserError(f"backbone.name: {source!r} is a {model_type!r} model; the vlm family loads "
                        f"{', '.join(sorted(ADAPTERS))} (an architecture is one VlmAdapter in "
                        "lifelong_moe/backbones/vlm_adapters.py)") from None


def resolve(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule at dotted ``path`` of ``root`` (``""``: root itself)."""
    for part in filter(None, path.split(".")):
        root = getattr(root, part)
    return root
