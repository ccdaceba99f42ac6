"""Edit records from user input and from E-VQA / E-IC / VLKEB JSON files.

The files are JSON lists of objects with EasyEdit's MMEdit field names (``src, pred, rephrase, alt,
image, image_rephrase, loc, loc_ans, m_loc, m_loc_q, m_loc_a``; E-VQA and E-IC as in EasyEdit's
``VQADataset`` / ``CaptionDataset``, VLKEB the same fields); image fields are paths under an image
root. Images are read with PIL and converted with the VLM's own processor (resize, crop, normalise)
to pixel tensors ``[3, S, S]``. Every failure is one UserError naming the file and the record index,
a target word outside a closed vocabulary (the tiny VLM's) included.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..errors import UserError
from .types import RECORD_FIELDS, EditRecord

IMAGE_FIELDS = ("image", "image_rephrase", "m_loc")
TEXT_FIELDS = tuple(f for f in RECORD_FIELDS if f not in IMAGE_FIELDS)
CONVERTIBLE_MODES = {"RGB", "RGBA", "L", "LA", "P", "1"}  # PIL modes with an unambiguous RGB reading


def image_tensor(vlm, image: Any, *, root: str | Path | None = None, what: str = "image") -> torch.Tensor | None:
    """``image`` (a path, a PIL image, a preprocessed tensor ``[3, S, S]`` or None) as the VLM's
    pixel tensor (float32, CPU); UserError naming ``what`` for anything else."""
    if image is None:
        return None
    if isinstance(image, torch.Tensor):
        s = vlm.image_size
        if image.ndim != 3 or tuple(image.shape) != (3, s, s) or not image.is_floating_point():
            raise UserError(f"{what}: a tensor image must be preprocessed pixel values, float [3, {s}, {s}]; got "
                            f"{image.dtype} {list(image.shape)} (pass a path or a PIL image to have it converted)")
        if not torch.isfinite(image).all():
            raise UserError(f"{what}: the pixel tensor holds NaN or infinite values")
        return image.detach().to("cpu", torch.float32).clone()
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, Path)):
        path = Path(root, image) if root is not None and not Path(image).is_absolute() else Path(image)
        if not path.is_file():
            raise UserError(f"{what}: image file not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                pil = im.copy()
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise UserError(f"{what}: cannot read image file {path}: {e}") from None
    elif isinstance(image, Image.Image):
        pil = image
    else:
        raise UserError(f"{what}: expected an image path, a PIL image, a pixel tensor or None; got "
                        f"{type(image).__name__}")
    if pil.mode not in CONVERTIBLE_MODES:
        raise UserError(f"{what}: image mode {pil.mode!r} is not supported (use RGB, RGBA, L, LA, P or 1)")
    if min(pil.size) < 1:
        raise UserError(f"{what}: the image is empty ({pil.size[0]}x{pil.size[1]})")
    return vlm.pixels_from_image(pil)


def make_record(vlm, fields: Mapping[str, Any], *, root: str | Path | None = None, where: str = "edit",
                ignore: Iterable[str] = (), need_image: bool = False) -> EditRecord:
    """An :class:`EditRecord` from MMEdit-style ``fields`` (or an EditRecord, checked); every problem is
    one UserError prefixed with ``where``."""
    if isinstance(fields, EditRecord):
        fields = {f: getattr(fields, f) for f in RECORD_FIELDS} | {"meta": fields.meta}
    if not isinstance(fields, Mapping):
        raise UserError(f"{where}: expected a mapping of MMEdit fields, got {type(fields).__name__}")
    ignore = set(ignore)
    unknown = sorted(k for k in fields if k not in RECORD_FIELDS and k != "meta" and k not in ignore)
    if unknown:
        import difflib

        hints = [f"{k!r}" + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(str(k), RECORD_FIELDS, 1,
                                                                                            0.6)) else "")
                 for k in unknown]
        raise UserError(f"{where}: unknown field(s) {', '.join(hints)}; known: {', '.join(RECORD_FIELDS)}")
    text = {}
    for f in TEXT_FIELDS:
        v = fields.get(f)
        if v is None:
            v = ""
        if not isinstance(v, str):
            raise UserError(f"{where}: field {f!r} must be text, got {type(v).__name__}")
        text[f] = v.strip()
    if not text["src"]:
        raise UserError(f"{where}: the prompt ('src') is empty")
    if not text["alt"]:
        raise UserError(f"{where}: the target ('alt') is empty")
    check_target_words(vlm, text["alt"], where)
    images = {f: image_tensor(vlm, fields.get(f), root=root, what=f"{where}: {f}") for f in IMAGE_FIELDS}
    if need_image and images["image"] is None:
        raise UserError(f"{where}: this method edits an image and a question; 'image' is missing")
    if (images["m_loc"] is None) != (not text["m_loc_q"]):
        raise UserError(f"{where}: image locality needs both 'm_loc' (an image) and 'm_loc_q' (its question)")
    meta = dict(fields.get("meta") or {})
    for f in IMAGE_FIELDS:
        if isinstance(fields.get(f), (str, Path)):
            meta.setdefault(f"{f}_path", str(fields[f]))
    return EditRecord(**text, **images, meta=meta)


def check_target_words(vlm, target: str, where: str) -> None:
    """UserError when ``target`` has a word outside the VLM's closed vocabulary (the tiny VLM's
    word-level tokenizer would read it as ``<unk>``: the edit could not be learned nor answered)."""
    from ..backbones.vocabulary import unknown_words

    bad = unknown_words(getattr(vlm, "tokenizer", None), target)
    if bad:
        raise UserError(f"{where}: the target {target!r} has the word(s) {', '.join(map(repr, bad))}, not in this "
                        f"backbone's closed vocabulary (the tiny VLM's word-level tokenizer knows only the synthetic "
                        f"world's words and would read them as <unk>); use words it knows, or a VLM with an open "
                        f"tokenizer (a Hugging Face LLaVA)")


def read_record_file(path: str | Path) -> list[dict]:
    """The JSON list of a record file; UserError naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"edit record file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records (E-VQA / E-IC / VLKEB format), got "
                        f"{type(data).__name__}")
    return data


def load_records(path: str | Path, vlm, *, image_root: str | Path | None = None, limit: int | None = None,
                 ignore_fields: Sequence[str] = ()) -> list[EditRecord]:
    """The first ``limit`` records of an E-VQA / E-IC / VLKEB JSON file, images under ``image_root``
    (default: the file's directory)."""
    path = Path(path)
    data = read_record_file(path)
    root = Path(image_root) if image_root is not None else path.parent
    if image_root is not None and not root.is_dir():
        raise UserError(f"image root {root} is not a directory")
    out = []
    for i, raw in enumerate(data[:limit] if limit else data):
        rec = make_record(vlm, raw, root=root, where=f"{path}: record {i}", ignore=ignore_fields)
        rec.meta.update(source=str(path), index=i)
        out.append(rec)
    return out


def record_text(record: EditRecord) -> dict[str, str]:
    """The text fields of a record (what the store keeps in JSON)."""
    return {f: getattr(record, f) for f in TEXT_FIELDS}


def record_images(record: EditRecord) -> dict[str, torch.Tensor]:
    """The image tensors a record carries (what the store keeps in safetensors)."""
    return {f: getattr(record, f) for f in IMAGE_FIELDS if getattr(record, f) is not None}
