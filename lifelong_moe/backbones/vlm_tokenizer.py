"""Word-level tokenizer of the tiny VLM over the synthetic world's closed vocabulary.

Built in code with the ``tokenizers`` library (a ``WordLevel`` model, lower-casing, the
pre-tokenizer that splits words from punctuation marks, a ``<s> $A`` post-processor as
Llama's tokenizer adds BOS) and wrapped as a ``transformers.PreTrainedTokenizerFast`` with
pad / bos / eos / unk and the ``<image>`` token, so that ``LlavaProcessor`` and
``save_pretrained`` / ``from_pretrained`` treat it as any Hugging Face tokenizer.

Words are whole tokens and spaces are not, so an answer tokenises the same after the prompt as
on its own: teacher forcing and generation see the same answer tokens.
"""
from __future__ import annotations

import re
from typing import Iterable

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")  # ids 0..4, in this order
IMAGE_TOKEN = "<image>"
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")  # as streams.vqa_synthetic.words: words, each punctuation mark alone


def split_words(text: str) -> list[str]:
    """``text`` as the tokenizer splits it (lower-cased words; each punctuation mark on its own)."""
    return _WORD.findall(text.lower())


def world_vocabulary() -> list[str]:
    """The synthetic world's words: every word a question, answer or caption can contain
    (:func:`streams.vqa_synthetic.vocabulary`)."""
    from ..streams.vqa_synthetic import vocabulary

    return vocabulary()


def build_tokenizer(words: Iterable[str]):
    """A ``PreTrainedTokenizerFast`` over the special tokens then ``words`` (split, deduplicated,
    sorted): deterministic ids for a given word set."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab_words = sorted({w for t in words for w in split_words(t)} - set(SPECIAL_TOKENS))
    vocab = {t: i for i, t in enumerate(list(SPECIAL_TOKENS) + vocab_words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Split(Regex(r"[a-z0-9]+|[^a-z0-9]"), "isolated")])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                      special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": IMAGE_TOKEN},
                                   padding_side="right", clean_up_tokenization_spaces=False)
