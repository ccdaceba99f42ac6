"""The edit store: an append-only log of edits, saved incrementally and atomically, reloaded bit-exactly.

Each edit has an id (``edit-000001``, never reused), a UTC timestamp, its request (text fields and
images) and the method's tensors; deletions are log entries, the deleted edit's data stays in the
history. Images are kept encoded, in memory and on disk (:mod:`.image_codec`: a per-channel palette
and a PNG of its indices, or zlib; bit-exact), once per distinct content (released with the last
edit holding it), and decoded when read (``StoredEdit.images`` is a lazy mapping). A saved store is
a directory (format version 2)::

    store.json                  format, version, method (name + config), backbone (name, config,
                                fingerprint), next_index, counts of edits / log entries / segments,
                                the newest segment (``head``) and the method state file, each with
                                its SHA-256
    edits-<sha>.safetensors     a segment: the edits and log entries of one save (only those added
                                since the previous save into this directory), in its metadata with
                                the previous segment's name and SHA-256 (a hash chain back to the
                                first); tensors "<id>/method/<name>" and "image/<key>" (encoded
                                images not in an earlier segment)
    method-<sha>.safetensors    the method's own learned state (``state_dict``), rewritten only
                                when it changed

A save writes its new segment(s) and a changed method file first (each atomically, named by
content), then replaces ``store.json`` in one rename, then removes the files the new index no longer
reaches. A kill at any moment leaves either the old ``store.json`` with the files it names, or the new
one with its files; the temporary and unreferenced files such a kill leaves are removed by the next
save or load of the directory. Writers and that cleanup take ``.store.lock`` (``flock``); one writer
per directory. A save costs what changed since the previous save into the same directory (made or
loaded by this store object); otherwise the whole store is written again, as a fresh chain. Version-1
stores (one file of float images, the whole store per save) are read, and the next save rewrites
them as version 2.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from . import image_codec
from ..errors import UserError
from ..io import atomic_path, read_json, write_json

FORMAT = "lifelong-moe edit store"
VERSION = 2
READS = (1, 2)
INDEX = "store.json"
LOCK = ".store.lock"
SEGMENT_BYTES = 256 << 20  # a save splits what it writes into segments of about this size,
SEGMENT_ENTRIES = 10000  # or of this many log entries (the segment's metadata stays well below safetensors' limit)
_FILE = re.compile(r"^(edits|method)-[0-9a-f]{16}\.safetensors$")
_STAGING = re.compile(r"^\.(store\.json|(edits|method)-[0-9a-f]{16}\.safetensors|\.(edits|method)\.staging)\..+\.tmp$"
                      r"|^\.(edits|method)\.staging$")


class Blob:
    """One encoded image (:mod:`.image_codec`) and its content key; shared by the edits that hold it."""

    __slots__ = ("key", "data", "__weakref__")

    def __init__(self, key: str, data: bytes):
        self.key, self.data = key, data


class ImageMap(Mapping):
    """An edit's images by field, kept encoded; a tensor is decoded on each read."""

    def __init__(self, refs: Mapping[str, Blob]):
        self.refs = dict(refs)

    @property
    def blobs(self) -> dict[str, bytes]:
        return {f: r.data for f, r in self.refs.items()}

    @property
    def content_keys(self) -> dict[str, str]:
        return {f: r.key for f, r in self.refs.items()}

    def __getitem__(self, f: str) -> torch.Tensor:
        return image_codec.decode(self.refs[f].data)

    def __iter__(self) -> Iterator[str]:
        return iter(self.refs)

    def __len__(self) -> int:
        return len(self.refs)

    def __contains__(self, f: object) -> bool:
        return f in self.refs

    def nbytes(self) -> int:
        return sum(len(r.data) for r in self.refs.values())


