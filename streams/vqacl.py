"""Real continual VQA data: VQA v2 questions in the VQACL partition format (Zhang et al., CVPR 2023,
``zhangxi1997/VQACL``, ``datasets/vqa/Partition_Q``), the data CL-MoE trains on.

One JSON list per question type and split, ``<split>_q_<type>.json`` (``karpathy_train_q_color.json``,
``karpathy_test_q_color.json``, ...), each record::

    {"img_id": "COCO_val2014_000000131089", "sent": "What color is the bus?", "question_type": "what color is the",
     "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": 1}, ...],   # 10 human answers
     "label": {"red": 1, "dark red": 0.3}, ...}                                          # VQA soft scores

``answers`` may also be a list of plain strings. The training target is the label with the highest
score (the first of equal ones, in file order); a record whose ``label`` is empty (VQA v2 has them: no
answer in the 3129-answer vocabulary) falls back to the commonest normalised human answer. Images are
resolved under ``root`` by their COCO name, as VQACL does (``vqa_data.py``: the split folder is the
``train2014`` / ``val2014`` in the id): ``<root>/val2014/COCO_val2014_000000131089.jpg`` (``.png`` is
accepted too; an id without a COCO split is looked up as ``<root>/<img_id>.jpg``). The JSON files are
looked for in ``partition_dir``, by default ``<root>/Partition_Q`` if it exists, else ``root``.

Question types are not limited to VQACL's ten: any name (letters, digits, ``_ . -``) whose two files
exist is a task, ``vqacl/<name>`` (a stream lists them in ``stream.question_types``, in its order).

A missing file, a malformed record (not an object, a missing or mistyped field, empty answers) or a
missing or unreadable image gives one :class:`~lifelong_moe.errors.UserError` naming the file and the
record index. Images are checked when loading (PIL open + verify, which reads headers, not pixels)
and decoded lazily, as PIL RGB images.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ..data import QAData, QARecord
from ..errors import UserError
from ..evaluation.vqa_metrics import normalize_answer

__all__ = ["load_vqacl", "load", "partition_file", "image_path", "available_types", "VQACLDataError", "VQAImageFiles"]

_COCO_ID = re.compile(r"^COCO_([a-z]+\d{4})_\d+$")
_EXTENSIONS = (".jpg", ".png")
_FIELDS = {"img_id": str, "sent": str, "question_type": str, "answers": list, "label": dict}
_TYPE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class VQACLDataError(UserError):
    """A missing or malformed VQACL partition file, record or image."""


class VQAImageFiles(Dataset):
    """``(PIL RGB image, i)`` read lazily from image files; ``i`` indexes the records."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return im.convert("RGB"), i


def partition_file(partition_dir: Path, split: str, qtype: str) -> Path:
    return Path(partition_dir) / f"{split}_q_{qtype}.json"


def image_path(root: Path, img_id: str) -> tuple[Path, list[Path]]:
    """The image file of ``img_id`` under ``root`` (the first that exists, else the first candidate)
    and every candidate looked at."""
    m = _COCO_ID.match(img_id)
    folder = Path(root) / m.group(1) if m else Path(root)
    candidates = [folder / f"{img_id}{ext}" for ext in _EXTENSIONS]
    return next((p for p in candidates if p.is_file()), candidates[0]), candidates


def _record_problem(r) -> str | None:
    """What is wrong with one record, or None."""
    if not isinstance(r, dict):
        return f"is a {type(r).__name__}, not an object"
    for key, kind in _FIELDS.items():
        if key not in r:
            return f"has no {key!r} field"
        if not isinstance(r[key], kind):
            return f"field {key!r} is a {type(r[key]).__name__}, not a {kind.__name__}"
    if not r["img_id"].strip():
        return "field 'img_id' is empty"
    if not r["sent"].strip():
        return "field 'sent' (the question) is empty"
    if not r["answers"]:
        return "field 'answers' is empty"
    for j, a in enumerate(r["answers"]):
        text = a.get("answer") if isinstance(a, dict) else a
        if not isinstance(text, str):
            return f"answers[{j}] is neither a string nor an object with a string 'answer'"
    for ans, score in r["label"].items():
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            return f"label {ans!r} has a non-numeric score {score!r}"
    return None


def _fail(path: Path, problems: list[tuple[int, str]]) -> VQACLDataError:
    i, what = problems[0]
    more = f" ({len(problems) - 1} more problem(s) in this file)" if len(problems) > 1 else ""
    return VQACLDataError(f"VQACL data {path}: record {i} {what}{more}")


def available_types(partition_dir: Path, split: str) -> list[str]:
    """The question types that have a ``<split>_q_<type>.json`` file in ``partition_dir``."""
    prefix = f"{split}_q_"
    d = Path(partition_dir)
    return sorted(p.name[len(prefix):-5] for p in d.glob(f"{prefix}*.json")) if d.is_dir() else []


def _missing(path: Path, qtype: str, split: str) -> VQACLDataError:
    import difflib

    have = available_types(path.parent, split)
    close = difflib.get_close_matches(qtype, have, n=1, cutoff=0.6)
    hint = (f"; unknown question type {qtype!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; question types with a {split} file there: {', '.join(have)}") if have and qtype not in have else ""
    return VQACLDataError(f"VQACL data: partition file {path} not found (expected one JSON list per question "
                          f"type and split, e.g. {split}_q_color.json, in the partition directory){hint}")


