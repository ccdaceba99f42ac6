"""Build a continual stream (an Avalanche benchmark plus per-experience TaskInfo) from config.

- ``class_incremental``: one dataset, its classes cut into experiences in a fixed order
  (seeded permutation, natural, or given). Every class lands in exactly one experience.
- ``multi_domain``: a sequence of datasets (MTIL style), one experience each, each with its own
  label space; a named order (``mtil_order1``/``mtil_order2``) or an explicit list.
- ``vqa``: visual question answering, one experience per question type (VQACL style), on the
  synthetic world (``synthetic_vqa``) or VQACL partition files (``vqacl``); items are
  ``(image, record index)`` and each experience's :class:`~lifelong_moe.data.QATask` holds the records.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, Subset

from ..config import SourceSpec, StreamConfig
from ..registry import TASK_KINDS
from ..data import ClassificationData, LabelSpace, QAData, QATask, TaskInfo
from .transforms import ImageTransform, prepare, transformed


@dataclass
class Stream:
    """An Avalanche ``CLScenario`` whose experiences carry ``task_info``, ``task_name`` and
    ``class_names``; ``tasks[i]`` describes experience ``i``."""

    kind: str
    benchmark: object
    tasks: list  # TaskInfo (classification) or QATask (vqa)
    skipped_images: dict[str, int] = field(default_factory=dict)  # dataset -> unreadable files left out

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def train_stream(self):
        return self.benchmark.train_stream

    @property
    def test_stream(self):
        return self.benchmark.test_stream

    @property
    def task_kind(self) -> str:
        return TASK_KINDS[self.kind]

    def describe(self) -> list[dict]:
        return [t.describe() for t in self.tasks]


def data_root(cfg: StreamConfig) -> Path:
    root = cfg.root or os.environ.get("LIFELONG_MOE_DATA") or "~/data"
    return Path(root).expanduser()


def subsample(targets: list[int], per_class: int | None, seed: int) -> list[int]:
    """First ``per_class`` indices of each class after a seeded shuffle, returned sorted."""
    if per_class is None:
        return list(range(len(targets)))
    rng = np.random.default_rng(seed)
    t = np.asarray(targets)
    keep = []
    for c in np.unique(t):
        idx = np.flatnonzero(t == c)
        keep.extend(rng.permutation(idx)[:per_class].tolist())
    return sorted(keep)


def load_data(spec: SourceSpec, cfg: StreamConfig, seed: int) -> ClassificationData:
    from .sources import load_source

    data = load_source(spec.dataset, root=data_root(cfg), download=cfg.download, seed=seed,
                       path=spec.path, test_fraction=cfg.test_fraction, on_bad_image=cfg.on_bad_image)
    sizes = cfg.samples_per_class
    if spec.samples_per_class is not None:
        own = spec.samples_per_class
        sizes = type(sizes)(train=own.train or sizes.train, test=own.test or sizes.test)
    tr = subsample(data.train_targets, sizes.train, seed)
    te = subsample(data.test_targets, sizes.test, seed + 1)
    templates = spec.templates or data.templates
    return ClassificationData(
        name=spec.name or data.name, class_names=list(data.class_names),
        train=Subset(data.train, tr) if sizes.train else data.train,
        test=Subset(data.test, te) if sizes.test else data.test,
        train_targets=[data.train_targets[i] for i in tr], test_targets=[data.test_targets[i] for i in te],
        templates=templates, meta=data.meta)


def _spec(x: str | SourceSpec) -> SourceSpec:
    return x if isinstance(x, SourceSpec) else SourceSpec(dataset=x)


def _avalanche(ds: Dataset, targets: list[int]):
    from avalanche.benchmarks.utils import DataAttribute, make_avalanche_dataset

    return make_avalanche_dataset(ds, data_attributes=[DataAttribute(list(targets), "targets")])


def class_order(cfg: StreamConfig, n_classes: int, seed: int) -> list[int]:
    if cfg.class_order == "natural":
        return list(range(n_classes))
    if cfg.class_order == "seed":
        return np.random.default_rng(seed).permutation(n_classes).tolist()
    order = [int(c) for c in cfg.class_order]
    if sorted(order) != list(range(n_classes)):
        raise ValueError(f"stream.class_order must be a permutation of 0..{n_classes - 1}")
    return order


def split_sizes(cfg: StreamConfig, n_classes: int) -> list[int]:
    """Classes per experience; with ``num_experiences`` the remainder goes to the first ones."""
    if cfg.classes_per_experience is not None:
        sizes = list(cfg.classes_per_experience)
        if sum(sizes) != n_classes or min(sizes) < 1:
            raise ValueError(f"stream.classes_per_experience must be positive and sum to {n_classes}, got {sizes}")
        return sizes
    n = cfg.num_experiences
    if n > n_classes:
        raise ValueError(f"stream.num_experiences={n} exceeds the {n_classes} classes of the dataset")
    return [n_classes // n + (1 if i < n_classes % n else 0) for i in range(n)]


def vqa_order(cfg: StreamConfig) -> list[str]:
    from .vqa_synthetic import QUESTION_TYPES

    if cfg.question_types is not None:
        return list(cfg.question_types)
    if cfg.order != "vqacl":
        raise ValueError(f"stream.order: unknown question-type order {cfg.order!r}; named orders: vqacl")
    return list(QUESTION_TYPES)


def load_qa(cfg: StreamConfig, qtype: str, seed: int) -> QAData:
    """One question type's data (``questions_per_type``: questions drawn per split, seeded)."""
    from .vqa_sources import load_vqa_source

    dataset = cfg.dataset if isinstance(cfg.dataset, str) else cfg.dataset.dataset
    sizes = {k: v for k, v in (("n_train", cfg.questions_per_type.train), ("n_test", cfg.questions_per_type.test))
             if v is not None}
    extra = {"partition_dir": cfg.partition_dir} if dataset == "vqacl" else {}
    return load_vqa_source(f"{dataset}/{qtype}", root=data_root(cfg), seed=seed, **sizes, **extra)


