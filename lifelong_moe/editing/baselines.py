"""Baseline editing methods through the same :class:`~.types.EditMethod` API as LiveEdit.

- ``ft``: fine-tune the chosen MLP projection(s) of one LLM decoder layer on each edit in turn
  (LiveEdit's FT baseline, ``configs/*/blip2-opt-2.7b.yaml``: one FFN weight of a late layer, a few
  Adam steps on the edit's cross-entropy).
- ``lora``: the same, through a peft LoRA (Hu et al., 2022) on that layer, ``B = 0`` at start.
- ``retrieval``: a frozen-feature memory (SERAC/LTE's retrieve-then-answer idea reduced to its
  floor): each edit stores the backbone's hidden state at the prompt's last token and the target's
  token ids; an input whose feature has cosine similarity >= ``threshold`` with a stored key gets
  that edit's answer instead of the model's. One batched similarity over the whole store.

FT and LoRA keep their edits in the weights: an edit's tensors are empty, ``state_dict`` holds the
tuned weights, an empty store restores the initial weights, and single edits cannot be deleted
(``supports_delete`` False) because sequential fine-tuning does not decompose per edit.
"""
from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace
from typing import Literal, Mapping, Optional, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..backbones.vlm import IGNORE
from .bank import EditBank
from .types import EditRecord

MLP = ("down_proj", "up_proj", "gate_proj")


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


def default_layer(vlm) -> int:
    """About 2/3 of the LLM's depth (LiveEdit hooks layer 21 of 32)."""
    return round(2 * len(vlm.decoder_layers) / 3)


def _layer(vlm, layer: Optional[int]) -> int:
    n = len(vlm.decoder_layers)
    i = default_layer(vlm) if layer is None else layer
    if not -n <= i < n:
        from ..errors import UserError

        raise UserError(f"method.layer {layer} is out of range for a {n}-layer language model")
    return i % n


def _one(vlm, record: EditRecord):
    """The edit as a one-row teacher-forcing batch: (image, src) -> alt."""
    return vlm.batch(None if record.image is None else record.image.unsqueeze(0), [record.src], [record.alt])


# ----------------------------------------------------------------------------------------- FT / LoRA
@contextmanager
def frozen_image_features(vlm):
    """Within the block, the VLM's image features are computed once and reused: the vision tower and
    projector are frozen and the edit's image does not change between steps (same values, less work)."""
    inner = getattr(vlm.model, "model", None)
    real = getattr(inner, "get_image_features", None)
    if real is None:
        yield
        return
    cache = {}

    def once(*args, **kwargs):
        if "out" not in cache:
            with torch.no_grad():
                cache["out"] = real(*args, **kwargs)
        return cache["out"]

    inner.get_image_features = once
    try:
        yield
    finally:
        del inner.get_image_features


class FTParams(_Params):
    name: Literal["ft"] = "ft"
    layer: Optional[int] = None  # None: round(2/3 * depth)
    modules: list[Literal[MLP]] = Field(default_factory=lambda: ["down_proj"], min_length=1)
    steps: int = Field(10, gt=0)
    lr: float = Field(1e-3, gt=0)


class LoraParams(_Params):
    name: Literal["lora"] = "lora"
    layer: Optional[int] = None
    modules: list[Literal[MLP]] = Field(default_factory=lambda: ["down_proj"], min_length=1)
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    steps: int = Field(10, gt=0)
    lr: float = Field(1e-2, gt=0)
    seed: int = Field(0, ge=0)  # LoRA A's initialisation


