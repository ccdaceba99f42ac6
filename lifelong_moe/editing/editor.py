"""The knowledge-editing API (EasyEdit users should feel at home)::

    editor = Editor("lmoe-tiny-llava", method="retrieval")      # or Editor.from_config("edit.yaml")
    eid = editor.edit(image="cat.png", prompt="what animal is this?", target="dog")
    editor.answer("cat.png", "what animal is this?")          # -> "dog"
    metrics, vlm, ids = editor.edit(prompts=[...], targets=[...], image=[...])  # EasyEdit's form (.easyedit)
    editor.evaluate(records)                                   # reliability, generality, locality
    editor.save("my_edits"); editor = Editor.load("my_edits")

A method that learns before it edits (``needs_fit``: LiveEdit's meta-trained generators and routers)
must be fitted first: ``editor.fit(train_records)``, or its fitted weights loaded
(``editor.load_fitted(path)``; made by ``editor.save_fitted(dir)`` or ``lifelong-moe fit liveedit``).
Its ``fitted`` parameter ``auto`` (the default) loads the shipped fitted weights when they were fitted
on this backbone with these settings (:mod:`.fitted`); until then ``edit()`` refuses.

Every bad input raises one :class:`~lifelong_moe.errors.UserError` before the store or the model is
touched. The store (:mod:`.store`) is the single source of truth: after every change the method is
told the active edits (``EditMethod.set_edits``).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import UserError
from . import metrics as M
from .records import image_tensor, make_record, record_images, record_text
from .registry import build_method
from .store import EditStore, backbone_fingerprint, check_compatible, read_index
from .types import EditMethod, EditRecord

EASYEDIT_KEYWORDS = {"prompts", "targets", "target_new", "rephrase_prompts", "rephrase_image", "locality_inputs",
                     "sequential_edit", "keep_original_weight"}  # edit(**these) is EasyEdit's form (.easyedit)


def build_vlm(backbone: Any, device: str | torch.device | None = None, seed: int = 0):
    """A VisionLanguageModel from an instance, a backbone config mapping, or a name (a shipped tiny
    VLM defaults to its synthetic pretraining); returns ``(vlm, config dict or None, source)`` with
    ``source`` = ``{"checkpoint": the weights' directory name or None, "shipped": bool}``. A randomly
    initialised model is drawn from ``seed`` (so a saved store can rebuild it)."""
    from ..backbones.factory import SYNTHETIC, load_vlm, resolve_embedded
    from ..backbones.shipped import SHIPPED_ROOT
    from ..backbones.vlm import VisionLanguageModel

    if isinstance(backbone, VisionLanguageModel):
        return backbone, None, {"checkpoint": None, "shipped": False}
    from ..config import format_validation_error
    from .config import EditBackboneConfig

    if isinstance(backbone, str):
        from ..backbones.vlm_tiny import shipped_vlm_names

        backbone = {"name": backbone, "pretrained": "synthetic" if backbone in shipped_vlm_names() else None}
    if not isinstance(backbone, Mapping):
        raise UserError(f"backbone: expected a VisionLanguageModel, a name or a config mapping, got "
                        f"{type(backbone).__name__}")
    from pydantic import ValidationError

    try:
        cfg = EditBackboneConfig.model_validate(dict(backbone))
    except ValidationError as e:
        raise UserError(format_validation_error(e, prefix="backbone")) from None
    weights, pretrain = cfg.pretrained, cfg.pretrain
    if weights == SYNTHETIC:  # the embedded model's checkpoint directory (shipped, or cached / trained)
        weights, pretrain = resolve_embedded("vlm", cfg.name, SYNTHETIC, cfg.pretrain, progress=False), None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vlm = load_vlm(cfg.name, weights, pretrain=pretrain, download=cfg.download,
                       prompt_template=cfg.prompt_template, progress=False, dtype=cfg.dtype)
    if device is not None:
        vlm.to(device)
    # a hub id or a directory carries its own weights; a tiny VLM without weights is randomly initialised
    checkpoint = Path(weights).name if weights else (None if _is_tiny(cfg.name) else cfg.name)
    shipped = weights is not None and SHIPPED_ROOT in Path(weights).parents
    return vlm, cfg.model_dump(mode="json"), {"checkpoint": checkpoint, "shipped": shipped}


def _is_tiny(name: str) -> bool:
    from ..backbones.vlm_tiny import shipped_vlm_names

    return name in shipped_vlm_names()


class Editor:
    """Edits a frozen VLM with one :class:`~.types.EditMethod` and keeps the edits in an :class:`EditStore`.

    ``backbone``: a :class:`~lifelong_moe.backbones.vlm.VisionLanguageModel`, a backbone config mapping
    (``name``, ``pretrained``, ...) or a name. ``method``: a registered name (``liveedit``, ``ft``,
    ``lora``, ``retrieval``) with its parameters as keywords, or a method instance. ``precision``:
    ``fp32``, ``bf16`` or ``fp16``, the autocast that fitting, editing, answering and evaluation run
    under (``runtime.precision``; :mod:`lifelong_moe.runtime.device`); None: the dtype the backbone's
    weights are stored in (``backbone.dtype``), which a half-precision backbone requires."""

    def __init__(self, backbone: Any, method: str | EditMethod = "liveedit", *, seed: int = 0,
                 device: str | torch.device | None = None, precision: str | None = None, **params):
        from ..runtime.device import check_precision, dtype_name, resolve_precision

        self.vlm, self.backbone_config, self.backbone_source = build_vlm(backbone, device, seed)
        self.seed = seed
        self.dtype = dtype_name(self.vlm.dtype)  # the frozen weights', as loaded
        self.precision = resolve_precision(self.dtype, precision, where="precision")
        check_precision(self.vlm.device, self.precision)
        self.fingerprint = backbone_fingerprint(self.vlm)  # of the unedited backbone, before any method hook
        if isinstance(method, str):
            self.method = build_method(method, {**self._shipped_settings(method, params), **params})
        else:
            if params:
                raise UserError(f"method parameters {sorted(params)} are given with a method instance; set them on it")
            if not isinstance(method, EditMethod):
                raise UserError(f"method: {type(method).__name__} does not implement the EditMethod protocol")
            self.method = method
        self.method.attach(self.vlm)
        self.store = EditStore(self._header())
        self.method.set_edits({})
        self.fitted: dict | None = None  # where the method's fitted weights came from (None: not fitted here)
        self._load_default_fitted()

    def autocast(self):
        """The context every model call of the editor runs in: autocast in :attr:`precision` (none in fp32)."""
        from ..runtime.device import autocast

        return autocast(self.vlm.device, self.precision)

    def _shipped_settings(self, method: str, given: Mapping) -> dict:
        """The settings of the one artefact shipped for ``method`` on this backbone, when the caller chose
        none of them and leaves ``fitted: auto``: ``Editor("lmoe-tiny-llava", "liveedit")`` then edits
        with the shipped generators instead of refusing as unfitted. Empty otherwise."""
        from . import fitted as F

        if given.get("fitted", "auto") != "auto" or not F.FITTED_ROOT.joinpath(method).is_dir():
            return {}
        keys = F.shipped_keys(method, self.backbone_identity()["tag"])
        return dict(keys[0]) if len(keys) == 1 and not set(keys[0]) & set(given) else {}

    def _header(self) -> dict:
        return {"method": self.method.name, "method_config": self.method.config(),
                "backbone": {"name": self.vlm.name, "config": self.backbone_config, "fingerprint": self.fingerprint,
                             "seed": self.seed}}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: str | Path | Mapping, overrides: Sequence[str] = (), *,
                    variant: str | None = None) -> "Editor":
        """From an edit YAML (or mapping): ``backbone``, ``method``, ``seed``, ``runtime`` are used."""
        from .config import load_edit_config

        cfgs = load_edit_config(dict(config) if isinstance(config, Mapping) else config, list(overrides),
                                only=[variant] if variant else None)
        if len(cfgs) > 1:
            raise UserError(f"the config has {len(cfgs)} variants; pick one with variant= "
                            f"({', '.join(c.name.rsplit('/', 1)[-1] for c in cfgs)})")
        return cls.from_edit_config(cfgs[0])

    @classmethod
    def from_edit_config(cls, cfg) -> "Editor":
        from ..runtime.device import resolve_device
        from ..runs.runner import seed_everything

        device = resolve_device(cfg.runtime.device)
        seed_everything(cfg.seed)
        backbone = cfg.backbone.model_dump(mode="json")
        method = build_method(cfg.method.name, cfg.method_params())
        return cls(backbone, method, seed=cfg.seed, device=device, precision=cfg.runtime.precision)

    # ------------------------------------------------------------------ inputs
    @property
    def requires_image(self) -> bool:
        return bool(getattr(self.method, "requires_image", self.method.name == "liveedit"))

    def _record(self, fields: Any, where: str) -> EditRecord:
        rec = make_record(self.vlm, fields, where=where, need_image=self.requires_image)
        if rec.image is None and not M.text_only_supported(self.vlm):
            raise UserError(f"{where}: no image, and this backbone takes no text-only prompts; give an image")
        return rec

    def records(self, records: Sequence[Any]) -> list[EditRecord]:
        """Validate MMEdit-style dicts / EditRecords, all before anything is applied."""
        if isinstance(records, (Mapping, EditRecord)) or not isinstance(records, Sequence):
            raise UserError("records: expected a list of MMEdit records (dicts or EditRecords)")
        return [self._record(r, f"records[{i}]") for i, r in enumerate(records)]

    # ------------------------------------------------------------------ editing
    def fit(self, train_records: Sequence[Any], *, train: dict | None = None,
            progress: Callable[[str], None] | None = None) -> dict:
        """Meta-train the method (LiveEdit) on ``train_records``; baselines return ``{}``. ``train``
        describes the split for :meth:`save_fitted` (default: the number of records and the seed);
        ``progress`` receives a line about every twentieth of the steps (losses, time left)."""
        if len(self.store):
            raise UserError("fit() before editing: the store already holds edits (reset() first)")
        recs = self.records(train_records)
        with self.autocast():
            stats = self.method.fit(recs, seed=self.seed, progress=progress)
        if self.needs_fit:
            self.fitted = {"source": "meta-trained", "path": None, **stats,
                           "train": train or {"source": "records", "records": len(recs), "seed": self.seed}}
        return stats

    # ------------------------------------------------------------------ fitted weights
    @property
    def needs_fit(self) -> bool:
        """Whether the method learns before it edits (LiveEdit's meta-training)."""
        return bool(getattr(self.method, "needs_fit", False))

    @property
    def is_fitted(self) -> bool:
        return not self.needs_fit or bool(getattr(self.method, "is_fitted", False))

    def backbone_identity(self) -> dict:
        """Name, checkpoint directory, weight fingerprint and the tag fitted artefacts are named by."""
        from .fitted import backbone_tag

        name, ckpt = self.vlm.name, self.backbone_source.get("checkpoint")
        return {"name": name, "checkpoint": ckpt, "fingerprint": self.fingerprint,
                "tag": backbone_tag(name, ckpt, self.fingerprint)}

    def save_fitted(self, directory: str | Path) -> Path:
        """Write the method's fitted weights into ``directory`` (:mod:`.fitted`: a .safetensors and its
        JSON, named for this backbone and the weight-shaping settings); return the .safetensors path."""
        from . import fitted as F

        if not self.needs_fit:
            raise UserError(f"method {self.method.name!r} learns nothing before editing: nothing to save "
                            "(its edits are saved with editor.save(dir))")
        self._require_fitted("save_fitted")
        info = self.fitted or {}
        return F.save(directory, self.method, self.backbone_identity(),
                      {"train": info.get("train"), "steps": info.get("steps"), "seconds": info.get("seconds"),
                       "final_losses": info.get("final_losses")})

    def load_fitted(self, path: str | Path, *, source: str = "path") -> dict:
        """Load fitted weights (a .safetensors with its JSON, or a directory holding them); UserError if
        they were fitted for another method, backbone or settings. Returns what was loaded."""
        from . import fitted as F

        if not self.needs_fit:
            raise UserError(f"method {self.method.name!r} learns nothing before editing: it takes no fitted weights")
        if len(self.store):
            raise UserError("load_fitted() before editing: the store already holds edits (reset() first)")
        ident = self.backbone_identity()
        key = self.method.fitted_key()
        artefact = F.locate(path, F.artefact_name(self.method.name, ident["tag"], key))
        state, info = F.read(artefact)
        F.check(info, self.method.name, key, ident, artefact)
        self.method.load_state_dict(state)
        self.method.set_edits(self.store.method_view())
        self.fitted = {"source": source, "path": str(artefact), "steps": info.get("steps"),
                       "seconds": info.get("train_seconds"), "final_losses": info.get("final_losses"),
                       "train": info.get("train")}
        return self.fitted

    def _load_default_fitted(self) -> None:
        """The method's ``fitted`` setting: ``auto`` loads the shipped artefact named for this backbone
        and these settings if there is one, a path loads that artefact, ``none`` nothing."""
        from . import fitted as F

        choice = getattr(getattr(self.method, "params", None), "fitted", "none")
        if not self.needs_fit or self.is_fitted or choice == "none":
            return
        if choice != "auto":
            self.load_fitted(choice)
            return
        shipped = F.find_shipped(self.method.name, self.backbone_identity()["tag"], self.method.fitted_key())
        if shipped is not None and F.fitted_on(shipped) == self.fingerprint:  # else: not this backbone, no match
            F.verify_shipped(shipped)
            self.load_fitted(shipped, source="shipped")

    def _require_fitted(self, what: str = "edit") -> None:
        if self.is_fitted:
            return
        name = self.method.name
        raise UserError(
            f"{what}: {name} is not fitted: its edits come from weights meta-trained before editing, and this "
            f"editor's are freshly initialised (no fitted weights were given, and none shipped for this backbone "
            f"with these settings). Fit them: editor.fit(train_records) (the edit runner does so with data.train > 0), "
            f"or load fitted ones: editor.load_fitted(path) or the method setting fitted=<path> "
            f"(`lifelong-moe fit {name} CONFIG --out DIR` makes them)")

    def edit(self, image: Any = None, prompt: str = "", target: str = "", **fields) -> str | tuple:
        """Apply one edit; return its id. ``image``: a path, a PIL image, a pixel tensor or None;
        other MMEdit fields (``rephrase``, ``loc``, ...) may be given and are kept with the request.
        With EasyEdit's keywords (``prompts=``, ``targets=``, ...) it is :meth:`edit_easyedit`."""
        if fields.keys() & EASYEDIT_KEYWORDS or isinstance(prompt, (list, tuple)):
            if prompt or target:
                raise UserError("edit: give one edit as prompt=, target= or EasyEdit's lists as prompts=, targets=, "
                                "image= (by keyword), not both")
            return self.edit_easyedit(image=image, **fields)
        self._require_fitted()
        rec = self._record({"image": image, "src": prompt, "alt": target, **fields}, "edit")
        return self._apply([rec])[0]

    def edit_easyedit(self, prompts: Any = None, targets: Any = None, image: Any = None, **kwargs) -> tuple:
        """EasyEdit's ``MultimodalEditor.edit`` form: lists of ``prompts``, ``targets`` (or ``target_new``),
        ``image``, ``rephrase_prompts``, ``rephrase_image``, ``locality_inputs``, ``sequential_edit``,
        ``keep_original_weight``; returns ``(metrics per edit, the VLM, kept edit ids)`` (:mod:`.easyedit`)."""
        from .easyedit import edit

        with self.autocast():
            return edit(self, prompts, targets, image, **kwargs)

    def edit_batch(self, records: Sequence[Any]) -> list[str]:
        """Apply MMEdit-style records in order (all validated first); return their ids."""
        self._require_fitted("edit_batch")
        return self._apply(self.records(records))

    def _apply(self, recs: Sequence[EditRecord]) -> list[str]:
        snap = self._snapshot()
        ids = []
        try:
            add = getattr(self.method, "add_edits", None)  # optional: O(new edit) instead of O(store)
            with self.autocast():
                for rec in recs:
                    tensors = self.method.make_edit(rec)
                    eid = self.store.add(record_text(rec), record_images(rec), tensors, rec.meta)
                    ids.append(eid)
                    if add is None:
                        self.method.set_edits(self.store.method_view())
                    else:
                        add({eid: self.store.history[eid].tensors})
        except BaseException:
            self._restore(snap)
            raise
        return ids

    def delete(self, edit_id: str) -> None:
        if not self.method.supports_delete:
            raise UserError(f"method {self.method.name!r} cannot delete single edits (its edits live in the tuned "
                            "weights and do not separate); reset() removes them all")
        self.store.delete(edit_id)
        self.method.set_edits(self.store.method_view())

    def reset(self) -> None:
        """Back to the unedited model with an empty store (the previous log is dropped)."""
        self.store = EditStore(self._header())
        self.method.set_edits({})

    @property
    def edits(self) -> list[dict]:
        """The active edits: id, timestamp, prompt, target, whether it has an image, its metadata."""
        return [{"id": e.id, "timestamp": e.timestamp, "prompt": e.request["src"], "target": e.request["alt"],
                 "image": "image" in e.images, "meta": e.meta} for e in self.store.active]

    def _snapshot(self):
        """What undoing later changes needs. A method that deletes single edits keeps them in their own
        tensors, so its learned state does not change with edits and is not copied."""
        s = self.store
        state = None if self.method.supports_delete else self.method.state_dict()
        return (list(s.history), set(s.deleted), len(s.log), s.next_index, state)

    def _restore(self, snap) -> None:
        keys, deleted, n_log, nxt, state = snap
        s = self.store
        s.history = {k: s.history[k] for k in keys}
        s.deleted, s.log, s.next_index = set(deleted), s.log[:n_log], nxt
        if state is not None:
            self.method.load_state_dict(state)
        self.method.set_edits(s.method_view())

    # ------------------------------------------------------------------ answering
    @torch.no_grad()
    def answer(self, image: Any, prompt: str | Sequence[str], max_new_tokens: int = 8) -> str | list[str]:
        """Greedy answer(s) of the edited model; ``image`` may be None for a text-only prompt."""
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        images = [image] * len(prompts) if single or not isinstance(image, (list, tuple)) else list(image)
        if len(images) != len(prompts):
            raise UserError(f"answer: {len(images)} images for {len(prompts)} prompts")
        if any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise UserError("answer: every prompt must be non-empty text")
        px = [image_tensor(self.vlm, im, what=f"answer: image {i}") for i, im in enumerate(images)]
        if any(p is None for p in px) and not all(p is None for p in px):
            raise UserError("answer: give an image for every prompt or for none")
        if px[0] is None and not M.text_only_supported(self.vlm):
            raise UserError("answer: no image, and this backbone takes no text-only prompts")
        with self.autocast():
            out = self.vlm.generate(None if px[0] is None else torch.stack(px), prompts, max_new_tokens)
        return out[0] if single else out

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, records: Sequence[Any], sequential: bool = True, *, keep: bool = True, generate: bool = True,
                 batch_size: int = 64, max_new_tokens: int = 8) -> dict:
        """Edit with ``records`` and score them (:mod:`.metrics`). ``sequential``: apply all the edits,
        then score every record (LiveEdit's lifelong protocol); otherwise each edit is applied alone,
        scored and undone. Locality is measured against the model as it was before these edits
        (outputs cached first). ``keep``: leave the sequential edits in the store (else undone)."""
        self._require_fitted("evaluate")
        recs = self.records(records)
        with self.autocast():
            return self._evaluate(recs, sequential, keep, generate, batch_size, max_new_tokens)

    def _evaluate(self, recs, sequential, keep, generate, batch_size, max_new_tokens) -> dict:
        pre = M.cache_pre_edit(self.vlm, recs, batch_size, max_new_tokens)
        snap = self._snapshot()
        t = time.perf_counter()
        if sequential:
            ids = self._apply(recs)
            edit_s = time.perf_counter() - t
            scores = M.score(self.vlm, recs, pre, batch_size, max_new_tokens, generate)
            if not keep:
                self._restore(snap)
        else:
            ids, edit_s, per = [], 0.0, []
            for i, rec in enumerate(recs):
                t = time.perf_counter()
                self._apply([rec])
                edit_s += time.perf_counter() - t
                per.append(M.score(self.vlm, [rec], pre.window(i, i + 1), batch_size, max_new_tokens, generate))
                self._restore(snap)
            scores = _merge(per)
        return {"protocol": "sequential" if sequential else "single", "edits": len(recs), "edit_ids": ids,
                "edit_seconds_mean": edit_s / max(1, len(recs)), "metrics": M.summary(scores),
                "n": {m: v["n"] for m, v in scores.items()}, "per_record": {m: v["per_record"] for m, v in scores.items()}}

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        self._require_fitted("save")  # a store always holds fitted weights
        return self.store.save(directory, self.method.state_dict())

    @classmethod
    def load(cls, directory: str | Path, backbone: Any = None, *, device: str | torch.device | None = None,
             precision: str | None = None) -> "Editor":
        """An Editor from a saved store; ``backbone`` defaults to the one recorded in the store (its
        ``dtype`` included); ``precision`` as for :class:`Editor`."""
        from .registry import validate_method

        d = Path(directory)
        index = read_index(d)  # a directory that is not a store fails here, before any model is built
        if backbone is None:
            backbone = index["backbone"].get("config")
            if backbone is None:
                raise UserError(f"edit store {d} was saved from a backbone object; pass it: Editor.load(dir, backbone=vlm)")
        name = index["method"]
        from .fitted import without_fitted

        params = without_fitted(validate_method(name, index["method_config"]))  # the store holds its fitted weights
        editor = cls(backbone, build_method(name, params), device=device, seed=int(index["backbone"].get("seed", 0)),
                     precision=precision)
        check_compatible(index, editor._header(), d)
        store, state = EditStore.load(d)
        editor.store = store
        editor.method.load_state_dict(state)
        editor.method.set_edits(store.method_view())
        if editor.needs_fit:
            editor.fitted = {"source": "store", "path": str(d)}
        return editor


# ---------------------------------------------------------------------- helpers
def _merge(per: list[dict]) -> dict:
    out = {}
    for m in M.METRICS:
        rows = [p[m] for p in per if p[m]["n"]]
        n = sum(r["n"] for r in rows)
        if not n:
            out[m] = {"token_acc": None, "exact_match": None, "n": 0, "per_record": []}
            continue
        em = [r["exact_match"] for r in rows]
        out[m] = {"token_acc": sum(r["token_acc"] * r["n"] for r in rows) / n,
                  "exact_match": None if any(e is None for e in em) else sum(e * r["n"] for e, r in zip(em, rows)) / n,
                  "n": n, "per_record": [a for r in rows for a in r["per_record"]]}
    return out
