"""Knowledge editing of a frozen VLM: edit records, the method protocol, the edit store and the
:class:`Editor` API (EasyEdit-style). LiveEdit lives in ``strategies/liveedit.py``; the baselines
(FT, LoRA, retrieval) beside the API."""
from .types import EditMethod, EditRecord

__all__ = ["EditMethod", "EditRecord"]
