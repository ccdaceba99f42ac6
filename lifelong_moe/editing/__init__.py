"""Knowledge editing of a frozen VLM: edit records, the method protocol, the edit store and the
:class:`Editor` API (EasyEdit-style). LiveEdit lives in ``strategies/liveedit.py``; the baselines
(FT, LoRA, retrieval) beside the API."""
from .types import EditMethod, EditRecord

__all__ = ["EditMethod", "EditRecord", "Editor", "EditStore", "load_records"]


def __getattr__(name: str):  # the API loads torch-heavy modules only when asked for
    if name == "Editor":
        from .editor import Editor

        return Editor
    if name == "EditStore":
        from .store import EditStore

        return EditStore
    if name == "load_records":
        from .records import load_records

        return load_records
    raise AttributeError(name)
