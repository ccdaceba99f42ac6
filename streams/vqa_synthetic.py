"""Synthetic visual question answering over the synthetic world (:mod:`.synthetic`), in VQACL's ten
question types and VQACL's order (Zhang et al., CVPR 2023, ``Question_type.py``; the order CL-MoE
trains in). Every question is answerable from its 32x32 picture, answers are short words from a
closed vocabulary, drawn balanced (so ``chance_level = 1 / len(answer_space)`` is what a blind guess
gets), and everything is deterministic by seed. Train and test images come from different random
streams and different digit glyphs (``render(glyph_split="train" | "test")``).

The types (what each asks; answers; the scenes it is asked on):

- ``recognition``: what the object is. Answers: the 10 shape names or ``digit`` (11). One object.
- ``location``: where the object is. Answers: the 9 grid positions ("top left" ... "bottom right").
  One object, shape or digit.
- ``judge``: yes/no, whether the picture shows a named colour or shape ("is there a red object?",
  "is the circle red?", "is there a star?"). Answers: yes, no, exactly half each. One to four shapes,
  styles that keep colours (clean, noisy, blurry).
- ``commonsense``: world knowledge about the shape, not shown by a label: how many corners it has
  (circle, ring: zero; crescent: two; triangle: three; square, diamond: four). The question never
  names the shape. Answers: zero, two, three, four. One object of those six shapes.
- ``count``: how many objects. Answers: one to four. Shapes (a group shares shape and colour).
- ``action``: what was done to the picture (its rendering style). Answers: clean, noisy, blurry,
  inverted, outlined.
- ``color``: the object's colour. Answers: the 10 colours. Clean, noisy or blurry pictures only
  (inverting or outlining changes the colours shown).
- ``type``: the fill pattern of the shape. Answers: solid, striped, dotted, checkered. One large
  shape, clean.
- ``subcategory``: which digit (the finer category under recognition's ``digit``). Answers: 0 to 9.
  One large digit, clean, noisy or blurry.
- ``causal``: why the object is hard to see; exactly one cause holds in each picture: it is small
  (far away: a small, clean object), blurred (a large object, blurry style) or noisy (a large object,
  noisy style). Answers: far, blur, noise.

:data:`PRETRAIN_TYPES` (recognition, location, judge, count, color) are the types the tiny VLM is
pretrained on; the other five stay unseen, so a continual stream has something new to learn.

Streams name a task ``synthetic_vqa/<type>`` (or, for real VQA v2 data in the VQACL partition format,
``vqacl/<type>``, see :mod:`.vqacl`) and load it with :func:`.vqa_sources.load_vqa_source`.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data import QAData, QARecord
from ..errors import UserError
from . import synthetic as _world
from .synthetic import SceneMix, sample_scenes
from .synthetic_render import (A, BACKGROUNDS, COLORS, COUNTS, DIGITS, POSITIONS, SHAPE_PLURALS, SHAPES, SIZES,
                               STYLES, TEXTURES, render)

VQA_GENERATOR_VERSION = 3  # bump whenever questions, answers or images change (pretrained-VLM cache key)

QUESTION_TYPES: list[str] = ["recognition", "location", "judge", "commonsense", "count", "action", "color",
                             "type", "subcategory", "causal"]
PRETRAIN_TYPES: list[str] = ["recognition", "location", "judge", "count", "color"]
HELD_OUT_TYPES: list[str] = [t for t in QUESTION_TYPES if t not in PRETRAIN_TYPES]

__all__ = ["QUESTION_TYPES", "PRETRAIN_TYPES", "HELD_OUT_TYPES", "DEFINITIONS", "VQA_GENERATOR_VERSION",
           "make_questions", "sample_for", "qa_examples", "answer_space", "chance_level", "vocabulary", "words",
           "load_question_type", "load",
           "UnknownQuestionTypeError", "CORNERS", "CAUSES", "describe_scene"]


class UnknownQuestionTypeError(UserError, ValueError):
    """An unknown question type or VQA source name."""


# ----------------------------------------------------------------------------- world knowledge
# commonsense: corners of the shapes it is asked about (shape index -> answer word)
CORNERS: dict[int, str] = {SHAPES.index("circle"): "zero", SHAPES.index("ring"): "zero",
                           SHAPES.index("crescent"): "two", SHAPES.index("triangle"): "three",
                           SHAPES.index("square"): "four", SHAPES.index("diamond"): "four"}
_CORNER_ANSWERS = ("zero", "two", "three", "four")
# causal: answer -> (size, style) of the one cause that holds in the picture
CAUSES: dict[str, tuple[int, int]] = {"far": (SIZES.index("small"), STYLES.index("clean")),
                                      "blur": (SIZES.index("large"), STYLES.index("blurry")),
                                      "noise": (SIZES.index("large"), STYLES.index("noisy"))}
_COLOR_SAFE = (1.0, 0.12, 0.12, 0.0, 0.0)  # styles that keep colours visible (no inverted / outlined)


@dataclass(frozen=True)
class _QType:
    name: str
    answers: tuple[str, ...]
    mix: SceneMix
    phrasings: tuple[str, ...]  # placeholders: {obj} (shape name, "digit" or "object"), {objs} (plural)
    group_phrasings: tuple[str, ...] = ()  # for scenes of 2-4 objects, where the singular reads wrong


DEFINITIONS: dict[str, str] = {
    "recognition": "what the object is: its shape, or 'digit'",
    "location": "where the object is, in a 3x3 grid",
    "judge": "yes/no: does the picture show a named colour or shape",
    "commonsense": "how many corners the shape has (world knowledge; the shape is not named)",
    "count": "how many objects there are",
    "action": "what was done to the picture (its rendering style)",
    "color": "the object's colour",
    "type": "the shape's fill pattern",
    "subcategory": "which digit (the finer category of recognition's 'digit')",
    "causal": "why the object is hard to see: far (small), blur or noise",
}


_SPECS = {s.name: s for s in [
    _QType("recognition", tuple(SHAPES) + ("digit",), SceneMix(p_digit=1 / 11, p_group=0.0),
           ("what is this?", "what is in the picture?", "what object is shown?", "what is the object in the picture?")),
    _QType("location", tuple(POSITIONS), SceneMix(p_group=0.0),
           ("where is the {obj}?", "where is the {obj} in the picture?", "in which part of the picture is the {obj}?",
            "where is the {obj} located?")),
    _QType("judge", ("yes", "no"), SceneMix(p_digit=0.0, p_group=0.3, styles=_COLOR_SAFE), ()),  # own phrasings
    _QType("commonsense", _CORNER_ANSWERS, SceneMix(p_digit=0.0, p_group=0.0),
           ("how many corners does this shape have?", "how many corners does the object have?",
            "how many corners does the shape in the picture have?", "how many corners does it have?")),
    _QType("count", tuple(COUNTS), SceneMix(p_digit=0.0, p_group=0.75),
           ("how many objects are there?", "how many {objs} are there?", "how many {objs} are in the picture?",
            "how many things can you see?")),
    _QType("action", tuple(STYLES), SceneMix(style_strength=(1.0, 1.3)),
           ("what was done to this picture?", "how was this picture edited?", "what effect was applied to the picture?",
            "what filter does this picture have?")),
    _QType("color", tuple(COLORS), SceneMix(styles=_COLOR_SAFE),
           ("what color is the {obj}?", "what is the color of the {obj}?", "which color does the {obj} have?"),
           ("what color are the {objs}?", "what is the color of the {objs}?", "which color do the {objs} have?")),
    _QType("type", tuple(TEXTURES), SceneMix(p_digit=0.0, p_group=0.0, styles=(1, 0, 0, 0, 0)),
           ("what pattern is on the {obj}?", "what kind of fill does the {obj} have?",
            "what type of texture does the {obj} have?", "how is the {obj} filled?")),
    _QType("subcategory", tuple(DIGITS), SceneMix(p_digit=1.0, p_group=0.0, sizes=(0.0, 1.0), styles=_COLOR_SAFE),
           ("which digit is this?", "what number is written here?", "what number is shown?",
            "which digit is in the picture?")),
    _QType("causal", tuple(CAUSES), SceneMix(p_digit=0.0, p_group=0.0, textures=(1, 0, 0, 0),
                                             style_strength=(1.1, 1.4)),
           ("why is the object hard to see?", "why is it hard to see the {obj}?",
            "why can you not see the {obj} clearly?", "why is the {obj} not clear?")),
]}
_JUDGE_COLOR = ("is there a {c} object?", "is there anything {c} in the picture?", "is the {obj} {c}?")
_JUDGE_COLOR_GROUP = ("is there a {c} object?", "is there anything {c} in the picture?", "are the {objs} {c}?")
_JUDGE_SHAPE = ("is there a {s}?", "is there a {s} in the picture?", "does the picture show a {s}?")
assert list(_SPECS) == QUESTION_TYPES == list(DEFINITIONS)


def _spec(qtype: str) -> _QType:
    if qtype not in _SPECS:
        close = difflib.get_close_matches(str(qtype), QUESTION_TYPES, n=1, cutoff=0.5)
        raise UnknownQuestionTypeError(f"unknown question type {qtype!r}" + (f" (did you mean {close[0]!r}?)" if close
                                       else "") + f"; types: {', '.join(QUESTION_TYPES)}")
    return _SPECS[qtype]


def answer_space(qtype: str) -> list[str]:
    """The closed answer vocabulary of ``qtype`` (answers are drawn uniformly from it)."""
    return list(_spec(qtype).answers)


def chance_level(qtype: str) -> float:
    """Accuracy of a uniform guess over :func:`answer_space` (answers are balanced)."""
    return 1.0 / len(_spec(qtype).answers)


# ----------------------------------------------------------------------------- scenes
def _balanced(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` labels in ``range(k)``, each used ``n // k`` or ``n // k + 1`` times, shuffled."""
    return rng.permutation(np.arange(n) % k)


