"""Names a config can use: strategies (per backbone family) and stream kinds."""
from __future__ import annotations

import difflib
import importlib

from .errors import ConfigError
from .families import FAMILIES

# strategy name -> {backbone family: module under lifelong_moe.strategies}, from each family's declaration
# (lifelong_moe.families); each module defines ``Params`` and ``Strategy``. A name that exists for one
# family only is refused, with a clear error, on the other.
STRATEGIES: dict[str, dict[str, str]] = {}
for _family in FAMILIES.values():
    for _name, _module in _family.strategies.items():
        STRATEGIES.setdefault(_name, {})[_family.name] = _module

# stream kind -> what its experiences ask; a backbone family answers one task kind
TASK_KINDS = {"class_incremental": "classification", "multi_domain": "classification", "vqa": "vqa"}
STREAM_KINDS = list(TASK_KINDS)


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def strategy_modules() -> list[str]:
    """Every strategy module, each once (for preloading in worker processes)."""
    return sorted({m for per_family in STRATEGIES.values() for m in per_family.values()})


def strategy_module(name: str, family: str = "clip"):
    if name not in STRATEGIES:
        raise ConfigError(f"strategy.name: unknown strategy {name!r}{_suggest(name, STRATEGIES)}; "
                          f"known: {', '.join(sorted(STRATEGIES))}")
    per_family = STRATEGIES[name]
    if family not in per_family:
        raise ConfigError(f"strategy {name!r} works on backbone family {' / '.join(map(repr, per_family))}, "
                          f"not on backbone.family {family!r}; strategies for {family!r}: "
                          f"{', '.join(sorted(n for n, f in STRATEGIES.items() if family in f))}")
    return importlib.import_module(f"lifelong_moe.strategies.{per_family[family]}")


def strategy_params_class(name: str, family: str = "clip"):
    return strategy_module(name, family).Params


def strategy_class(name: str, family: str = "clip"):
    return strategy_module(name, family).Strategy
