"""LoRA (Hu et al., 2022) on the frozen VLM's language model through peft, trained sequentially on
the question types: the classic lower bound of continual VQA (every type overwrites the same adapter).

``W x + (alpha / r) B A x`` with ``B = 0`` at start, injected by module-name targeting
(``peft.inject_adapter_in_model``) into the LLM's linears named in ``targets`` (LLaVA / CL-MoE's
choice: the attention and MLP projections of every decoder layer; never the vision tower or lm_head).
``projector`` adds LoRA on the vision-language projector's linears too (LLaVA's own LoRA recipe
trains the projector alongside the LLM; here it stays frozen and gets a low-rank update instead). peft's Linear adds the low-rank path beside the frozen weight, which it never
modifies: the backbone stays bit-identical.
"""
from typing import Literal

from pydantic import Field

from .vlm_base import StrategyParams, VlmStrategy

LLM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Params(StrategyParams):
    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    targets: list[Literal[LLM_LINEARS + ("projector",)]] = Field(default_factory=lambda: list(LLM_LINEARS),
                                                                 min_length=1)


def inject_lora(model, p: Params) -> None:
    """peft LoRA on ``model``'s LLM linears named by ``p.targets``; only LoRA weights train."""
    from peft import LoraConfig, inject_adapter_in_model

    llm = tuple(t for t in p.targets if t != "projector")
    regexes = [model.lora_target_regex(llm)] if llm else []
    regexes += [model.projector_target_regex()] if "projector" in p.targets else []
    cfg = LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout,
                     target_modules="|".join(f"(?:{r})" for r in regexes))
    inject_adapter_in_model(cfg, model.model)
    for n, param in model.named_parameters():
        param.requires_grad_("lora_" in n)


class Strategy(VlmStrategy):
    Params = Params

    def setup(self, model) -> None:
        inject_lora(model, self.params)
