"""Turn a source spec (a dataset name plus where its files are) into a :class:`ClassificationData`.

Sources: ``digits`` (sklearn's bundled 8x8 digits), ``imagefolder`` (a class-per-folder
directory), ``tensors`` (a ``.safetensors``/``.npz`` file) and torchvision datasets by short name
under ``root``, the 11 MTIL datasets included. Nothing is ever downloaded unless ``download=True``.

Splits: official train/test where the dataset has one (FGVC-Aircraft ``train``/``test``, DTD
``train``/``test`` of partition 1, Oxford-IIIT Pet ``trainval``/``test``, Flowers102
``train``/``test``). Caltech101, EuroSAT and SUN397 have none: they get a random split with a
fixed torch generator seeded by :data:`RANDOM_SPLIT_SEED` (42, as the ZSCL / MoE-Adapters MTIL
setup does), ``test_fraction`` of the images (0.2 by default) going to test. ``digits`` and
``imagefolder`` without ``train/``/``test/`` are split per class (stratified) by the run ``seed``.
Subsampling is not done here: the stream does it.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ..data import ClassificationData
from ..errors import UserError
from .templates import templates_for

RANDOM_SPLIT_SEED = 42
LOOKED_FOR = "put the files there (torchvision layout) or set `download: true` in the stream config"


class DatasetNotFoundError(FileNotFoundError, UserError):
    """A dataset's files are not where they were looked for; the message says where and what to do."""


class SourceError(ValueError, UserError):
    """An unknown source name or malformed source files/arrays."""


# Hook for source families defined elsewhere (e.g. ``synthetic/<domain>``): keyed by the prefix
# before "/" (or the whole name); consulted before the built-in sources. Each callable is called as
# ``fn(dataset, root=..., download=..., seed=..., path=..., test_fraction=...)``. Use
# :func:`register_source` so that ``KNOWN_SOURCES`` lists it too.
EXTRA_SOURCES: dict[str, Callable[..., ClassificationData]] = {}


class TensorImages(Dataset):
    """``(x[i], int target)`` over a float tensor ``[N, C, H, W]`` in ``[0, 1]``."""

    def __init__(self, x: torch.Tensor, targets: list[int]):
        self.x, self.targets = x, list(targets)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


# ----------------------------------------------------------------------------- tensors
def _as_tensor(a) -> torch.Tensor:
    return a.detach().cpu() if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))


def _images(name: str, x) -> torch.Tensor:
    x = _as_tensor(x)
    want = "(N, C, H, W) or (N, H, W, C) with C in {1, 3}"
    if x.ndim != 4 or (x.shape[1] not in (1, 3) and x.shape[3] not in (1, 3)):
        raise SourceError(f"{name} has shape {tuple(x.shape)}; expected {want}")
    if x.shape[1] not in (1, 3):  # channels last (if both could be channels, channels first wins)
        x = x.permute(0, 3, 1, 2)
    if x.dtype == torch.uint8:
        return x.float().div_(255.0).contiguous()
    if not x.is_floating_point():
        raise SourceError(f"{name} has dtype {x.dtype}; expected uint8 (0..255) or float in [0, 1]")
    if x.numel() and (x.min() < -1e-6 or x.max() > 1 + 1e-6):
        raise SourceError(f"{name} holds floats in [{x.min():.3g}, {x.max():.3g}]; expected [0, 1] "
                          "(or pass uint8 0..255)")
    return x.float().clamp(0, 1).contiguous()  # a copy: never aliases the caller's array


def _labels(name: str, y, n: int, xname: str, n_classes: int) -> list[int]:
    y = _as_tensor(y)
    if y.ndim != 1 or len(y) != n:
        raise SourceError(f"{name} has shape {tuple(y.shape)}; expected ({n},): one label per image of {xname}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise SourceError(f"{name} has dtype {y.dtype}; expected integer class indices")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise SourceError(f"{name} holds labels in {int(y.min())}..{int(y.max())}; expected 0..{n_classes - 1} "
                          f"(there are {n_classes} class names)")
    return [int(t) for t in y.tolist()]


