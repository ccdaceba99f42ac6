"""Names a config can use: strategies (per backbone family), stream kinds, backbone families."""
from __future__ import annotations

import difflib
import importlib

from .errors import ConfigError

# strategy name -> {backbone family: module under lifelong_moe.strategies}; each module defines ``Params``
# and ``Strategy``. A name that exists for one family only is refused, with a clear error, on the other.
STRATEGIES: dict[str, dict[str, str]] = {
    "zeroshot": {"clip": "zeroshot", "vlm": "vlm_zeroshot"},
    "finetune": {"clip": "finetune"},
    "lora": {"clip": "lora", "vlm": "vlm_lora"},
    "lwf": {"clip": "lwf", "vlm": "vlm_lwf"},
    "ewc": {"clip": "ewc"},
    "replay": {"clip": "replay", "vlm": "vlm_replay"},
    "moe_adapters": {"clip": "moe_adapters"},
    "cl_moe": {"vlm": "cl_moe", "clip": "cl_moe_clip"},
}

STREAM_KINDS = ["class_incremental", "multi_domain", "vqa"]
FAMILIES = {"clip": "open_clip CLIP (classification streams)",
            "vlm": "Hugging Face LLaVA-style generative VLM (vqa streams)"}


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
