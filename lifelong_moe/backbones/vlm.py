"""Frozen generative vision-language backbone: any transformers image-text-to-text model that has an
adapter in :mod:`.vlm_adapters` (LLaVA, Qwen2-VL, LLaVA-NeXT, Idefics3, BLIP-2 with OPT).

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
from .vlm_adapters import LLAVA_15_TEMPLATE, VlmAdapter, adapter_for, plain_pixels, resolve

__all__ = ["LLAVA_15_TEMPLATE", "VisionLanguageModel", "VlmBatch", "load_vlm_model"]
ANSWER_SEPARATOR = " "  # between the prompt and the answer, in teacher forcing as in generation
LM_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE = -100  # label of positions the loss skips (transformers' convention)


@dataclass
class VlmBatch:
    """Tokenised, padded VQA inputs. ``labels`` are -100 except on the answer tokens and the closing
    EOS (the positions ``answer_mask`` marks); ``image_mask`` marks the image placeholder tokens,
    ``prompt_mask`` the other non-padding tokens (BOS, instruction, question). All ``[B, L]`` but
    ``pixel_values`` ``[B, 3, S, S]``, or None for text-only prompts (no image token, no image); the
    model's own image arguments are made from it by :meth:`VisionLanguageModel.model_inputs`."""

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


def load_vlm_model(source: str, *, local_files_only: bool = True, dtype: torch.dtype | None = None):
    """``(model, processor)`` from a hub id or a local directory, through the class its adapter names
    (``AutoModelForImageTextToText`` or the architecture's own); every failure is one UserError
    naming ``source``."""
    import transformers
    from transformers import AutoConfig, AutoProcessor

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
        model_class = getattr(transformers, adapter_for(config.model_type, source).model_class)
        try:
            model = model_class.from_pretrained(source, local_files_only=local_files_only, dtype=dtype)
            processor = AutoProcessor.from_pretrained(source, local_files_only=local_files_only)
        except Exception as e:  # noqa: BLE001 - missing weights or tokenizer files, shape mismatch
            raise UserError(f"could not load VLM {source!r}: {type(e).__name__}: {e}") from None
    return model, processor


def _hf_cache() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return str(HF_HUB_CACHE)