def from_tensors(name: str, x_train, y_train, x_test, y_test, class_names, templates=None,
                 meta: dict | None = None) -> ClassificationData:
    """A dataset from in-memory arrays (numpy or torch). ``x``: 4-D, channels first or last with
    C in {1, 3}, uint8 0..255 or float in [0, 1]; ``y``: 1-D integer labels indexing ``class_names``."""
    class_names = [str(c) for c in class_names]
    if not class_names:
        raise SourceError(f"dataset {name!r}: class_names is empty")
    xtr, xte = _images("x_train", x_train), _images("x_test", x_test)
    ytr = _labels("y_train", y_train, len(xtr), "x_train", len(class_names))
    yte = _labels("y_test", y_test, len(xte), "x_test", len(class_names))
    return ClassificationData(name, class_names, TensorImages(xtr, ytr), TensorImages(xte, yte), ytr, yte,
                              templates=list(templates) if templates else None, meta=dict(meta or {}))


def _load_tensors(path: Path) -> ClassificationData:
    keys = ("x_train", "y_train", "x_test", "y_test")
    if path.suffix == ".npz":
        not_npz = f"{path} is not a valid .npz file (np.savez writes one: a zip archive of .npy arrays)"
        if not zipfile.is_zipfile(path):
            raise SourceError(not_npz)
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except ValueError as e:
            if "pickle" in str(e).lower() or "object arrays" in str(e).lower():  # never loaded: arbitrary code
                raise SourceError(f"{path} holds an array of Python objects, which is never loaded; store numbers "
                                  "as numeric arrays and class_names as a string array (np.array(names, dtype=str))"
                                  ) from None
            raise SourceError(f"{not_npz}: {e}") from None
        except (OSError, EOFError, zipfile.BadZipFile) as e:
            raise SourceError(f"{not_npz}: {e}") from None
        raw = sorted(k for k, v in arrays.items() if not isinstance(v, np.ndarray))  # numpy hands back the bytes
        if raw:
            raise SourceError(f"{not_npz}: {', '.join(raw)} not .npy arrays")
    elif path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.numpy import load_file

        try:
            arrays = load_file(str(path))
            with safe_open(str(path), framework="numpy") as f:
                md = f.metadata() or {}
            if "class_names" in md:
                arrays["class_names"] = np.array(json.loads(md["class_names"]), dtype=str)
        except (SafetensorError, OSError, ValueError) as e:
            raise SourceError(f"{path} is not a valid .safetensors file ({e})") from None
    else:
        raise SourceError(f"{path}: tensors files must end in .safetensors or .npz")
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise SourceError(f"{path} lacks {', '.join(missing)}; it holds {', '.join(sorted(arrays)) or 'nothing'} "
                          f"(expected {', '.join(keys)})")
    names = arrays.get("class_names")
    if names is None:
        for side in (Path(str(path) + ".classes.txt"), path.with_suffix(".classes.txt")):
            if side.is_file():
                try:
                    names = [ln.strip() for ln in side.read_text(encoding="utf-8").splitlines() if ln.strip()]
                except UnicodeDecodeError as e:
                    raise SourceError(f"{side}: not UTF-8 text ({e.reason} at byte {e.start})") from None
                break
        else:
            raise SourceError(f"{path}: no class names; put a 'class_names' string array in the file or "
                              f"write them one per line to {path}.classes.txt")
    return from_tensors(path.stem, *(arrays[k] for k in keys), [str(n) for n in np.asarray(names).tolist()],
                        meta={"source": "tensors", "path": str(path)})


