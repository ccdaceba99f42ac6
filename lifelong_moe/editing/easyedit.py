"""EasyEdit's ``MultimodalEditor.edit`` call on an :class:`~.editor.Editor` (its README's multimodal example)::

    metrics, model, ids = editor.edit(
        prompts=["how many circles are there?", "what color is the circle?"],
        targets=["two", "green"],                       # EasyEdit's README writes target_new=: both accepted
        image=["a.png", "b.png"],                       # paths, PIL images, pixel tensors, or None (text-only)
        rephrase_prompts=[...], rephrase_image=[...],   # optional, one per edit (None: not measured)
        locality_inputs={"text": {"prompt": [...], "ground_truth": [...]},
                         "vision": {"prompt": [...], "ground_truth": [...], "image": [...]}},
        sequential_edit=False, keep_original_weight=False)

Each list has one entry per edit (a single edit may be given as plain values). It returns EasyEdit's
triple: one dict per edit ``{"case_id", "time" (seconds the edit took), "edit_id", "pre": {...},
"post": {...}}``, the edited VLM, and the ids of the edits left in the store.

Protocol, as EasyEdit's: ``sequential_edit=False`` (its default) applies each edit alone, scores it and
undoes it (the store is unchanged afterwards); ``sequential_edit=True`` applies the edits in order and
keeps them, edit i scored right after it is applied (edits 0..i in place), and
``keep_original_weight=True`` then undoes them all at the end. Pre-edit outputs are cached before the
first edit. (``editor.evaluate(records)`` is LiveEdit's protocol: all edits first, then every record.)

Metrics are the project's (:mod:`.metrics`), under EasyEdit's names; every ``*_acc`` is teacher-forced
token accuracy, as EasyEdit's: the fraction of the reference answer's tokens that are the argmax after
the prompt (the closing EOS not counted):

- ``rewrite_acc`` = reliability: edit image + prompt -> target;
- ``rephrase_acc`` = text generality: edit image + rephrased prompt -> target;
- ``image_rephrase_acc`` = image generality: rephrased image + prompt -> target;
- ``locality_acc`` = text locality: the text-only locality prompt, agreement of the argmax with the
  pre-edit model's argmax at the positions of its ``ground_truth`` tokens (None when the VLM has no
  text-only path);
- ``multimodal_locality_acc`` = image locality: the same on the vision locality image + prompt (top-1
  agreement, LiveEdit's rule, where EasyEdit counts a top-10 match).

``pre`` holds the first three on the unedited model; ``post`` all that were given inputs.
"""
from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

from ..errors import UserError
from . import metrics as M

NAMES = {"reliability": "rewrite_acc", "text_generality": "rephrase_acc", "image_generality": "image_rephrase_acc",
         "text_locality": "locality_acc", "image_locality": "multimodal_locality_acc"}
PRE = ("reliability", "text_generality", "image_generality")
KEYWORDS = ("prompts", "targets", "target_new", "image", "rephrase_prompts", "rephrase_image", "locality_inputs",
            "sequential_edit", "keep_original_weight", "file_type", "verbose", "batch_size")


def _column(value: Any, n: int, what: str, *, text: bool, optional: bool = True) -> list:
    """``value`` as one entry per edit: a list of ``n``, or one value when ``n == 1``."""
    if value is None and optional:
        return [None] * n
    if isinstance(value, (list, tuple)):
        values = list(value)
        if len(values) != n:
            raise UserError(f"edit: {what} has {len(values)} entries for {n} prompt(s); give one per edit")
    elif n == 1:
        values = [value]
    else:
        raise UserError(f"edit: {what} must be a list with one entry per prompt ({n}), got {type(value).__name__}")
    if text:
        for i, v in enumerate(values):
            if not (v is None and optional) and not isinstance(v, str):
                raise UserError(f"edit: {what}[{i}] must be text, got {type(v).__name__}")
    return values


def _locality(inputs: Any, n: int) -> dict[str, list]:
    """MMEdit locality fields (``loc, loc_ans, m_loc, m_loc_q, m_loc_a``) from EasyEdit's ``locality_inputs``."""
    out: dict[str, list] = {}
    if inputs is None:
        return out
    if not isinstance(inputs, Mapping):
        raise UserError(f"edit: locality_inputs must be a dict with 'text' and/or 'vision', got {type(inputs).__name__}")
    unknown = sorted(set(inputs) - {"text", "vision"})
    if unknown:
        raise UserError(f"edit: locality_inputs: unknown key(s) {unknown}; known: text, vision")
    parts = {"text": {"prompt": "loc", "ground_truth": "loc_ans"},
             "vision": {"prompt": "m_loc_q", "ground_truth": "m_loc_a", "image": "m_loc"}}
    for part, fields in parts.items():
        given = inputs.get(part)
        if given is None:
            continue
        if not isinstance(given, Mapping):
            raise UserError(f"edit: locality_inputs[{part!r}] must be a dict of {', '.join(fields)}")
        extra = sorted(set(given) - set(fields))
        missing = [k for k in fields if given.get(k) is None]
        if extra or missing:
            raise UserError(f"edit: locality_inputs[{part!r}] needs exactly {', '.join(fields)}"
                            + (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else ""))
        for key, field in fields.items():
            out[field] = _column(given[key], n, f"locality_inputs[{part!r}][{key!r}]", text=key != "image",
                                 optional=False)
    return out


