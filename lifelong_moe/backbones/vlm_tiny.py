"""The embedded tiny LLaVA (``lmoe-tiny-llava``), built from configs shipped in ``model_configs/vlm/``.

LLaVA's recipe (Liu et al., "Visual Instruction Tuning", NeurIPS 2023, Sec. 4.1): a CLIP vision
tower under an LLM, joined by a projector. Here the vision tower is the embedded tiny CLIP's image
tower (``lmoe-tiny-vit``, open_clip) converted to transformers' ``CLIPVisionModel``
(:func:`convert_open_clip_visual`) read at its penultimate layer as LLaVA does (``vision_feature_layer
-2``; CLS kept: 17 image tokens; measured: location 93% / colour 84% zero-shot after pretraining vs
57% / 44% from the last layer), the projector LLaVA-1.5's two-layer MLP, the LLM a tiny Llama
decoder, the tokenizer word-level over the synthetic world (:mod:`.vlm_tokenizer`). The result is a
plain ``LlavaForConditionalGeneration`` + ``LlavaProcessor``: ``save_pretrained`` writes a directory
any transformers user can load.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

VLM_CONFIG_DIR = Path(__file__).parent / "model_configs" / "vlm"


def shipped_vlm_names() -> list[str]:
    return sorted(p.stem for p in VLM_CONFIG_DIR.glob("*.json"))


def tiny_spec(name: str) -> dict:
    """The shipped config of tiny VLM ``name`` (``model_configs/vlm/<name>.json``)."""
    path = VLM_CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        close = difflib.get_close_matches(name, shipped_vlm_names(), n=1, cutoff=0.5)
        raise UserError(f"unknown tiny VLM {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                        + f"; shipped: {', '.join(shipped_vlm_names())}")
    return json.loads(path.read_text())


def tiny_words(spec: dict) -> list[str]:
    """Words of the tiny VLM's vocabulary: the world's plus those of its prompts."""
    from .vlm_tokenizer import IMAGE_TOKEN, world_vocabulary

    template = spec["prompt_template"].replace("{question}", " ").replace(IMAGE_TOKEN, " ")
    return world_vocabulary() + [template, spec["caption_question"]]


# ----------------------------------------------------------------------------- open_clip -> transformers
def clip_vision_config_of(open_clip_cfg: dict, act: str = "gelu"):
    """transformers ``CLIPVisionConfig`` with the geometry of an open_clip ViT config."""
    from transformers import CLIPVisionConfig

    v = open_clip_cfg["vision_cfg"]
    width = v["width"]
    return CLIPVisionConfig(hidden_size=width, intermediate_size=int(width * v.get("mlp_ratio", 4.0)),
                            num_hidden_layers=v["layers"], num_attention_heads=width // v.get("head_width", 64),
                            image_size=v["image_size"], patch_size=v["patch_size"], hidden_act=act,
                            layer_norm_eps=1e-5)


def convert_open_clip_visual(visual: nn.Module) -> dict[str, torch.Tensor]:
    """open_clip ``VisionTransformer`` weights as a ``CLIPVisionModel`` state dict.

    The two implement the same ViT (Radford et al. 2021): conv1 -> patch_embedding, class and
    position embeddings, ln_pre -> pre_layrnorm, per block ln_1/ln_2 -> layer_norm1/2, the packed
    ``in_proj`` split into q/k/v, out_proj, mlp c_fc/c_proj -> fc1/fc2, ln_post -> post_layernorm.
    open_clip's ``proj`` (the CLIP embedding head) has no counterpart: LLaVA reads hidden states."""
    sd = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    blocks = visual.transformer.resblocks
    for i, blk in enumerate(blocks):
        if not isinstance(blk.attn, nn.MultiheadAttention) or not isinstance(blk.ls_1, nn.Identity):
            raise ValueError("only open_clip ViTs with plain nn.MultiheadAttention and no layer scale convert")
    if getattr(visual, "attn_pool", None) is not None or visual.pool_type != "tok":
        raise ValueError("only open_clip ViTs pooling the class token convert")
    pre = ""
    out = {pre + "embeddings.class_embedding": sd["class_embedding"],
           pre + "embeddings.patch_embedding.weight": sd["conv1.weight"],
           pre + "embeddings.position_embedding.weight": sd["positional_embedding"],
           pre + "pre_layrnorm.weight": sd["ln_pre.weight"], pre + "pre_layrnorm.bias": sd["ln_pre.bias"],
           pre + "post_layernorm.weight": sd["ln_post.weight"], pre + "post_layernorm.bias": sd["ln_post.bias"]}
    for i in range(len(blocks)):
        src, dst = f"transformer.resblocks.{i}.", f"{pre}encoder.layers.{i}."
        for a, b in (("q", 0), ("k", 1), ("v", 2)):
            out[f"{dst}self_attn.{a}_proj.weight"] = sd[src + "attn.in_proj_weight"].chunk(3, 0)[b].clone()
            out[f"{dst}self_attn.{a}_proj.bias"] = sd[src + "attn.in_proj_bias"].chunk(3, 0)[b].clone()
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for s, d in pairs.items():
            out[f"{dst}{d}.weight"] = sd[f"{src}{s}.weight"]
            out[f"{dst}{d}.bias"] = sd[f"{src}{s}.bias"]
    return out


