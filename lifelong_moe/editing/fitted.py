"""Fitted method weights as an artefact: what a method learns before it edits, saved once and loaded
instead of learning it again. For LiveEdit (Chen et al., CVPR 2025) these are the expert generators,
both routing extractors with the vision sentinel and the residual's LayerNorm, meta-trained on a train
split (the reference's ``train_vllm_editor.py``); edits are not part of it (they live in the store).

An artefact is two files side by side::

    <name>.safetensors   the method's ``state_dict`` (safetensors only: nothing is unpickled)
    <name>.json          format, method, ``key`` (the settings that shape the weights), all its settings,
                         backbone (name, checkpoint directory, weight fingerprint), train split, steps,
                         wall time, final losses, and the sha256 of the .safetensors

``<name>`` is ``<method>-<backbone tag>-<key hash>``; the tag is the backbone checkpoint directory's
name (``lmoe-tiny-llava-<hash>`` for the shipped tiny VLM) or ``<model>-fp<fingerprint>`` for a model
without one. Loading checks the method, the key and the backbone's fingerprint
(:func:`.store.backbone_fingerprint`), so weights are used only on the backbone and with the settings
they were fitted for.

Shipped artefacts live in ``lifelong_moe/editing/weights/<method>/`` (package data), each with the
manifest of :mod:`lifelong_moe.backbones.shipped` (sha256 of each file, the exact command, steps, wall
time, commit): ``lifelong-moe fit liveedit CONFIG --ship``. A method's ``fitted: auto`` (the default)
loads the shipped one whose name this backbone and these settings give.
"""
from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path

from ..errors import UserError
from ..io import atomic_path, file_sha256, read_json, write_json

FORMAT = "lifelong-moe fitted method weights"
VERSION = 1
FITTED_ROOT = Path(__file__).parent / "weights"


# ---------------------------------------------------------------------------- names
def backbone_tag(name: str, checkpoint: str | None, fingerprint: str) -> str:
    """The backbone part of an artefact's name: its checkpoint directory's name, or ``<model>-fp<fingerprint>``."""
    tag = checkpoint or f"{Path(name or 'vlm').name}-fp{fingerprint}"
    return re.sub(r"[^A-Za-z0-9._-]+", "--", tag)


def key_hash(method: str, key: dict) -> str:
    return hashlib.sha256(json.dumps({"method": method, "key": key}, sort_keys=True).encode()).hexdigest()[:12]


def artefact_name(method: str, tag: str, key: dict) -> str:
    return f"{method}-{tag}-{key_hash(method, key)}"


def info_path(artefact: Path) -> Path:
    """``x.safetensors`` -> ``x.json`` (where :func:`lifelong_moe.backbones.shipped.info_file` looks too)."""
    return Path(artefact).with_suffix(".json")


def shipped_dir(method: str) -> Path:
    return FITTED_ROOT / method


# ---------------------------------------------------------------------------- save / read
def save(directory: str | Path, method, backbone: dict, fit: dict) -> Path:
    """Write ``method``'s fitted weights into ``directory`` (atomically: the .safetensors, then the
    JSON naming its sha256); return the .safetensors path. ``backbone``: name, checkpoint, fingerprint,
    tag; ``fit``: train split, steps, seconds, final losses."""
    from safetensors.torch import save_file

    from ..provenance import versions

    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise UserError(f"fitted weights: {d} exists and is not a directory")
    key = method.fitted_key()
    path = d / f"{artefact_name(method.name, backbone['tag'], key)}.safetensors"
    state = {k: v.detach().to("cpu").contiguous() for k, v in method.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "method": method.name,
                                             "key": key_hash(method.name, key)})
    info = {"format": FORMAT, "version": VERSION, "method": method.name, "key": key,
            "params": method.config(), "backbone": dict(backbone), "train": fit.get("train"),
            "steps": fit.get("steps"), "train_seconds": fit.get("seconds"),
            "final_losses": fit.get("final_losses"), "file": path.name, "sha256": file_sha256(path),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions()}
    write_json(info_path(path), info)
    return path


def locate(path: str | Path, name: str | None = None) -> Path:
    """The .safetensors of the artefact at ``path``: that file, its JSON, or a directory holding one
    (``name``, when given, picks among several); UserError otherwise."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.with_suffix(".safetensors")
    if not p.is_dir():
        raise UserError(f"fitted weights {p}: no such file or directory")
    found = sorted(q.with_suffix(".safetensors") for q in p.glob("*.json") if _is_info(q))
    if name is not None and p / f"{name}.safetensors" in found:
        return p / f"{name}.safetensors"
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserError(f"fitted weights {p}: the directory holds no fitted weights (<name>.safetensors with "
                        f"<name>.json); make them with `lifelong-moe fit liveedit CONFIG --out {p}`")
    raise UserError(f"fitted weights {p}: the directory holds {len(found)} artefacts, none named for this backbone "
                    f"and these settings; name one: {', '.join(f.name for f in found)}")


def _is_info(p: Path) -> bool:
    try:
        return read_json(p).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read(artefact: Path) -> tuple[dict, dict]:
    """``(state_dict, info)`` of an artefact; UserError if its JSON is missing or not ours, or the
    weights file is missing or not the one the JSON names (damaged)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    artefact = Path(artefact)
    meta = info_path(artefact)
    if not meta.is_file():
        raise UserError(f"fitted weights {artefact}: {meta.name} (their settings and backbone) is missing")
    try:
        info = read_json(meta)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"fitted weights {meta}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise UserError(f"{meta} does not describe fitted method weights (format {FORMAT!r})")
    if info.get("version") != VERSION:
        raise UserError(f"fitted weights {meta} have version {info.get('version')!r}; this version reads {VERSION}")
    if not artefact.is_file():
        raise UserError(f"fitted weights {artefact}: the weights file is missing")
    if file_sha256(artefact) != info.get("sha256"):
        raise UserError(f"fitted weights {artefact}: the file does not match the sha256 in {meta.name} (damaged)")
    try:
        return load_file(str(artefact)), info
    except (SafetensorError, OSError) as e:
        raise UserError(f"fitted weights {artefact}: cannot read it: {e}") from None


