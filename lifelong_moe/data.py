"""Data contracts shared by streams, backbones and strategies.

A *source* (torchvision dataset, ImageFolder, sklearn digits, tensors, the synthetic world) is
turned into a :class:`ClassificationData`; a *stream* cuts one or more of them into experiences,
each described by a :class:`TaskInfo`. A visual question answering task is a :class:`QAData` of
:class:`QARecord` s (one question type, VQACL-style).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from torch.utils.data import Dataset


@dataclass
class ClassificationData:
    """One labelled image dataset with a train and a test split.

    ``train[i]`` / ``test[i]`` return ``(image, target)`` where ``image`` is a PIL image or a float
    tensor ``[C, H, W]`` with values in ``[0, 1]`` (``C`` is 1 or 3) and ``target`` an int in
    ``range(len(class_names))``. ``train_targets`` / ``test_targets`` list every target in order,
    so streams can split by class without decoding images.
    """

    name: str
    class_names: list[str]
    train: Dataset
    test: Dataset
    train_targets: list[int]
    test_targets: list[int]
    templates: list[str] | None = None  # dataset-specific prompts, each with exactly one "{}"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.train_targets) != len(self.train) or len(self.test_targets) != len(self.test):
            raise ValueError(f"dataset {self.name!r}: targets and samples differ in length")
        if not self.class_names:
            raise ValueError(f"dataset {self.name!r}: no class names")


@dataclass(frozen=True)
class LabelSpace:
    """The class names one head of the prompt classifier ranges over (a dataset's classes)."""

    name: str
    class_names: tuple[str, ...]
    templates: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TaskInfo:
    """What an experience is about: its name, its label space and which of its classes it holds."""

    index: int
    name: str
    label_space: LabelSpace
    classes: tuple[int, ...]

    kind = "classification"

    @property
    def class_names(self) -> list[str]:
        return [self.label_space.class_names[c] for c in self.classes]

    def describe(self) -> dict:
        return {"index": self.index, "name": self.name, "label_space": self.label_space.name,
                "classes": list(self.classes), "class_names": self.class_names}


def subset_indices(targets: Sequence[int], classes: Sequence[int]) -> list[int]:
    wanted = set(int(c) for c in classes)
    return [i for i, t in enumerate(targets) if int(t) in wanted]


# ----------------------------------------------------------------------------- visual question answering
@dataclass(frozen=True)
class QARecord:
    """One visual question with its answer(s)."""

    question: str
    answer: str                    # the training target (VQACL: the label with the highest score)
    answers: tuple[str, ...] = ()  # all human answers (10 in VQA v2) for soft accuracy; () means (answer,)
    question_type: str = ""
    image_id: str = ""

    @property
    def reference_answers(self) -> tuple[str, ...]:
        """The answers a prediction is scored against: ``answers``, or ``(answer,)`` when empty."""
        return self.answers or (self.answer,)


@dataclass
class QAData:
    """One VQA task (one question type) with a train and a test split. ``train[i]`` / ``test[i]`` return
    ``(image, i)``: image a PIL image or float tensor [C, H, W] in [0, 1]; i the index of its record in
    ``train_records`` / ``test_records``."""

    name: str
    train: Dataset
    test: Dataset
    train_records: list[QARecord]
    test_records: list[QARecord]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.train_records) != len(self.train) or len(self.test_records) != len(self.test):
            raise ValueError(f"VQA data {self.name!r}: records and images differ in length")


@dataclass(frozen=True)
class QATask:
    """What a VQA experience is about: one question type, with its train and test records (the
    ``i`` of a dataset item ``(image, i)`` indexes them)."""

    index: int
    name: str
    question_type: str
    train_records: tuple[QARecord, ...]
    test_records: tuple[QARecord, ...]
    kind = "vqa"

    def describe(self) -> dict:
        return {"index": self.index, "name": self.name, "question_type": self.question_type,
                "train_questions": len(self.train_records), "test_questions": len(self.test_records)}
