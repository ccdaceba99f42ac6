"""Synthetic VQA (streams/vqa_synthetic.py) and VQACL-format real data (streams/vqacl.py)."""
from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest
import torch

from lifelong_moe.data import QAData, QARecord
from lifelong_moe.errors import UserError
from lifelong_moe.streams import vqa_synthetic as V
from lifelong_moe.streams.synthetic import attribute_bank, caption_batch
from lifelong_moe.streams.synthetic_render import A, COLORS, COUNTS, POSITIONS, SHAPES, STYLES, TEXTURES

N = 120  # questions per type in the checks below


def _draw(qtype, seed=0, n=N):
    rng = np.random.default_rng([seed, 99])
    sc = V.sample_for(qtype, n, rng)
    q, a = V.make_questions(sc, qtype, rng)
    return sc, q, a


# ----------------------------------------------------------------------------- the ten types
def test_types_in_vqacl_order_and_pretrain_subset():
    assert V.QUESTION_TYPES == ["recognition", "location", "judge", "commonsense", "count", "action", "color",
                                "type", "subcategory", "causal"]
    assert set(V.PRETRAIN_TYPES) < set(V.QUESTION_TYPES) and len(V.PRETRAIN_TYPES) == 5
    assert V.HELD_OUT_TYPES == [t for t in V.QUESTION_TYPES if t not in V.PRETRAIN_TYPES]


@pytest.mark.parametrize("qtype", V.QUESTION_TYPES)
def test_answers_in_space_balanced_and_chance(qtype):
    _, _, answers = _draw(qtype)
    space = V.answer_space(qtype)
    assert len(space) >= 2 and len(set(space)) == len(space)
    assert set(answers) == set(space)  # every answer occurs, none outside the space
    counts = Counter(answers).values()
    assert max(counts) - min(counts) <= 1  # balanced: a blind guess gets chance_level
    assert V.chance_level(qtype) == pytest.approx(1 / len(space))


def test_judge_is_half_yes():
    _, _, answers = _draw("judge", n=101)
    assert sorted(Counter(answers).values()) == [50, 51]


_CORNERS_BY_NAME = {"circle": "zero", "ring": "zero", "crescent": "two", "triangle": "three", "square": "four",
                    "diamond": "four"}


def _oracle(qtype: str, row: np.ndarray, question: str) -> str:
    """The answer re-derived from the scene attributes (written independently of the module)."""
    shape = SHAPES[row[A["shape"]]] if row[A["shape"]] >= 0 else None
    if qtype == "recognition":
        return "digit" if row[A["digit"]] >= 0 else shape
    if qtype == "location":
        return POSITIONS[row[A["position"]]]
    if qtype == "judge":
        ws = set(V.words(question))
        asked_colors = [c for c in COLORS if c in ws]
        named_shapes = [s for s in SHAPES if s in ws or s + "s" in ws or s + "es" in ws]
        if asked_colors:  # "is the circle red?": the shape named (if any) is the scene's, the colour is asked
            assert len(asked_colors) == 1 and named_shapes in ([], [shape])
            return "yes" if asked_colors[0] == COLORS[row[A["color"]]] else "no"
        assert len(named_shapes) == 1
        return "yes" if named_shapes[0] == shape else "no"
    if qtype == "commonsense":
        return _CORNERS_BY_NAME[shape]
    if qtype == "count":
        return COUNTS[row[A["count"]] - 1]
    if qtype == "action":
        return STYLES[row[A["style"]]]
    if qtype == "color":
        return COLORS[row[A["color"]]]
    if qtype == "type":
        return TEXTURES[row[A["texture"]]]
    if qtype == "subcategory":
        return str(row[A["digit"]])
    assert qtype == "causal"
    small, style = row[A["size"]] == 0, STYLES[row[A["style"]]]
    assert (small and style == "clean") or (not small and style in ("blurry", "noisy"))  # exactly one cause
    return "far" if small else {"blurry": "blur", "noisy": "noise"}[style]


@pytest.mark.parametrize("qtype", V.QUESTION_TYPES)
def test_answer_follows_from_scene(qtype):
    scenes, questions, answers = _draw(qtype)
    for row, q, a in zip(scenes, questions, answers):
        assert a == _oracle(qtype, row, q), (q, a, row)
        if qtype != "judge":  # a shape the question names is the one in the picture
            ws = set(V.words(q))
            named = [s for s in SHAPES if s in ws or s + "s" in ws or s + "es" in ws]
            assert named in ([], [SHAPES[row[A["shape"]]]]), (q, row)


