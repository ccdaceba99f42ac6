"""lifelong-moe: continual learning and knowledge editing of frozen vision-language backbones
with mixture-of-experts adapters."""

__version__ = "0.1.0"

import warnings as _warnings

# avalanche imports qpsolvers, which warns at import time when no QP solver is installed (only GEM needs one).
_warnings.filterwarnings("ignore", message="no QP solver found")
