"""Small builders shared by tests: a tiny config on sklearn digits, two-domain tensor files and
a built run on them."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lifelong_moe.config import RunConfig, validate


def tiny_config(strategy: dict, **over) -> "RunConfig":
    data = {
        "name": "t",
        "seed": 0,
        "stream": {"kind": "class_incremental", "dataset": "digits", "num_experiences": 2,
                   "classes_per_experience": None, "samples_per_class": {"train": 12, "test": 6}},
        "backbone": {"name": "lmoe-tiny-vit"},
        "strategy": strategy,
        "training": {"epochs": 1, "batch_size": 8, "optimizer": {"lr": 1e-3}},
        "evaluation": {"batch_size": 64},
        "runtime": {"device": "cpu"},  # exact-value tests hold on the CPU, also on a machine with a GPU
    }
    for k, v in over.items():
        node = data
        parts = k.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    data["stream"] = {k: v for k, v in data["stream"].items() if v is not None}
    return validate(data)


def write_domain_files(root: Path, n_train: int, n_test: int = 16) -> list[Path]:
    """Two visually distinct domains (smooth dark blobs vs bright colour noise), two classes each,
    as .npz files under ``root``; deterministic (one seeded generator)."""
    rng = np.random.default_rng(0)
    paths = []
    for name in ("blobs", "noise"):
        def images(n):
            if name == "blobs":
                return rng.uniform(0, 0.3, (n, 3, 4, 4)).repeat(8, 2).repeat(8, 3).astype(np.float32)
            return rng.uniform(0.6, 1.0, (n, 3, 32, 32)).astype(np.float32)
        p = root / f"{name}.npz"
        np.savez(p, x_train=images(n_train), y_train=np.repeat([0, 1], n_train // 2), x_test=images(n_test),
                 y_test=np.repeat([0, 1], n_test // 2), class_names=np.array([f"{name} a", f"{name} b"], dtype=str))
        paths.append(p)
    return paths


def build_on_domains(paths, strategy: dict, **over):
    """``runner.build`` of a multi-domain stream over ``paths`` (from :func:`write_domain_files`)."""
    from lifelong_moe.runs.runner import build

    over = {"stream__kind": "multi_domain", "stream__num_experiences": None, "stream__dataset": None,
            "stream__samples_per_class": {},
            "stream__domains": [{"dataset": "tensors", "path": str(p), "name": p.stem} for p in paths],
            "training__iterations": 4, **over}
    return build(tiny_config(strategy, **over), progress=False)