def build_vqa(cfg: StreamConfig, transform: ImageTransform, seed: int, tokenizer=None):
    from avalanche.benchmarks.scenarios import benchmark_from_datasets

    from .vqa_sources import check_answer_words

    trains, tests, tasks = [], [], []
    for i, qtype in enumerate(vqa_order(cfg)):
        data = load_qa(cfg, qtype, seed)
        check_answer_words(data, tokenizer, cfg.on_unknown_answer)  # closed vocabularies (the tiny VLM) only
        positions = {s: list(range(len(getattr(data, f"{s}_records")))) for s in ("train", "test")}
        trains.append(_avalanche(prepare(data.train, positions["train"], transform.for_training()),
                                 positions["train"]))
        tests.append(_avalanche(prepare(data.test, positions["test"], transform), positions["test"]))
        tasks.append(QATask(i, data.name, qtype, tuple(data.train_records), tuple(data.test_records)))
    if len({t.name for t in tasks}) != len(tasks):
        raise ValueError("stream.question_types: a question type is listed twice")
    return benchmark_from_datasets(train=trains, test=tests), tasks


def build_stream(cfg: StreamConfig, transform: ImageTransform, seed: int, tokenizer=None) -> Stream:
    """``tokenizer``: the backbone's, for a vqa stream's answer-word check (:func:`.vqa_sources.check_answer_words`)."""
    from avalanche.benchmarks.scenarios import benchmark_from_datasets, class_incremental_benchmark

    skipped = {}
    if cfg.kind == "vqa":
        bm, tasks = build_vqa(cfg, transform, seed, tokenizer)
    elif cfg.kind == "class_incremental":
        spec = _spec(cfg.dataset)
        data = load_data(spec, cfg, seed)
        skipped[data.name] = data.meta.get("skipped_images", 0)
        space = LabelSpace(data.name, tuple(data.class_names), tuple(data.templates) if data.templates else None)
        order = class_order(cfg, len(data.class_names), seed)
        sizes = split_sizes(cfg, len(data.class_names))
        train, test = transformed(data, transform)
        bm = class_incremental_benchmark(
            {"train": _avalanche(train, data.train_targets), "test": _avalanche(test, data.test_targets)},
            class_order=order, num_classes_per_exp=sizes)
        tasks, start = [], 0
        for i, size in enumerate(sizes):
            cls = tuple(order[start:start + size])
            start += size
            names = [data.class_names[c] for c in cls]
            label = ",".join(names) if len(names) <= 3 else f"{names[0]}..{names[-1]}"
            tasks.append(TaskInfo(i, f"{data.name}[{label}]", space, cls))
    else:
        from .mtil import resolve_order

        specs = [_spec(d) for d in (cfg.domains if cfg.domains is not None else resolve_order(cfg.order))]
        trains, tests, tasks = [], [], []
        for i, spec in enumerate(specs):
            data = load_data(spec, cfg, seed)
            skipped[data.name] = data.meta.get("skipped_images", 0)
            space = LabelSpace(data.name, tuple(data.class_names), tuple(data.templates) if data.templates else None)
            train, test = transformed(data, transform)
            trains.append(_avalanche(train, data.train_targets))
            tests.append(_avalanche(test, data.test_targets))
            tasks.append(TaskInfo(i, data.name, space, tuple(range(len(data.class_names)))))
        if len({t.name for t in tasks}) != len(tasks):
            raise ValueError("stream.domains: two domains share a name; give each a distinct 'name'")
        bm = benchmark_from_datasets(train=trains, test=tests)
    for s in (bm.train_stream, bm.test_stream):
        for exp, info in zip(s, tasks):
            exp.task_info, exp.task_name = info, info.name
            exp.class_names = getattr(info, "class_names", [])
    return Stream(cfg.kind, bm, tasks, {k: n for k, n in skipped.items() if n})


def eval_classes(tasks: list[TaskInfo], row: int, col: int, mode: str) -> tuple[int, ...]:
    """Classes in play when evaluating test set ``col`` after training experience ``row``
    (``row = -1`` is the zero-shot row).

    - ``task``: the classes of experience ``col`` only (task-aware, MTIL convention);
    - ``seen``: every class of ``col``'s label space held by experiences ``0..max(row, col)``
      (class-incremental convention; for not-yet-trained ``col`` this is zero-shot transfer);
    - ``all``: the whole label space of ``col``.
    """
    t = tasks[col]
    if mode == "task":
        return t.classes
    if mode == "all":
        return tuple(range(len(t.label_space.class_names)))
    upto = max(row, col)
    seen = sorted({c for u in tasks[: upto + 1] if u.label_space == t.label_space for c in u.classes})
    return tuple(seen)
