"""Synthetic VQA (streams/vqa_synthetic.py) and VQACL-format real data (streams/vqacl.py)."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lifelong_moe.data import QAData, QARecord
from lifelong_moe.errors import UserError
from lifelong_moe.streams import vqa_sources as S
from lifelong_moe.streams import vqa_synthetic as V
from lifelong_moe.streams.synthetic import attribute_bank, caption_batch
from lifelong_moe.streams.synthetic_render import A, COLORS, COUNTS, POSITIONS, SHAPES, STYLES, TEXTURES
from lifelong_moe.streams.vqacl import image_path, load_vqacl

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
    d = S.load_vqa_source("synthetic_vqa/count", seed=0, n_train=8, n_test=4, root="/ignored")
    assert d.name == "synthetic_vqa/count" and d.meta["chance"] == 0.25 and d.meta["pretrained"]
    assert "synthetic_vqa/causal" in S.KNOWN_VQA_SOURCES and "vqacl/causal" in S.KNOWN_VQA_SOURCES
    with pytest.raises(UserError, match="'cuont' .did you mean 'count'"):
        S.load_vqa_source("synthetic_vqa/cuont")
    with pytest.raises(UserError, match="unknown VQA task"):
        S.load_vqa_source("imagenet/count")


def test_qadata_checks_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        QAData("x", train=[0, 1], test=[], train_records=[QARecord("q", "a")], test_records=[])


def test_splits_use_their_own_digit_glyphs(monkeypatch):
    """Train images draw digits from the train glyphs, test images from the test glyphs (none from pretraining)."""
    calls = []
    real = V.render
    monkeypatch.setattr(V, "render", lambda *a, **kw: calls.append(kw["glyph_split"]) or real(*a, **kw))
    V._generate("subcategory", 0, 0, 4), V._generate("subcategory", 0, 1, 4)
    assert calls == ["train", "test"]


# ----------------------------------------------------------------------------- VQACL partition files

def _human(*answers):
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


def _write_image(path: Path, color=(200, 30, 30), size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _vqacl_root(tmp_path: Path, train=None, test=None) -> Path:
    root = tmp_path / "vqa"
    train = train if train is not None else [
        {"img_id": "COCO_train2014_000000000009", "sent": "What color is the bus?",
         "question_type": "what color is the",
         "answers": _human(*["red"] * 4, *["dark red"] * 4, "Red.", "maroon"), "label": {"dark red": 1, "red": 1},
         "question_id": 9000, "answer_type": "other"},
        {"img_id": "COCO_train2014_000000000025", "sent": " What color is the sky? ",
         "question_type": "what color is the",
         "answers": ["Blue", "blue. ", "gray", "BLUE", "grey", "light blue", "gray", "white", "cloudy", "dark"],
         "label": {}},  # empty label: the target falls back to the commonest normalised answer
    ]
    test = test if test is not None else [
        {"img_id": "COCO_val2014_000000131089", "sent": "What color is the cat?", "question_type": "what color is the",
         "answers": _human(*["black"] * 9, "white"), "label": {"black": 1, "white": 0.3}},
    ]
    (root / "Partition_Q").mkdir(parents=True)
    (root / "Partition_Q" / "karpathy_train_q_color.json").write_text(json.dumps(train))
    (root / "Partition_Q" / "karpathy_test_q_color.json").write_text(json.dumps(test))
    _write_image(root / "train2014" / "COCO_train2014_000000000009.jpg")
    _write_image(root / "train2014" / "COCO_train2014_000000000025.png", (20, 20, 220))
    _write_image(root / "val2014" / "COCO_val2014_000000131089.jpg", (5, 5, 5), (5, 7))
    return root


def test_vqacl_loads_records_and_lazy_images(tmp_path):
    root = _vqacl_root(tmp_path)
    d = load_vqacl("color", root)
    assert d.name == "vqacl/color" and len(d.train) == 2 and len(d.test) == 1
    first, second = d.train_records
    assert first == QARecord("What color is the bus?", "dark red",  # highest label; the first of equals
                             tuple(["red"] * 4 + ["dark red"] * 4 + ["Red.", "maroon"]), "color",
                             "COCO_train2014_000000000009")
    # the commonest answer once normalised: 3 x "blue", 2 x "gray"
    assert second.question == "What color is the sky?" and second.answer == "blue"
    assert second.answers[1] == "blue." and len(second.answers) == 10  # human answers kept, stripped
    assert d.test_records[0].answer == "black" and d.test_records[0].image_id == "COCO_val2014_000000131089"
    img, i = d.train[1]
    assert i == 1 and img.mode == "RGB" and img.size == (8, 6) and img.getpixel((0, 0)) == (20, 20, 220)
    img, i = d.test[0]
    assert i == 0 and img.size == (5, 7)
    assert d.meta["targets_without_label"] == {"train": 1, "test": 0}
    via_registry = S.load_vqa_source("vqacl/color", root=root, seed=0, download=False)
    assert via_registry.train_records == d.train_records


def test_vqacl_image_names_follow_the_coco_split(tmp_path):
    assert image_path(tmp_path, "COCO_val2014_000000000001")[1] == [
        tmp_path / "val2014" / "COCO_val2014_000000000001.jpg", tmp_path / "val2014" / "COCO_val2014_000000000001.png"]
    assert image_path(tmp_path, "photo7")[1][0] == tmp_path / "photo7.jpg"


def test_vqacl_seeded_subsets(tmp_path):
    recs = [{"img_id": "COCO_train2014_000000000009", "sent": f"q{i}?", "question_type": "what color",
             "answers": ["red"], "label": {"red": 1}} for i in range(20)]
    root = _vqacl_root(tmp_path, train=recs)
    a = load_vqacl("vqacl/color", root, seed=1, n_train=5)
    b = load_vqacl("vqacl/color", root, seed=1, n_train=5)
    c = load_vqacl("vqacl/color", root, seed=2, n_train=5)
    qs = [r.question for r in a.train_records]
    assert len(qs) == 5 and qs == [r.question for r in b.train_records] == sorted(qs, key=lambda q: int(q[1:-1]))
    assert qs != [r.question for r in c.train_records]


def _good(**change):
    r = {"img_id": "COCO_train2014_000000000009", "sent": "What color?", "question_type": "what color",
         "answers": _human("red"), "label": {"red": 1}}
    r.update(change)
    return {k: v for k, v in r.items() if v is not None}


@pytest.mark.parametrize("bad, message", [
    (_good(sent=None), "record 1 has no 'sent' field"),
    (_good(img_id=None), "record 1 has no 'img_id' field"),
    (_good(question_type=None), "record 1 has no 'question_type' field"),
    (_good(label=None), "record 1 has no 'label' field"),
    (_good(answers=[]), "record 1 field 'answers' is empty"),
    (_good(answers="red"), "record 1 field 'answers' is a str, not a list"),
    (_good(answers=[{"answer_id": 1}]), r"record 1 answers\[0\] is neither"),
    (_good(label={"red": "high"}), "record 1 label 'red' has a non-numeric score"),
    (_good(sent="  "), "record 1 field 'sent' .the question. is empty"),
    (["not", "a record"], "record 1 is a list, not an object"),
    (_good(img_id="COCO_train2014_000000000777"), "record 1 image 'COCO_train2014_000000000777' not found"),
])
def test_vqacl_malformed_record_names_file_and_index(tmp_path, bad, message):
    root = _vqacl_root(tmp_path, train=[_good(), bad])
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match=message) as e:
        load_vqacl("color", root)
    assert "karpathy_train_q_color.json" in str(e.value)
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written


def test_vqacl_unreadable_image_and_problem_count(tmp_path):
    root = _vqacl_root(tmp_path, test=[_good(img_id="COCO_val2014_000000000002"),
                                       _good(img_id="COCO_val2014_000000000003"), _good(img_id="COCO_val2014_1")])
    (root / "val2014" / "COCO_val2014_000000000002.jpg").write_bytes(b"not an image at all")
    _write_image(root / "val2014" / "COCO_val2014_000000000003.png")  # a good header, a broken checksum:
    png = bytearray((root / "val2014" / "COCO_val2014_000000000003.png").read_bytes())  # found by verify()
    png[-20] ^= 0xFF
    (root / "val2014" / "COCO_val2014_000000000003.png").write_bytes(bytes(png))
    _write_image(root / "val2014" / "COCO_val2014_1.jpg")
    with pytest.raises(UserError, match=r"karpathy_test_q_color.json: record 0 image .*COCO_val2014_000000000002.jpg "
                                        r"cannot be read .*\(1 more problem"):
        load_vqacl("color", root)
    assert len(load_vqacl("color", root, check_images=False).test) == 3  # the check can be skipped


@pytest.mark.parametrize("content, message", [
    (None, "partition file .*karpathy_train_q_color.json not found"),
    ("[{", "karpathy_train_q_color.json: not valid JSON"),
    ('{"img_id": 1}', "expected a JSON list of records, got a dict"),
    ("[]", "the list of records is empty"),
])
def test_vqacl_bad_partition_file(tmp_path, content, message):
    root = _vqacl_root(tmp_path)
    f = root / "Partition_Q" / "karpathy_train_q_color.json"
    f.unlink() if content is None else f.write_text(content)
    with pytest.raises(UserError, match=message):
        load_vqacl("color", root)


def test_vqacl_bad_arguments(tmp_path):
    root = _vqacl_root(tmp_path)
    with pytest.raises(UserError, match="needs `root`"):
        S.load_vqa_source("vqacl/color")
    with pytest.raises(UserError, match="is not a directory"):
        load_vqacl("color", tmp_path / "nowhere")
    with pytest.raises(UserError, match="unknown question type 'colour'"):
        load_vqacl("colour", root)
    other = tmp_path / "parts"
    other.mkdir()
    (root / "Partition_Q" / "karpathy_train_q_color.json").rename(other / "karpathy_train_q_color.json")
    (root / "Partition_Q" / "karpathy_test_q_color.json").rename(other / "karpathy_test_q_color.json")
    assert len(load_vqacl("color", root, partition_dir=other).train) == 2  # partition files elsewhere
