"""Frozen generative vision-language backbone: transformers' ``LlavaForConditionalGeneration``.

A VLM is named as Hugging Face users name it: a hub id (``llava-hf/llava-1.5-7b-hf``, read from the
local HF cache; downloaded only with ``download=True``) or a local ``save_pretrained`` directory.
The shipped tiny model ``lmoe-tiny-llava`` (:mod:`.vlm_tiny`) is built from configs in the package;
with ``pretrained="synthetic"`` it is pretrained on the synthetic world (:mod:`.pretrain_vlm`,
cached) and then loaded from its cache directory exactly as a user's local directory is.

Prompts: ``prompt_template`` with ``{question}`` and the processor's image token; the answer follows
the prompt after one space and ends with EOS. Teacher forcing (:meth:`VisionLanguageModel.batch`)
and greedy generation (:meth:`VisionLanguageModel.generate`) tokenise the prompt identically, so
the first generated token is the argmax of the teacher-forced logits at the answer's start.
"""
from __future__ import annotations

import contextlib
import difflib
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

# llava-1.5's short-answer VQA prompt (Liu et al., "Improved Baselines with Visual Instruction Tuning",
# CVPR 2024, Table 7; the llava-hf model cards' "USER: <image>\n... ASSISTANT:" chat format)
LLAVA_15_TEMPLATE = "USER: <image>\n{question} Answer the question using a single word or phrase. ASSISTANT:"
ANSWER_SEPARATOR = " "  # between the prompt and the answer, in teacher forcing as in generation
LM_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE = -100  # label of positions the loss skips (transformers' convention)


@dataclass
class VlmBatch:
    """Tokenised, padded VQA inputs. ``labels`` are -100 except on the answer tokens and the closing
    EOS (the positions ``answer_mask`` marks); ``image_mask`` marks the image placeholder tokens,
    ``prompt_mask`` the other non-padding tokens (BOS, instruction, question). All ``[B, L]`` but
    ``pixel_values`` ``[B, 3, S, S]``, or None for text-only prompts (no image token, no image)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    labels: torch.Tensor
    image_mask: torch.Tensor
    prompt_mask: torch.Tensor
    answer_mask: torch.Tensor

    def to(self, device) -> "VlmBatch":
        return VlmBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                           for f in fields(self)})

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id (``owner/name``: one slash, no leading dot, slash or tilde)."""
    return name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1 or "\\" in name


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars or info chatter while loading (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_llava(source: str, *, local_files_only: bool = True, dtype: torch.dtype | None = None):
    """``(LlavaForConditionalGeneration, processor)`` from a hub id or a local directory; every
    failure is one UserError naming ``source``."""
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"backbone.name: {source} is a directory but not a saved transformers model "
                            "(no config.json; write one with model.save_pretrained(dir))")
        source = str(local)
    elif _looks_like_path(source) or local.exists():
        raise UserError(f"backbone.name: local model directory not found: {source}")
    with _quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=local_files_only)
        except Exception as e:  # noqa: BLE001 - offline cache miss, bad id, corrupt config
            if local_files_only and not local.is_dir():
                raise UserError(f"backbone.name: {source!r} is neither a local directory nor in the local Hugging "
                                f"Face cache ({_hf_cache()}); download it once (huggingface-cli download {source}) "
                                "or set backbone.download: true") from None
            raise UserError(f"could not load VLM {source!r}: {type(e).__name__}: {e}") from None
        if config.model_type != "llava":
            raise UserError(f"backbone.name: {source!r} is a {config.model_type!r} model; the vlm family loads "
                            "LLaVA models (model_type 'llava', LlavaForConditionalGeneration)")
        try:
            model = LlavaForConditionalGeneration.from_pretrained(source, local_files_only=local_files_only,
                                                                  dtype=dtype)
            processor = AutoProcessor.from_pretrained(source, local_files_only=local_files_only)
        except Exception as e:  # noqa: BLE001 - missing weights or tokenizer files, shape mismatch
            raise UserError(f"could not load VLM {source!r}: {type(e).__name__}: {e}") from None
    return model, processor