@pytest.mark.parametrize("qtype", V.QUESTION_TYPES)
def test_answer_needs_the_picture(qtype):
    """The question text alone does not give the answer: the commonest question has several answers,
    and recognition / commonsense questions never name the shape."""
    _, questions, answers = _draw(qtype, n=400)
    top = Counter(questions).most_common(1)[0][0]
    assert len({a for q, a in zip(questions, answers) if q == top}) >= 2
    if qtype in ("recognition", "commonsense"):
        assert not any(s in V.words(q) for q in questions for s in SHAPES)


def test_types_ask_different_questions():
    seen: dict[str, str] = {}
    for qtype in V.QUESTION_TYPES:
        for q in set(_draw(qtype)[1]):
            assert seen.setdefault(q, qtype) == qtype, f"{q!r} asked by {seen[q]} and {qtype}"


def test_every_word_in_vocabulary():
    vocab = set(V.vocabulary())
    assert V.vocabulary() == sorted(vocab)
    for qtype in V.QUESTION_TYPES:
        _, questions, answers = _draw(qtype, n=300)
        for text in questions + answers:
            assert set(V.words(text)) <= vocab, text
    _, captions = caption_batch(3000, np.random.default_rng(0))
    for text in captions + attribute_bank()[0]:
        assert set(V.words(text)) <= vocab, text


def test_words_splits_punctuation():
    assert V.words("Is there a red circle?") == ["is", "there", "a", "red", "circle", "?"]
    assert V.words("a photo of digit 3.") == ["a", "photo", "of", "digit", "3", "."]


def test_make_questions_deterministic_and_rejects_unsuited_scenes():
    sc = V.sample_for("color", 50, np.random.default_rng(1))
    assert V.make_questions(sc, "color", np.random.default_rng(2)) == V.make_questions(sc, "color",
                                                                                      np.random.default_rng(2))
    shapes = V.sample_for("type", 5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="subcategory"):
        V.make_questions(shapes, "subcategory", np.random.default_rng(0))
    inverted = V.sample_for("action", 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="color"):
        V.make_questions(inverted, "color", np.random.default_rng(0))  # colours changed by inverting


def test_unknown_type_is_a_user_error():
    with pytest.raises(UserError, match="did you mean 'color'"):
        V.answer_space("colour")


# ----------------------------------------------------------------------------- tasks
def _digest(x: torch.Tensor) -> str:
    return hashlib.sha1(x.numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("qtype", ["location", "subcategory", "causal"])
def test_load_question_type_is_deterministic_with_disjoint_splits(qtype):
    d = V.load_question_type(qtype, seed=3, n_train=40, n_test=20)
    assert isinstance(d, QAData) and d.name == f"synthetic_vqa/{qtype}"
    assert len(d.train) == len(d.train_records) == 40 and len(d.test) == 20
    img, i = d.train[7]
    assert i == 7 and img.shape == (3, 32, 32) and img.dtype == torch.float32 and 0 <= img.min() <= img.max() <= 1
    r = d.train_records[7]
    assert r.question_type == qtype and r.answer in V.answer_space(qtype) and r.reference_answers == (r.answer,)
    V._cached.cache_clear()
    again = V.load_question_type(qtype, seed=3, n_train=40, n_test=20)
    assert again.train_records == d.train_records and again.test_records == d.test_records
    assert torch.equal(again.train.images, d.train.images) and torch.equal(again.test.images, d.test.images)
    train = {_digest(x) for x in d.train.images}
    assert not train & {_digest(x) for x in d.test.images}
    other = V.load_question_type(qtype, seed=4, n_train=40, n_test=20)
    assert not torch.equal(other.train.images, d.train.images)


def test_load_vqa_source_by_name():
    d = V.load_vqa_source("synthetic_vqa/count", seed=0, n_train=8, n_test=4, root="/ignored")
    assert d.name == "synthetic_vqa/count" and d.meta["chance"] == 0.25 and d.meta["pretrained"]
    assert "synthetic_vqa/causal" in V.KNOWN_VQA_SOURCES and "vqacl/causal" in V.KNOWN_VQA_SOURCES
    with pytest.raises(UserError, match="'cuont' .did you mean 'count'"):
        V.load_vqa_source("synthetic_vqa/cuont")
    with pytest.raises(UserError, match="unknown VQA task"):
        V.load_vqa_source("imagenet/count")


def test_qadata_checks_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        QAData("x", train=[0, 1], test=[], train_records=[QARecord("q", "a")], test_records=[])