class _WeightEditing:
    """Shared by FT and LoRA: sequential Adam steps on each edit's answer cross-entropy."""

    supports_delete = False

    def __init__(self, params):
        self.params = params
        self.vlm = None
        self._initial: dict[str, torch.Tensor] = {}

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        raise NotImplementedError

    def attach(self, vlm) -> None:
        self.vlm = vlm
        self._prepare(vlm)
        self._initial = {n: p.detach().clone() for n, p in self._trainable().items()}

    def _prepare(self, vlm) -> None:
        pass

    def detach(self) -> None:
        self.set_edits({})
        self.vlm = None

    def fit(self, train: Sequence[EditRecord], *, seed: int = 0, progress=None) -> dict:
        return {}

    def make_edit(self, record: EditRecord) -> dict[str, torch.Tensor]:
        params = list(self._trainable().values())
        batch = _one(self.vlm, record)
        # Adam on fp32 master copies of half-precision weights (FT on a bf16 / fp16 backbone: steps of
        # lr 1e-3 would round away in the weight's own dtype), written back after every step; fp32
        # weights are their own masters
        masters = [p if p.dtype == torch.float32 else p.detach().float() for p in params]
        opt = torch.optim.Adam(masters, lr=self.params.lr)
        with torch.enable_grad(), frozen_image_features(self.vlm):
            for p in params:
                p.requires_grad_(True)
            try:
                for _ in range(self.params.steps):
                    loss = self.vlm.answer_loss(batch)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    for p, m in zip(params, masters):
                        if m is not p:
                            m.grad = None if p.grad is None else p.grad.float()
                            p.grad = None
                    opt.step()
                    with torch.no_grad():
                        for p, m in zip(params, masters):
                            if m is not p:
                                p.copy_(m)
            finally:
                for p in params:
                    p.requires_grad_(False)
                    p.grad = None
        return {}

    def set_edits(self, edits: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        if not edits:  # the unedited weights (the edits live in the weights themselves)
            with torch.no_grad():
                for n, p in self._trainable().items():
                    p.copy_(self._initial[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self._trainable().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        own = self._trainable()
        if set(state) != set(own):
            raise ValueError(f"{self.name} state has keys {sorted(state)[:3]}..., expected {sorted(own)[:3]}...")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(state[n])

    def config(self) -> dict:
        return self.params.model_dump(mode="json")


class FineTune(_WeightEditing):
    name = "ft"

    def _trainable(self):
        i = _layer(self.vlm, self.params.layer)
        return {f"layers.{i}.mlp.{m}.weight": self.vlm.layer_linear(i, m).weight for m in self.params.modules}


class LoraEdit(_WeightEditing):
    name = "lora"

    def _prepare(self, vlm) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        i = _layer(vlm, self.params.layer)
        target = vlm.lora_target_regex(self.params.modules, layers=[i])
        if not any("lora_" in n for n, _ in vlm.model.named_parameters()):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.params.seed)
                inject_adapter_in_model(LoraConfig(r=self.params.r, lora_alpha=self.params.alpha, lora_dropout=0.0,
                                                   target_modules=target), vlm.model)
            for n, p in vlm.model.named_parameters():
                p.requires_grad_(False)
                if "lora_" in n and p.dtype != torch.float32:  # a half-precision backbone: LoRA trains in fp32
                    p.data = p.data.float()

    def _trainable(self):
        return {n: p for n, p in self.vlm.model.named_parameters() if "lora_" in n}


# ----------------------------------------------------------------------------------------- retrieval
class RetrievalParams(_Params):
    name: Literal["retrieval"] = "retrieval"
    layer: int = -1  # hidden-state index (transformers' hidden_states; -1: the last layer)
    threshold: float = Field(0.97, ge=-1, le=1)  # cosine similarity an input needs to take a stored answer


class Retrieval:
    """Nearest stored edit by a frozen feature; its answer replaces the model's when similar enough.

    It wraps the VLM's ``logits`` (teacher forcing: the stored answer's tokens become the argmax at the
    answer positions of matched rows) and ``generate_ids`` (matched rows return the stored answer);
    with an empty store both are the VLM's own, untouched."""

    name = "retrieval"
    supports_delete = True

    def __init__(self, params: RetrievalParams):
        self.params = params
        self.vlm = None
        self.answers: list[torch.Tensor] = []
        self._keys = EditBank(["key"])  # the stored features, grown in place

    def attach(self, vlm) -> None:
        self.vlm = vlm
        self._orig_generate_ids = vlm.generate_ids
        vlm.logits = vlm.forward = self._logits  # instance attributes shadow the class's methods
        vlm.generate_ids = self._generate_ids

    def detach(self) -> None:
        for a in ("logits", "forward", "generate_ids"):
            self.vlm.__dict__.pop(a, None)
        self.vlm = None

    def fit(self, train: Sequence[EditRecord], *, seed: int = 0, progress=None) -> dict:
        return {}

    # ------------------------------------------------------------------ features
    def _forward(self, batch):
        out = self.vlm.model(**self.vlm.model_inputs(batch), output_hidden_states=True)
        valid = batch.attention_mask.bool() & ~batch.answer_mask
        pos = (valid * torch.arange(valid.shape[1], device=valid.device)).argmax(1)  # last prompt token
        h = out.hidden_states[self.params.layer]
        feats = h[torch.arange(len(pos), device=h.device), pos].float()
        return out.logits, torch.nn.functional.normalize(feats, dim=-1), pos

    def _match(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(matched [B] bool, best edit index [B])``: one batched similarity against every key."""
        best, idx = (feats @ self.keys.to(feats.device).T).max(1)
        return best >= self.params.threshold, idx

    # ------------------------------------------------------------------ the wrapped VLM calls
    def _logits(self, batch):
        if not self.answers:
            return type(self.vlm).logits(self.vlm, batch)
        logits, feats, pos = self._forward(batch)
        matched, idx = self._match(feats)
        for row in matched.nonzero().flatten().tolist():
            ans = self.answers[int(idx[row])]
            n = min(len(ans), logits.shape[1] - 1 - int(pos[row]))
            at = torch.arange(n) + int(pos[row])
            logits[row, at] = -1e4
            logits[row, at, ans[:n].to(logits.device)] = 1e4
        return logits

    @torch.no_grad()
    def _generate_ids(self, pixel_values, questions, max_new_tokens: int = 8):
        if not self.answers:
            return self._orig_generate_ids(pixel_values, questions, max_new_tokens)
        if self.params.layer == -1:
            return self._generate_in_one_pass(pixel_values, questions, max_new_tokens)
        _, feats, _ = self._forward(self.vlm.batch(pixel_values, questions, padding_side="left"))
        matched, idx = self._match(feats)
        rows: list = [None] * len(questions)
        rest = [i for i in range(len(questions)) if not matched[i]]
        if rest:
            px = None if pixel_values is None else pixel_values[rest]
            own = self._orig_generate_ids(px, [questions[i] for i in rest], max_new_tokens)
            for i, r in zip(rest, own):
                rows[i] = r.cpu()
        for i in matched.nonzero().flatten().tolist():
            rows[i] = self.answers[int(idx[i])][:max_new_tokens]
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), self.vlm.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = r
        return out

    def _generate_in_one_pass(self, pixel_values, questions, max_new_tokens: int):
        """Generation that reads the feature from its own prefill (the LLM's last hidden state at the
        prompt's last token, left padding) and forces the stored answer's tokens, then EOS, on matched
        rows at the LM head: no extra forward."""
        state: dict = {}

        def read_feature(module, args, out):
            if "rows" not in state:  # the prefill: every prompt token at once
                feats = torch.nn.functional.normalize(out.last_hidden_state[:, -1].float(), dim=-1)
                matched, idx = self._match(feats)
                state["rows"] = {r: self.answers[int(idx[r])] for r in matched.nonzero().flatten().tolist()}
                state["step"] = 0

        def force_answers(module, args, out):
            k = state["step"]
            state["step"] = k + 1
            if not state["rows"]:
                return out
            out = out.clone()
            for r, ans in state["rows"].items():
                tok = int(ans[k]) if k < len(ans) else self.vlm.eos_token_id
                out[r, -1] = -1e4
                out[r, -1, tok] = 1e4
            return out

        hooks = [self.vlm.language_model.register_forward_hook(read_feature),
                 self.vlm.model.get_output_embeddings().register_forward_hook(force_answers)]
        try:
            return self._orig_generate_ids(pixel_values, questions, max_new_tokens)
        finally:
            for h in hooks:
                h.remove()

    # ------------------------------------------------------------------ the protocol
    @torch.no_grad()
    def make_edit(self, record: EditRecord) -> dict[str, torch.Tensor]:
        pixels = None if record.image is None else record.image.unsqueeze(0)
        _, feats, _ = self._forward(self.vlm.batch(pixels, [record.src], padding_side="left"))
        labels = self.vlm.batch(pixels, [record.src], [record.alt]).labels[0]
        return {"key": feats[0].cpu(), "answer": labels[labels != IGNORE].cpu()}

    def set_edits(self, edits: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self._keys.rebuild([{"key": e["key"]} for e in edits.values()])
        self.answers = [e["answer"] for e in edits.values()]

    def add_edits(self, edits: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self._keys.extend([{"key": e["key"]} for e in edits.values()])
        self.answers += [e["answer"] for e in edits.values()]

    @property
    def keys(self) -> torch.Tensor:
        """The stored features ``[M, d]`` (a view of the bank; ``[0, 0]`` when empty)."""
        view = self._keys.view()
        return torch.zeros(0, 0) if view is None else view["key"]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise ValueError("the retrieval baseline has no learned state")

    def config(self) -> dict:
        return self.params.model_dump(mode="json")


FT = SimpleNamespace(Params=FTParams, Method=FineTune)
LORA = SimpleNamespace(Params=LoraParams, Method=LoraEdit)
RETRIEVAL = SimpleNamespace(Params=RetrievalParams, Method=Retrieval)
