"""Frozen hooked-block states for LiveEdit's meta-training (``cache_train_states``).

The backbone is frozen, so each train record's hidden states at the hooked block (and the pre-edit
log-probabilities of its image-locality input) are the same at every step: they are computed once,
trimmed to each row's length, and every training batch is padded back together from them, with the
decoder blocks' call arguments (causal mask, positions, rotary embeddings) rebuilt for the new
padding. Same losses as a fresh pass (``tests/test_liveedit.py``); about 4x faster on the tiny VLM.

Only what the losses read is kept. The pre-edit log-probabilities enter the locality KL at the answer
positions only, so they are kept there alone (``pre_loc_at`` [A, V] at ``pre_loc_pos``), not at every
position (at LLaVA-1.5 sizes 620 positions x 32k vocabulary, 79 MB per record, against A x 128 KiB).
Per record the cache holds (:func:`bytes_per_record`)::

    4 inputs x tokens x d x (hidden dtype bytes)     hooked-block states
  + 4 inputs x tokens x (3 masks x 1 + labels x 8)   spans and labels
  + A answer tokens of the locality input x V x 4    pre-edit log-probabilities"""
from __future__ import annotations

import torch

from ..backbones.vlm import IGNORE

ROW_KEYS = ("hidden", "image", "prompt", "answer", "labels")


class _Stop(Exception):
    """Ends the language model's pass at its first decoder block."""


def slice_block_kwargs(kwargs: dict, rows: slice) -> dict:
    """The block kwargs of some rows: batch-first tensors (the attention mask) are cut, shared ones
    (rotary embeddings of broadcast positions) kept."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.ndim == 4 and k == "attention_mask":
            v = v[rows]
        elif isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            v = tuple(t[rows] if t.shape[0] > 1 else t for t in v)
        out[k] = v
    return out


def trim(frozen: dict, kinds: int = 4) -> list[list[dict]]:
    """Per record, per input kind (rows ``kind * b + j``), the frozen pass's row cut to its length
    (right padding); the last kind also keeps its pre-edit log-probabilities at the positions the
    locality KL reads (those predicting an answer token: ``pre_loc_pos``, ``pre_loc_at``)."""
    b = frozen["hidden"].shape[0] // kinds
    records = []
    for j in range(b):
        rows = []
        for k in range(kinds):
            row = k * b + j
            n = int(frozen["attention"][row].sum())
            item = {key: frozen[key][row, :n].clone() for key in ROW_KEYS}
            if k == kinds - 1:
                pos = (item["labels"][1:] != IGNORE).nonzero().flatten()
                item["pre_loc_pos"], item["pre_loc_at"] = pos, frozen["pre_loc"][j, pos].clone()
            rows.append(item)
        records.append(rows)
    return records


def pad(cache: list[list[dict]], pick, device, block_kwargs) -> dict:
    """A training batch from cached rows of records ``pick`` (rows grouped by kind, right padded):
    what a fresh frozen pass returns, with ``block_kwargs(hidden, attention)`` for the new shape."""
    kinds = len(cache[0])
    rows = [cache[i][k] for k in range(kinds) for i in pick]
    length = max(len(r["labels"]) for r in rows)

    def stack(key, fill):
        out = torch.full((len(rows), length, *rows[0][key].shape[1:]), fill, dtype=rows[0][key].dtype, device=device)
        for i, r in enumerate(rows):
            out[i, :len(r[key])] = r[key]
        return out

    attention = torch.zeros(len(rows), length, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        attention[i, :len(r["labels"])] = 1
    last = rows[(kinds - 1) * len(pick):]
    # zeros where the KL does not read (it is masked to the answer positions there)
    pre_loc = torch.zeros(len(pick), length, last[0]["pre_loc_at"].shape[-1], device=device)
    for i, r in enumerate(last):
        pre_loc[i, r["pre_loc_pos"].to(device)] = r["pre_loc_at"].to(device)
    hidden = stack("hidden", 0.0)
    return {"hidden": hidden, "kwargs": block_kwargs(hidden, attention), "image": stack("image", False),
            "prompt": stack("prompt", False), "answer": stack("answer", False), "labels": stack("labels", IGNORE),
            "attention": attention, "pre_loc": pre_loc}


def bytes_per_record(record: list[dict]) -> int:
    """What one cached record holds, in bytes (the formula in the module docstring, counted)."""
    return sum(t.numel() * t.element_size() for row in record for t in row.values())


@torch.no_grad()
def decoder_block_kwargs(vlm, layer: int, hidden: torch.Tensor, attention: torch.Tensor) -> dict:
    """The kwargs the language model gives its decoder blocks for inputs of this shape and padding
    (causal mask, positions, rotary embeddings): it is run on zeros and stopped at its first block.
    Empty when ``layer`` is the last block (only the final norm follows it)."""
    if layer == len(vlm.decoder_layers) - 1:
        return {}
    captured = {}

    def grab(module, args, kwargs):
        captured.update(kwargs)
        raise _Stop

    handle = vlm.decoder_layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        vlm.language_model(inputs_embeds=torch.zeros_like(hidden), attention_mask=attention, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured
