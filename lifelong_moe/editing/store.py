"""The edit store: an append-only log of edits, saved atomically and reloaded bit-exactly.

Each edit has an id (``edit-000001``, never reused), a UTC timestamp, its request (text fields and
image tensors) and the method's tensors; deletions are log entries, the deleted edit's data stays in
the history. A saved store is a directory::

    store.json                    format, version, method (name + config), backbone (name, config,
                                  fingerprint), edits (ids, timestamps, text, tensor names), log,
                                  tensor file names with their SHA-256
    edits-<sha>.safetensors       request images and method tensors, keys "<id>/image/<field>",
                                  "<id>/method/<name>"
    method-<sha>.safetensors      the method's own learned state (``state_dict``)

The tensor files are named by their content and written first (each atomically); ``store.json`` is
replaced last in one rename, and only then are files it no longer names removed. A crash at any
moment of a save therefore leaves either the previous ``store.json`` with the files it names, or the
new one with its files.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

import torch

from ..errors import UserError
from ..io import atomic_path, file_sha256, read_json, write_json

FORMAT = "lifelong-moe edit store"
VERSION = 1
INDEX = "store.json"


@dataclass
class StoredEdit:
    id: str
    timestamp: str
    request: dict[str, str]  # the record's text fields
    images: dict[str, torch.Tensor]  # the record's image tensors by field
    tensors: dict[str, torch.Tensor]  # what the method made of it
    meta: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.images.values(), *self.tensors.values()))


def backbone_fingerprint(vlm) -> str:
    """A cheap identity of a backbone's weights: SHA-256 over every parameter's name, shape, dtype and a
    strided sample of 64 of its values (a different checkpoint of the same architecture differs)."""
    h = hashlib.sha256()
    for name, t in sorted(vlm.model.state_dict().items()):
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].to("cpu", torch.float64)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class EditStore:
    """The edits of one method on one backbone. ``header``: ``method``, ``method_config``,
    ``backbone`` (``name``, ``config``, ``fingerprint``)."""

    def __init__(self, header: dict):
        self.header = dict(header)
        self.history: dict[str, StoredEdit] = {}  # every edit ever added, in order
        self.deleted: set[str] = set()
        self.log: list[dict] = []
        self.next_index = 1

    # ------------------------------------------------------------------ the log
    def add(self, request: dict[str, str], images: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor],
            meta: dict | None = None) -> str:
        eid = f"edit-{self.next_index:06d}"
        self.next_index += 1
        cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        imgs = {k: v.detach().to("cpu").contiguous().clone() for k, v in images.items()}
        ts = _now()
        self.history[eid] = StoredEdit(eid, ts, dict(request), imgs, cpu, dict(meta or {}))
        self.log.append({"op": "add", "id": eid, "timestamp": ts})
        return eid

    def delete(self, eid: str) -> None:
        if eid not in self.history:
            raise UserError(f"no edit with id {eid!r} in the store" + (f" (ids run from {self.ids()[0]} to "
                                                                      f"{self.ids()[-1]})" if self.ids() else ""))
        if eid in self.deleted:
            raise UserError(f"edit {eid!r} was already deleted")
        self.deleted.add(eid)
        self.log.append({"op": "delete", "id": eid, "timestamp": _now()})

    def ids(self) -> list[str]:
        """Ids of the active (not deleted) edits, in the order they were made."""
        return [e for e in self.history if e not in self.deleted]

    @property
    def active(self) -> list[StoredEdit]:
        return [self.history[e] for e in self.ids()]

    def method_view(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{id: method tensors}`` of the active edits (what ``EditMethod.set_edits`` receives)."""
        return {e.id: e.tensors for e in self.active}

    def __len__(self) -> int:
        return len(self.history) - len(self.deleted)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path, method_state: Mapping[str, torch.Tensor]) -> Path:
        """Write the store (see the module doc); refuses a directory holding anything but a store of
        the same method and backbone."""
        from safetensors.torch import save_file

        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise UserError(f"edit store {d}: exists and is not a directory")
        if d.is_dir() and any(d.iterdir()):
            if not (d / INDEX).is_file():
                raise UserError(f"refusing to write an edit store into {d}: it holds other files and no {INDEX}")
            old = read_index(d)
            check_compatible(old, self.header, d)
        d.mkdir(parents=True, exist_ok=True)
        tensors, entries = {}, []
        for e in self.history.values():
            for k, v in e.images.items():
                tensors[f"{e.id}/image/{k}"] = v
            for k, v in e.tensors.items():
                tensors[f"{e.id}/method/{k}"] = v
            entries.append({"id": e.id, "timestamp": e.timestamp, "request": e.request, "meta": e.meta,
                            "images": sorted(e.images), "tensors": sorted(e.tensors)})
        files = {}
        for kind, payload in (("edits", tensors), ("method", {k: v.detach().to("cpu").contiguous().clone()
                                                              for k, v in method_state.items()})):
            with atomic_path(d / f".{kind}.staging") as tmp:
                save_file(payload, str(tmp), metadata={"format": FORMAT})
                sha = file_sha256(tmp)
                final = d / f"{kind}-{sha[:16]}.safetensors"
            Path(d / f".{kind}.staging").replace(final)
            files[kind] = {"file": final.name, "sha256": sha}
        index = {"format": FORMAT, "version": VERSION, **self.header, "next_index": self.next_index,
                 "deleted": sorted(self.deleted), "edits": entries, "log": self.log, "files": files}
        write_json(d / INDEX, index)
        keep = {f["file"] for f in files.values()}
        for stale in list(d.glob("edits-*.safetensors")) + list(d.glob("method-*.safetensors")):
            if stale.name not in keep:
                stale.unlink(missing_ok=True)
        return d

    @classmethod
    def load(cls, directory: str | Path) -> tuple["EditStore", dict[str, torch.Tensor]]:
        """``(store, method_state)`` from a saved store; UserError if ``directory`` is not one or is damaged."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = Path(directory)
        index = read_index(d)
        loaded = {}
        for kind in ("edits", "method"):
            info = index["files"].get(kind) or {}
            path = d / str(info.get("file", ""))
            if not info.get("file") or not path.is_file():
                raise UserError(f"edit store {d}: its {kind} tensor file {info.get('file')!r} is missing")
            if file_sha256(path) != info.get("sha256"):
                raise UserError(f"edit store {d}: {path.name} does not match the checksum in {INDEX} (damaged)")
            try:
                loaded[kind] = load_file(str(path))
            except (SafetensorError, OSError) as e:
                raise UserError(f"edit store {d}: cannot read {path.name}: {e}") from None
        header = {k: index[k] for k in ("method", "method_config", "backbone")}
        store = cls(header)
        t = loaded["edits"]
        try:
            for e in index["edits"]:
                store.history[e["id"]] = StoredEdit(
                    e["id"], e["timestamp"], dict(e["request"]), {k: t[f"{e['id']}/image/{k}"] for k in e["images"]},
                    {k: t[f"{e['id']}/method/{k}"] for k in e["tensors"]}, dict(e.get("meta") or {}))
        except (KeyError, TypeError) as e:
            raise UserError(f"edit store {d}: {INDEX} names a tensor the edits file lacks ({e})") from None
        store.deleted = set(index["deleted"])
        store.log = list(index["log"])
        store.next_index = int(index["next_index"])
        return store, loaded["method"]


def read_index(d: Path) -> dict:
    """The validated ``store.json`` of ``d``; UserError if ``d`` is not an edit store."""
    if not d.is_dir():
        raise UserError(f"edit store {d}: not a directory")
    p = d / INDEX
    if not p.is_file():
        raise UserError(f"{d} is not an edit store (no {INDEX}); save one with editor.save(dir)")
    try:
        index = read_json(p)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{p}: not valid JSON ({e}); the store is damaged") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"{d} is not an edit store ({INDEX} lacks format {FORMAT!r})")
    if index.get("version") != VERSION:
        raise UserError(f"edit store {d} has version {index.get('version')!r}; this version reads {VERSION}")
    missing = [k for k in ("method", "method_config", "backbone", "edits", "log", "files", "deleted", "next_index")
               if k not in index]
    if missing:
        raise UserError(f"{p}: missing {', '.join(missing)}; the store is damaged")
    return index


def check_compatible(saved: Mapping, header: Mapping, where: Path | str) -> None:
    """UserError if a store written by another method, method configuration or backbone is used here."""
    if saved["method"] != header["method"]:
        raise UserError(f"edit store {where} was written by method {saved['method']!r}, not {header['method']!r}")
    if saved["method_config"] != header["method_config"]:
        a, b = saved["method_config"], header["method_config"]
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise UserError(f"edit store {where} was written with another {header['method']} configuration "
                        f"(differs in: {', '.join(diff)})")
    sb, hb = saved["backbone"], header["backbone"]
    if sb.get("name") != hb.get("name") or sb.get("fingerprint") != hb.get("fingerprint"):
        raise UserError(f"edit store {where} was written on backbone {sb.get('name')!r} (fingerprint "
                        f"{sb.get('fingerprint')}), not on this one ({hb.get('name')!r}, {hb.get('fingerprint')})")