class VisionLanguageModel(nn.Module):
    """Frozen generative VLM: a transformers image-text-to-text model + its processor, its
    architecture's parts found through its :class:`~.vlm_adapters.VlmAdapter`.

    Every parameter starts with ``requires_grad=False``; strategies inject adapters (peft LoRA on
    :meth:`linear_modules`, hooks on :attr:`decoder_layers`) and train those."""

    family = "vlm"

    def __init__(self, model, processor, prompt_template: str | None = None, name: str = "",
                 image_size: int | None = None):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.name = name
        cfg = model.config
        self.adapter: VlmAdapter = adapter_for(cfg.model_type, name)
        try:
            self.decoder_layers, self.projector  # noqa: B018 - the adapter's paths exist in this model
        except AttributeError:
            raise UserError(f"VLM {name!r} ({cfg.model_type}): no decoder layers at {self.adapter.language_model!r} "
                            f"or no projector at {self.adapter.projector!r}, where its adapter looks (only "
                            "decoder-only language models are supported, e.g. not BLIP-2 with T5)") from None
        self.image_size = self._picture_size(image_size)
        ip = getattr(processor, "image_processor", None)
        self.mean = tuple(getattr(ip, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
        self.std = tuple(getattr(ip, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
        self.image_token_id = int(cfg.image_token_id)
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.num_image_tokens = int(self.adapter.num_image_tokens(self))
        tok = self.tokenizer
        if tok.eos_token_id is None:
            raise UserError(f"VLM {name!r}: its tokenizer has no EOS token (answers end with one)")
        self.eos_token_id = int(tok.eos_token_id)
        pad = next((t for t in (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id) if t is not None))
        self.pad_token_id = int(pad)
        self.prompt_template = prompt_template or getattr(cfg, "prompt_template", None) or self.adapter.template
        if "{question}" not in self.prompt_template or self.image_token not in self.prompt_template:
            raise UserError(f"prompt_template must contain {{question}} and the image token {self.image_token!r}; "
                            f"got {self.prompt_template!r}")
        # text-only prompts (pixel_values=None): the template without the image token and the space after it
        before, after = (f"(?:{re.escape(w)})?" if w else "" for w in self.adapter.image_wrap)
        self.text_template = re.sub(before + re.escape(self.image_token) + after + r"\s*", "", self.prompt_template,
                                    count=1)
        self.current_batch: VlmBatch | None = None  # the batch logits()/generate_ids() is running (for hooks)

    def _picture_size(self, wanted: int | None) -> int:
        """The picture side S: the adapter's, or ``wanted`` where the architecture takes any size."""
        own = int(self.adapter.image_size(self))
        if wanted is None or wanted == own:
            return own
        if not self.adapter.resizable:
            raise UserError(f"backbone.image_size: {self.name or 'this VLM'} takes {own} px pictures "
                            f"(its vision tower's size), not {wanted}")
        f = int(self.adapter.size_factor(self)) if self.adapter.size_factor else 1
        if wanted <= 0 or wanted % f:
            raise UserError(f"backbone.image_size: {wanted} is not a positive multiple of {f} "
                            f"(patch size x merge size of {self.name or 'this VLM'})")
        return wanted

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, name: str, pretrained: str | None = None, *, download: bool = False,
                    prompt_template: str | None = None, dtype: torch.dtype | None = None,
                    image_size: int | None = None) -> "VisionLanguageModel":
        """``name``: a shipped tiny VLM (``lmoe-tiny-llava``), a hub id or a local directory.
        ``pretrained``: for a shipped name, a local directory of its weights (the embedded
        ``synthetic`` weights are resolved to one by :func:`lifelong_moe.backbones.factory.load_vlm`);
        None gives the tiny model randomly initialised. Hub ids and
        directories carry their weights: ``pretrained`` stays None. ``image_size``: the picture side
        for architectures that take any size (Qwen2-VL); None: the adapter's. Never downloads unless
        ``download``; every failure is one UserError naming the culprit."""
        from .vlm_tiny import shipped_vlm_names

        if name in shipped_vlm_names():
            if pretrained is None:
                from .vlm_tiny import build_tiny_llava

                model, processor = build_tiny_llava(name)
                return cls(model.to(dtype) if dtype else model, processor, prompt_template, name, image_size)
            source = pretrained
            if not Path(source).expanduser().is_dir():
                raise UserError(f"backbone.pretrained: directory of {name} weights not found: {source}")
            model, processor = load_vlm_model(source, local_files_only=True, dtype=dtype)
            return cls(model, processor, prompt_template, name, image_size)
        if pretrained is not None:
            raise UserError(f"backbone.pretrained: {pretrained!r} is only used with a shipped tiny VLM "
                            f"({', '.join(shipped_vlm_names())}); a hub id or a local directory carries its weights")
        if "/" not in name and not Path(name).expanduser().exists():
            close = difflib.get_close_matches(name, shipped_vlm_names(), n=1, cutoff=0.6)
            if close:
                raise UserError(f"backbone.name: unknown VLM {name!r} (did you mean {close[0]!r}?); shipped tiny "
                                f"VLMs: {', '.join(shipped_vlm_names())}; or a hub id / local directory")
        model, processor = load_vlm_model(name, local_files_only=not download, dtype=dtype)
        return cls(model, processor, prompt_template, name, image_size)

    # ------------------------------------------------------------------ structure
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _part(self, path: str) -> nn.Module:
        """The submodule at one of the adapter's paths, also under a peft wrapper of :attr:`model`
        (found by the path's ending)."""
        try:
            return resolve(self.model, path)
        except AttributeError:
            found = next((m for n, m in self.model.named_modules() if n.endswith("." + path)), None)
            if found is None:
                raise AttributeError(f"no module {path!r} in the VLM") from None
            return found

    @property
    def language_model(self) -> nn.Module:
        """The LLM's decoder stack (a ``LlamaModel`` for LLaVA-1.5), at the adapter's path."""
        return self._part(self.adapter.language_model)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The LLM's decoder layers, by index (for hooks and adapter injection)."""
        return self.language_model.layers

    @property
    def final_norm(self) -> nn.Module:
        """The norm after the last decoder layer (before the LM head)."""
        return resolve(self.language_model, self.adapter.final_norm)

    @property
    def hidden_size(self) -> int:
        return int(self.language_model.config.hidden_size)

    @property
    def call_module(self) -> nn.Module:
        """The module every forward pass and generation step calls (hooks that need each call)."""
        return self._part(self.adapter.call_module) if self.adapter.call_module else self.model

    @property
    def projector(self) -> nn.Module:
        """The vision-language projector (LLaVA's ``multi_modal_projector``, Qwen2-VL's merger, ...)."""
        return self._part(self.adapter.projector)

    @property
    def vision_dim(self) -> int:
        """The width of the projector's input (the frozen vision feature)."""
        if self.adapter.vision_dim is not None:
            return int(self.adapter.vision_dim(self))
        return next(m for m in self.projector.modules() if isinstance(m, nn.Linear)).in_features

    def layer_linear(self, layer: int, name: str) -> nn.Linear:
        """Decoder layer ``layer``'s linear called ``name`` (canonical: ``q_proj`` ... ``down_proj``)."""
        if name not in self.adapter.linears:
            raise UserError(f"{self.name or 'this VLM'} has no {name!r} linear in its decoder layers "
                            f"(it has {', '.join(self.adapter.linears)})")
        return resolve(self.decoder_layers[layer], self.adapter.linears[name])

    def linear_modules(self) -> dict[str, nn.Linear]:
        """The LLM's ``nn.Linear`` modules by qualified name within :attr:`model` (peft targeting);
        the vision tower, projector and LM head are not included."""
        prefix = next(n for n, m in self.model.named_modules() if m is self.language_model) + "."
        return {n: m for n, m in self.model.named_modules() if n.startswith(prefix) and isinstance(m, nn.Linear)}

    def lora_target_regex(self, names: Sequence[str] = LM_LAYERS, layers: Sequence[int] | None = None) -> str:
        """A peft ``target_modules`` regex (matched with ``re.fullmatch``) selecting the LLM's decoder
        linears called ``names`` (canonical names; those the architecture lacks are skipped), in every
        layer or in ``layers``, whether peft wraps :attr:`model` or this module."""
        paths = [re.escape(self.adapter.linears[n]) for n in names if n in self.adapter.linears]
        if not paths:
            raise UserError(f"LoRA targets {list(names)}: {self.name or 'this VLM'} has none of them "
                            f"(it has {', '.join(self.adapter.linears)})")
        index = r"\d+" if layers is None else "(?:" + "|".join(str(int(i)) for i in layers) + ")"
        return (r"(?:.*\.)?" + re.escape(self.adapter.language_model) + r"\.layers\." + index
                + r"\.(?:" + "|".join(paths) + ")")

    def projector_target_regex(self) -> str:
        """A peft ``target_modules`` regex selecting the projector's ``nn.Linear`` modules."""
        path = self.adapter.projector
        names = [f"{path}.{n}" for n, m in self.projector.named_modules() if isinstance(m, nn.Linear)]
        return r"(?:.*\.)?(?:" + "|".join(re.escape(n) for n in names) + ")"

    def model_inputs(self, batch: VlmBatch) -> dict:
        """Keyword arguments of one forward pass of :attr:`model` on ``batch``: ids, attention mask and
        the architecture's image arguments (none for text-only prompts)."""
        images = {} if batch.pixel_values is None else self.adapter.pixel_inputs(self, batch.pixel_values,
                                                                                 batch.input_ids)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **images}

    def pixels_from_image(self, image) -> torch.Tensor:
        """``[3, S, S]`` float32 of a PIL image: the processor's own pixels where it makes one
        ``S x S`` picture (LLaVA), else resized (bicubic) and normalised with its mean and std."""
        import numpy as np
        from PIL import Image

        image = image.convert("RGB")
        ip = getattr(self.processor, "image_processor", None)
        if self.adapter.pixel_inputs is plain_pixels and ip is not None:
            pixels = ip(images=image, return_tensors="pt")["pixel_values"]
            if tuple(pixels.shape) == (1, 3, self.image_size, self.image_size):
                return pixels[0].to(torch.float32)
        s = self.image_size
        x = torch.from_numpy(np.asarray(image.resize((s, s), Image.BICUBIC), dtype=np.float32) / 255.0)
        x = x.permute(2, 0, 1)
        return (x - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)

    # ------------------------------------------------------------------ tokenisation
    def prompt(self, question: str, text_only: bool = False) -> str:
        return (self.text_template if text_only else self.prompt_template).replace("{question}", question.strip())

    def _expand(self, text: str) -> str:
        n = self.num_image_tokens
        return text.replace(self.image_token, self.adapter.expand(self, n) if self.adapter.expand
                            else self.image_token * n)

    def _check_images(self, pixel_values: torch.Tensor, n: int) -> None:
        s = self.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, s, s) or pixel_values.shape[0] != n:
            raise ValueError(f"pixel_values must have shape [{n}, 3, {s}, {s}] (one image per question), "
                             f"got {list(pixel_values.shape)}")

    def _image_first(self, ids: list[int]) -> list[int]:
        """``BOS, image tokens, ...`` -> ``image tokens, BOS, ...`` where the architecture puts the
        image before BOS (BLIP-2); otherwise ``ids`` unchanged."""
        n, bos = self.num_image_tokens, self.tokenizer.bos_token_id
        if not self.adapter.image_before_bos or len(ids) <= n or ids[0] != bos or ids[1] != self.image_token_id:
            return ids
        return ids[1:n + 1] + ids[:1] + ids[n + 1:]

    def encode(self, questions: Sequence[str], answers: Sequence[str] | None = None,
               text_only: bool = False) -> list[tuple[list[int], int]]:
        """Per example ``(token ids, prompt length)``: the prompt's ids, then (with answers) the
        answer's ids and EOS. The answer's ids are those the prompt followed by one space and the
        answer tokenise to after the prompt's own ids (so a tokenizer that merges across the space
        cannot shift them); if the prompt's ids are not a prefix there, the answer is tokenised alone.
        ``text_only``: prompts without the image token (:attr:`text_template`)."""
        tok = self.tokenizer
        prompts = [self._expand(self.prompt(q, text_only)) for q in questions]
        p_ids = [self._image_first(ids) for ids in tok(prompts)["input_ids"]]
        want = 0 if text_only else self.num_image_tokens
        for p, ids in zip(prompts, p_ids):
            if ids.count(self.image_token_id) != want:
                raise ValueError(f"prompt {p[:80]!r}... has {ids.count(self.image_token_id)} image tokens, expected "
                                 f"{want} (the template must name {self.image_token!r} once)")
        if answers is None:
            return [(list(ids), len(ids)) for ids in p_ids]
        full = [self._image_first(ids) for ids in
                tok([p + ANSWER_SEPARATOR + a.strip() for p, a in zip(prompts, answers)])["input_ids"]]
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
        if text_only and not self.adapter.text_only:
            raise ValueError(f"{self.name or 'this VLM'} ({self.model.config.model_type}) answers only with a picture")
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
            return self.model(**self.model_inputs(batch)).logits

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
        with self.running(batch):
            out = self.model.generate(**self.model_inputs(batch), generation_config=cfg)
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
