"""Sequential fine-tuning of CLIP's image tower (or both towers): the classic lower bound."""
from typing import Literal

from pydantic import Field

from .base import ClipStrategy, StrategyParams


class Params(StrategyParams):
    name: Literal["finetune"] = "finetune"
    towers: list[Literal["image", "text"]] = Field(["image"], min_length=1)


def unfreeze_towers(model, towers) -> None:
    """Make the named towers trainable; CLIP's logit scale stays frozen."""
    for n, p in model.clip.named_parameters():
        image = n.startswith("visual.")
        if (image and "image" in towers) or (not image and "text" in towers and n != "logit_scale"):
            p.requires_grad_(True)


class Strategy(ClipStrategy):
    Params = Params

    def setup(self, model) -> None:
        unfreeze_towers(model, self.params.towers)
