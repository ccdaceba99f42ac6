"""Zero-shot CLIP: no training; every row of the accuracy matrix is the frozen model's."""
from typing import Literal

from .base import ClipStrategy, StrategyParams


class Params(StrategyParams):
    name: Literal["zeroshot"] = "zeroshot"


class Strategy(ClipStrategy):
    Params = Params
    trains = False
    cost_hint = 0.05
