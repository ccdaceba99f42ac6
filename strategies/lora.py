"""LoRA (Hu et al., 2022) on both CLIP towers through peft, trained sequentially.

``W x + (alpha / r) B A x`` with ``B = 0`` at start, injected by module-name targeting
(``peft.inject_adapter_in_model``). Default targets: the MLP's ``c_fc`` and ``c_proj`` of every
block of both towers.

Attention: LoRA on ``attn.out_proj`` of open_clip's ``nn.MultiheadAttention`` is a silent no-op
(the module's forward reads the weight directly), so the attention target is the whole ``attn``
module, which peft wraps as a unit. peft implements that by merging the LoRA delta into the frozen
``in_proj_weight`` for each forward and subtracting it afterwards, which leaves the frozen weight
off by float round-off; ``attn`` is therefore opt-in (``targets: [c_fc, c_proj, attn]``), and only
the default keeps the backbone bit-identical.
"""
from typing import Literal

from pydantic import Field

from .base import ClipStrategy, StrategyParams

TOWER_PREFIX = {"image": r"visual\.transformer", "text": r"transformer"}


class Params(StrategyParams):
    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0)  # peft: a positive rank
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)  # torch.nn.Dropout: a probability (1 would drop everything)
    towers: list[Literal["image", "text"]] = Field(["image", "text"], min_length=1)
    targets: list[Literal["c_fc", "c_proj", "attn"]] = Field(["c_fc", "c_proj"], min_length=1)


def target_regex(towers, targets) -> str:
    mods = "|".join(("mlp." + t) if t != "attn" else "attn" for t in targets).replace(".", r"\.")
    return rf"^({'|'.join(TOWER_PREFIX[t] for t in towers)})\.resblocks\.\d+\.({mods})$"


class Strategy(ClipStrategy):
    Params = Params

    def setup(self, model) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        p = self.params
        cfg = LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout,
                         target_modules=target_regex(p.towers, p.targets))
        inject_adapter_in_model(cfg, model.clip)
        for n, param in model.clip.named_parameters():
            param.requires_grad_("lora_" in n)
        model.clear_text_cache()