@dataclass
class StoredEdit:
    id: str
    timestamp: str
    request: dict[str, str]  # the record's text fields
    images: ImageMap  # the record's image tensors by field (encoded; decoded when read)
    tensors: dict[str, torch.Tensor]  # what the method made of it
    meta: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes held: the encoded images (shared ones counted in full) and the method tensors."""
        return self.images.nbytes() + sum(t.numel() * t.element_size() for t in self.tensors.values())


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
        self._blobs: weakref.WeakValueDictionary[str, Blob] = weakref.WeakValueDictionary()  # held by edits
        self._saved: dict[str, dict] = {}  # per directory: what this store last saved there (or loaded)

    # ------------------------------------------------------------------ the log
    def add(self, request: dict[str, str], images: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
            meta: dict | None = None) -> str:
        """Append an edit; ``images`` are tensors (encoded here) or another edit's :class:`ImageMap`."""
        refs = {}
        for f in images:
            if isinstance(images, ImageMap):
                refs[f] = self._intern(images.refs[f].key, images.refs[f].data)
            else:
                blob = image_codec.encode(images[f])
                refs[f] = self._intern(image_codec.key(blob), blob)
        eid = f"edit-{self.next_index:06d}"
        self.next_index += 1
        cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        ts = _now()
        self.history[eid] = StoredEdit(eid, ts, dict(request), ImageMap(refs), cpu, dict(meta or {}))
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

    def _intern(self, key: str, data: bytes) -> Blob:
        """The store's blob of this content (one per distinct image; gone with the last edit holding it)."""
        ref = self._blobs.get(key)
        if ref is None:
            ref = self._blobs[key] = Blob(key, data)
        return ref

    @property
    def blobs(self) -> dict[str, bytes]:
        """The distinct encoded images the edits hold, by content key."""
        return {k: r.data for k, r in self._blobs.items()}

    def nbytes(self) -> int:
        """Bytes of tensor data held: distinct encoded images and every edit's method tensors."""
        blobs = {r.key: len(r.data) for e in self.history.values() for r in e.images.refs.values()}
        return sum(blobs.values()) + sum(
            t.numel() * t.element_size() for e in self.history.values() for t in e.tensors.values())

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path, method_state: Mapping[str, torch.Tensor]) -> Path:
        """Write the store (see the module doc): only what changed since this store's previous save
        into (or load from) ``directory``. Refuses a directory holding anything but a store of the same
        method and backbone."""
        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise UserError(f"edit store {d}: exists and is not a directory")
        if d.is_dir() and any(not _ours(p.name) for p in d.iterdir()):
            if not (d / INDEX).is_file():
                raise UserError(f"refusing to write an edit store into {d}: it holds other files and no {INDEX}")
            check_compatible(read_index(d), self.header, d)
        d.mkdir(parents=True, exist_ok=True)
        with _lock(d) as locked:
            if not locked:
                raise UserError(f"edit store {d}: another process is saving into it ({LOCK} is held)")
            _sweep_staging(d)
            old = read_index(d) if (d / INDEX).is_file() else None
            if old is not None:
                check_compatible(old, self.header, d)
            mine = self._saved.get(str(d.resolve()))
            if not (mine and old and old["version"] == VERSION and old["head"] == mine["head"]
                    and old["segments"] == mine["segments"] and mine["log"] <= len(self.log)
                    and (mine["log"] == 0 or self.log[mine["log"] - 1] == mine["last"])):
                mine = {"head": None, "segments": 0, "log": 0, "last": None, "blobs": set(), "files": set(),
                        "method": None}
            state = self._write_segments(d, mine)
            method = _serialise({k: v.detach().to("cpu").contiguous() for k, v in method_state.items()})
            sha = hashlib.sha256(method).hexdigest()
            ref = {"file": f"method-{sha[:16]}.safetensors", "sha256": sha}
            if ref != mine["method"] or not (d / ref["file"]).is_file():
                _write_file(d / ref["file"], method)
            index = {"format": FORMAT, "version": VERSION, **self.header, "next_index": self.next_index,
                     "edits": len(self.history), "log": len(self.log), "segments": state["segments"],
                     "head": state["head"], "method_state": ref}
            write_json(d / INDEX, index)
            state["method"] = ref
            self._saved[str(d.resolve())] = state
            _sweep_unreferenced(d, state["files"] | {ref["file"]})
        return d

    def _write_segments(self, d: Path, mine: dict) -> dict:
        """Write the log entries after ``mine["log"]`` (with the edits they add) as segments chained
        after ``mine["head"]``; return the new chain's state."""
        head, n, files, blobs = mine["head"], mine["segments"], set(mine["files"]), set(mine["blobs"])
        pending = self.log[mine["log"]:]
        at = 0
        while at < len(pending):
            tensors, log, edits, size = {}, [], [], 0
            while at < len(pending) and (not log or (size < SEGMENT_BYTES and len(log) < SEGMENT_ENTRIES)):
                entry = pending[at]
                at += 1
                log.append(entry)
                if entry.get("op") != "add":
                    continue
                e = self.history[entry["id"]]
                imgs = {}
                for f, ref in e.images.refs.items():
                    k = imgs[f] = ref.key
                    if k not in blobs:
                        blobs.add(k)
                        tensors[f"image/{k}"] = torch.frombuffer(bytearray(ref.data), dtype=torch.uint8)
                        size += len(ref.data)
                for name, t in e.tensors.items():
                    tensors[f"{e.id}/method/{name}"] = t
                    size += t.numel() * t.element_size()
                edits.append({"id": e.id, "timestamp": e.timestamp, "request": e.request, "meta": e.meta,
                              "images": imgs, "tensors": sorted(e.tensors)})
            seg = {"prev": head, "edits": edits, "log": log}
            data = _serialise(tensors, {"format": FORMAT, "segment": json.dumps(seg, allow_nan=False)})
            sha = hashlib.sha256(data).hexdigest()
            head = {"file": f"edits-{sha[:16]}.safetensors", "sha256": sha}
            _write_file(d / head["file"], data)
            files.add(head["file"])
            n += 1
        return {"head": head, "segments": n, "log": len(self.log), "last": dict(self.log[-1]) if self.log else None,
                "blobs": blobs, "files": files, "method": None}

    @classmethod
    def load(cls, directory: str | Path) -> tuple["EditStore", dict[str, torch.Tensor]]:
        """``(store, method_state)`` from a saved store; UserError if ``directory`` is not one or is damaged.
        Removes what a killed save left behind (unless another process holds the store's lock)."""
        d = Path(directory)
        index = read_index(d)
        if index["version"] == 1:
            return _load_v1(cls, d, index)
        store = cls({k: index[k] for k in ("method", "method_config", "backbone")})
        chain, ref, blobs = [], index["head"], {}
        while ref is not None:  # newest to oldest through the headers; each file is checked when read below
            if len(chain) >= index["segments"]:
                raise UserError(f"edit store {d}: its segments chain past the {index['segments']} that {INDEX} "
                                "counts (damaged)")
            chain.append(ref)
            ref = _segment_meta(d, ref, _header(d, ref))["prev"]
        if len(chain) != index["segments"]:
            raise UserError(f"edit store {d}: {INDEX} counts {index['segments']} segments, the chain has "
                            f"{len(chain)} (damaged)")
        for ref in reversed(chain):  # oldest first, one segment in memory at a time
            seg, tensors = _read_segment(d, ref)
            for k, t in tensors.items():
                if k.startswith("image/"):
                    blobs[k[6:]] = t.numpy().tobytes()
            try:
                for e in seg["edits"]:
                    eid = e["id"]
                    imgs = {f: store._intern(k, blobs[k]) for f, k in e["images"].items()}
                    store.history[eid] = StoredEdit(eid, str(e["timestamp"]), dict(e["request"]), ImageMap(imgs),
                                                    {n: tensors[f"{eid}/method/{n}"] for n in e["tensors"]},
                                                    dict(e.get("meta") or {}))
                store.log.extend(dict(x) for x in seg["log"])
            except (KeyError, TypeError, AttributeError, ValueError) as err:
                raise UserError(f"edit store {d}: segment {ref['file']} names an edit or tensor it lacks "
                                f"({err!r}; damaged)") from None
        _check_log(d, store, index)
        method_state = _read_tensors(d, index["method_state"])
        store._saved[str(d.resolve())] = {
            "head": index["head"], "segments": index["segments"], "log": len(store.log),
            "last": dict(store.log[-1]) if store.log else None, "blobs": set(blobs),
            "files": {r["file"] for r in chain}, "method": index["method_state"]}
        with _lock(d, wait=False) as locked:  # no save is under way: remove what a killed one left
            if locked:
                _sweep_staging(d)
                try:
                    same_index = read_json(d / INDEX).get("head") == index["head"]
                except (OSError, ValueError, AttributeError):
                    same_index = False
                if same_index:  # (a save that ended since we read the index has its own files)
                    _sweep_unreferenced(d, {r["file"] for r in chain} | {index["method_state"]["file"]})
        return store, method_state


