"""What an edit is and what an editing method must offer.

:class:`EditRecord` carries EasyEdit's MMEdit fields (E-VQA / E-IC / VLKEB): ``src`` the edit prompt,
``alt`` the new target, ``pred`` the pre-edit answer, ``rephrase`` a paraphrased prompt (text
generality), ``image_rephrase`` another image of the same content (image generality), ``loc`` /
``loc_ans`` a text-only question and answer (text locality), ``m_loc`` / ``m_loc_q`` / ``m_loc_a`` an
unrelated image with its question and answer (image locality). Images are pixel tensors
``[3, S, S]`` already preprocessed for the VLM (``None`` where a record has none).

:class:`EditMethod` is the contract between the :class:`~lifelong_moe.editing.editor.Editor` (store,
evaluation, persistence) and a method (LiveEdit, the FT / LoRA / retrieval baselines)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch

# the MMEdit record fields, in EasyEdit's names
RECORD_FIELDS = ("src", "pred", "rephrase", "alt", "image", "image_rephrase", "loc", "loc_ans",
                 "m_loc", "m_loc_q", "m_loc_a")


@dataclass
class EditRecord:
    src: str
    alt: str
    image: torch.Tensor | None = None
    pred: str = ""
    rephrase: str = ""
    image_rephrase: torch.Tensor | None = None
    loc: str = ""
    loc_ans: str = ""
    m_loc: torch.Tensor | None = None
    m_loc_q: str = ""
    m_loc_a: str = ""
    meta: dict = field(default_factory=dict)  # provenance: image ids / paths, source file, index


@runtime_checkable
class EditMethod(Protocol):
    """A knowledge-editing method over a frozen :class:`~lifelong_moe.backbones.vlm.VisionLanguageModel`.

    The Editor calls, in order: ``attach(vlm)`` once; ``fit(train)`` once if the method learns before
    editing (LiveEdit's meta-training; baselines return ``{}``); then per edit ``make_edit(record)``,
    storing the returned CPU tensors under a new edit id, and ``set_edits(store)`` whenever the active
    store changes (add, delete, load). With an empty store the VLM's outputs must be bit-identical to
    the unedited VLM's. ``state_dict`` holds the method's own learned weights (not the edits). A method
    may also offer ``add_edits(new)``, equivalent to ``set_edits`` of the store with ``new`` appended;
    the Editor then uses it for additions, so one edit does not cost O(store)."""

    name: str
    supports_delete: bool

    def attach(self, vlm) -> None: ...

    def detach(self) -> None: ...

    def fit(self, train: Sequence[EditRecord], *, seed: int = 0,
            progress: Callable[[str], None] | None = None) -> dict: ...

    def make_edit(self, record: EditRecord) -> dict[str, torch.Tensor]: ...

    def set_edits(self, edits: Mapping[str, Mapping[str, torch.Tensor]]) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None: ...

    def config(self) -> dict: ...