def _hf_cache() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return str(HF_HUB_CACHE)


class VisionLanguageModel(nn.Module):
    """Frozen LLaVA-style VLM: transformers' ``LlavaForConditionalGeneration`` + its processor.

    Every parameter starts with ``requires_grad=False``; strategies inject adapters (peft LoRA on
    :meth:`linear_modules`, hooks on :attr:`decoder_layers`) and train those."""

    family = "vlm"

    def __init__(self, model, processor, prompt_template: str | None = None, name: str = ""):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.name = name
        cfg = model.config
        vc = cfg.vision_config
        self.image_size = int(vc.image_size)
        ip = getattr(processor, "image_processor", None)
        self.mean = tuple(getattr(ip, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
        self.std = tuple(getattr(ip, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
        self.image_token_id = int(cfg.image_token_id)
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.num_image_tokens = (self.image_size // vc.patch_size) ** 2 + (cfg.vision_feature_select_strategy == "full")
        tok = self.tokenizer
        if tok.eos_token_id is None:
            raise UserError(f"VLM {name!r}: its tokenizer has no EOS token (answers end with one)")
        self.eos_token_id = int(tok.eos_token_id)
        pad = next((t for t in (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id) if t is not None))
        self.pad_token_id = int(pad)
        self.prompt_template = prompt_template or getattr(cfg, "prompt_template", None) or LLAVA_15_TEMPLATE
        if "{question}" not in self.prompt_template or self.image_token not in self.prompt_template:
            raise UserError(f"prompt_template must contain {{question}} and the image token {self.image_token!r}; "
                            f"got {self.prompt_template!r}")
        # text-only prompts (pixel_values=None): the template without the image token and the space after it
        self.text_template = re.sub(re.escape(self.image_token) + r"\s*", "", self.prompt_template, count=1)
        self.current_batch: VlmBatch | None = None  # the batch logits()/generate_ids() is running (for hooks)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, name: str, pretrained: str | None = None, *, download: bool = False,
                    prompt_template: str | None = None, dtype: torch.dtype | None = None) -> "VisionLanguageModel":
        """``name``: a shipped tiny VLM (``lmoe-tiny-llava``), a hub id or a local directory.
        ``pretrained``: for a shipped name, a local directory of its weights (the embedded
        ``synthetic`` weights are resolved to one by :func:`lifelong_moe.backbones.factory.load_vlm`);
        None gives the tiny model randomly initialised. Hub ids and
        directories carry their weights: ``pretrained`` stays None. Never downloads unless
        ``download``; every failure is one UserError naming the culprit."""
        from .vlm_tiny import shipped_vlm_names

        if name in shipped_vlm_names():
            if pretrained is None:
                from .vlm_tiny import build_tiny_llava

                model, processor = build_tiny_llava(name)
                return cls(model.to(dtype) if dtype else model, processor, prompt_template, name)
            source = pretrained
            if not Path(source).expanduser().is_dir():
                raise UserError(f"backbone.pretrained: directory of {name} weights not found: {source}")
            model, processor = load_llava(source, local_files_only=True, dtype=dtype)
            return cls(model, processor, prompt_template, name)
        if pretrained is not None:
            raise UserError(f"backbone.pretrained: {pretrained!r} is only used with a shipped tiny VLM "
                            f"({', '.join(shipped_vlm_names())}); a hub id or a local directory carries its weights")
        if "/" not in name and not Path(name).expanduser().exists():
            close = difflib.get_close_matches(name, shipped_vlm_names(), n=1, cutoff=0.6)
            if close:
                raise UserError(f"backbone.name: unknown VLM {name!r} (did you mean {close[0]!r}?); shipped tiny "
                                f"VLMs: {', '.join(shipped_vlm_names())}; or a hub id / local directory")
        model, processor = load_llava(name, local_files_only=not download, dtype=dtype)
        return cls(model, processor, prompt_template, name)

    # ------------------------------------------------------------------ structure
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def language_model(self) -> nn.Module:
        """The LLM (a ``LlamaModel`` for LLaVA-1.5), found by name so that a peft-wrapped
        :attr:`model` still has it."""
        lm = getattr(getattr(self.model, "model", None), "language_model", None)
        if lm is None:
            lm = next(m for n, m in self.model.named_modules() if n.endswith("language_model") and hasattr(m, "layers"))
        return lm

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The LLM's decoder layers, by index (for hooks and adapter injection)."""
        return self.language_model.layers

    def linear_modules(self) -> dict[str, nn.Linear]:
        """The LLM's ``nn.Linear`` modules by qualified name within :attr:`model` (peft targeting);
        the vision tower, projector and LM head are not included."""
        prefix = next(n for n, m in self.model.named_modules() if m is self.language_model) + "."
        return {n: m for n, m in self.model.named_modules() if n.startswith(prefix) and isinstance(m, nn.Linear)}

    def lora_target_regex(self, names: Sequence[str] = LM_LAYERS) -> str:
        """A peft ``target_modules`` regex (matched with ``re.fullmatch``) selecting the LLM's
        decoder linears called ``names``, whether peft wraps :attr:`model` or this module."""
        return r"(?:.*\.)?language_model\.layers\.\d+\.(?:self_attn|mlp)\.(?:" + "|".join(names) + ")"

    # ------------------------------------------------------------------ tokenisation
    def prompt(self, question: str, text_only: bool = False) -> str:
        return (self.text_template if text_only else self.prompt_template).replace("{question}", question.strip())

    def _expand(self, text: str) -> str:
        return text.replace(self.image_token, self.image_token * self.num_image_tokens)

    def _check_images(self, pixel_values: torch.Tensor, n: int) -> None:
        s = self.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, s, s) or pixel_values.shape[0] != n:
            raise ValueError(f"pixel_values must have shape [{n}, 3, {s}, {s}] (one image per question), "
                             f"got {list(pixel_values.shape)}")

    def encode(self, questions: Sequence[str], answers: Sequence[str] | None = None,
               text_only: bool = False) -> list[tuple[list[int], int]]:
        """Per example ``(token ids, prompt length)``: the prompt's ids, then (with answers) the
        answer's ids and EOS. The answer's ids are those the prompt followed by one space and the
        answer tokenise to after the prompt's own ids (so a tokenizer that merges across the space
        cannot shift them); if the prompt's ids are not a prefix there, the answer is tokenised alone.
        ``text_only``: prompts without the image token (:attr:`text_template`)."""
        tok = self.tokenizer
        prompts = [self._expand(self.prompt(q, text_only)) for q in questions]
        p_ids = tok(prompts)["input_ids"]
        want = 0 if text_only else self.num_image_tokens
        for p, ids in zip(prompts, p_ids):
            if ids.count(self.image_token_id) != want:
                raise ValueError(f"prompt {p[:80]!r}... has {ids.count(self.image_token_id)} image tokens, expected "
                                 f"{want} (the template must name {self.image_token!r} once)")
        if answers is None:
            return [(list(ids), len(ids)) for ids in p_ids]
        full = tok([p + ANSWER_SEPARATOR + a.strip() for p, a in zip(prompts, answers)])["input_ids"]
        out = []
        for ids, f, a in zip(p_ids, full, answers):
            if f[:len(ids)] == ids:
                ans = list(f[len(ids):])
            else:
                ans = tok(ANSWER_SEPARATOR + a.strip(), add_special_tokens=False)["input_ids"]
            if ans and ans[-1] == self.eos_token_id:  # tokenizers that close every text with EOS
                ans = ans[:-1]
            out.append((list(ids) + ans + [self.eos_token_id], len(ids)))
        return out

    def batch(self, pixel_values: torch.Tensor | None, questions: Sequence[str], answers: Sequence[str] | None = None,
              padding_side: str = "right") -> VlmBatch:
        """Tokenise and pad (right for teacher forcing; ``"left"`` for generation). ``pixel_values``
        None: text-only prompts (no image token, no image)."""
        if answers is not None and len(answers) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
        text_only = pixel_values is None
        if not text_only:
            self._check_images(pixel_values, len(questions))
        enc = self.encode(questions, answers, text_only)
        length = max(len(ids) for ids, _ in enc)
        b = len(enc)
        input_ids = torch.full((b, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, length), IGNORE, dtype=torch.long)
        attention = torch.zeros((b, length), dtype=torch.long)
        for i, (ids, n_prompt) in enumerate(enc):
            start = length - len(ids) if padding_side == "left" else 0
            input_ids[i, start:start + len(ids)] = torch.tensor(ids)
            attention[i, start:start + len(ids)] = 1
            labels[i, start + n_prompt:start + len(ids)] = torch.tensor(ids[n_prompt:], dtype=torch.long)
        valid = attention.bool()
        image = valid & (input_ids == self.image_token_id)
        answer = labels != IGNORE
        batch = VlmBatch(input_ids, attention, pixel_values, labels, image, valid & ~image & ~answer, answer)
        batch = batch.to(self.device)
        if not text_only:
            batch.pixel_values = batch.pixel_values.to(self.dtype)
        return batch

    @contextlib.contextmanager
    def running(self, batch: VlmBatch):
        """Expose ``batch`` as :attr:`current_batch` while the model runs on it, so forward hooks
        (LiveEdit's routing) can read its image / prompt / answer masks."""
        previous, self.current_batch = self.current_batch, batch
        try:
            yield batch
        finally:
            self.current_batch = previous

    # ------------------------------------------------------------------ teacher forcing
    def logits(self, batch: VlmBatch) -> torch.Tensor:
        """``[B, L, V]``: position ``t`` scores token ``t + 1``."""
        with self.running(batch):
            return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              pixel_values=batch.pixel_values).logits

    forward = logits

    def _shifted(self, batch: VlmBatch, logits: torch.Tensor | None):
        logits = self.logits(batch) if logits is None else logits
        return logits[:, :-1].float(), batch.labels[:, 1:]

    def answer_loss(self, batch: VlmBatch, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy over all answer tokens (and EOS) of the batch."""
        lg, y = self._shifted(batch, logits)
        return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.reshape(-1), ignore_index=IGNORE)

    def answer_logprobs(self, batch: VlmBatch, logits: torch.Tensor | None = None) -> torch.Tensor:
        """``[B]``: log p(answer, EOS | image, prompt) = sum of the answer tokens' log-probabilities."""
        lg, y = self._shifted(batch, logits)
        mask = y != IGNORE
        lp = lg.log_softmax(-1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return (lp * mask).sum(1)

    def token_accuracy(self, batch: VlmBatch, logits: torch.Tensor | None = None) -> torch.Tensor:
        """``[B]``: fraction of answer tokens (and EOS) whose teacher-forced argmax is right."""
        lg, y = self._shifted(batch, logits)
        mask = y != IGNORE
        right = (lg.argmax(-1) == y) & mask
        return right.sum(1).float() / mask.sum(1).clamp_min(1).float()

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_ids(self, pixel_values: torch.Tensor | None, questions: Sequence[str],
                     max_new_tokens: int = 8) -> torch.Tensor:
        """``[B, <= max_new_tokens]`` greedily generated token ids (KV cache, left padding), padded
        with the pad id after EOS. ``pixel_values`` None: text-only prompts."""
        from transformers import GenerationConfig

        batch = self.batch(pixel_values, questions, padding_side="left")
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                               eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id)
        images = {} if batch.pixel_values is None else {"pixel_values": batch.pixel_values}
        with self.running(batch):
            out = self.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                      generation_config=cfg, **images)
        return out[:, batch.input_ids.shape[1]:]

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Token ids -> answers: cut at the first EOS, special tokens dropped, stripped."""
        texts = []
        for row in ids.tolist():
            if self.eos_token_id in row:
                row = row[:row.index(self.eos_token_id)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    def generate(self, pixel_values: torch.Tensor | None, questions: Sequence[str],
                 max_new_tokens: int = 8) -> list[str]:
        """Greedy answers (KV cache, left padding, attention mask; stops at EOS), decoded, stripped."""
        return self.decode(self.generate_ids(pixel_values, questions, max_new_tokens))
