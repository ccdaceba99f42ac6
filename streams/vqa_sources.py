"""VQA sources by name: ``<prefix>/<question type>`` -> a loader of one :class:`~lifelong_moe.data.QAData` task.

``synthetic_vqa/<type>``: the offline synthetic world (:mod:`.vqa_synthetic`); ``vqacl/<type>``: real VQA v2
in the VQACL partition format (:mod:`.vqacl`). A new source family is one :func:`register_vqa_source` call.
"""
from __future__ import annotations

import difflib
from typing import Callable

from ..data import QAData
from . import vqa_synthetic, vqacl
from .vqa_synthetic import QUESTION_TYPES, UnknownQuestionTypeError

VQA_SOURCES: dict[str, Callable[..., QAData]] = {}
KNOWN_VQA_SOURCES: list[str] = []


def register_vqa_source(prefix: str, fn: Callable[..., QAData], names=()) -> None:
    """Add a VQA source family: ``load_vqa_source("<prefix>/<task>", ...)`` calls ``fn`` with the full name."""
    VQA_SOURCES[prefix] = fn
    KNOWN_VQA_SOURCES[:] = sorted(set(KNOWN_VQA_SOURCES) | set(names or [prefix]))


def load_vqa_source(name: str, *, root=None, seed: int = 0, **kwargs) -> QAData:
    """Load one VQA task by name: ``synthetic_vqa/<type>`` (keywords n_train, n_test) or
    ``vqacl/<type>`` (real VQA v2 in the VQACL partition format under ``root``; see :mod:`.vqacl`)."""
    prefix = str(name).split("/", 1)[0]
    if prefix not in VQA_SOURCES or "/" not in str(name):
        close = difflib.get_close_matches(str(name), KNOWN_VQA_SOURCES, n=1, cutoff=0.6)
        raise UnknownQuestionTypeError(f"unknown VQA task {name!r}" + (f" (did you mean {close[0]!r}?)" if close
                                       else "") + f"; known: {', '.join(KNOWN_VQA_SOURCES)}")
    return VQA_SOURCES[prefix](name, root=root, seed=seed, **kwargs)


register_vqa_source("synthetic_vqa", vqa_synthetic.load, names=[f"synthetic_vqa/{t}" for t in QUESTION_TYPES])
register_vqa_source("vqacl", vqacl.load, names=[f"vqacl/{t}" for t in QUESTION_TYPES])
