"""Editing methods by name. Each entry names a module (or ``module:attribute``) exposing ``Params``
(pydantic) and ``Method`` (``Method(params)`` implements :class:`~.types.EditMethod`)."""
from __future__ import annotations

import difflib
import importlib

from pydantic import BaseModel, ValidationError

from ..config import format_validation_error
from ..errors import ConfigError

EDIT_METHODS = {
    "liveedit": "lifelong_moe.strategies.liveedit",
    "ft": "lifelong_moe.editing.baselines:FT",
    "lora": "lifelong_moe.editing.baselines:LORA",
    "retrieval": "lifelong_moe.editing.baselines:RETRIEVAL",
}


def method_module(name: str):
    """The module/namespace of method ``name``; ConfigError naming it (with suggestions) if unknown
    or not installed."""
    target = EDIT_METHODS.get(name)
    if target is None:
        close = difflib.get_close_matches(str(name), sorted(EDIT_METHODS), n=1, cutoff=0.5)
        raise ConfigError(f"method.name: unknown editing method {name!r}" + (f" (did you mean {close[0]!r}?)" if close
                          else "") + f"; known: {', '.join(sorted(EDIT_METHODS))}")
    module, _, attr = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise ConfigError(f"method.name: {name!r} is not available in this installation ({module} is missing)") \
                from None
        raise
    return getattr(mod, attr) if attr else mod


def build_method(name: str, params=None):
    """``Method(params)`` of ``name``; ``params``: a Params instance, a dict of its fields or None."""
    mod = method_module(name)
    if params is None or isinstance(params, dict):
        params = validate_method(name, dict(params or {}))
    return mod.Method(params)


def validate_method(name: str, params: dict) -> BaseModel:
    """The method's ``Params`` validated from ``params``; ConfigError naming ``method.<key>``."""
    cls = method_module(name).Params
    try:
        return cls.model_validate({k: v for k, v in params.items() if k != "name"} |
                                  ({"name": name} if "name" in cls.model_fields else {}))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, prefix="method")) from None
