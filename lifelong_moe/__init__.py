"""lifelong-moe: continual learning and knowledge editing of frozen vision-language backbones
with mixture-of-experts adapters."""

__version__ = "0.1.0"
__all__ = ["run", "sweep", "load_run", "compare", "__version__"]

import warnings as _warnings

# avalanche imports qpsolvers, which warns at import time when no QP solver is installed (only GEM needs one).
_warnings.filterwarnings("ignore", message="no QP solver found")


def __getattr__(name: str):
    """The Python API (:mod:`lifelong_moe.api`), imported on first use so ``import lifelong_moe`` stays
    light."""
    if name in ("run", "sweep", "load_run", "compare"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
