"""The Editor API on the tiny LLaVA: an empty store leaves the backbone's outputs bit-identical, edits
change answers and deletes undo them, bad input is refused before the store changes, save/load
round-trips bit-exactly and a store from another method or backbone is refused."""
import copy

import numpy as np
import pytest
import torch

from edit_records import world_records
from lifelong_moe.editing import EditRecord
from lifelong_moe.editing.editor import Editor
from lifelong_moe.errors import ConfigError, UserError
from lifelong_moe.backbones.vlm import VisionLanguageModel


@pytest.fixture(scope="module")
def base_vlm(one_thread):
    torch.manual_seed(0)
    return VisionLanguageModel.from_config("lmoe-tiny-llava")  # random init: fast, deterministic


@pytest.fixture
def vlm(base_vlm):
    return copy.deepcopy(base_vlm)


@pytest.fixture(scope="module")
def recs(base_vlm):
    return world_records(base_vlm, 6, seed=3)


def outputs(vlm, recs):
    x = torch.stack([r.image for r in recs])
    batch = vlm.batch(x, [r.src for r in recs], [r.alt for r in recs])
    with torch.no_grad():
        return vlm.logits(batch), vlm.generate_ids(x, [r.src for r in recs], 4)


@pytest.mark.parametrize("method", ["retrieval", "ft", "lora"])
def test_empty_store_is_bit_identical_to_the_backbone_before_and_after_edits(vlm, recs, method):
    ref_logits, ref_ids = outputs(vlm, recs)
    editor = Editor(vlm, method, steps=2) if method != "retrieval" else Editor(vlm, method)
    logits, ids = outputs(editor.vlm, recs)
    assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids)
    editor.edit_batch(recs[:3])
    moved, _ = outputs(editor.vlm, recs)
    assert not torch.equal(moved, ref_logits)  # the edits do act
    editor.reset()
    logits, ids = outputs(editor.vlm, recs)
    assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids)


def test_retrieval_edit_answers_the_target_only_where_it_matches_and_delete_undoes_it(vlm, recs):
    editor = Editor(vlm, "retrieval", threshold=0.999)  # a random model's features are all alike
    r, other = recs[0], recs[1]
    before = editor.answer(r.image, r.src), editor.answer(other.image, other.src)
    assert before[0] != r.alt
    eid = editor.edit(image=r.image, prompt=r.src, target=r.alt)
    assert [e["id"] for e in editor.edits] == [eid] and editor.edits[0]["target"] == r.alt
    assert editor.answer(r.image, r.src) == r.alt
    assert editor.answer(other.image, other.src) == before[1]  # another scene and question: untouched
    editor.delete(eid)
    assert editor.edits == [] and editor.answer(r.image, r.src) == before[0]
    assert [e["op"] for e in editor.store.log] == ["add", "delete"]  # the log keeps both
    with pytest.raises(UserError, match="already deleted"):
        editor.delete(eid)


def test_fine_tuning_cannot_delete_single_edits(vlm, recs):
    editor = Editor(vlm, "ft", steps=1)
    eid = editor.edit(image=recs[0].image, prompt=recs[0].src, target=recs[0].alt)
    with pytest.raises(UserError, match="cannot delete single edits"):
        editor.delete(eid)
    assert [e["id"] for e in editor.edits] == [eid]


def test_sequential_evaluation_scores_locality_against_the_pre_edit_model(vlm, recs):
    editor = Editor(vlm, "retrieval", threshold=0.999)
    wrong = [EditRecord(**{**r.__dict__, "m_loc_a": "zero"}) for r in recs]  # ground truth is not the reference
    res = editor.evaluate(wrong, keep=False)
    m = res["metrics"]
    assert res["edits"] == len(recs) and editor.edits == []  # keep=False: undone afterwards
    assert m["reliability.token_acc"] == 1.0 and m["reliability.exact_match"] == 1.0  # retrieval answers exactly
    assert m["image_locality.token_acc"] == 1.0 and m["image_locality.exact_match"] == 1.0
    single = editor.evaluate(recs, sequential=False)
    assert single["protocol"] == "single" and single["metrics"]["reliability.exact_match"] == 1.0
    assert editor.edits == []  # each single edit is undone


class NeedsImage:
    """A minimal EditMethod that edits (image, prompt) pairs only."""

    name, supports_delete, requires_image = "needs_image", True, True

    def attach(self, vlm): ...

    def detach(self): ...

    def fit(self, train, *, seed=0): return {}

    def make_edit(self, record): return {"x": torch.zeros(1)}

    def set_edits(self, edits): ...

    def state_dict(self): return {}

    def load_state_dict(self, state): ...

    def config(self): return {}


