"""Small builders shared by tests: a tiny config on sklearn digits and a built run."""
from __future__ import annotations

from lifelong_moe.config import validate


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
