"""Data sources on small local files made in tmp_path; nothing is downloaded."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lifelong_moe.data import ClassificationData
from lifelong_moe.streams import sources
from lifelong_moe.streams.mtil import MTIL_ORDER_I, MTIL_ORDER_II, NAMED_ORDERS, resolve_order
from lifelong_moe.streams.sources import (
    EXTRA_SOURCES, KNOWN_SOURCES, DatasetNotFoundError, from_tensors, load_source,
)


def png(path, value: int, mode: str = "RGB", size=(6, 5)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, value, value)).save(path)


def make_folder(root, classes: dict[str, int], mode="RGB"):
    for c, n in classes.items():
        for i in range(n):
            png(root / c / f"{i:02d}.png", 10 * i, mode)


def check_items(data: ClassificationData):
    for ds, targets in ((data.train, data.train_targets), (data.test, data.test_targets)):
        assert len(ds) == len(targets)
        for i in range(len(ds)):
            assert ds[i][1] == targets[i]
            assert 0 <= targets[i] < len(data.class_names)


# ----------------------------------------------------------------------------- imagefolder
def test_imagefolder_with_train_test(tmp_path):
    make_folder(tmp_path / "train", {"golden_retriever": 3, "cat": 2}, mode="L")
    make_folder(tmp_path / "test", {"golden_retriever": 1, "cat": 2})
    data = load_source("imagefolder", root=None, path=tmp_path)
    assert data.class_names == ["cat", "golden retriever"]
    assert (len(data.train), len(data.test)) == (5, 3)
    assert data.train_targets == [0, 0, 1, 1, 1] and data.test_targets == [0, 0, 1]
    img, _ = data.train[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    check_items(data)


def test_imagefolder_mismatched_or_partial_splits(tmp_path):
    make_folder(tmp_path / "a" / "train", {"x": 1, "y": 1})
    make_folder(tmp_path / "a" / "test", {"x": 1, "z": 1})
    with pytest.raises(ValueError, match="only in train: \\['y'\\]; only in test: \\['z'\\]"):
        load_source("imagefolder", root=None, path=tmp_path / "a")
    make_folder(tmp_path / "b" / "train", {"x": 1})
    with pytest.raises(ValueError, match="found train/ but no test/"):
        load_source("imagefolder", root=None, path=tmp_path / "b")


def test_imagefolder_split_per_class(tmp_path):
    make_folder(tmp_path, {"a": 5, "b": 10, "c": 1})
    data = load_source("imagefolder", root=None, path=tmp_path, seed=0, test_fraction=0.2)
    assert data.class_names == ["a", "b", "c"]
    assert sorted(data.test_targets) == [0, 1, 1]  # round(5*.2)=1, round(10*.2)=2, a lone image stays in train
    assert len(data.train) + len(data.test) == 16
    assert not set(data.train.indices) & set(data.test.indices)
    check_items(data)
    again = load_source("imagefolder", root=None, path=tmp_path, seed=0, test_fraction=0.2)
    assert again.test.indices == data.test.indices
    others = [load_source("imagefolder", root=None, path=tmp_path, seed=s).test.indices for s in range(1, 6)]
    assert any(o != data.test.indices for o in others)


def test_imagefolder_path_relative_to_root_and_missing(tmp_path):
    make_folder(tmp_path / "pics", {"a": 2, "b": 2})
    assert load_source("imagefolder", root=tmp_path, path="pics").name == "pics"
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        load_source("imagefolder", root=tmp_path, path=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="needs `path`"):
        load_source("imagefolder", root=tmp_path)


# ----------------------------------------------------------------------------- tensors
def arrays(rng, n_train=6, n_test=4, layout="nhwc"):
    shape = (8, 7, 3) if layout == "nhwc" else (3, 8, 7)
    return dict(x_train=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
                y_train=np.arange(n_train) % 3, x_test=rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
                y_test=np.arange(n_test) % 3)


def test_tensors_npz(tmp_path):
    a = arrays(np.random.default_rng(0))
    f = tmp_path / "toy.npz"
    np.savez(f, **a, class_names=np.array(["red", "green", "blue"]))
    data = load_source("tensors", root=None, path=f)
    assert data.name == "toy" and data.class_names == ["red", "green", "blue"]
    assert (len(data.train), len(data.test)) == (6, 4)
    x, y = data.train[1]
    assert x.shape == (3, 8, 7) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.allclose(x, torch.from_numpy(a["x_train"][1]).permute(2, 0, 1).float() / 255)
    assert y == 1 and isinstance(y, int)
    check_items(data)


def test_tensors_safetensors_with_sibling_classes(tmp_path):
    from safetensors.numpy import save_file

    a = arrays(np.random.default_rng(1), layout="nchw")
    a = {**a, "x_train": a["x_train"].astype(np.float32) / 255, "x_test": a["x_test"][:, :1].copy()}
    f = tmp_path / "toy.safetensors"
    save_file(a, str(f))
    (tmp_path / "toy.safetensors.classes.txt").write_text("one\ntwo\nthree\n")
    data = load_source("tensors", root=None, path=f)
    assert data.class_names == ["one", "two", "three"]
    assert data.train[0][0].shape == (3, 8, 7) and data.test[0][0].shape == (1, 8, 7)
    assert data.test_targets == [0, 1, 2, 0]
    check_items(data)


def test_tensors_file_errors(tmp_path):
    f = tmp_path / "bad.npz"
    np.savez(f, x_train=np.zeros((2, 3, 4, 4), np.uint8), y_train=np.zeros(2, int))
    with pytest.raises(ValueError, match="lacks x_test, y_test"):
        load_source("tensors", root=None, path=f)
    a = arrays(np.random.default_rng(2))
    np.savez(f, **a)
    with pytest.raises(ValueError, match="no class names.*classes.txt"):
        load_source("tensors", root=None, path=f)
    with pytest.raises(DatasetNotFoundError):
        load_source("tensors", root=None, path=tmp_path / "absent.npz")


@pytest.mark.parametrize("key,value,needle", [
    ("x_train", np.zeros((10, 32, 32)), "x_train has shape (10, 32, 32); expected (N, C, H, W) or (N, H, W, C)"),
    ("x_test", np.zeros((4, 2, 8, 8), np.uint8), "x_test has shape (4, 2, 8, 8); expected"),
    ("y_train", np.zeros((6, 1), int), "y_train has shape (6, 1); expected (6,)"),
    ("y_test", np.zeros(3, int), "y_test has shape (3,); expected (4,)"),
    ("y_train", np.full(6, 3), "expected 0..2"),
    ("y_test", np.zeros(4, np.float32), "expected integer"),
    ("x_train", np.full((6, 8, 7, 3), 2.0, np.float32), "expected [0, 1]"),
])
def test_from_tensors_shape_errors(key, value, needle):
    a = arrays(np.random.default_rng(3))
    a[key] = value
    with pytest.raises(ValueError) as e:
        from_tensors("t", a["x_train"], a["y_train"], a["x_test"], a["y_test"], ["a", "b", "c"])
    assert needle in str(e.value)


def test_from_tensors_accepts_torch_and_templates():
    x = torch.rand(5, 1, 4, 4)
    data = from_tensors("t", x, torch.tensor([0, 1, 0, 1, 0]), x[:2], torch.tensor([1, 0]), ["a", "b"],
                        templates=["a {}."])
    assert torch.equal(data.train[3][0], x[3]) and data.templates == ["a {}."]


# ----------------------------------------------------------------------------- digits
def test_digits_stratified_and_seeded():
    d = load_source("digits", root=None, seed=0)
    assert d.class_names == [str(i) for i in range(10)] and len(d.train) + len(d.test) == 1797
    assert set(d.train_targets) == set(d.test_targets) == set(range(10))
    assert abs(len(d.test) / 1797 - 0.2) < 0.01
    x, y = d.test[0]
    assert x.shape == (1, 8, 8) and 0 <= x.min() and x.max() <= 1 and x.max() > 0.5
    assert d.templates == ['a photo of the number: "{}".']
    check_items(d)
    assert load_source("digits", root=None, seed=0).test.indices == d.test.indices
    assert load_source("digits", root=None, seed=1).test.indices != d.test.indices
    assert len(load_source("digits", root=None, test_fraction=0.5).test) > 850


# ----------------------------------------------------------------------------- torchvision
@pytest.mark.parametrize("name", sorted(sources._TORCHVISION))
def test_missing_torchvision_dataset(tmp_path, name):
    with pytest.raises(DatasetNotFoundError) as e:
        load_source(name, root=tmp_path, download=False)
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError) and name in msg
    assert str(tmp_path / sources._TORCHVISION[name].folder) in msg and "download" in msg
    if name == "caltech101":
        assert not any(tmp_path.iterdir())  # nothing created on the way


def test_stanford_cars_says_where_to_get_it(tmp_path):
    for download in (False, True):  # torchvision refuses to download it without touching the network
        with pytest.raises(DatasetNotFoundError, match="cannot download stanford_cars") as e:
            load_source("stanford_cars", root=tmp_path, download=download)
        assert str(tmp_path / "stanford_cars") in str(e.value) and "devkit" in str(e.value)


def test_fake_eurosat_random_split(tmp_path):
    folder = tmp_path / "eurosat" / "2750"
    for c in ("AnnualCrop", "SeaLake", "Forest"):
        make_folder(folder, {c: 10})
    d = load_source("eurosat", root=tmp_path, seed=0)
    assert d.class_names == ["annual crop", "forest", "sea or lake"]
    assert (len(d.train), len(d.test)) == (24, 6)
    assert d.templates[0] == "a centered satellite photo of {}." and len(d.templates) == 3  # the reference list
    check_items(d)
    assert load_source("eurosat", root=tmp_path, seed=7).test.indices == d.test.indices  # fixed split seed
    # the reference's split (ZSCL / MoE-Adapters split_dataset): torch's random_split, 80 % in front
    ref_train, ref_test = torch.utils.data.random_split(range(30), [24, 6], generator=torch.Generator().manual_seed(42))
    assert (sorted(d.train.indices), sorted(d.test.indices)) == (sorted(ref_train), sorted(ref_test))


def test_fake_dtd_and_caltech(tmp_path):
    data = tmp_path / "dtd" / "dtd"
    files = {"train1.txt": ["banded/a.png", "zig_zagged/b.png", "banded/c.png"],
             "test1.txt": ["zig_zagged/d.png", "banded/e.png"]}
    for split, lines in files.items():
        (data / "labels").mkdir(parents=True, exist_ok=True)
        (data / "labels" / split).write_text("\n".join(lines) + "\n")
        for rel in lines:
            png(data / "images" / rel, 50)
    d = load_source("dtd", root=tmp_path)
    assert d.class_names == ["banded", "zig zagged"]
    assert d.train_targets == [0, 1, 0] and d.test_targets == [1, 0]
    check_items(d)
    cats = tmp_path / "caltech101" / "101_ObjectCategories"
    for c in ("BACKGROUND_Google", "Faces_easy", "yin_yang"):  # torchvision reads image_0001.jpg, ...
        for i in range(5):
            png(cats / c / f"image_{i + 1:04d}.jpg", 20 * i)
    c = load_source("caltech101", root=tmp_path)
    assert c.class_names == ["centered face", "yin yang"] and len(c.train) + len(c.test) == 10
    check_items(c)


# ----------------------------------------------------------------------------- names and hooks
def test_unknown_name_suggests():
    with pytest.raises(ValueError, match="did you mean 'cifar100'") as e:
        load_source("cifar1000", root=None)
    assert "known: " in str(e.value) and "stanford_cars" in str(e.value)


def test_known_sources_and_extra_hook(monkeypatch):
    assert KNOWN_SOURCES == sorted(KNOWN_SOURCES)
    assert {"digits", "imagefolder", "tensors", "cifar10", "mnist", "fashion_mnist"} <= set(KNOWN_SOURCES)
    assert set(MTIL_ORDER_I) <= set(KNOWN_SOURCES)
    seen = {}

    def fake(dataset, **kw):
        seen.update(kw, dataset=dataset)
        return from_tensors(dataset, torch.rand(2, 3, 4, 4), [0, 1], torch.rand(1, 3, 4, 4), [1], ["a", "b"])

    monkeypatch.setitem(EXTRA_SOURCES, "synthetic", fake)
    assert load_source("synthetic/shapes", root="r", seed=3).name == "synthetic/shapes"
    assert seen["dataset"] == "synthetic/shapes" and seen["seed"] == 3 and seen["root"] == "r"


# ----------------------------------------------------------------------------- mtil
def test_resolve_order():
    assert resolve_order("mtil_order1") == MTIL_ORDER_I and resolve_order("MTIL_ORDER2") == MTIL_ORDER_II
    assert len(MTIL_ORDER_I) == 11 and sorted(MTIL_ORDER_I) == sorted(MTIL_ORDER_II)
    assert set(NAMED_ORDERS) == {"mtil_order1", "mtil_order2"}
    order = resolve_order("mtil_order1")
    order.append("x")
    assert len(NAMED_ORDERS["mtil_order1"]) == 11  # a copy
    assert resolve_order(["digits", "mnist"]) == ["digits", "mnist"]
    with pytest.raises(ValueError, match="did you mean 'mtil_order1'"):
        resolve_order("mtil_ordr1")
    with pytest.raises(ValueError, match="more than once"):
        resolve_order(["mnist", "mnist"])
    with pytest.raises(ValueError, match="non-empty"):
        resolve_order([])
