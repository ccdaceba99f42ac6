"""The edit store on its own: bit-exact round trip of the whole log, images kept encoded, saves that
append only what changed, a save killed at any moment keeps the previous store loadable and intact (and
its leftovers are cleaned on the next open), and what is not a store (or a damaged one) is refused with
one error naming the bad field."""
import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lifelong_moe.editing import image_codec
from lifelong_moe.editing.store import INDEX, LOCK, EditStore, ImageMap, check_compatible
from lifelong_moe.errors import UserError

HEADER = {"method": "m", "method_config": {"a": 1}, "backbone": {"name": "b", "config": None, "fingerprint": "f"}}


def filled(n: int, seed: int = 0) -> EditStore:
    g = torch.Generator().manual_seed(seed)
    store = EditStore(HEADER)
    for i in range(n):
        store.add({"src": f"question {i}", "alt": f"answer {i}"}, {"image": torch.randn(3, 4, 4, generator=g)},
                  {"key": torch.randn(8, generator=g), "answer": torch.arange(i + 1)}, {"index": i})
    return store


def same(a: EditStore, b: EditStore, timestamps: bool = True) -> bool:
    """Equal stores, bit for bit (``timestamps=False``: for stores filled by different processes)."""
    def log(s):
        return s.log if timestamps else [{k: v for k, v in e.items() if k != "timestamp"} for e in s.log]

    if list(a.history) != list(b.history) or a.deleted != b.deleted or log(a) != log(b) or a.next_index != b.next_index:
        return False
    for k, x in a.history.items():
        y = b.history[k]
        if (x.request, x.meta) != (y.request, y.meta) or (timestamps and x.timestamp != y.timestamp):
            return False
        for d1, d2 in ((x.images, y.images), (x.tensors, y.tensors)):
            if set(d1) != set(d2) or not all(torch.equal(d1[n], d2[n]) and d1[n].dtype == d2[n].dtype for n in d1):
                return False
    return True


def test_round_trip_is_bit_exact_with_deletions_and_method_state(tmp_path):
    store = filled(5)
    store.delete("edit-000002")
    state = {"w": torch.randn(3, 3, dtype=torch.float64)}
    store.save(tmp_path, state)
    back, back_state = EditStore.load(tmp_path)
    assert same(store, back) and back.ids() == ["edit-000001", "edit-000003", "edit-000004", "edit-000005"]
    assert torch.equal(back_state["w"], state["w"]) and back_state["w"].dtype == torch.float64
    assert back.add({"src": "q", "alt": "a"}, {}, {}) == "edit-000006"  # ids are never reused
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == LOCK and names[-1] == INDEX and len(names) == 4  # + one segment + method file, nothing stale


def test_a_save_appends_only_what_changed(tmp_path):
    store = filled(3)
    state = {"w": torch.ones(4)}
    store.save(tmp_path, state)
    first = {p.name: p.read_bytes() for p in tmp_path.glob("*.safetensors")}
    store.add({"src": "q", "alt": "a"}, {"image": torch.randn(3, 4, 4)}, {"key": torch.randn(8)})
    store.save(tmp_path, state)
    files = {p.name: p.read_bytes() for p in tmp_path.glob("*.safetensors")}
    assert all(files[k] == v for k, v in first.items())  # earlier files untouched, the method file not rewritten
    (new,) = set(files) - set(first)
    assert new.startswith("edits-") and len(files[new]) < 2000  # the one new edit
    store.delete("edit-000002")
    store.save(tmp_path, state)
    store.save(tmp_path, state)  # nothing changed: nothing new
    assert len(list(tmp_path.glob("edits-*"))) == 3 and json.loads((tmp_path / INDEX).read_text())["segments"] == 3
    back, _ = EditStore.load(tmp_path)
    assert same(back, store)
    back.add({"src": "q2", "alt": "a2"}, {}, {"key": torch.zeros(8)})  # a loaded store appends too
    back.save(tmp_path, {"w": torch.zeros(4)})
    assert len(list(tmp_path.glob("edits-*"))) == 4 and len(list(tmp_path.glob("method-*"))) == 1
    again, st = EditStore.load(tmp_path)
    assert same(again, back) and torch.equal(st["w"], torch.zeros(4))


def pixels(seed: int, size: int = 64) -> torch.Tensor:
    """An image as a CLIP-style processor makes it: 8-bit pixels rescaled and normalised per channel."""
    u = torch.randint(0, 256, (3, size, size), generator=torch.Generator().manual_seed(seed)).float()
    mean, std = torch.tensor([0.481, 0.458, 0.408]).view(3, 1, 1), torch.tensor([0.269, 0.261, 0.276]).view(3, 1, 1)
    return (u * (1 / 255) - mean) / std