# ----------------------------------------------------------------------------- splits
def stratified_split(targets, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Per class, a seeded shuffle puts ``round(n * test_fraction)`` images (at least 1 when the
    class has 2 or more, never all) in test, the rest in train. Both index lists come sorted."""
    rng = np.random.default_rng(seed)
    t = np.asarray(targets)
    train, test = [], []
    for c in np.unique(t):
        idx = rng.permutation(np.flatnonzero(t == c))
        k = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, round(len(idx) * test_fraction)))
        test.extend(idx[:k].tolist())
        train.extend(idx[k:].tolist())
    return sorted(train), sorted(test)


def _split_data(name, class_names, full, targets, train_idx, test_idx, templates, meta) -> ClassificationData:
    return ClassificationData(name, class_names, Subset(full, train_idx), Subset(full, test_idx),
                              [targets[i] for i in train_idx], [targets[i] for i in test_idx], templates, meta)


def _digits(seed: int, test_fraction: float) -> ClassificationData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    targets = [int(t) for t in d.target]
    tr, te = stratified_split(targets, test_fraction, seed)
    full = TensorImages(x, targets)
    return _split_data("digits", [str(i) for i in range(10)], full, targets, tr, te,
                       ['a photo of the number: "{}".'], {"source": "digits", "seed": seed})


# ----------------------------------------------------------------------------- imagefolder
def _clean(name: str) -> str:
    return " ".join(name.replace("_", " ").split())


def unreadable_image(path: str) -> str | None:
    """Why PIL cannot decode the image at ``path`` (None if it can). Header check plus a decode: JPEGs
    at 1/8 scale (``draft``), which still reads the whole stream and so finds truncated files
    (about 1.5 ms for a 500x375 JPEG on one core; a header check alone misses truncation)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (1, 1))
            im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... per format
        return " ".join(str(e).replace(f"'{path}'", "").split()) or type(e).__name__
    return None


def _check_images(ds, root: Path, on_bad_image: str) -> int:
    """Refuse (``error``) or drop (``skip``) the images of an ImageFolder that cannot be decoded, so that
    a bad file fails the stream before the run starts, not training at its first use; the number dropped."""
    from concurrent.futures import ThreadPoolExecutor

    paths = [p for p, _ in ds.samples]
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        bad = {p: why for p, why in zip(paths, pool.map(unreadable_image, paths, chunksize=64)) if why is not None}
    if not bad:
        return 0
    if on_bad_image == "error":
        listed = [f"{os.path.relpath(p, root)} ({why})" for p, why in list(bad.items())[:5]]
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise SourceError(f"dataset 'imagefolder' at {root}: {len(bad)} image file(s) cannot be read: "
                          f"{', '.join(listed)}{more}; fix or remove them, or set stream.on_bad_image: skip")
    ds.samples = ds.imgs = [s for s in ds.samples if s[0] not in bad]
    ds.targets = [t for _, t in ds.samples]
    warnings.warn(f"dataset 'imagefolder' at {root}: skipped {len(bad)} image file(s) that cannot be read "
                  f"(stream.on_bad_image: skip)", stacklevel=2)
    return len(bad)


def _image_folder(path: Path, seed: int, test_fraction: float, on_bad_image: str = "error") -> ClassificationData:
    from torchvision.datasets import ImageFolder

    skipped = 0

    def load(d: Path):
        nonlocal skipped
        try:
            ds = ImageFolder(str(d))  # default loader: PIL, converted to RGB, lazily
        except FileNotFoundError as e:
            raise DatasetNotFoundError(f"dataset 'imagefolder': {e} (expected {d}/<class>/<image>)") from e
        skipped += _check_images(ds, path, on_bad_image)
        return ds

    meta = {"source": "imagefolder", "path": str(path)}
    has = {s: (path / s).is_dir() for s in ("train", "test")}
    if has["train"] and has["test"]:
        tr, te = load(path / "train"), load(path / "test")
        if tr.classes != te.classes:
            a, b = set(tr.classes), set(te.classes)
            raise SourceError(f"dataset 'imagefolder' at {path}: train/ and test/ hold different classes "
                              f"(only in train: {sorted(a - b)}; only in test: {sorted(b - a)})")
        return ClassificationData(path.name, [_clean(c) for c in tr.classes], tr, te, list(tr.targets),
                                  list(te.targets), None, {**meta, "split": "train/ and test/",
                                                           "skipped_images": skipped})
    if has["train"] or has["test"]:
        one, other = ("train", "test") if has["train"] else ("test", "train")
        raise SourceError(f"dataset 'imagefolder' at {path}: found {one}/ but no {other}/; give both, or "
                          "neither (then each class folder is split by test_fraction)")
    full = load(path)
    targets = list(full.targets)
    tr, te = stratified_split(targets, test_fraction, seed)
    return _split_data(path.name, [_clean(c) for c in full.classes], full, targets, tr, te, None,
                       {**meta, "split": f"stratified, test_fraction={test_fraction}, seed={seed}",
                        "skipped_images": skipped})


