"""Words a closed-vocabulary tokenizer cannot spell.

The tiny VLM's tokenizer (:mod:`.vlm_tokenizer`) is word-level over the synthetic world's words: any
other word becomes ``<unk>``, so an answer holding one can be neither learned nor generated. Real
tokenizers (BPE, SentencePiece) spell any text: :func:`closed_vocabulary` is None for them and
nothing is checked. Detection reads the tokenizer, not the model's name: a ``tokenizers`` ``WordLevel``
model is closed.
"""
from __future__ import annotations

from typing import Any

_CACHE = "_lmoe_closed_vocabulary"


def closed_vocabulary(tokenizer: Any) -> frozenset[str] | None:
    """The word list of a word-level tokenizer, or None for an open one (or no tokenizer)."""
    cached = getattr(tokenizer, _CACHE, False)
    if cached is not False:
        return cached
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = None
    if backend is not None and type(getattr(backend, "model", None)).__name__ == "WordLevel":
        vocab = frozenset(backend.get_vocab())
    try:
        setattr(tokenizer, _CACHE, vocab)
    except AttributeError:  # None, or an object without a __dict__
        pass
    return vocab


def unknown_words(tokenizer: Any, text: str) -> list[str]:
    """The words of ``text``, split as the tokenizer splits them, that its closed vocabulary lacks
    (each once, in order); ``[]`` for an open tokenizer."""
    vocab = closed_vocabulary(tokenizer)
    if vocab is None:
        return []
    backend = tokenizer.backend_tokenizer
    norm = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
    pieces = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(norm)] if backend.pre_tokenizer is not None \
        else norm.split()
    return list(dict.fromkeys(w for w in pieces if w not in vocab))