def requests(prompts: Any, targets: Any, image: Any = None, rephrase_prompts: Any = None, rephrase_image: Any = None,
             locality_inputs: Any = None) -> list[dict]:
    """EasyEdit's inputs as MMEdit field dicts, one per edit (validated by :func:`.records.make_record` later)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise UserError("edit: prompts must be a prompt or a non-empty list of prompts")
    n = len(prompts)
    cols = {"src": _column(list(prompts), n, "prompts", text=True, optional=False),
            "alt": _column(targets, n, "targets", text=True, optional=False),
            "image": _column(image, n, "image", text=False),
            "rephrase": _column(rephrase_prompts, n, "rephrase_prompts", text=True),
            "image_rephrase": _column(rephrase_image, n, "rephrase_image", text=False),
            **_locality(locality_inputs, n)}
    return [{k: v[i] for k, v in cols.items() if v[i] is not None} for i in range(n)]


def _accs(vlm, recs, pre: M.PreEdit, only: Sequence[str], batch_size: int) -> list[dict]:
    """Per record ``{EasyEdit name: token accuracy}`` for the metrics of ``only`` it has inputs for."""
    scores = M.score(vlm, recs, pre, batch_size, generate=False, only=only)
    items = M.usable(vlm, M.probes(recs))
    out: list[dict] = [{} for _ in recs]
    for m in only:
        for p, acc in zip(items[m], scores[m]["per_record"]):
            out[p.record][NAMES[m]] = acc
    if "text_locality" in only and not M.text_only_supported(vlm):
        for o, r in zip(out, recs):
            if r.loc:
                o[NAMES["text_locality"]] = None
    return out


def edit(editor, prompts: Any = None, targets: Any = None, image: Any = None, *, target_new: Any = None,
         rephrase_prompts: Any = None, rephrase_image: Any = None, locality_inputs: Any = None,
         sequential_edit: bool = False, keep_original_weight: bool = False, file_type: Any = None,
         verbose: bool = False, batch_size: int = 64, **unknown) -> tuple[list[dict], Any, list[str]]:
    """EasyEdit's ``MultimodalEditor.edit`` on ``editor`` (see the module docstring); every bad input is
    one UserError before the store or the model is touched."""
    if unknown:
        raise UserError(f"edit: unknown keyword(s) {sorted(unknown)} for EasyEdit's form; known: {', '.join(KEYWORDS)}")
    if prompts is None:
        raise UserError("edit: EasyEdit's form needs prompts=[...] (with targets= and image=)")
    if (targets is None) == (target_new is None):
        raise UserError("edit: give the new answers once, as targets=[...] (or EasyEdit's older target_new=)")
    for name, flag in (("sequential_edit", sequential_edit), ("keep_original_weight", keep_original_weight),
                       ("verbose", verbose)):
        if not isinstance(flag, bool):
            raise UserError(f"edit: {name} must be True or False, got {flag!r}")
    kinds = {file_type} if isinstance(file_type, str) or file_type is None else set(file_type)
    if kinds - {None, "image"}:
        raise UserError(f"edit: file_type {sorted(map(str, kinds - {None}))}: only images are supported")
    editor._require_fitted("edit")
    raw = requests(prompts, targets if targets is not None else target_new, image, rephrase_prompts, rephrase_image,
                   locality_inputs)
    recs = [editor._record(r, f"edit: case {i}") for i, r in enumerate(raw)]  # all checked before any edit
    vlm = editor.vlm
    pre = M.cache_pre_edit(vlm, recs, batch_size)
    before = _accs(vlm, recs, pre, PRE, batch_size)
    snap = editor._snapshot()
    results, kept = [], []
    try:
        for i, rec in enumerate(recs):
            t = time.perf_counter()
            eid = editor._apply([rec])[0]
            seconds = time.perf_counter() - t
            after = _accs(vlm, [rec], pre.window(i, i + 1), M.METRICS, batch_size)[0]
            if sequential_edit:
                kept.append(eid)
            else:
                editor._restore(snap)
            results.append({"case_id": i, "time": seconds, "edit_id": eid if sequential_edit else None,
                            "pre": before[i], "post": after})
            if verbose:
                print(f"edit {i}: {rec.src!r} -> {rec.alt!r}: {after}", flush=True)
    except BaseException:
        editor._restore(snap)
        raise
    if sequential_edit and keep_original_weight:
        editor._restore(snap)
        kept = []
    return results, vlm, kept