def test_bad_input_gets_one_clear_error_and_leaves_the_store_untouched(vlm, recs, tmp_path):
    from PIL import Image

    editor = Editor(vlm, NeedsImage())
    editor.edit(image=recs[0].image, prompt="what color is it?", target="red")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((8, 8), np.float32), mode="F").save(tmp_path / "float.tiff")
    r = recs[1]
    cases = [
        (dict(image=r.image, prompt=r.src, target="  "), "target .'alt'. is empty"),
        (dict(image=None, prompt=r.src, target="red"), "'image' is missing"),
        (dict(image=str(tmp_path / "broken.png"), prompt=r.src, target="red"), "cannot read image file"),
        (dict(image=str(tmp_path / "nowhere.png"), prompt=r.src, target="red"), "image file not found"),
        (dict(image=str(tmp_path / "float.tiff"), prompt=r.src, target="red"), "image mode 'F'"),
        (dict(image=torch.zeros(3, 16, 16), prompt=r.src, target="red"), r"float \[3, 32, 32\]"),
        (dict(image=r.image, prompt=r.src, target="red", rephrse="x"), "unknown field.*'rephrse'.*did you mean 'rephrase'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            editor.edit(**kwargs)
    good = {"src": r.src, "alt": "red", "image": r.image}
    with pytest.raises(UserError, match=r"records\[1\]: unknown field.*'answer'"):
        editor.edit_batch([good, {**good, "answer": "red"}])  # the good first record is not applied either
    assert len(editor.edits) == 1 and len(editor.store.log) == 1
    with pytest.raises(UserError, match="not an edit store"):
        Editor.load(tmp_path)


def test_save_and_load_round_trip_bit_exactly_and_answer_the_same(vlm, recs, tmp_path):
    editor = Editor(vlm, "lora", steps=2, r=2)
    ids = editor.edit_batch(recs[:3])
    ref_logits, ref_ids = outputs(editor.vlm, recs)
    editor.save(tmp_path / "store")
    back = Editor.load(tmp_path / "store", backbone=copy.deepcopy(vlm_unedited(vlm)))
    assert [e["id"] for e in back.edits] == ids and back.store.log == editor.store.log
    for eid in ids:
        a, b = editor.store.history[eid], back.store.history[eid]
        assert a.request == b.request and a.timestamp == b.timestamp
        assert all(torch.equal(a.images[k], b.images[k]) for k in a.images) and set(a.images) == set(b.images)
    assert all(torch.equal(v, back.method.state_dict()[k]) for k, v in editor.method.state_dict().items())
    logits, gen = outputs(back.vlm, recs)
    assert torch.equal(logits, ref_logits) and torch.equal(gen, ref_ids)


def test_liveedit_store_saves_loads_and_answers_the_same(vlm, base_vlm, recs, tmp_path):
    """LiveEdit through the Editor: its resolved config and generator weights rebuild it on load."""
    editor = Editor(vlm, "liveedit", steps=3, batch_size=2)
    editor.fit(recs[3:])
    ids = editor.edit_batch(recs[:3])
    ref_logits, ref_ids = outputs(editor.vlm, recs)
    editor.save(tmp_path / "store")
    back = Editor.load(tmp_path / "store", backbone=copy.deepcopy(base_vlm))
    assert [e["id"] for e in back.edits] == ids and back.method.config() == editor.method.config()
    logits, gen = outputs(back.vlm, recs)
    assert torch.equal(logits, ref_logits) and torch.equal(gen, ref_ids)


def vlm_unedited(vlm):
    """The backbone as it was before LoRA was injected (peft's wrappers removed, base weights kept)."""
    fresh = VisionLanguageModel.from_config("lmoe-tiny-llava")
    state = {k.replace(".base_layer", ""): v for k, v in vlm.model.state_dict().items() if "lora_" not in k}
    fresh.model.load_state_dict(state)
    return fresh


def test_a_store_of_another_method_or_backbone_is_refused(vlm, base_vlm, recs, tmp_path):
    editor = Editor(vlm, "retrieval")
    editor.edit_batch(recs[:2])
    editor.save(tmp_path / "s")
    with pytest.raises(UserError, match="written by method 'retrieval', not 'ft'"):
        Editor(copy.deepcopy(base_vlm), "ft").save(tmp_path / "s")
    other = copy.deepcopy(base_vlm)
    with torch.no_grad():
        other.model.lm_head.weight.mul_(1.5)
    with pytest.raises(UserError, match="was written on backbone"):
        Editor.load(tmp_path / "s", backbone=other)
    with pytest.raises(UserError, match="another retrieval configuration .differs in: threshold"):
        Editor(copy.deepcopy(base_vlm), "retrieval", threshold=0.5).save(tmp_path / "s")
    same = Editor.load(tmp_path / "s", backbone=copy.deepcopy(base_vlm))
    assert len(same.edits) == 2


def test_from_config_and_unknown_methods(base_vlm):
    with pytest.raises(ConfigError, match="unknown editing method 'retreival' .did you mean 'retrieval'"):
        Editor(base_vlm, "retreival")
    with pytest.raises(ConfigError, match="method.thresold"):
        Editor.from_config({"backbone": {"name": "lmoe-tiny-llava"}, "method": {"name": "retrieval", "thresold": 1}})
    editor = Editor.from_config({"backbone": {"name": "lmoe-tiny-llava"}, "method": {"name": "retrieval",
                                                                                        "threshold": 0.5},
                                 "runtime": {"device": "cpu"}})
    assert editor.method.params.threshold == 0.5 and editor.backbone_config["name"] == "lmoe-tiny-llava"


def test_text_only_prompts_answer_and_count_for_text_locality(vlm):
    from lifelong_moe.editing.metrics import text_only_supported

    if not text_only_supported(vlm):
        pytest.skip("the VLM has no text-only path yet (vlm.batch(None, ...) comes with the liveedit branch)")
    recs = world_records(vlm, 4, seed=5, text_loc=True)
    editor = Editor(vlm, "retrieval", threshold=0.999)
    before = editor.answer(None, recs[0].loc)
    res = editor.evaluate(recs)
    assert res["n"]["text_locality"] == 4 and res["metrics"]["text_locality.token_acc"] == 1.0
    assert editor.answer(None, recs[0].loc) == before


def test_a_store_reloads_onto_the_backbone_its_config_names(recs, tmp_path):
    cfg = {"seed": 3, "backbone": {"name": "lmoe-tiny-llava"}, "method": {"name": "retrieval", "threshold": 0.999},
           "runtime": {"device": "cpu"}}
    editor = Editor.from_config(cfg)
    editor.edit_batch(recs[:2])
    want = editor.answer([r.image for r in recs], [r.src for r in recs])
    editor.save(tmp_path / "s")
    back = Editor.load(tmp_path / "s")  # rebuilt from the recorded config and seed, fingerprint checked
    assert back.answer([r.image for r in recs], [r.src for r in recs]) == want
    assert back.fingerprint == editor.fingerprint and [e["id"] for e in back.edits] == ["edit-000001", "edit-000002"]


def test_a_batch_that_fails_midway_is_rolled_back(vlm, recs):
    editor = Editor(vlm, "ft", steps=2, lr=1e-2)
    first = editor.edit(image=recs[0].image, prompt=recs[0].src, target=recs[0].alt)
    weights = editor.method.state_dict()
    real, calls = editor.method.make_edit, []

    def flaky(record):
        calls.append(record)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(record)

    editor.method.make_edit = flaky
    with pytest.raises(RuntimeError, match="out of memory"):
        editor.edit_batch(recs[1:4])
    assert [e["id"] for e in editor.edits] == [first] and len(editor.store.log) == 1
    assert all(torch.equal(v, editor.method.state_dict()[k]) for k, v in weights.items())  # the first batch edit undone
    editor.method.make_edit = real
    assert editor.edit(image=recs[1].image, prompt=recs[1].src, target=recs[1].alt) == "edit-000002"


@pytest.mark.parametrize("method", ["ft", "lora"])
def test_reusing_the_image_features_across_steps_changes_no_weight(vlm, recs, method, monkeypatch):
    import contextlib

    import lifelong_moe.editing.baselines as B

    other = copy.deepcopy(vlm)
    fast = Editor(vlm, method, steps=3, lr=1e-2)
    calls = []
    vlm.model.model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    fast.edit_batch(recs[:2])
    assert len(calls) == 2  # once per edit, not once per step
    monkeypatch.setattr(B, "frozen_image_features", lambda vlm: contextlib.nullcontext())
    plain = Editor(other, method, steps=3, lr=1e-2)
    plain.edit_batch(recs[:2])
    a, b = fast.method.state_dict(), plain.method.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in fast.method._initial.items())  # they did train
    assert "get_image_features" not in vlm.model.model.__dict__  # the real method is back


def test_retrieval_generation_in_one_pass_answers_as_with_a_separate_feature_pass(vlm, recs):
    x, qs = torch.stack([r.image for r in recs]), [r.src for r in recs]
    before = vlm.generate(x, qs, 4)
    editor = Editor(vlm, "retrieval", threshold=0.999)
    editor.edit_batch(recs[:3])
    one_pass = editor.vlm.generate(x, qs, 4)  # layer -1: feature read from generation's own prefill
    assert one_pass[:3] == [r.alt for r in recs[:3]] and one_pass[3:] == before[3:]
    n = len(editor.vlm.decoder_layers)  # hidden state n is hidden state -1, read by a forward pass of its own
    editor.method.params = editor.method.params.model_copy(update={"layer": n})
    assert editor.vlm.generate(x, qs, 4) == one_pass
