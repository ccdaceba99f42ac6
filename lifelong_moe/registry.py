"""Names a config can use: strategies, sources, streams, backbones, metrics."""
from __future__ import annotations

import difflib
import importlib

from .errors import ConfigError

# strategy name -> module under lifelong_moe.strategies; each module defines ``Params`` and ``Strategy``.
STRATEGIES = {
    "zeroshot": "zeroshot",
    "finetune": "finetune",
    "lora": "lora",
    "lwf": "lwf",
    "ewc": "ewc",
    "replay": "replay",
    "moe_adapters": "moe_adapters",
}

STREAM_KINDS = ["class_incremental", "multi_domain"]


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def strategy_module(name: str):
    if name not in STRATEGIES:
        raise ConfigError(f"strategy.name: unknown strategy {name!r}{_suggest(name, STRATEGIES)}; "
                          f"known: {', '.join(sorted(STRATEGIES))}")
    return importlib.import_module(f"lifelong_moe.strategies.{STRATEGIES[name]}")


def strategy_params_class(name: str):
    return strategy_module(name).Params


def strategy_class(name: str):
    return strategy_module(name).Strategy