def test_images_are_kept_encoded_once_and_decode_bit_exactly(tmp_path):
    img, other = pixels(0), pixels(1)
    odd = torch.randn(3, 20, 20, generator=torch.Generator().manual_seed(2))  # > 256 values a channel: zlib
    odd[0, 0, 0] = -0.0
    store = EditStore(HEADER)
    store.add({"src": "a", "alt": "b"}, {"image": img, "m_loc": other}, {})
    store.add({"src": "c", "alt": "d"}, {"image": img, "image_rephrase": odd}, {})
    e1, e2 = store.history["edit-000001"], store.history["edit-000002"]
    assert isinstance(e1.images, ImageMap) and e1.images.blobs["image"] is e2.images.blobs["image"]  # stored once
    assert json.loads(e1.images.blobs["image"][8:8 + 200].split(b"}")[0] + b"}")["codec"] == "palette-png"
    assert json.loads(e2.images.blobs["image_rephrase"][8:8 + 200].split(b"}")[0] + b"}")["codec"] == "zlib"
    assert len(store.blobs) == 3 and store.nbytes() < 0.5 * 3 * img.numel() * 4
    store.save(tmp_path, {})
    back, _ = EditStore.load(tmp_path)
    for e in (e1, e2):
        for f, t in e.images.items():
            b = back.history[e.id].images[f]
            assert b.dtype == t.dtype and torch.equal(b.view(torch.int32), t.view(torch.int32))  # the same bits
    assert torch.equal(back.history["edit-000001"].images["image"].view(torch.int32), img.view(torch.int32))
    assert torch.signbit(back.history["edit-000002"].images["image_rephrase"][0, 0, 0])
    with safe(tmp_path) as f:
        assert sum(k.startswith("image/") for k in f.keys()) == 3  # the shared image once on disk
    copy_ = EditStore(HEADER)
    copy_.add({"src": "a", "alt": "b"}, e1.images, {})  # an ImageMap passes through without re-encoding
    assert copy_.history["edit-000001"].images.blobs == e1.images.blobs
    assert set(dict(e1.images)) == {"image", "m_loc"}  # a plain mapping of tensors
    del e, e2
    store.history.pop("edit-000002")  # undone (Editor._restore): its own image is no longer held
    assert len(store.blobs) == 2 and store.nbytes() == sum(len(b) for b in e1.images.blobs.values())
    for t in (img, odd, torch.zeros(3, 0, 5), torch.randn(2, 3, dtype=torch.float64), pixels(3).half()):
        back = image_codec.decode(image_codec.encode(t))
        assert torch.equal(back, t) and back.dtype == t.dtype


def safe(d: Path):
    from safetensors import safe_open
    return safe_open(str(next(d.glob("edits-*.safetensors"))), "pt")


def test_resave_removes_only_files_the_new_index_no_longer_names(tmp_path):
    filled(2).save(tmp_path, {})
    store = filled(3)
    store.save(tmp_path, {})
    assert len(list(tmp_path.glob("edits-*.safetensors"))) == 1
    assert same(EditStore.load(tmp_path)[0], store)


