"""VQACL-format partitions with question types of the user's own run as a stream in the config's order,
and an answer word outside the tiny VLM's closed vocabulary is refused (or warned about) when the
stream is built, naming the word, the file, the record and the question type."""
import json
import warnings
from pathlib import Path

import pytest

from lifelong_moe.backbones.vlm_tiny import tiny_spec, tiny_words
from lifelong_moe.backbones.vlm_tokenizer import build_tokenizer
from lifelong_moe.config import StreamConfig
from lifelong_moe.errors import UserError
from lifelong_moe.streams.builder import build_stream
from lifelong_moe.streams.transforms import ImageTransform
from lifelong_moe.streams.vqa_sources import load_vqa_source
from lifelong_moe.streams.vqacl import load_vqacl

from test_vqa_data import _human, _write_image

TYPES = ("shape_kind", "count", "tint")  # two of the user's own and one of VQACL's ten, in this order


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return build_tokenizer(tiny_words(tiny_spec("lmoe-tiny-llava")))


def _partitions(root: Path, answers=None) -> Path:
    """``karpathy_{train,test}_q_<type>.json`` for :data:`TYPES` with COCO-named PNG images."""
    answers = answers or {"shape_kind": ["circle", "star", "square"], "count": ["two", "three", "one"],
                          "tint": ["red", "green", "blue"]}
    for t, qtype in enumerate(TYPES):
        for split, coco in (("train", "train2014"), ("test", "val2014")):
            records = []
            for i, answer in enumerate(answers[qtype]):
                img = f"COCO_{coco}_{100 * t + i:012d}"
                _write_image(root / coco / f"{img}.png", (30 * i, 80, 40 * t))
                records.append({"img_id": img, "sent": f"what {qtype} is it ?", "question_type": qtype,
                                "answers": _human(*[answer] * 10), "label": {answer: 1.0}})
            path = root / "Partition_Q" / f"karpathy_{split}_q_{qtype}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(records))
    return root


def _stream(root, types=TYPES, **extra):
    return StreamConfig.model_validate({"kind": "vqa", "dataset": "vqacl", "root": str(root),
                                        "question_types": list(types), **extra})


def _build(cfg, tokenizer):
    return build_stream(cfg, ImageTransform(32, (0.5,) * 3, (0.5,) * 3), 0, tokenizer=tokenizer)


def test_own_question_types_run_as_a_stream_in_the_config_order(tmp_path, tiny_tokenizer):
    root = _partitions(tmp_path / "coco")
    order = ["tint", "shape_kind", "count"]
    stream = _build(_stream(root, order), tiny_tokenizer)
    assert [t.question_type for t in stream.tasks] == order
    assert [t.name for t in stream.tasks] == [f"vqacl/{q}" for q in order]
    assert [r.answer for r in stream.tasks[1].train_records] == ["circle", "star", "square"]
    assert [e.task_name for e in stream.train_stream] == [f"vqacl/{q}" for q in order]
    x, i = stream.train_stream[0].dataset[2][:2]
    assert tuple(x.shape) == (3, 32, 32) and int(i) == 2
    d = load_vqa_source("vqacl/shape_kind", root=root)
    assert d.meta["task_index"] is None and load_vqacl("count", root).meta["task_index"] == 4  # VQACL's own


def test_a_type_without_files_names_the_types_that_have_them(tmp_path):
    root = _partitions(tmp_path / "coco")
    with pytest.raises(UserError, match=r"karpathy_train_q_shape_knd.json not found .*unknown question type "
                                        r"'shape_knd' \(did you mean 'shape_kind'\?\); question types with a "
                                        r"karpathy_train file there: count, shape_kind, tint"):
        load_vqacl("shape_knd", root)
    with pytest.raises(UserError, match="is not a name"):
        load_vqacl("../secret", root)


def test_an_answer_outside_the_tiny_vocabulary_is_refused_naming_word_file_record_and_type(tmp_path, tiny_tokenizer):
    root = _partitions(tmp_path / "coco", {"shape_kind": ["circle", "star", "square"],
                                           "count": ["two", "three", "one"], "tint": ["red", "teal green", "blue"]})
    with pytest.raises(UserError, match=r"vqacl/tint: the answer 'teal green' of .*karpathy_train_q_tint.json record 1 "
                                        r"\(question type 'tint'\) has the word 'teal', which is not in the backbone's "
                                        r"closed vocabulary .*2 record\(s\) of this task"):
        _build(_stream(root), tiny_tokenizer)
    # the record is named by its position in the file, also when a subset is drawn
    cfg = _stream(root, ["tint"], questions_per_type={"train": 2})
    with pytest.raises(UserError, match=r"karpathy_train_q_tint.json record 1 "):
        _build(cfg, tiny_tokenizer)
    with warnings.catch_warnings(record=True) as caught:  # warn: kept (as <unk>), said once per task
        warnings.simplefilter("always")
        stream = _build(_stream(root, on_unknown_answer="warn"), tiny_tokenizer)
    assert len(stream.tasks) == 3 and len(caught) == 1 and "the word 'teal'" in str(caught[0].message)
    assert len(_build(_stream(root), None).tasks) == 3  # no closed vocabulary (a real tokenizer): no check


def test_synthetic_vqa_answers_are_all_in_the_tiny_vocabulary(tiny_tokenizer):
    cfg = StreamConfig.model_validate({"kind": "vqa", "dataset": "synthetic_vqa", "order": "vqacl",
                                       "questions_per_type": {"train": 20, "test": 10}})
    assert len(_build(cfg, tiny_tokenizer).tasks) == 10