# ----------------------------------------------------------------------------- torchvision
@dataclass(frozen=True)
class _TV:
    cls: str  # torchvision.datasets class
    folder: str  # where, under root, torchvision looks for the files
    splits: tuple[str, str] | None  # (train, test) split names; "bool" -> train=True/False; None -> random
    manual: str = ""  # how to get the files where torchvision cannot download them


_TORCHVISION = {
    "cifar10": _TV("CIFAR10", "cifar-10-batches-py", ("bool", "")),
    "cifar100": _TV("CIFAR100", "cifar-100-python", ("bool", "")),
    "mnist": _TV("MNIST", "MNIST/raw", ("bool", "")),
    "fashion_mnist": _TV("FashionMNIST", "FashionMNIST/raw", ("bool", "")),
    "fgvc_aircraft": _TV("FGVCAircraft", "fgvc-aircraft-2013b", ("train", "test")),
    "caltech101": _TV("Caltech101", "caltech101/101_ObjectCategories", None,
                      "torchvision downloads it from Google Drive with `gdown`, which is often over quota; "
                      "otherwise get caltech-101.zip from the Caltech 101 page on data.caltech.edu and unpack "
                      "101_ObjectCategories.tar.gz so that its class folders sit in that directory"),
    "dtd": _TV("DTD", "dtd/dtd", ("train", "test")),
    "eurosat": _TV("EuroSAT", "eurosat/2750", None),
    "flowers102": _TV("Flowers102", "flowers-102", ("train", "test")),
    "food101": _TV("Food101", "food-101", ("train", "test")),
    "oxford_pet": _TV("OxfordIIITPet", "oxford-iiit-pet", ("trainval", "test")),
    "stanford_cars": _TV("StanfordCars", "stanford_cars", ("train", "test"),
                         "torchvision cannot download stanford_cars (its original URL is gone), so `download: "
                         "true` does not help: get a copy by hand (e.g. a Kaggle mirror of Stanford Cars) and lay "
                         "it out as devkit/{cars_meta.mat,cars_train_annos.mat}, cars_train/, cars_test/ and "
                         "cars_test_annos_withlabels.mat in that directory"),
    "sun397": _TV("SUN397", "SUN397", None),
}

# Oxford 102 Flowers category names in label order; torchvision's Flowers102 exposes no class list.
FLOWERS102_CLASSES = [
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot",
    "king protea", "spear thistle", "yellow iris", "globe-flower", "purple coneflower", "peruvian lily",
    "balloon flower", "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger",
    "grape hyacinth", "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william",
    "carnation", "garden phlox", "love in the mist", "mexican aster", "alpine sea holly", "ruby-lipped cattleya",
    "cape flower", "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily",
    "poinsettia", "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion",
    "petunia", "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium",
    "orange dahlia", "pink-yellow dahlia", "cautleya spicata", "japanese anemone", "black-eyed susan",
    "silverbush", "californian poppy", "osteospermum", "spring crocus", "bearded iris", "windflower",
    "tree poppy", "gazania", "azalea", "water lily", "rose", "thorn apple", "morning glory", "passion flower",
    "lotus", "toad lily", "anthurium", "frangipani", "clematis", "hibiscus", "columbine", "desert-rose",
    "tree mallow", "magnolia", "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss",
    "foxglove", "bougainvillea", "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower",
    "trumpet creeper", "blackberry lily",
]
_CALTECH_RENAME = {"Faces": "face", "Faces_easy": "centered face", "Leopards": "leopard",
                   "Motorbikes": "motorbike", "airplanes": "airplane"}