SAVER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_edit_store import appended, filled
    import lifelong_moe.editing.store as S
    stage, marker, mode, d = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    # full: another store, written whole; append: the saved one, loaded, two more edits and a delete
    store = filled(7, seed=1) if mode == "full" else appended(S.EditStore.load(d)[0])

    def stall():
        marker.write_text("ready")
        time.sleep(60)

    if stage == "tensors":  # killed while the new segment is half written
        def slow(path, data):
            with S.atomic_path(path) as tmp:
                Path(tmp).write_bytes(data[: len(data) // 2])
                stall()
        S._write_file = slow
    elif stage == "index":  # killed with the new segment written, store.json half written
        def slow_json(path, obj):
            with S.atomic_path(path) as tmp:
                Path(tmp).write_text('{{"format": "lifelong-moe ed')
                stall()
        S.write_json = slow_json
    else:  # killed after store.json is replaced, before unreferenced files are removed
        def slow_sweep(d, keep):
            stall()
        S._sweep_unreferenced = slow_sweep
    store.save(d, {{}} if mode == "full" else {{"w": S.torch.ones(2)}})
""")


def appended(store: EditStore) -> EditStore:
    """What the append-mode saver adds to a store."""
    g = torch.Generator().manual_seed(7)
    for i in range(2):
        store.add({"src": f"more {i}", "alt": "x"}, {"image": torch.randn(3, 4, 4, generator=g)},
                  {"key": torch.randn(8, generator=g), "answer": torch.arange(2)})
    store.delete("edit-000001")
    return store


def leftovers(d: Path) -> list[str]:
    """Temporary files of a save, and segment files the index does not reach."""
    index = json.loads((d / INDEX).read_text())
    reached, ref = {index["method_state"]["file"]}, index["head"]
    while ref is not None:
        reached.add(ref["file"])
        from safetensors import safe_open
        with safe_open(str(d / ref["file"]), "pt") as f:
            ref = json.loads(f.metadata()["segment"])["prev"]
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp") or
                  (p.name.endswith(".safetensors") and p.name not in reached))


@pytest.mark.parametrize("mode", ["full", "append"])
@pytest.mark.parametrize("stage", ["tensors", "index", "cleanup"])
def test_a_save_killed_at_any_moment_keeps_a_loadable_intact_store(tmp_path, stage, mode):
    old = filled(3)
    d = tmp_path / "store"
    old.save(d, {"w": torch.ones(2)})
    old.add({"src": "q", "alt": "a"}, {}, {})  # two saves: a chain of two segments
    old.save(d, {"w": torch.ones(2)})
    script = tmp_path / "saver.py"
    script.write_text(SAVER.format(tests=str(Path(__file__).parent)))
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, str(script), stage, str(marker), mode, str(d)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "the saving process ended before reaching the kill point"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    if stage != "cleanup":
        assert leftovers(d)  # the killed save left files behind
    back, state = EditStore.load(d)
    assert leftovers(d) == []  # removed on open
    if stage == "cleanup":  # the new index was in place: the new store, whole
        want = filled(7, seed=1) if mode == "full" else appended(copy.deepcopy(old))
        assert same(back, want, timestamps=False)
        assert state == {} if mode == "full" else torch.equal(state["w"], torch.ones(2))
    else:
        assert same(back, old) and torch.equal(state["w"], torch.ones(2))
    back.add({"src": "after", "alt": "y"}, {"image": torch.randn(3, 4, 4)}, {"key": torch.randn(8)})
    back.save(d, {})  # the directory takes the next save (an append)
    assert same(EditStore.load(d)[0], back)
    new = filled(2)
    new.save(d, {})
    assert same(EditStore.load(d)[0], new) and leftovers(d) == []


def test_what_is_not_a_store_or_is_damaged_is_refused(tmp_path):
    with pytest.raises(UserError, match="is not an edit store .no store.json"):
        EditStore.load(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="refusing to write an edit store into .*holds other files"):
        filled(1).save(tmp_path, {})
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    d = tmp_path / "s"
    filled(2).save(d, {})
    edits = next(d.glob("edits-*.safetensors"))
    edits.write_bytes(edits.read_bytes()[:-1] + b"\0")
    with pytest.raises(UserError, match="does not match the checksum"):
        EditStore.load(d)
    (d / INDEX).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        EditStore.load(d)


def test_compatibility_names_what_differs():
    check_compatible(HEADER, HEADER, "s")
    with pytest.raises(UserError, match="differs in: a"):
        check_compatible(HEADER, {**HEADER, "method_config": {"a": 2}}, "s")
    with pytest.raises(UserError, match="fingerprint"):
        check_compatible(HEADER, {**HEADER, "backbone": {"name": "b", "fingerprint": "g"}}, "s")


def test_leftovers_of_a_killed_save_are_removed_on_the_next_open(tmp_path):
    d = tmp_path / "s"
    store = filled(2)
    store.save(d, {})
    junk = [".store.json.k2j3.tmp", ".edits-0123456789abcdef.safetensors.x1.tmp", "edits-0123456789abcdef.safetensors",
            "method-fedcba9876543210.safetensors", ".edits.staging", "..edits.staging.ab.tmp"]
    for name in junk:
        (d / name).write_bytes(b"partial")
    (d / "notes.txt").write_text("mine")
    back, _ = EditStore.load(d)
    assert same(back, store)
    assert sorted(p.name for p in d.iterdir() if p.name in junk) == [] and (d / "notes.txt").is_file()
    fresh = tmp_path / "f"  # a first save killed before store.json: the retry goes ahead
    fresh.mkdir()
    (fresh / ".edits-0123456789abcdef.safetensors.x1.tmp").write_bytes(b"partial")
    (fresh / "edits-0123456789abcdef.safetensors").write_bytes(b"partial")
    store.save(fresh, {})
    assert same(EditStore.load(fresh)[0], store)
    assert not any(p.name.endswith(".tmp") or p.name == "edits-0123456789abcdef.safetensors" for p in fresh.iterdir())


@pytest.mark.parametrize("field,value,message", [
    ("next_index", "abc", "field 'next_index' must be an integer >= 1, got \"abc\" \\(str\\)"),
    ("next_index", True, "field 'next_index' must be an integer >= 1"),
    ("next_index", 0, "field 'next_index' must be an integer >= 1"),
    ("method_config", 3, "field 'method_config' must be a mapping of method parameters, got 3 \\(int\\)"),
    ("method", None, "field 'method' must be a method name"),
    ("backbone", "b", "field 'backbone' must be a mapping"),
    ("backbone", {"name": 5, "fingerprint": "f", "config": None}, "field 'backbone.name' must be a backbone name"),
    ("backbone", {"name": "b", "fingerprint": "f", "config": None, "seed": "0"}, "field 'backbone.seed'"),
    ("segments", -1, "field 'segments' must be a non-negative integer"),
    ("edits", "3", "field 'edits' must be a non-negative integer"),
    ("log", None, "field 'log' must be a non-negative integer"),
    ("head", {"file": "../../etc/passwd", "sha256": "0" * 64}, "field 'head' must be"),
    ("method_state", {"file": "method-0123456789abcdef.safetensors"}, "field 'method_state' must be"),
])
def test_a_wrong_typed_index_field_is_one_error_naming_it(tmp_path, field, value, message):
    from lifelong_moe.editing.editor import Editor

    filled(2).save(tmp_path, {})
    index = json.loads((tmp_path / INDEX).read_text())
    index[field] = value
    (tmp_path / INDEX).write_text(json.dumps(index))
    for load in (EditStore.load, Editor.load):
        with pytest.raises(UserError, match=f"{INDEX}: {message}"):
            load(tmp_path)
    with pytest.raises(UserError, match=message):
        filled(1).save(tmp_path, {})
    del index[field]
    (tmp_path / INDEX).write_text(json.dumps(index))
    with pytest.raises(UserError, match=f"missing {field}"):
        EditStore.load(tmp_path)


def test_a_broken_chain_or_count_is_refused(tmp_path):
    store = filled(2)
    store.save(tmp_path, {})
    store.add({"src": "q", "alt": "a"}, {}, {})
    store.save(tmp_path, {})
    index = json.loads((tmp_path / INDEX).read_text())
    (tmp_path / INDEX).write_text(json.dumps({**index, "segments": 1}))
    with pytest.raises(UserError, match="chain past the 1"):
        EditStore.load(tmp_path)
    (tmp_path / INDEX).write_text(json.dumps({**index, "edits": 5}))
    with pytest.raises(UserError, match="counts 5 edits"):
        EditStore.load(tmp_path)
    (tmp_path / INDEX).write_text(json.dumps({**index, "next_index": 2}))
    with pytest.raises(UserError, match="would reuse an id"):
        EditStore.load(tmp_path)
    (tmp_path / INDEX).write_text(json.dumps(index))
    first = sorted(tmp_path.glob("edits-*"), key=lambda p: p.stat().st_mtime)[0]
    first.unlink()
    with pytest.raises(UserError, match=f"its file '{first.name}' is missing"):
        EditStore.load(tmp_path)


def test_a_version_1_store_is_read_and_rewritten_as_version_2(tmp_path):
    from safetensors.torch import save_file

    from lifelong_moe.io import file_sha256, write_json

    old = filled(3)
    old.delete("edit-000001")
    tensors, entries = {}, []
    for e in old.history.values():  # the version-1 layout: float images and method tensors in one file
        tensors |= {f"{e.id}/image/{k}": v for k, v in e.images.items()}
        tensors |= {f"{e.id}/method/{k}": v for k, v in e.tensors.items()}
        entries.append({"id": e.id, "timestamp": e.timestamp, "request": e.request, "meta": e.meta,
                        "images": sorted(e.images), "tensors": sorted(e.tensors)})
    files = {}
    for kind, payload in (("edits", tensors), ("method", {"w": torch.ones(2)})):
        save_file(payload, str(tmp_path / "x"))
        sha = file_sha256(tmp_path / "x")
        (tmp_path / "x").rename(tmp_path / f"{kind}-{sha[:16]}.safetensors")
        files[kind] = {"file": f"{kind}-{sha[:16]}.safetensors", "sha256": sha}
    write_json(tmp_path / INDEX, {"format": "lifelong-moe edit store", "version": 1, **HEADER, "next_index": 4,
                                  "deleted": ["edit-000001"], "edits": entries, "log": old.log, "files": files})
    back, state = EditStore.load(tmp_path)
    assert same(back, old) and torch.equal(state["w"], torch.ones(2))
    back.save(tmp_path, state)
    assert json.loads((tmp_path / INDEX).read_text())["version"] == 2
    assert not any(p.name in (files["edits"]["file"],) for p in tmp_path.iterdir())
    assert same(EditStore.load(tmp_path)[0], old)
    index = json.loads((tmp_path / INDEX).read_text())
    (tmp_path / INDEX).write_text(json.dumps({**index, "version": 3}))
    with pytest.raises(UserError, match="has version 3; this version of lifelong-moe reads 1 and 2"):
        EditStore.load(tmp_path)


def test_llava_processor_pixels_are_stored_as_a_palette_png_and_come_back_bit_exact():
    """LLaVA-1.5's CLIP processor resizes 8-bit pixels and normalises them per channel: at most 256
    values a channel, so the compact codec applies (a photo-sized image, 336 px)."""
    transformers = pytest.importorskip("transformers")
    import numpy as np
    from PIL import Image

    ip = transformers.CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    rng = np.random.default_rng(0)
    smooth = np.repeat(np.repeat(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), 16, 0), 16, 1)
    x = ip(images=Image.fromarray(smooth), return_tensors="pt")["pixel_values"][0]
    blob = image_codec.encode(x)
    assert b'"codec":"palette-png"' in blob[:200] and len(blob) < x.numel() * x.element_size() / 4
    back = image_codec.decode(blob)
    assert back.dtype == torch.float32 and torch.equal(back.view(torch.int32), x.view(torch.int32))


def test_an_editor_store_of_pil_images_appends_and_reloads_bit_exactly(one_thread, tmp_path):
    """Through the Editor on the tiny LLaVA: images given as PIL pictures go through the processor,
    are kept as palette PNGs, a second save appends, and the reloaded editor answers the same."""
    import numpy as np
    from PIL import Image

    from edit_records import world_records
    from lifelong_moe.backbones.vlm import VisionLanguageModel
    from lifelong_moe.editing.editor import Editor
    from lifelong_moe.editing.records import image_tensor

    torch.manual_seed(0)
    vlm = VisionLanguageModel.from_config("lmoe-tiny-llava")
    recs = world_records(vlm, 3, seed=3)
    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(4)]
    editor = Editor(copy.deepcopy(vlm), "retrieval")
    d = tmp_path / "store"
    first = editor.edit(image=pics[0], prompt=recs[0].src, target=recs[0].alt, image_rephrase=pics[1], m_loc=pics[2],
                        m_loc_q="what is it?")
    editor.save(d)
    second = editor.edit(image=pics[3], prompt=recs[1].src, target=recs[1].alt)
    editor.save(d)
    assert len(list(d.glob("edits-*"))) == 2 and len(list(d.glob("method-*"))) == 1
    back = Editor.load(d, backbone=copy.deepcopy(vlm))
    for eid, fields in ((first, {"image": 0, "image_rephrase": 1, "m_loc": 2}), (second, {"image": 3})):
        a, b = editor.store.history[eid].images, back.store.history[eid].images
        assert set(b) == set(fields) and all(b"palette-png" in b.blobs[f][:200] for f in fields)
        for f, i in fields.items():
            want = image_tensor(vlm, pics[i])
            assert torch.equal(b[f].view(torch.int32), want.view(torch.int32)) and torch.equal(a[f], b[f])
    x = torch.stack([image_tensor(vlm, p) for p in pics[:2]])
    qs = [recs[0].src, recs[1].src]
    assert torch.equal(back.vlm.generate_ids(x, qs, 4), editor.vlm.generate_ids(x, qs, 4))


def test_a_large_save_is_split_into_chained_segments(tmp_path, monkeypatch):
    import lifelong_moe.editing.store as S

    monkeypatch.setattr(S, "SEGMENT_ENTRIES", 2)
    store = filled(5)
    store.delete("edit-000003")
    store.save(tmp_path, {})
    assert len(list(tmp_path.glob("edits-*"))) == 3 and json.loads((tmp_path / INDEX).read_text())["segments"] == 3
    assert same(EditStore.load(tmp_path)[0], store)


def test_bench_edit_store_reports_bytes_per_edit_and_per_one_edit_save(capsys, tmp_path):
    from lifelong_moe.cli import main

    assert main(["bench", "edit_store", "--edits", "6", "--distinct", "2", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "RAM per edit" in out and "disk per edit" in out
    assert "one save() of one new edit into the 6-edit store" in out
    assert main(["bench", "edit_store", "--edits", "1", "--distinct", "2"]) == 2
    assert list(tmp_path.iterdir()) == []  # its stores were temporary
