"""VQA sources by name: ``<prefix>/<question type>`` -> a loader of one :class:`~lifelong_moe.data.QAData` task.

``synthetic_vqa/<type>``: the offline synthetic world (:mod:`.vqa_synthetic`); ``vqacl/<type>``: real VQA v2
in the VQACL partition format (:mod:`.vqacl`), VQACL's ten types or the user's own. A new source family is
one :func:`register_vqa_source` call. :func:`check_answer_words` refuses (or warns about) answers that a
closed-vocabulary backbone (the tiny VLM) cannot spell.
"""
from __future__ import annotations

import difflib
import warnings
from typing import Any, Callable

from ..data import QAData
from ..errors import UserError
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


def _where(data: QAData, split: str, i: int) -> str:
    """Record ``i`` of a split, named by its file and position there when the source has files."""
    path, idx = data.meta.get(f"{split}_file"), data.meta.get(f"{split}_indices")
    return f"{path} record {idx[i]}" if path and idx is not None else f"{data.name} {split} record {i}"


def check_answer_words(data: QAData, tokenizer: Any, on_unknown: str = "error") -> int:
    """Check every target answer of ``data`` against ``tokenizer``'s closed vocabulary (the tiny VLM's
    word-level one; an open tokenizer passes everything). ``on_unknown``: ``error`` raises one
    UserError naming the first bad word, its file and record and the question type; ``warn`` warns
    once and keeps the records (the words become ``<unk>``). Returns the number of such records."""
    from ..backbones.vocabulary import closed_vocabulary, unknown_words

    if on_unknown not in ("error", "warn"):
        raise UserError(f"stream.on_unknown_answer: expected 'error' or 'warn', got {on_unknown!r}")
    if closed_vocabulary(tokenizer) is None:
        return 0
    seen: dict[str, list[str]] = {}
    bad = []  # (split, index, answer, words)
    for split in ("train", "test"):
        for i, r in enumerate(getattr(data, f"{split}_records")):
            words = seen.get(r.answer)
            if words is None:
                words = seen[r.answer] = unknown_words(tokenizer, r.answer)
            if words:
                bad.append((split, i, r.answer, words))
    if not bad:
        return 0
    split, i, answer, words = bad[0]
    qtype = getattr(data, f"{split}_records")[i].question_type or data.name
    all_words = list(dict.fromkeys(w for *_, ws in bad for w in ws))
    shown = ", ".join(map(repr, all_words[:10])) + (f" and {len(all_words) - 10} more" if len(all_words) > 10 else "")
    msg = (f"{data.name}: the answer {answer!r} of {_where(data, split, i)} (question type {qtype!r}) has the word "
           f"{words[0]!r}, which is not in the backbone's closed vocabulary (the tiny VLM's word-level tokenizer "
           f"knows only the synthetic world's words and would read it as <unk>); {len(bad)} record(s) of this task "
           f"have such answers (words: {shown})")
    if on_unknown == "warn":
        warnings.warn(msg + "; kept, as <unk> (stream.on_unknown_answer: warn)", stacklevel=2)
        return len(bad)
    raise UserError(msg + ". Use a VLM with an open tokenizer (a Hugging Face LLaVA), answers in its vocabulary, "
                    "or stream.on_unknown_answer: warn to keep them as <unk>")
