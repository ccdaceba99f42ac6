"""Zero-shot VLM: no training; every row of the matrix is the frozen model's answers."""
from typing import Literal

from .vlm_base import StrategyParams, VlmStrategy


class Params(StrategyParams):
    name: Literal["zeroshot"] = "zeroshot"


class Strategy(VlmStrategy):
    Params = Params
    trains = False
    cost_hint = 0.1
