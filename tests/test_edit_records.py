"""E-VQA / E-IC / VLKEB JSON records: a hand-written file with PNGs loads with the VLM's own image
preprocessing; a missing file or a malformed record is one error naming the file and the index."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from edit_records import write_record_file
from lifelong_moe.editing.records import image_tensor, load_records
from lifelong_moe.errors import UserError
from lifelong_moe.backbones.vlm import VisionLanguageModel


@pytest.fixture(scope="module")
def vlm(one_thread):
    torch.manual_seed(0)
    return VisionLanguageModel.from_config("lmoe-tiny-llava")


def test_a_hand_written_record_file_loads_with_the_vlm_preprocessing(vlm, tmp_path):
    raw = write_record_file(tmp_path, 3)
    recs = load_records(tmp_path / "eval.json", vlm)
    assert len(recs) == 3
    for i, (r, d) in enumerate(zip(recs, raw)):
        assert (r.src, r.alt, r.pred, r.rephrase, r.m_loc_q, r.m_loc_a) == \
               (d["src"], d["alt"], d["pred"], d["rephrase"], d["m_loc_q"], d["m_loc_a"])
        assert r.meta["index"] == i and r.meta["image_path"] == d["image"]
        png = np.asarray(Image.open(tmp_path / d["image"]))  # 32x32 RGB: the processor only rescales and normalises
        want = (torch.tensor(png).permute(2, 0, 1).float() / 255 - torch.tensor(vlm.mean).view(3, 1, 1)) \
            / torch.tensor(vlm.std).view(3, 1, 1)
        assert r.image.shape == (3, 32, 32) and torch.allclose(r.image, want, atol=1e-5)
        assert r.m_loc is not None and r.image_rephrase is not None and r.loc == ""
    assert len(load_records(tmp_path / "eval.json", vlm, limit=2)) == 2


def test_a_larger_image_in_another_mode_is_converted(vlm):
    gray = Image.fromarray(np.full((48, 64), 200, np.uint8), mode="L")
    x = image_tensor(vlm, gray)
    assert x.shape == (3, 32, 32) and torch.allclose(x[0], x[0, 0, 0].expand(32, 32))


@pytest.mark.parametrize("bad, message", [
    ({"image": "images/missing.png"}, r"record 1: image: image file not found: .*missing.png"),
    ({"alt": ""}, r"record 1: the target .'alt'. is empty"),
    ({"alt": 3}, r"record 1: field 'alt' must be text, got int"),
    ({"port_new": "x"}, r"record 1: unknown field.*'port_new'"),
    ({"m_loc": None}, r"record 1: image locality needs both 'm_loc'"),
])
def test_a_malformed_record_is_one_error_naming_the_file_and_index(vlm, tmp_path, bad, message):
    raw = write_record_file(tmp_path, 2)
    raw[1].update(bad)
    (tmp_path / "eval.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"eval.json: " + message):
        load_records(tmp_path / "eval.json", vlm)


def test_extra_fields_of_a_real_file_can_be_ignored_and_bad_files_are_named(vlm, tmp_path):
    raw = write_record_file(tmp_path, 2)
    (tmp_path / "vlkeb.json").write_text(json.dumps([{**r, "port_new": []} for r in raw]))
    assert len(load_records(tmp_path / "vlkeb.json", vlm, ignore_fields=["port_new"])) == 2
    (tmp_path / "obj.json").write_text(json.dumps({"src": "x"}))
    with pytest.raises(UserError, match="obj.json: expected a JSON list"):
        load_records(tmp_path / "obj.json", vlm)
    with pytest.raises(UserError, match="record file not found"):
        load_records(tmp_path / "nope.json", vlm)
    with pytest.raises(UserError, match="image root .* is not a directory"):
        load_records(tmp_path / "vlkeb.json", vlm, image_root=tmp_path / "nowhere", ignore_fields=["port_new"])
