"""EasyEdit's ``MultimodalEditor.edit`` call form on the Editor (lifelong_moe/editing/easyedit.py), written
as its README's multimodal example: lists of prompts, targets and images (paths or PIL images), rephrases,
``locality_inputs`` with text and vision parts; EasyEdit's metric names in ``pre`` and ``post``."""
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lifelong_moe.backbones.vlm import VisionLanguageModel
from lifelong_moe.backbones.vocabulary import closed_vocabulary, unknown_words
from lifelong_moe.editing import load_records
from lifelong_moe.editing.editor import Editor
from lifelong_moe.errors import UserError

POST = {"rewrite_acc", "rephrase_acc", "image_rephrase_acc", "locality_acc", "multimodal_locality_acc"}
PRE = {"rewrite_acc", "rephrase_acc", "image_rephrase_acc"}


@pytest.fixture(scope="module")
def base_vlm(one_thread):
    torch.manual_seed(0)
    return VisionLanguageModel.from_config("lmoe-tiny-llava")  # random init: fast, deterministic


@pytest.fixture
def editor(base_vlm):
    return Editor(copy.deepcopy(base_vlm), "retrieval", threshold=0.999)


def _png(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture
def readme(tmp_path):
    """The README example's inputs, in the tiny VLM's words; images as paths and as a PIL image."""
    paths = [_png(tmp_path / f"img{i}.png", i) for i in range(5)]
    return dict(
        prompts=["how many circles are there ?", "what color is the star ?"],
        targets=["two", "green"],
        image=[paths[0], Image.open(paths[1])],
        rephrase_prompts=["how many circles do you see ?", "what is the color of the star ?"],
        rephrase_image=[paths[2], paths[3]],
        locality_inputs={
            "text": {"prompt": ["how many corners does a triangle have ?", "is there a red object ?"],
                     "ground_truth": ["three", "no"]},
            "vision": {"prompt": ["where is the object ?", "what shape is shown ?"],
                       "ground_truth": ["top left", "square"], "image": [paths[4], paths[4]]},
        })


def test_readme_call_returns_easyedit_metrics_and_leaves_the_store_as_it_was(editor, readme):
    metrics, model, ids = editor.edit(**readme, keep_original_weight=False)
    assert model is editor.vlm and ids == [] and len(editor.store) == 0  # singleton editing: each edit undone
    assert [m["case_id"] for m in metrics] == [0, 1]
    for m in metrics:
        assert set(m["pre"]) == PRE and set(m["post"]) == POST and m["time"] >= 0 and m["edit_id"] is None
        assert all(0.0 <= v <= 1.0 for v in (*m["pre"].values(), *m["post"].values()))
        assert m["post"]["rewrite_acc"] == 1.0  # retrieval makes the edit exactly
    # the same numbers as the project's own evaluation, one edit at a time, of the same records in MMEdit form
    recs = [{"src": p, "alt": t, "image": im, "rephrase": rp, "image_rephrase": ri, "loc": lq, "loc_ans": la,
             "m_loc_q": mq, "m_loc_a": ma, "m_loc": mi}
            for p, t, im, rp, ri, lq, la, mq, ma, mi in zip(
                readme["prompts"], readme["targets"], readme["image"], readme["rephrase_prompts"],
                readme["rephrase_image"], *readme["locality_inputs"]["text"].values(),
                *readme["locality_inputs"]["vision"].values())]
    report = editor.evaluate(recs, sequential=False, generate=False)
    names = {"reliability": "rewrite_acc", "text_generality": "rephrase_acc", "image_generality": "image_rephrase_acc",
             "text_locality": "locality_acc", "image_locality": "multimodal_locality_acc"}
    for metric, key in names.items():
        assert report["per_record"][metric] == pytest.approx([m["post"][key] for m in metrics])


def test_sequential_edit_keeps_the_edits_and_keep_original_weight_undoes_them(editor, readme):
    before = editor.answer(readme["image"][0], readme["prompts"][0])
    metrics, _, ids = editor.edit(prompts=readme["prompts"], target_new=readme["targets"], image=readme["image"],
                                  sequential_edit=True)  # the README's older target_new= spelling
    assert len(ids) == 2 and [e["id"] for e in editor.edits] == ids == [m["edit_id"] for m in metrics]
    assert set(metrics[0]["post"]) == {"rewrite_acc"} and metrics[1]["post"]["rewrite_acc"] == 1.0
    assert editor.answer(readme["image"][0], readme["prompts"][0]) == "two"
    editor.reset()
    _, _, ids = editor.edit(prompts=readme["prompts"][0], targets="two", image=readme["image"][0],
                            sequential_edit=True, keep_original_weight=True)  # one edit as plain values
    assert ids == [] and len(editor.store) == 0 and editor.answer(readme["image"][0], readme["prompts"][0]) == before


def test_todays_single_edit_call_still_works(editor, readme):
    eid = editor.edit(image=readme["image"][0], prompt=readme["prompts"][0], target="two")
    assert isinstance(eid, str) and [e["id"] for e in editor.edits] == [eid]


@pytest.mark.parametrize("change, message", [
    ({"targets": ["two"]}, "targets has 1 entries for 2 prompt"),
    ({"rephrase_image": "x.png"}, "rephrase_image must be a list with one entry per prompt"),
    ({"locality_inputs": {"text": {"prompt": ["q ?", "q ?"]}}}, r"locality_inputs\['text'\] needs exactly prompt, "
                                                                 r"ground_truth; missing \['ground_truth'\]"),
    ({"locality_inputs": {"audio": {}}}, r"unknown key\(s\) \['audio'\]"),
    ({"train_ds": []}, r"unknown keyword\(s\) \['train_ds'\]"),
    ({"target_new": ["two", "green"]}, "give the new answers once"),
    ({"file_type": "video"}, "only images are supported"),
    ({"targets": ["two", "zebra"]}, "case 1: the target 'zebra' has the word.s. 'zebra', not in this backbone's "
                                    "closed vocabulary"),
    ({"image": ["nowhere.png", None]}, "case 0: image: image file not found"),
])
def test_bad_input_is_one_user_error_before_anything_changes(editor, readme, change, message):
    editor.edit(image=readme["image"][0], prompt=readme["prompts"][0], target="two")
    log = list(editor.store.log)
    with pytest.raises(UserError, match=message):
        editor.edit(**{**readme, **change})
    assert editor.store.log == log and len(editor.edits) == 1


def test_mixing_the_two_forms_is_refused(editor, readme):
    with pytest.raises(UserError, match="not both"):
        editor.edit(prompt="what color is the star ?", prompts=readme["prompts"], targets=readme["targets"])
    with pytest.raises(UserError, match="needs prompts="):
        editor.edit(targets=readme["targets"])


def test_closed_vocabulary_only_for_word_level_tokenizers(base_vlm):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    assert "green" in closed_vocabulary(base_vlm.tokenizer)
    assert unknown_words(base_vlm.tokenizer, "Dark green zebra, zebra!") == ["zebra", "!"]
    bpe = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    assert closed_vocabulary(bpe) is None and unknown_words(bpe, "zebra") == []  # open: nothing to check
    assert closed_vocabulary(None) is None


def test_edit_record_file_with_a_target_outside_the_vocabulary_names_file_record_and_word(base_vlm, tmp_path):
    _png(tmp_path / "a.png", 0)
    rec = {"src": "what color is the star ?", "alt": "green", "image": "a.png"}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([rec, {**rec, "alt": "Turquoise"}]))
    with pytest.raises(UserError, match=r"eval.json: record 1: the target 'Turquoise' has the word.s. 'turquoise'"):
        load_records(path, base_vlm)
    path.write_text(json.dumps([rec]))
    assert load_records(path, base_vlm)[0].alt == "green"
