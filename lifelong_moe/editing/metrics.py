"""Knowledge-editing metrics as the field defines them (LiveEdit's evaluator,
``evaluation/vllm_editor_eval.py:136-228``; EasyEdit's MMEdit names in brackets):

- ``reliability`` (rewrite_acc): the edit's image and prompt -> the new target ``alt``;
- ``text_generality`` (rephrase_acc): the edit's image, the rephrased prompt -> ``alt``;
- ``image_generality`` (image_rephrase_acc): the rephrased image, the edit prompt -> ``alt``;
- ``text_locality`` (locality_acc): the text-only question ``loc`` -> the PRE-edit model's output;
- ``image_locality`` (multimodal_locality_acc): ``m_loc`` image + ``m_loc_q`` -> the pre-edit output.

Each is scored twice: ``token_acc``, teacher-forced token accuracy over the answer's tokens (not the
closing EOS; for locality: agreement of the argmax with the pre-edit argmax at the positions of
``loc_ans`` / ``m_loc_a``, LiveEdit's rule, not EasyEdit's top-10 variant), and ``exact_match``, the
greedy generated answer equal to ``alt`` (for locality: equal to the pre-edit generated answer).
Pre-edit outputs are cached before the edits are applied (EasyEdit#643). Records lacking a field
(no rephrase, no ``loc``) do not count for that metric.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..backbones.vlm import IGNORE
from .types import EditRecord

METRICS = ("reliability", "text_generality", "image_generality", "text_locality", "image_locality")
LOCALITY = ("text_locality", "image_locality")


@dataclass
class Probe:
    record: int  # index of the record it comes from
    image: torch.Tensor | None
    question: str
    answer: str


def probes(records: Sequence[EditRecord]) -> dict[str, list[Probe]]:
    """The inputs each metric scores, per record that has the fields."""
    out: dict[str, list[Probe]] = {m: [] for m in METRICS}
    for i, r in enumerate(records):
        out["reliability"].append(Probe(i, r.image, r.src, r.alt))
        if r.rephrase:
            out["text_generality"].append(Probe(i, r.image, r.rephrase, r.alt))
        if r.image_rephrase is not None:
            out["image_generality"].append(Probe(i, r.image_rephrase, r.src, r.alt))
        if r.loc:
            out["text_locality"].append(Probe(i, None, r.loc, r.loc_ans or r.alt))
        if r.m_loc is not None and r.m_loc_q:
            out["image_locality"].append(Probe(i, r.m_loc, r.m_loc_q, r.m_loc_a or r.alt))
    return out


def text_only_supported(vlm) -> bool:
    """Whether the VLM takes text-only prompts (``vlm.batch(None, ...)``)."""
    cached = getattr(vlm, "_lmoe_text_only", None)
    if cached is None:
        try:
            vlm.batch(None, ["?"], ["?"])
            cached = True
        except (AttributeError, TypeError, ValueError):
            cached = False
        try:
            vlm._lmoe_text_only = cached
        except AttributeError:
            pass
    return cached


def _groups(items: Sequence[Probe], batch_size: int):
    """Index batches of probes that all have an image or all have none (one forward each)."""
    for has_image in (True, False):
        idx = [i for i, p in enumerate(items) if (p.image is not None) == has_image]
        for s in range(0, len(idx), batch_size):
            yield idx[s:s + batch_size], has_image


def _pixels(items: Sequence[Probe], idx: list[int], has_image: bool):
    return torch.stack([items[i].image for i in idx]) if has_image else None


@torch.no_grad()
def answer_tokens(vlm, items: Sequence[Probe], batch_size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per probe ``(teacher-forced argmax, reference tokens)`` over its answer tokens (the closing EOS
    left out, as LiveEdit's and EasyEdit's label masks cover the target's tokens only)."""
    out: list = [None] * len(items)
    for idx, has_image in _groups(items, batch_size):
        batch = vlm.batch(_pixels(items, idx, has_image), [items[i].question for i in idx],
                          [items[i].answer for i in idx])
        logits = vlm.logits(batch)
        pred, y = logits[:, :-1].argmax(-1).cpu(), batch.labels[:, 1:].cpu()
        for row, i in enumerate(idx):
            at = (y[row] != IGNORE).nonzero().flatten()[:-1]  # the answer's tokens, not the closing EOS
            out[i] = (pred[row][at], y[row][at])
    return out