def _tv_class_names(name: str, ds) -> list[str]:
    if name == "mnist":
        return [str(i) for i in range(10)]  # torchvision: "0 - zero", ...
    if name == "flowers102":
        return list(FLOWERS102_CLASSES)
    if name == "caltech101":
        return [_CALTECH_RENAME.get(c) or _clean(c) for c in ds.categories]
    if name == "eurosat":  # folder names such as "AnnualCrop", "SeaLake"
        return ["sea or lake" if c == "SeaLake" else re.sub(r"(?<=[a-z])(?=[A-Z])", " ", c).lower()
                for c in ds.classes]
    if name == "sun397":  # "apartment_building/outdoor" -> "apartment building outdoor"
        return [_clean(c.replace("/", " ")) for c in ds.classes]
    return [_clean(str(c)) for c in ds.classes]


def _tv_targets(ds) -> list[int]:
    """Labels without decoding images, from the attribute each torchvision dataset keeps them in."""
    if hasattr(ds, "_samples"):  # StanfordCars: (path, label)
        return [int(t) for _, t in ds._samples]
    for attr in ("targets", "_labels", "y"):
        v = getattr(ds, attr, None)
        if v is not None:
            return [int(t) for t in (v.tolist() if hasattr(v, "tolist") else v)]
    raise TypeError(f"{type(ds).__name__}: no label attribute found")


def _not_found(name: str, spec: _TV, root: Path) -> DatasetNotFoundError:
    hint = f"put the files there (torchvision layout); {spec.manual}" if spec.cls == "StanfordCars" else \
        LOOKED_FOR + (f". Note: {spec.manual}" if spec.manual else "")
    return DatasetNotFoundError(f"dataset {name!r} (torchvision {spec.cls}) not found or incomplete in "
                                f"{root / spec.folder} (root {root}). To fix: {hint}.")


def _tv_make(name: str, spec: _TV, root: Path, download: bool, split: str | None):
    import torchvision.datasets as tvd

    if name == "caltech101" and not download and not (root / spec.folder).is_dir():
        raise _not_found(name, spec, root)  # torchvision would create directories before failing
    kw = {} if split is None else {"train": split == "train"} if spec.splits[0] == "bool" else {"split": split}
    try:
        return getattr(tvd, spec.cls)(str(root), download=download, **kw)
    except RuntimeError as e:
        if "not found" in str(e).lower():
            raise _not_found(name, spec, root) from e
        raise
    except FileNotFoundError as e:
        raise _not_found(name, spec, root) from e
    except ValueError as e:
        if "cannot be downloaded" in str(e):
            raise _not_found(name, spec, root) from e
        raise