def check(info: dict, method: str, key: dict, backbone: dict, where: Path) -> None:
    """UserError unless ``info`` was fitted by ``method`` with ``key`` on ``backbone`` (same fingerprint)."""
    if info.get("method") != method:
        raise UserError(f"fitted weights {where} belong to method {info.get('method')!r}, not {method!r}")
    fb = info.get("backbone") or {}
    if fb.get("fingerprint") != backbone["fingerprint"]:
        raise UserError(f"fitted weights {where} were fitted on backbone {fb.get('tag')!r} (fingerprint "
                        f"{fb.get('fingerprint')}), not on this one ({backbone['tag']!r}, {backbone['fingerprint']}): "
                        f"fit them for this backbone (`lifelong-moe fit {method} CONFIG --out DIR`)")
    saved = info.get("key") or {}
    diff = sorted(k for k in set(saved) | set(key) if saved.get(k) != key.get(k))
    if diff:
        what = ", ".join(f"{k}: {saved.get(k)!r} there, {key.get(k)!r} here" for k in diff)
        raise UserError(f"fitted weights {where} were fitted with other {method} settings ({what}); set those "
                        f"settings to match, or fit weights for these (`lifelong-moe fit {method} CONFIG --out DIR`)")


# ---------------------------------------------------------------------------- shipped
def find_shipped(method: str, tag: str, key: dict) -> Path | None:
    """The shipped artefact named for this backbone tag and key (with its manifest), if any."""
    from ..backbones.shipped import manifest_path

    p = shipped_dir(method) / f"{artefact_name(method, tag, key)}.safetensors"
    return p if p.is_file() and manifest_path(p).is_file() else None


def shipped_keys(method: str, tag: str) -> list[dict]:
    """The settings (``key``) of every artefact shipped for this method and backbone tag, e.g. to run a
    benchmark with the shipped weights without restating their settings."""
    keys = []
    for p in sorted(shipped_dir(method).glob(f"{method}-{tag}-*.safetensors")):
        try:
            keys.append(read_json(info_path(p))["key"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged JSON: loading that artefact reports it
    return keys


def fitted_on(artefact: Path) -> str | None:
    """The weight fingerprint of the backbone an artefact was fitted on (None if its JSON cannot say)."""
    try:
        return (read_json(info_path(artefact)).get("backbone") or {}).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def verify_shipped(artefact: Path) -> None:
    """UserError naming what differs from the shipped artefact's manifest."""
    from ..backbones.shipped import verify

    problems = verify(artefact)
    if problems:
        raise UserError(f"shipped fitted weights {artefact.name} do not match their manifest ({'; '.join(problems)}); "
                        "reinstall the package, or set fitted: none")


def ship(artefact: Path, command: str, commit: str | None = None) -> tuple[Path, list[str]]:
    """Make an artefact written under :data:`FITTED_ROOT` a shipped one: write its manifest (files
    with sha256, ``command``, the key and backbone as its config, steps, wall time, commit) and remove
    the same method's artefacts fitted on another checkpoint of the same backbone model (they can no
    longer match it). Returns ``(manifest path, names removed)``."""
    from ..backbones.shipped import manifest_path, write_manifest

    artefact = Path(artefact)
    if FITTED_ROOT not in artefact.parents:
        raise ValueError(f"{artefact} is not under {FITTED_ROOT}")
    info = read_json(info_path(artefact))
    manifest = write_manifest(artefact, command=command, info={
        "config": {"method": info["method"], "key": info["key"], "backbone": info["backbone"], "train": info["train"]},
        "steps": info.get("steps"), "train_seconds": info.get("train_seconds")}, commit=commit)
    removed = []
    for other in sorted(artefact.parent.glob("*.safetensors")):
        if other == artefact or not info_path(other).is_file():
            continue
        ob = read_json(info_path(other)).get("backbone") or {}
        if ob.get("name") == info["backbone"]["name"] and ob.get("checkpoint") != info["backbone"]["checkpoint"]:
            for p in (other, info_path(other), manifest_path(other)):
                p.unlink(missing_ok=True)
            removed.append(other.stem)
    return manifest, removed


def without_fitted(params):
    """``params`` set to load no fitted weights (``fitted: none``) where the method has that setting: for
    a fit from scratch, or a store that carries its own fitted weights."""
    if "fitted" in type(params).model_fields:
        return params.model_copy(update={"fitted": "none"})
    return params