@torch.no_grad()
def generations(vlm, items: Sequence[Probe], batch_size: int = 64, max_new_tokens: int = 8) -> list[str]:
    out: list = [""] * len(items)
    for idx, has_image in _groups(items, batch_size):
        texts = vlm.generate(_pixels(items, idx, has_image), [items[i].question for i in idx], max_new_tokens)
        for i, t in zip(idx, texts):
            out[i] = t
    return out


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


@dataclass
class PreEdit:
    """The unedited model's locality outputs, cached before the edits: ``{metric: {record index: ...}}``."""

    tokens: dict[str, dict[int, torch.Tensor]]
    texts: dict[str, dict[int, str]]

    def window(self, start: int, stop: int) -> "PreEdit":
        """The entries of records ``start..stop-1``, re-indexed from 0 (to score those records alone)."""
        def cut(d):
            return {m: {i - start: x for i, x in v.items() if start <= i < stop} for m, v in d.items()}

        return PreEdit(cut(self.tokens), cut(self.texts))


def usable(vlm, items: dict[str, list[Probe]]) -> dict[str, list[Probe]]:
    """``items`` less the text-only probes when the VLM has no text-only path."""
    if text_only_supported(vlm):
        return items
    return {m: [p for p in ps if p.image is not None] for m, ps in items.items()}


def cache_pre_edit(vlm, records: Sequence[EditRecord], batch_size: int = 64, max_new_tokens: int = 8) -> PreEdit:
    items = usable(vlm, probes(records))
    owners = {m: [p.record for p in items[m]] for m in LOCALITY}
    return PreEdit({m: dict(zip(owners[m], (p for p, _ in answer_tokens(vlm, items[m], batch_size)))) for m in LOCALITY},
                   {m: dict(zip(owners[m], generations(vlm, items[m], batch_size, max_new_tokens))) for m in LOCALITY})


def score(vlm, records: Sequence[EditRecord], pre: PreEdit, batch_size: int = 64, max_new_tokens: int = 8,
          generate: bool = True, only: Sequence[str] = METRICS) -> dict[str, dict]:
    """``{metric: {"token_acc", "exact_match", "n", "per_record"}}`` over ``records`` (means; None where
    no record has the fields, or for text locality when the VLM has no text-only path)."""
    items = usable(vlm, probes(records))
    out = {}
    for m in only:
        ps = items[m]
        if not ps:
            out[m] = {"token_acc": None, "exact_match": None, "n": 0, "per_record": []}
            continue
        toks = answer_tokens(vlm, ps, batch_size)
        if m in LOCALITY:
            refs = [pre.tokens[m][p.record] for p in ps]
            acc = [(a == q).float().mean().item() if len(q) else 1.0 for (a, _), q in zip(toks, refs)]
        else:
            acc = [(p == y).float().mean().item() for p, y in toks]
        em = None
        if generate:
            texts = generations(vlm, ps, batch_size, max_new_tokens)
            refs = [pre.texts[m][p.record] for p in ps] if m in LOCALITY else [p.answer for p in ps]
            em = [float(normalize(a) == normalize(b)) for a, b in zip(texts, refs)]
        out[m] = {"token_acc": sum(acc) / len(acc), "exact_match": None if em is None else sum(em) / len(em),
                  "n": len(ps), "per_record": acc}
    return out


def summary(scores: dict[str, dict]) -> dict[str, float | None]:
    """Flat ``{"reliability.token_acc": ..., "reliability.exact_match": ...}``."""
    return {f"{m}.{k}": v[k] for m, v in scores.items() for k in ("token_acc", "exact_match")}
