"""VQA answer scoring: VQA v2 answer normalisation, exact match and VQA soft accuracy.

The rules follow the official VQA evaluation code, ``GT-Vision-Lab/VQA``,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (commit ``a013f00``, 2021): ``processPunctuation``,
``processDigitArticle`` and the accuracy loop of ``evaluate`` (Antol et al., ICCV 2015; Goyal et al.,
CVPR 2017). Two choices of ours, both stated where they apply:

- :func:`normalize_answer` is always applied to the prediction and to every human answer. The
  official loop normalises both only when the human answers disagree (when all agree it compares raw
  stripped strings, so "Yes" scores 0 against ten "yes"); VQA v2's released answers are already
  normalised, so this changes scores only for unnormalised predictions, and it lets synthetic
  answers such as "two" match "2".
- :func:`vqa_accuracy` with a single reference answer is exact match (the official leave-one-out
  formula would give 0: no other human is left to agree).
"""
from __future__ import annotations

import re
from typing import Sequence

__all__ = ["normalize_answer", "exact_match", "vqa_accuracy", "vqa_scores", "CONTRACTIONS", "NUMBER_WORDS"]

# processDigitArticle: number words up to ten become digits ("none" too), articles are dropped
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})

# Contractions written without one of their apostrophes get it back ("dont" -> "don't",
# "couldnt've" and "couldn'tve" -> "couldn't've"): the official table maps every form with exactly
# one apostrophe dropped to the full form. Its "I'm", "I've", "I'd've" entries are capitalised and
# never match lower-cased text, so they are left out here.
_FULL_FORMS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've
he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've needn't not've
o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's
someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd there'd've
there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's
what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _contractions() -> dict[str, str]:
    table = {}
    for full in _FULL_FORMS:
        for i in [i for i, ch in enumerate(full) if ch == "'"]:
            table[full[:i] + full[i + 1:]] = full
    table["somebody'd"] = "somebodyd"  # sic: the official table maps this one the other way round
    return table


CONTRACTIONS: dict[str, str] = _contractions()

# processPunctuation
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")  # official "(?!<=\d)(\.)(?!\d)": a period not followed by a digit


def _punctuation(text: str) -> str:
    """Each mark is deleted where it touches a space (or the text has a digit,digit comma), else it
    becomes a space; then periods not followed by a digit go ("1.5" keeps its point)."""
    out = text
    number_comma = _COMMA_IN_NUMBER.search(text) is not None
    for p in _PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or number_comma) else " ")
    return _PERIOD.sub("", out)


def _digits_articles(text: str) -> str:
    kept = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in kept if w not in _ARTICLES)


def normalize_answer(s: str) -> str:
    """VQA v2 answer normalisation: newlines/tabs to spaces and strip, punctuation, lower case,
    number words to digits, articles dropped, apostrophes restored in contractions, single spaces.
    ``"Two dogs!"`` -> ``"2 dogs"``, ``"the Red."`` -> ``"red"``, ``"dont know"`` -> ``"don't know"``."""
    return _digits_articles(_punctuation(s.replace("\n", " ").replace("\t", " ").strip()))


def _as_answers(answers: str | Sequence[str]) -> list[str]:
    out = [answers] if isinstance(answers, str) else list(answers)
    if not out:
        raise ValueError("no reference answer given")
    return out


def exact_match(pred: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalised ``pred`` equals the normalised target, else 0.0. The target is
    ``answers`` itself when it is a string, else its first element: pass the training target
    (``QARecord.answer``, VQACL's highest-scoring label), not the unordered human answers. This is
    CL-MoE's metric (case-insensitive exact match against one answer) with VQA normalisation."""
    return float(normalize_answer(pred) == normalize_answer(_as_answers(answers)[0]))


def vqa_accuracy(pred: str, answers: str | Sequence[str]) -> float:
    """VQA soft accuracy, the official form: over the ``n`` leave-one-out subsets of the human
    answers, the mean of ``min(1, #answers in the subset equal to pred / 3)`` (normalised). With 10
    answers, ``m`` of which match, this is 0, 0.3, 0.6, 0.9, 1 for m = 0, 1, 2, 3, >= 4. A single
    answer gives :func:`exact_match`."""
    refs = [normalize_answer(a) for a in _as_answers(answers)]
    p = normalize_answer(pred)
    if len(refs) == 1:
        return float(p == refs[0])
    m = sum(r == p for r in refs)
    # leaving out a matching answer leaves m - 1 matches; leaving out another one leaves m
    return (m * min(1.0, (m - 1) / 3) + (len(refs) - m) * min(1.0, m / 3)) / len(refs)


def vqa_scores(pred: str, answer: str, answers: Sequence[str] = ()) -> dict[str, float]:
    """Both scores of one prediction for a record (``QARecord.answer``, ``QARecord.answers``; empty
    ``answers`` means ``(answer,)``)."""
    return {"exact_match": exact_match(pred, answer), "vqa_accuracy": vqa_accuracy(pred, tuple(answers) or (answer,))}
