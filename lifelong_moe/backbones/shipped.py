"""Weights shipped with the package: the embedded tiny CLIP and tiny VLM, pretrained once on the
synthetic world by the project's own command (``lifelong-moe pretrain clip|vlm --ship``).

``weights/`` mirrors the model cache (``<cache>/clip/<model>-<key>.safetensors``,
``<cache>/vlm/<model>-<key>/``, each with its JSON record beside it) and is looked up before it:
``pretrained: synthetic`` with the default recipe finds the shipped artefact and loads it through the
path a real checkpoint takes (open_clip ``pretrained=<file>``, ``from_pretrained(<dir>)``), so runs do
not pretrain and their zero-shot rows are the same on every CPU. A recipe override (``backbone.pretrain``)
changes the key and trains into the user's cache as before.

Every artefact has ``<artefact>.manifest.json``: the sha256 and size of each file, the exact command
that produced it, its recipe, steps, wall time, the commit and the library versions.
``tests/test_shipped_weights.py`` checks each file against its manifest and that the default recipe
resolves to it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..io import file_sha256 as sha256, write_text

SHIPPED_ROOT = Path(__file__).parent / "weights"
MANIFEST_SUFFIX = ".manifest.json"


def find(cached: Path, cache_root: Path, complete) -> Path | None:
    """Where the checkpoint for cache location ``cached`` already is: its shipped counterpart first, else
    ``cached`` itself when ``complete(cached)``; None when it must be trained."""
    shipped = shipped_path(cached, cache_root)
    if shipped is not None:
        return shipped
    return Path(cached) if complete(Path(cached)) else None


def shipped_path(cached: Path, cache_root: Path) -> Path | None:
    """The shipped counterpart of cache location ``cached`` (same relative path), if it is shipped."""
    try:
        rel = Path(cached).relative_to(cache_root)
    except ValueError:
        return None
    p = SHIPPED_ROOT / rel
    return p if manifest_path(p).is_file() and p.exists() else None


def manifest_path(artefact: Path) -> Path:
    return Path(artefact).with_name(Path(artefact).name + MANIFEST_SUFFIX)


def artefact_files(artefact: Path) -> list[Path]:
    """The files an artefact consists of: itself (a checkpoint file) or a directory's files, sorted."""
    artefact = Path(artefact)
    return sorted(p for p in artefact.rglob("*") if p.is_file()) if artefact.is_dir() else [artefact]


def write_manifest(artefact: Path, *, command: str, info: dict, commit: str | None = None) -> Path:
    """Write ``<artefact>.manifest.json`` (files with sha256 and bytes, command, recipe, steps, wall
    time, commit, versions, CPU capability) and return its path."""
    import torch

    from ..provenance import versions

    artefact = Path(artefact)
    v = versions()
    files = {str(p.relative_to(artefact.parent)): {"sha256": sha256(p), "bytes": p.stat().st_size}
             for p in artefact_files(artefact)}
    record = info_file(artefact)
    if record.is_file():
        files[record.name] = {"sha256": sha256(record), "bytes": record.stat().st_size}
    manifest = {"artefact": artefact.name, "command": command, "config": info.get("config"),
                "steps": info.get("steps"), "wall_seconds": info.get("train_seconds"),
                "commit": commit or v.get("git_commit"), "versions": v,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(), "files": files}
    write_text(manifest_path(artefact), json.dumps(manifest, indent=2) + "\n")
    return manifest_path(artefact)


def info_file(artefact: Path) -> Path:
    """The JSON record the pretraining writes beside an artefact (``x.safetensors`` -> ``x.json``,
    directory ``d`` -> ``d.json``)."""
    artefact = Path(artefact)
    return artefact.with_suffix(".json") if artefact.suffix == ".safetensors" else artefact.with_name(
        artefact.name + ".json")


def read_manifest(artefact: Path) -> dict:
    return json.loads(manifest_path(artefact).read_text())


def verify(artefact: Path) -> list[str]:
    """What is wrong with a shipped artefact against its manifest (empty: every file present, no file
    more, each sha256 equal)."""
    artefact = Path(artefact)
    if not manifest_path(artefact).is_file():
        return [f"{artefact.name}: no manifest"]
    listed = read_manifest(artefact)["files"]
    problems = []
    for rel, meta in listed.items():
        p = artefact.parent / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif sha256(p) != meta["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
    present = {str(p.relative_to(artefact.parent)) for p in artefact_files(artefact)}
    problems += [f"{rel}: not in the manifest" for rel in sorted(present - set(listed))]
    return problems


def shipped_artefacts(root: Path | None = None) -> list[Path]:
    """Every shipped artefact under ``root`` (default :data:`SHIPPED_ROOT`): the paths their manifests name."""
    root = SHIPPED_ROOT if root is None else Path(root)
    return sorted(p.with_name(p.name[: -len(MANIFEST_SUFFIX)]) for p in root.rglob("*" + MANIFEST_SUFFIX))


def drop_other_versions(artefact: Path, model: str) -> list[str]:
    """Remove the shipped artefacts of ``model`` other than ``artefact`` (one shipped version per model);
    the names removed."""
    artefact = Path(artefact)
    removed = []
    for other in shipped_artefacts():
        if other.parent == artefact.parent and other.name != artefact.name and other.name.startswith(model + "-"):
            for p in (other, info_file(other), manifest_path(other)):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
            removed.append(other.name)
    return removed


def ship(artefact: Path, model: str, command: str, commit: str | None = None) -> Path:
    """Make a freshly trained artefact under :data:`SHIPPED_ROOT` the shipped one of ``model``: write its
    manifest (``commit``: the code that trained it, read when training started; default: now), drop the
    other versions. Returns the manifest's path."""
    artefact = Path(artefact)
    if SHIPPED_ROOT not in artefact.parents:
        raise ValueError(f"{artefact} is not under {SHIPPED_ROOT}")
    info = json.loads(info_file(artefact).read_text())
    out = write_manifest(artefact, command=command, info=info, commit=commit)
    drop_other_versions(artefact, model)
    return out


def train_for_cli(a, model: str, overrides: dict, resolve) -> str:
    """``lifelong-moe pretrain clip|vlm``: ``resolve(model, overrides, progress, force, cache_dir)`` the
    checkpoint (trained if missing) into the user's cache, or with ``--ship`` into :data:`SHIPPED_ROOT`
    and ship it, its manifest naming the commit read before training (the tree may change meanwhile)."""
    from ..provenance import git_commit

    commit = git_commit()
    path = resolve(model, overrides, progress=not a.quiet, force=a.force, cache_dir=ship_root(a))
    if a.ship and (a.force or not manifest_path(path).is_file()):
        print(f"shipped: {ship(Path(path), model, a.command_line, commit)}")
    elif a.ship:  # found already shipped, nothing trained: its manifest stays as it was
        print(f"already shipped: {path} (--force retrains it)")
    return path


def ship_root(a) -> str | None:
    """The cache root a ``lifelong-moe pretrain`` call trains into: :data:`SHIPPED_ROOT` with ``--ship``."""
    from ..errors import UserError

    if not getattr(a, "ship", False):
        return a.cache_dir
    if a.cache_dir:
        raise UserError("--ship trains into the package's weights/ folder; it takes no --cache-dir")
    return str(SHIPPED_ROOT)