def _read_records(path: Path, qtype: str = "", split: str = "") -> list[dict]:
    if not path.is_file():
        raise _missing(path, qtype, split)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VQACLDataError(f"VQACL data {path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise VQACLDataError(f"VQACL data {path}: expected a JSON list of records, got a {type(data).__name__}")
    if not data:
        raise VQACLDataError(f"VQACL data {path}: the list of records is empty")
    problems = [(i, p) for i, r in enumerate(data) for p in [_record_problem(r)] if p]
    if problems:
        raise _fail(path, problems)
    return data


def _target(r: dict, answers: tuple[str, ...]) -> str:
    """VQACL's training answer: the highest-scoring label (first of equals); without labels, the
    commonest normalised human answer (first of equals)."""
    if r["label"]:
        return max(r["label"].items(), key=lambda kv: kv[1])[0]
    return Counter(normalize_answer(a) for a in answers).most_common(1)[0][0]


def _check_images(path: Path, indices, records: list[dict], root: Path) -> list[Path]:
    from PIL import Image

    def problem(p: Path, looked: list[Path], img_id: str) -> str | None:
        if not p.is_file():
            return f"image {img_id!r} not found (looked for {' and '.join(str(c) for c in looked)})"
        try:
            with Image.open(p) as im:
                im.verify()
        except Exception as e:  # PIL raises many kinds for broken files
            return f"image {p} cannot be read ({type(e).__name__}: {e})"
        return None

    found, problems, seen = [], [], {}
    for i in indices:
        img_id = records[i]["img_id"]
        p, looked = image_path(root, img_id)
        if p not in seen:  # VQA v2 asks several questions about each image: check it once
            seen[p] = problem(p, looked, img_id)
        if seen[p]:
            problems.append((i, seen[p]))
        found.append(p)
    if problems:
        raise _fail(path, problems)
    return found


def _subset(n_records: int, n: int | None, seed: int, split: int) -> list[int]:
    if n is None or n >= n_records:
        return list(range(n_records))
    if n < 1:
        raise VQACLDataError(f"VQACL data: n_train / n_test must be >= 1, got {n}")
    rng = np.random.default_rng([seed, split, 0x7AC1])
    return sorted(rng.choice(n_records, size=n, replace=False).tolist())


def load_vqacl(qtype: str, root: str | Path, partition_dir: str | Path | None = None, *, seed: int = 0,
               n_train: int | None = None, n_test: int | None = None, train_split: str = "karpathy_train",
               test_split: str = "karpathy_test", check_images: bool = True) -> QAData:
    """VQACL question type ``qtype`` (``"color"``, or ``"vqacl/color"``) as a :class:`QAData`, images
    as lazily decoded PIL images. ``n_train`` / ``n_test`` keep a seeded random subset (file order
    kept); every record is validated, the images of the kept ones are checked."""
    from .vqa_synthetic import QUESTION_TYPES

    key = qtype.split("/", 1)[1] if qtype.startswith("vqacl/") else qtype
    if not _TYPE_NAME.match(key):
        raise VQACLDataError(f"VQACL data: question type {key!r} is not a name (letters, digits, '_', '.', '-'; "
                             "it names the files <split>_q_<type>.json)")
    if root is None:
        raise VQACLDataError(f"VQACL data vqacl/{key}: needs `root` (the directory holding train2014/ and val2014/)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise VQACLDataError(f"VQACL data vqacl/{key}: root {root} is not a directory")
    if partition_dir is None:
        partition_dir = root / "Partition_Q" if (root / "Partition_Q").is_dir() else root
    partition_dir = Path(partition_dir).expanduser()
    splits = []
    for s, (split, n) in enumerate(((train_split, n_train), (test_split, n_test))):
        path = partition_file(partition_dir, split, key)
        raw = _read_records(path, key, split)
        keep = _subset(len(raw), n, int(seed), s)
        paths = _check_images(path, keep, raw, root) if check_images else [image_path(root, raw[i]["img_id"])[0]
                                                                          for i in keep]
        records, fallback = [], 0
        for i in keep:
            r = raw[i]
            answers = tuple((a["answer"] if isinstance(a, dict) else a).strip() for a in r["answers"])
            fallback += not r["label"]
            records.append(QARecord(r["sent"].strip(), _target(r, answers), answers, key, r["img_id"]))
        splits.append((path, paths, records, fallback, keep))
    (tr_path, tr_img, tr_rec, tr_fb, tr_keep), (te_path, te_img, te_rec, te_fb, te_keep) = splits
    return QAData(name=f"vqacl/{key}", train=VQAImageFiles(tr_img), test=VQAImageFiles(te_img),
                  train_records=tr_rec, test_records=te_rec,
                  meta={"source": "vqacl", "question_type": key,
                        "task_index": QUESTION_TYPES.index(key) if key in QUESTION_TYPES else None,  # VQACL's ten
                        "root": str(root), "train_file": str(tr_path), "test_file": str(te_path), "seed": int(seed),
                        "train_indices": tr_keep, "test_indices": te_keep,  # file positions of the records
                        "targets_without_label": {"train": tr_fb, "test": te_fb}})


def load(name: str, *, root=None, seed: int = 0, partition_dir=None, n_train: int | None = None,
         n_test: int | None = None, train_split: str = "karpathy_train", test_split: str = "karpathy_test",
         check_images: bool = True, **_ignored) -> QAData:
    """VQA source entry point: ``load("vqacl/color", root=...)`` (see :func:`load_vqacl`); other
    keyword arguments of the generic loaders (download, ...) are accepted and ignored."""
    return load_vqacl(name, root, partition_dir, seed=seed, n_train=n_train, n_test=n_test, train_split=train_split,
                      test_split=test_split, check_images=check_images)
