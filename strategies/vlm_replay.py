"""Experience replay (Chaudhry et al., 2019) for continual VQA: sequential LoRA on the LLM plus a
memory of ``memory_size`` training questions split evenly over the question types seen so far;
every step adds the answer loss of a replayed minibatch,

    L = CE(current batch) + weight * CE(replay batch).

The memory stores record indices, not images (small to checkpoint); the plugin is CLIP replay's own:
:meth:`VlmStrategy.loss_on` scores each replayed question against its own task's records.
"""
from typing import Literal

from pydantic import Field

from .replay import ReplayPlugin
from .vlm_base import VlmStrategy
from .vlm_lora import Params as LoraParams
from .vlm_lora import inject_lora


class Params(LoraParams):
    name: Literal["replay"] = "replay"
    memory_size: int = Field(200, gt=0)
    replay_batch_size: int | None = Field(None, gt=0)  # default: the training batch size
    weight: float = Field(1.0, ge=0)


class Strategy(VlmStrategy):
    Params = Params
    cost_hint = 1.5  # current and replayed mini-batches

    def setup(self, model) -> None:
        inject_lora(model, self.params)

    def make_plugins(self):
        return [ReplayPlugin(self.params)]