# ---------------------------------------------------------------------- files
def _serialise(tensors: Mapping[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    from safetensors.torch import save

    return save(dict(tensors), metadata=metadata or {"format": FORMAT})


def _write_file(path: Path, data: bytes) -> None:
    """``data`` into ``path`` atomically (synced)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def _read_checked(d: Path, ref: Mapping) -> bytes:
    path = d / ref["file"]
    if not path.is_file():
        raise UserError(f"edit store {d}: its file {ref['file']!r} is missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise UserError(f"edit store {d}: {path.name} does not match the checksum recorded for it (damaged)")
    return data


def _read_tensors(d: Path, ref: Mapping) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = _read_checked(d, ref)
    try:
        return load(data)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"edit store {d}: cannot read {ref['file']}: {e}") from None


def _header(d: Path, ref: Mapping) -> bytes:
    """The safetensors header of a segment file (its length prefix included), unchecked."""
    path = d / ref["file"]
    if not path.is_file():
        raise UserError(f"edit store {d}: its file {ref['file']!r} is missing")
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        return head + f.read(min(n, 100 << 20))


def _segment_meta(d: Path, ref: Mapping, data: bytes) -> dict:
    """The validated segment record in the metadata of a segment file's bytes (or its header)."""
    where = f"edit store {d}: segment {ref['file']}"
    try:
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
        seg = json.loads(meta["segment"])
    except (struct.error, ValueError, KeyError, AttributeError, TypeError) as e:
        raise UserError(f"{where}: not a segment of this format ({e!r}; damaged)") from None
    if not isinstance(seg, dict) or not isinstance(seg.get("edits"), list) or not isinstance(seg.get("log"), list):
        raise UserError(f"{where}: its metadata lacks the edits and log lists (damaged)")
    prev = seg.get("prev")
    if prev is not None:
        _check_ref(prev, f"{where}: field 'prev'")
    return seg


def _read_segment(d: Path, ref: Mapping) -> tuple[dict, dict[str, torch.Tensor]]:
    """A segment's record (validated) and tensors, the file checked against its SHA-256."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = _read_checked(d, ref)
    seg = _segment_meta(d, ref, data)
    try:
        return seg, load(data)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"edit store {d}: cannot read {ref['file']}: {e}") from None


def _check_log(d: Path, store: EditStore, index: Mapping) -> None:
    """The rebuilt log agrees with the index's counts; ``deleted`` and the ids follow from it."""
    if len(store.history) != index["edits"] or len(store.log) != index["log"]:
        raise UserError(f"edit store {d}: {INDEX} counts {index['edits']} edits and {index['log']} log entries, "
                        f"its segments hold {len(store.history)} and {len(store.log)} (damaged)")
    for x in store.log:
        if not isinstance(x, dict) or x.get("op") not in ("add", "delete") or x.get("id") not in store.history:
            raise UserError(f"edit store {d}: a log entry names no stored edit: {x!r} (damaged)")
        if x["op"] == "delete":
            store.deleted.add(x["id"])
    numbers = [int(e[5:]) for e in store.history if re.fullmatch(r"edit-\d+", e)]
    if numbers and max(numbers) >= index["next_index"]:
        raise UserError(f"edit store {d}: next_index {index['next_index']} would reuse an id (damaged)")
    store.next_index = index["next_index"]


@contextmanager
def _lock(d: Path, wait: bool = True) -> Iterator[bool]:
    """Hold ``d/.store.lock`` (yields False when ``wait`` is off and another process holds it, or the
    directory cannot take the lock file)."""
    try:
        import fcntl
    except ImportError:  # no flock (not POSIX): a single writer is assumed
        yield True
        return
    try:
        fd = open(d / LOCK, "a")
    except OSError:
        if wait:
            raise
        yield False  # a read-only directory: no cleanup
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            yield False
            return
        yield True
    finally:
        fd.close()


def _ours(name: str) -> bool:
    """A file a store's save writes (a killed first save may leave some without ``store.json``)."""
    return name in (INDEX, LOCK) or bool(_FILE.match(name) or _STAGING.match(name))


def _sweep_staging(d: Path) -> None:
    """Remove the temporary files a killed save left (callers hold the lock)."""
    for p in d.iterdir():
        if _STAGING.match(p.name):
            p.unlink(missing_ok=True)


def _sweep_unreferenced(d: Path, keep: set[str]) -> None:
    """Remove the store files ``keep`` does not name (an older chain, or a killed save's segments)."""
    for p in d.iterdir():
        if _FILE.match(p.name) and p.name not in keep:
            p.unlink(missing_ok=True)


def _load_v1(cls, d: Path, index: dict) -> tuple[EditStore, dict[str, torch.Tensor]]:
    """A version-1 store (float images and method tensors in one file); the next save rewrites it."""
    loaded = {k: _read_tensors(d, index["files"][k]) for k in ("edits", "method")}
    store = cls({k: index[k] for k in ("method", "method_config", "backbone")})
    t = loaded["edits"]
    try:
        for e in index["edits"]:
            refs = {}
            for k in e["images"]:
                blob = image_codec.encode(t[f"{e['id']}/image/{k}"])
                refs[k] = store._intern(image_codec.key(blob), blob)
            store.history[e["id"]] = StoredEdit(e["id"], e["timestamp"], dict(e["request"]), ImageMap(refs),
                                                {k: t[f"{e['id']}/method/{k}"] for k in e["tensors"]},
                                                dict(e.get("meta") or {}))
        store.log = [dict(x) for x in index["log"]]
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise UserError(f"edit store {d}: {INDEX} names a tensor the edits file lacks ({err!r})") from None
    _check_log(d, store, {**index, "edits": len(index["edits"]), "log": len(index["log"])})
    if store.deleted != set(index["deleted"]):
        raise UserError(f"edit store {d}: the deleted list disagrees with the log (damaged)")
    return store, loaded["method"]


# ---------------------------------------------------------------------- the index
def _kind(v: Any) -> str:
    text = json.dumps(v)
    return f"{text[:40]}{'...' if len(text) > 40 else ''} ({'null' if v is None else type(v).__name__})"


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _check_ref(v: Any, where: str) -> None:
    if not (isinstance(v, dict) and isinstance(v.get("file"), str) and _FILE.match(v["file"])
            and isinstance(v.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", v["sha256"])):
        raise UserError(f"{where} must be {{\"file\": \"edits-|method-<16 hex>.safetensors\", \"sha256\": "
                        f"<64 hex>}}, got {_kind(v)}; the store is damaged")


def read_index(d: Path) -> dict:
    """The validated ``store.json`` of ``d``: every field type-checked, one UserError naming the file
    and the first bad field."""
    d = Path(d)
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
    if index.get("version") not in READS or isinstance(index.get("version"), bool):
        raise UserError(f"edit store {d} has version {index.get('version')!r}; this version of lifelong-moe reads "
                        f"{' and '.join(map(str, READS))}")
    v1 = index["version"] == 1
    fields = ["method", "method_config", "backbone", "next_index"] + (
        ["edits", "log", "files", "deleted"] if v1 else ["edits", "log", "segments", "head", "method_state"])
    missing = [k for k in fields if k not in index]
    if missing:
        raise UserError(f"{p}: missing {', '.join(missing)}; the store is damaged")

    def bad(name: str, expect: str):
        return UserError(f"{p}: field {name!r} must be {expect}, got {_kind(_get(index, name))}; the store is damaged")

    if not isinstance(index["method"], str) or not index["method"]:
        raise bad("method", "a method name")
    if not isinstance(index["method_config"], dict):
        raise bad("method_config", "a mapping of method parameters")
    b = index["backbone"]
    if not isinstance(b, dict):
        raise bad("backbone", "a mapping (name, config, fingerprint)")
    for k, ok, what in (("name", lambda v: isinstance(v, str) and v, "a backbone name"),
                        ("fingerprint", lambda v: isinstance(v, str), "text"),
                        ("config", lambda v: v is None or isinstance(v, dict), "a mapping or null"),
                        ("seed", lambda v: _is_int(v), "a non-negative integer")):
        if (k in b or k != "seed") and not ok(b.get(k)):
            raise bad(f"backbone.{k}", what)
    if not _is_int(index["next_index"], 1):
        raise bad("next_index", "an integer >= 1")
    if v1:
        for k in ("edits", "log", "deleted"):
            if not isinstance(index[k], list):
                raise bad(k, "a list")
        if not isinstance(index["files"], dict):
            raise bad("files", "a mapping")
        for k in ("edits", "method"):
            _check_ref(index["files"].get(k), f"{p}: field 'files.{k}'")
        return index
    for k in ("edits", "log", "segments"):
        if not _is_int(index[k]):
            raise bad(k, "a non-negative integer")
    if index["head"] is None:
        if index["segments"] or index["log"]:
            raise bad("head", "a segment (the store has segments)")
    else:
        _check_ref(index["head"], f"{p}: field 'head'")
        if not index["head"]["file"].startswith("edits-"):
            raise bad("head", "an edits-<sha>.safetensors segment")
    _check_ref(index["method_state"], f"{p}: field 'method_state'")
    return index


def _get(index: dict, dotted: str) -> Any:
    v = index
    for part in dotted.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


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