def _torchvision(name: str, root: Path, download: bool, test_fraction: float) -> ClassificationData:
    spec = _TORCHVISION[name]
    meta = {"source": name, "root": str(root), "torchvision": spec.cls}
    if spec.splits is None:
        full = _tv_make(name, spec, root, download, None)
        targets = _tv_targets(full)
        # as the reference's torch random_split(ds, [int(0.8 n), rest], Generator().manual_seed(42)):
        # train is the front of the permutation, test the rest
        n_train = int((1 - test_fraction) * len(targets))
        perm = torch.randperm(len(targets), generator=torch.Generator().manual_seed(RANDOM_SPLIT_SEED)).tolist()
        tr, te = sorted(perm[:n_train]), sorted(perm[n_train:])
        return _split_data(name, _tv_class_names(name, full), full, targets, tr, te, templates_for(name),
                           {**meta, "split": f"random, test_fraction={test_fraction}, seed={RANDOM_SPLIT_SEED}"})
    names = ("train", "test") if spec.splits[0] == "bool" else spec.splits
    train, test = (_tv_make(name, spec, root, download, s) for s in names)
    if getattr(train, "classes", None) != getattr(test, "classes", None):
        raise SourceError(f"dataset {name!r} in {root / spec.folder}: train and test splits list different classes")
    return ClassificationData(name, _tv_class_names(name, train), train, test, _tv_targets(train),
                              _tv_targets(test), templates_for(name), {**meta, "split": "/".join(names)})


# ----------------------------------------------------------------------------- entry point
KNOWN_SOURCES: list[str] = sorted(["digits", "imagefolder", "tensors", *_TORCHVISION])


def register_source(prefix: str, fn: Callable[..., ClassificationData], names=()) -> None:
    """Add a source family to :data:`EXTRA_SOURCES`; ``names`` (e.g. ``"synthetic/<domain>"``)
    are listed in :data:`KNOWN_SOURCES`."""
    EXTRA_SOURCES[prefix] = fn
    KNOWN_SOURCES[:] = sorted(set(KNOWN_SOURCES) | set(names or [prefix]))


def _resolve_path(dataset: str, path, root) -> Path:
    if path is None:
        what = "directory" if dataset == "imagefolder" else "file"
        raise SourceError(f"dataset {dataset!r} needs `path` (the {what} to read)")
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and root is not None and (Path(root).expanduser() / p).exists():
        p = Path(root).expanduser() / p
    if not p.exists():
        what = "a directory of <class>/<image> folders (optionally under train/ and test/)" \
            if dataset == "imagefolder" else "a .safetensors or .npz file holding x_train, y_train, x_test, y_test"
        raise DatasetNotFoundError(f"dataset {dataset!r}: {p.resolve()} does not exist; `path` must point to {what}")
    return p


def load_source(dataset: str, *, root: str | Path | None, download: bool = False, seed: int = 0,
                path: str | Path | None = None, test_fraction: float = 0.2,
                on_bad_image: str = "error") -> ClassificationData:
    """Load one source as a :class:`ClassificationData` (see the module docstring). ``on_bad_image``
    (``error`` or ``skip``): what an ``imagefolder`` does with image files that cannot be decoded."""
    if not 0 < test_fraction < 1:
        raise SourceError(f"test_fraction must be in (0, 1), got {test_fraction}")
    prefix = dataset.split("/", 1)[0]
    if prefix in EXTRA_SOURCES:
        return EXTRA_SOURCES[prefix](dataset, root=root, download=download, seed=seed, path=path,
                                     test_fraction=test_fraction)
    key = dataset.strip().lower().replace("-", "_")
    if key == "digits":
        return _digits(seed, test_fraction)
    if key == "imagefolder":
        return _image_folder(_resolve_path(key, path, root), seed, test_fraction, on_bad_image)
    if key == "tensors":
        return _load_tensors(_resolve_path(key, path, root))
    if key in _TORCHVISION:
        base = Path(root if root is not None else os.environ.get("LIFELONG_MOE_DATA") or "~/data").expanduser()
        return _torchvision(key, base, download, test_fraction)
    close = difflib.get_close_matches(key, KNOWN_SOURCES, n=1, cutoff=0.6)
    raise SourceError(f"unknown dataset {dataset!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                      f"known: {', '.join(KNOWN_SOURCES)}")


# ----------------------------------------------------------------------------- synthetic world
def _register_synthetic() -> None:
    from .synthetic import DOMAINS, load

    register_source("synthetic", load, names=[f"synthetic/{d}" for d in DOMAINS])


_register_synthetic()
