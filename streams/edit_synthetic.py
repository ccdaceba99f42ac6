"""Synthetic knowledge edits in EasyEdit's MMEdit format over the synthetic VQA world
(:mod:`.vqa_synthetic`), for the tiny VLM: deterministic by seed, offline.

One record (:class:`~lifelong_moe.editing.types.EditRecord`):

- ``image`` / ``src``: a scene and a question about it (colour, location or count: the types the
  tiny VLM is pretrained on, so it has knowledge to overwrite); ``pred`` the true answer; ``alt`` a
  counterfactual answer from the same closed vocabulary (never the true one);
- ``rephrase``: another wording of the same question (text generality);
- ``image_rephrase``: another rendering of the same scene content (new position jitter, rotation,
  colour and style noise; image generality);
- ``loc`` / ``loc_ans``: a text-only world-knowledge question ("how many corners does the square
  have?") and its answer (text locality);
- ``m_loc`` / ``m_loc_q`` / ``m_loc_a``: an unrelated scene with a question of a type no edit asks
  (recognition or judge, also pretrained) and its true answer (image locality; MMEdit likewise
  draws these from another dataset).

Train and test splits use different random streams, different digit glyphs, and disjoint scene
contents (a scene belongs to the split its attribute hash picks). Pixels are ``float [3, 32, 32]``
normalised as the tiny VLM's processor does (CLIP mean / std), the input ``VisionLanguageModel``
takes."""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..editing.types import EditRecord
from ..errors import UserError
from .synthetic_render import A, SHAPES, render
from .vqa_synthetic import CORNERS, _fix_articles, _nouns, _spec, make_questions, sample_for

__all__ = ["EDIT_TYPES", "LOCALITY_TYPES", "IMAGE_MEAN", "IMAGE_STD", "edit_records"]

EDIT_TYPES = ("color", "location", "count")
LOCALITY_TYPES = ("recognition", "judge")  # pretrained types no edit asks about
# the tiny VLM's processor normalisation (lmoe-tiny-vit: open_clip's OpenAI defaults)
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
_SPLITS = ("train", "test")


def _normalise(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).float() / 255.0
    return (x - torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGE_STD).view(1, 3, 1, 1)


def _split_of(row: np.ndarray) -> int:
    """0 (train) or 1 (test): a fixed hash of the scene's attributes, so the splits never share one."""
    return hashlib.sha256(np.asarray(row, np.int64).tobytes()).digest()[0] & 1


def _scenes(qtype: str, n: int, split: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` scenes suited to ``qtype`` whose content belongs to ``split``."""
    out: list[np.ndarray] = []
    while len(out) < n:
        sc = sample_for(qtype, max(2 * (n - len(out)), 8), rng)
        out += [row for row in sc if _split_of(row) == split]
    return np.stack(out[:n])


def _two_wordings(qtype: str, row: np.ndarray, rng: np.random.Generator) -> tuple[str, str]:
    """Two different phrasings of the same question about ``row`` (same noun)."""
    s = _spec(qtype)
    frames = s.group_phrasings if row[A["count"]] > 1 and s.group_phrasings else s.phrasings
    obj, objs = _nouns(row, rng, named=True)
    texts = list(dict.fromkeys(_fix_articles(f.format(obj=obj, objs=objs)) for f in frames))  # distinct, in order
    i, j = rng.choice(len(texts), 2, replace=False)
    return texts[i], texts[j]


def _render(scenes: np.ndarray, qtype: str, split: int, rng: np.random.Generator) -> torch.Tensor:
    mix = _spec(qtype).mix
    return _normalise(render(scenes, rng, glyph_split=_SPLITS[split], rotation=mix.rotation,
                             style_strength=mix.style_strength))


def edit_records(split: str, n: int, *, seed: int = 0) -> list[EditRecord]:
    """``n`` MMEdit-format edit records of ``split`` ("train" | "test"), deterministic by ``seed``;
    question types cycle through :data:`EDIT_TYPES` and answers are balanced within each type."""
    if split not in _SPLITS:
        raise UserError(f"edit_records: split must be 'train' or 'test', got {split!r}")
    if n < 0:
        raise UserError(f"edit_records: n must be >= 0, got {n}")
    s = _SPLITS.index(split)
    rng = np.random.default_rng([int(seed), s, 0xED17])
    types = [EDIT_TYPES[i % len(EDIT_TYPES)] for i in range(n)]
    records: list[EditRecord | None] = [None] * n
    for qtype in EDIT_TYPES:
        idx = [i for i, t in enumerate(types) if t == qtype]
        if not idx:
            continue
        k = len(idx)
        answers = list(_spec(qtype).answers)
        scenes = _scenes(qtype, k, s, rng)
        images, rephrased = _render(scenes, qtype, s, rng), _render(scenes, qtype, s, rng)
        _, truths = make_questions(scenes, qtype, rng)
        # unrelated image locality: a scene asked a question of a type no edit asks (as MMEdit draws
        # its image-locality questions from another dataset, OK-VQA), with its true answer
        loc_types = [LOCALITY_TYPES[int(rng.integers(len(LOCALITY_TYPES)))] for _ in range(k)]
        loc = {}
        for lt in sorted(set(loc_types)):
            rows = [j for j in range(k) if loc_types[j] == lt]
            sc = _scenes(lt, len(rows), s, rng)
            qs, ans = make_questions(sc, lt, rng)
            ims = _render(sc, lt, s, rng)
            loc.update({j: (sc[r], ims[r], qs[r], ans[r]) for r, j in enumerate(rows)})
        for j, i in enumerate(idx):
            src, rephrase = _two_wordings(qtype, scenes[j], rng)
            alt = answers[(answers.index(truths[j]) + int(rng.integers(1, len(answers)))) % len(answers)]
            loc_scene, loc_image, m_q, m_a = loc[j]
            shape = int(rng.choice(sorted(CORNERS)))
            records[i] = EditRecord(
                src=src, alt=alt, image=images[j], pred=truths[j], rephrase=rephrase,
                image_rephrase=rephrased[j], loc=f"how many corners does the {SHAPES[shape]} have?",
                loc_ans=CORNERS[shape], m_loc=loc_image, m_loc_q=m_q, m_loc_a=m_a,
                meta={"source": "synthetic_edit", "split": split, "seed": int(seed), "index": i,
                      "question_type": qtype, "scene": scenes[j].tolist(), "m_loc_scene": loc_scene.tolist(),
                      "m_loc_question_type": loc_types[j]})
    return records
