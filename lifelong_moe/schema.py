"""The base of every config section: unknown keys are errors with a close-match suggestion, and the
small validated types sections share (prompt templates, positive ints)."""
from __future__ import annotations

import difflib
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError


class Strict(BaseModel):
    """A config section: unknown keys are errors, with a close-match suggestion."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields)
            unknown = [k for k in data if k not in known]
            if unknown:
                parts = []
                for key in unknown:
                    close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.4)
                    parts.append(f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
                raise PydanticCustomError(
                    "unknown_key", "{msg}; known keys: {known}",
                    {"msg": "; ".join(parts), "known": ", ".join(sorted(known))})
        return data


def _check_template(t: str) -> str:
    """A prompt template: ``str.format`` with one class name fills exactly one ``{}``."""
    try:
        filled = t.format("\0")
    except (IndexError, KeyError, ValueError) as e:
        raise ValueError(f"template {t!r} is not a format string with one '{{}}' for the class name ({e})") from None
    if filled.count("\0") != 1:
        raise ValueError(f"template {t!r} must hold exactly one '{{}}' (where the class name goes)")
    return t


Template = Annotated[str, AfterValidator(_check_template)]
PositiveInt = Annotated[int, Field(gt=0)]