def _sample_groups(n: int, rng: np.random.Generator, mix: SceneMix, groups) -> np.ndarray:
    """Scenes whose rows ``mask`` follow ``fixed`` for each ``(mask, fixed)`` in ``groups``."""
    sc = np.full((n, len(A)), -1, np.int64)
    for mask, fixed in groups:
        idx = np.flatnonzero(mask)
        if len(idx):
            sc[idx] = sample_scenes(len(idx), rng, mix, {k: np.asarray(v)[idx] if np.ndim(v) else v
                                                        for k, v in fixed.items()})
    return sc


def sample_for(qtype: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` scenes suited to ``qtype`` (int array as from :func:`.synthetic.sample_scenes`) whose
    answers are balanced over :func:`answer_space` (judge balances yes/no in :func:`make_questions`)."""
    s = _spec(qtype)
    k = len(s.answers)
    label = _balanced(n, k, rng)
    one = np.ones(n, np.int64)
    if qtype == "recognition":
        digit = label == k - 1
        return _sample_groups(n, rng, s.mix, [(digit, {"digit": rng.integers(0, 10, n)}),
                                              (~digit, {"shape": label, "count": one})])
    if qtype == "location":
        digit = rng.random(n) < s.mix.p_digit
        return _sample_groups(n, rng, s.mix, [(digit, {"digit": rng.integers(0, 10, n), "position": label}),
                                              (~digit, {"count": one, "position": label})])
    if qtype == "judge":
        return sample_scenes(n, rng, s.mix)
    if qtype == "commonsense":
        pools = [np.array([sh for sh, a in CORNERS.items() if a == ans]) for ans in s.answers]
        shape = np.array([pools[lab][rng.integers(len(pools[lab]))] for lab in label], np.int64)
        return sample_scenes(n, rng, s.mix, {"shape": shape, "count": one})
    if qtype == "count":
        return sample_scenes(n, rng, s.mix, {"count": label + 1})
    if qtype == "action":
        return sample_scenes(n, rng, s.mix, {"style": label})
    if qtype == "color":
        return sample_scenes(n, rng, s.mix, {"color": label})
    if qtype == "type":
        return sample_scenes(n, rng, s.mix, {"texture": label, "count": one, "size": one})
    if qtype == "subcategory":
        return sample_scenes(n, rng, s.mix, {"digit": label})
    # causal
    size, style = (np.array([CAUSES[s.answers[lab]][i] for lab in label]) for i in (0, 1))
    return sample_scenes(n, rng, s.mix, {"count": one, "size": size, "style": style})


# ----------------------------------------------------------------------------- questions and answers
def _unsuited(qtype: str, sc: np.ndarray) -> np.ndarray:
    """Rows of ``sc`` a ``qtype`` question cannot be asked of (so its answer would not follow)."""
    digit, count, style = sc[:, A["digit"]] >= 0, sc[:, A["count"]], sc[:, A["style"]]
    colour_lost = np.isin(style, [STYLES.index("inverted"), STYLES.index("outlined")])
    bad = {
        "recognition": count != 1,
        "location": (count != 1) | (sc[:, A["position"]] < 0),
        "judge": digit | colour_lost,
        "commonsense": (count != 1) | ~np.isin(sc[:, A["shape"]], list(CORNERS)),
        "count": np.zeros(len(sc), bool),
        "action": np.zeros(len(sc), bool),
        "color": colour_lost,
        "type": digit,
        "subcategory": ~digit,
        "causal": (count != 1) | ~np.any([(sc[:, A["size"]] == sz) & (style == st) for sz, st in CAUSES.values()], 0),
    }[qtype]
    return np.flatnonzero(bad)


def _answer(qtype: str, row: np.ndarray) -> str:
    if qtype == "recognition":
        return "digit" if row[A["digit"]] >= 0 else SHAPES[row[A["shape"]]]
    if qtype == "causal":
        return next(a for a, (sz, st) in CAUSES.items() if (row[A["size"]], row[A["style"]]) == (sz, st))
    if qtype == "commonsense":
        return CORNERS[int(row[A["shape"]])]
    attr = {"location": "position", "count": "count", "action": "style", "color": "color", "type": "texture",
            "subcategory": "digit"}[qtype]
    names = {"position": POSITIONS, "count": COUNTS, "style": STYLES, "color": COLORS, "texture": TEXTURES,
             "digit": DIGITS}[attr]
    v = int(row[A[attr]])
    return names[v - 1] if attr == "count" else names[v]


def _nouns(row: np.ndarray, rng: np.random.Generator, named: bool) -> tuple[str, str]:
    """(singular, plural) noun for the scene's object(s): its shape name (when ``named``), or a generic one."""
    if row[A["digit"]] >= 0:
        return ("digit", "digits") if named and rng.random() < 0.6 else ("object", "objects")
    if named and rng.random() < 0.6:
        return SHAPES[row[A["shape"]]], SHAPE_PLURALS[row[A["shape"]]]
    return ("object", "objects") if rng.random() < 0.8 else ("thing", "things")


def _judge(row: np.ndarray, truth: bool, rng: np.random.Generator) -> str:
    single = row[A["count"]] == 1
    if rng.random() < 0.5:  # colour
        c = int(row[A["color"]]) if truth else int((row[A["color"]] + rng.integers(1, len(COLORS))) % len(COLORS))
        frames = _JUDGE_COLOR if single else _JUDGE_COLOR_GROUP
        obj, objs = _nouns(row, rng, named=True)
        return frames[rng.integers(len(frames))].format(c=COLORS[c], obj=obj, objs=objs)
    s = int(row[A["shape"]]) if truth else int((row[A["shape"]] + rng.integers(1, len(SHAPES))) % len(SHAPES))
    return _JUDGE_SHAPE[rng.integers(len(_JUDGE_SHAPE))].format(s=SHAPES[s])


def _fix_articles(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def make_questions(scenes: np.ndarray, qtype: str, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """One ``(question, answer)`` per scene row, deterministic given ``rng``. The scenes must suit the
    type (as from :func:`sample_for`); a row that does not (e.g. a shape for ``subcategory``) raises
    ``ValueError``. Judge questions are true for exactly half of the rows (the first of an odd one out
    drawn at random)."""
    s = _spec(qtype)
    sc = np.asarray(scenes)
    bad = _unsuited(qtype, sc)
    if len(bad):
        raise ValueError(f"{len(bad)} scene(s) do not suit {qtype!r} questions (first: row {bad[0]}); "
                         f"draw them with sample_for({qtype!r}, ...)")
    if qtype == "judge":
        truth = _balanced(len(sc), 2, rng) == 0
        return ([_fix_articles(_judge(row, bool(t), rng)) for row, t in zip(sc, truth)],
                ["yes" if t else "no" for t in truth])
    questions = []
    for row in sc:
        frames = s.group_phrasings if row[A["count"]] > 1 and s.group_phrasings else s.phrasings
        obj, objs = _nouns(row, rng, named=qtype not in ("recognition", "commonsense"))
        questions.append(_fix_articles(frames[rng.integers(len(frames))].format(obj=obj, objs=objs)))
    return questions, [_answer(qtype, row) for row in sc]


# ----------------------------------------------------------------------------- full descriptions
_STYLE_EFFECT = {"noisy": " with noise", "blurry": " with blur"}


def describe_scene(row: np.ndarray) -> str:
    """One deterministic caption naming every attribute of scene ``row`` that the ten question types
    read, in a fixed order, with the world knowledge the held-out types rely on in plain words (a
    shape's corners, "far away" for a small object, the noise or blur a style adds):
    "a small red striped triangle in the top left , with three corners , far away , noisy style
    with noise , on a black background ." The tiny VLM learns to say this (LLaVA's stage-1 captions),
    so it has put each attribute into words before a stream asks a new question type about it."""
    count = int(row[A["count"]])
    digit = row[A["digit"]] >= 0
    noun = f"digit {DIGITS[row[A['digit']]]}" if digit else (SHAPE_PLURALS if count > 1 else SHAPES)[row[A["shape"]]]
    words_ = ([SIZES[row[A["size"]]]] if count == 1 else []) + [COLORS[row[A["color"]]]]
    words_ += ([] if digit else [TEXTURES[row[A["texture"]]]]) + [noun]
    text = " ".join([COUNTS[count - 1] if count > 1 else "a"] + words_)
    clauses = []
    if count == 1:
        text += f" in the {POSITIONS[row[A['position']]]}"
        if not digit and int(row[A["shape"]]) in CORNERS:
            clauses.append(f"with {CORNERS[int(row[A['shape']])]} corners")
        if SIZES[row[A["size"]]] == "small":
            clauses.append("far away")
    style = STYLES[row[A["style"]]]
    clauses.append(f"{style} style{_STYLE_EFFECT.get(style, '')}")
    clauses.append(f"on a {BACKGROUNDS[row[A['background']]]} background")
    return _fix_articles(" , ".join([text] + clauses) + " .")


# ----------------------------------------------------------------------------- vocabulary
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    """The word-level tokens of ``text``: lower-case runs of letters/digits, and each other
    non-space character (punctuation) on its own."""
    return _WORD.findall(text.lower())


def _template_words(frames) -> set[str]:
    return {w for f in frames for w in words(re.sub(r"\{[^}]*\}", " ", f))}


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    vocab: set[str] = set()
    for names in (SHAPES, SHAPE_PLURALS, COLORS, TEXTURES, SIZES, POSITIONS, BACKGROUNDS, STYLES, COUNTS, DIGITS):
        vocab |= {w for name in names for w in words(name)}
    for s in _SPECS.values():  # questions and answers
        vocab |= _template_words(s.phrasings + s.group_phrasings) | {w for a in s.answers for w in words(a)}
    vocab |= _template_words(_JUDGE_COLOR + _JUDGE_COLOR_GROUP + _JUDGE_SHAPE)
    vocab |= {"digit", "digits", "object", "objects", "thing", "things"}
    # captions of the world (streams/synthetic.py: _describe and its frames)
    vocab |= _template_words(_world._FRAMES + _world._STYLE_FRAMES)
    vocab |= {"a", "an", "some", "in", "the", "on", "background", "style", "is", "are"}
    vocab |= {"with", "corners", "far", "away", "noise", "blur", ","}  # describe_scene's clauses
    return tuple(sorted(vocab))


def vocabulary() -> list[str]:
    """Every word (:func:`words`) any question, answer or caption of the world can contain, sorted;
    punctuation marks are entries of their own."""
    return list(_vocabulary())


# ----------------------------------------------------------------------------- tasks
class QAImages(Dataset):
    """``(float image [3, 32, 32] in [0, 1], i)`` over a uint8 image tensor; ``i`` indexes the records."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].float() / 255.0, i


def qa_examples(qtype: str, n: int, rng: np.random.Generator, *, glyph_split: str = "pretrain"):
    """``n`` examples of ``qtype``: ``(images uint8 [n, 3, 32, 32], questions, answers)``, rendered with the
    type's scene mix. ``glyph_split`` "pretrain" for pretraining; the tasks use "train" and "test"."""
    mix = _spec(qtype).mix
    sc = sample_for(qtype, n, rng)
    images = render(sc, rng, glyph_split=glyph_split, rotation=mix.rotation, style_strength=mix.style_strength)
    questions, answers = make_questions(sc, qtype, rng)
    return images, questions, answers


def _generate(qtype: str, seed: int, split: int, n: int):
    rng = np.random.default_rng([seed, QUESTION_TYPES.index(qtype), split, 0x7A5])
    images, questions, answers = qa_examples(qtype, n, rng, glyph_split=("train", "test")[split])
    return torch.from_numpy(images), questions, answers


@lru_cache(maxsize=64)
def _cached(qtype: str, seed: int, n_train: int, n_test: int):
    return _generate(qtype, seed, 0, n_train), _generate(qtype, seed, 1, n_test)


def load_question_type(qtype: str, *, seed: int = 0, n_train: int = 300, n_test: int = 100) -> QAData:
    """Question type ``qtype`` (``"color"`` or ``"synthetic_vqa/color"``) as a :class:`QAData`:
    balanced answers, deterministic by seed, train and test images from different streams and glyphs."""
    key = qtype.split("/", 1)[1] if qtype.startswith("synthetic_vqa/") else qtype
    s = _spec(key)
    if n_train < 1 or n_test < 1:
        raise UserError(f"synthetic_vqa/{key}: n_train and n_test must be >= 1 (got {n_train}, {n_test})")
    splits = _cached(key, int(seed), int(n_train), int(n_test))
    records = [[QARecord(q, a, question_type=key, image_id=f"synthetic_vqa/{key}/{part}/{i}")
                for i, (q, a) in enumerate(zip(qs, ans))]
               for part, (_, qs, ans) in zip(("train", "test"), splits)]
    return QAData(name=f"synthetic_vqa/{key}", train=QAImages(splits[0][0]), test=QAImages(splits[1][0]),
                  train_records=records[0], test_records=records[1],
                  meta={"source": "synthetic_vqa", "question_type": key, "definition": DEFINITIONS[key],
                        "seed": int(seed), "answer_space": list(s.answers), "chance": chance_level(key),
                        "pretrained": key in PRETRAIN_TYPES, "generator_version": VQA_GENERATOR_VERSION,
                        "image_size": 32})


def load(name: str, *, seed: int = 0, n_train: int = 300, n_test: int = 100, **_ignored) -> QAData:
    """Source entry point ``load("synthetic_vqa/color", seed=...)``; other keyword arguments of the
    generic loaders (root, ...) are accepted and ignored."""
    return load_question_type(name, seed=seed, n_train=n_train, n_test=n_test)