def load_open_clip_visual(tower: nn.Module, visual: nn.Module) -> None:
    """Copy an open_clip ViT into a transformers ``CLIPVisionModel`` (strict: every weight)."""
    sd = convert_open_clip_visual(visual)
    if next(iter(tower.state_dict())).startswith("vision_model."):  # transformers < 5 nests the tower
        sd = {"vision_model." + k: v for k, v in sd.items()}
    tower.load_state_dict(sd, strict=True)


def open_clip_activation(visual: nn.Module) -> str:
    """transformers' name of the MLP activation of an open_clip ViT (GELU or QuickGELU)."""
    act = visual.transformer.resblocks[0].mlp.gelu
    if type(act).__name__ == "QuickGELU":
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_new"
    raise ValueError(f"unsupported open_clip activation {type(act).__name__}")


# ----------------------------------------------------------------------------- the tiny LLaVA
def build_tiny_llava(name: str = "lmoe-tiny-llava", clip_checkpoint: str | None = None, seed: int = 0,
                     prepare_visual=None):
    """``(LlavaForConditionalGeneration, LlavaProcessor)`` of the shipped tiny config ``name``:
    vision tower converted from the tiny CLIP (weights of ``clip_checkpoint``, or its random init
    when None; ``prepare_visual(clip_model)``, if given, trains it further first), projector and
    decoder randomly initialised from ``seed``."""
    from transformers import (CLIPImageProcessor, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    from .clip import create_clip
    from .pretrain_clip import model_config
    from .vlm_tokenizer import build_tokenizer

    spec = tiny_spec(name)
    tokenizer = build_tokenizer(tiny_words(spec))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip, _, size, mean, std = create_clip(spec["vision_from_clip"], clip_checkpoint)
        vision_cfg = clip_vision_config_of(model_config(spec["vision_from_clip"]), open_clip_activation(clip.visual))
        declared = spec["vision_config"]
        mismatch = {k: (v, getattr(vision_cfg, k)) for k, v in declared.items() if getattr(vision_cfg, k) != v}
        if mismatch:
            raise ValueError(f"{name}: vision_config disagrees with {spec['vision_from_clip']}: {mismatch}")
        text_cfg = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               **spec["text_config"])
        n_img = (vision_cfg.image_size // vision_cfg.patch_size) ** 2 + (spec["vision_feature_select_strategy"] == "full")
        cfg = LlavaConfig(vision_config=vision_cfg, text_config=text_cfg,
                          image_token_index=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
                          image_seq_length=n_img, vision_feature_layer=spec["vision_feature_layer"],
                          vision_feature_select_strategy=spec["vision_feature_select_strategy"],
                          projector_hidden_act=spec["projector_hidden_act"],
                          tie_word_embeddings=spec["text_config"].get("tie_word_embeddings", False))
        cfg.prompt_template = spec["prompt_template"]
        cfg.caption_question = spec["caption_question"]
        model = LlavaForConditionalGeneration(cfg)
        if prepare_visual is not None:
            prepare_visual(clip)
        load_open_clip_visual(model.model.vision_tower, clip.visual)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                         image_mean=list(mean), image_std=list(std))
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_cfg.patch_size,
                               vision_feature_select_strategy=spec["vision_feature_select_strategy"],
                               num_additional_image_tokens=1)
    return model.eval(), processor
