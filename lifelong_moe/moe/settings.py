"""The MoE methods' default settings, each written once, and the checks of a setting against the
expert pool, each with its one error text. The strategies' ``Params`` and this package's modules take
their defaults and checks from here.

The two methods' defaults differ because their papers' do; neither restates the other:

- MoE-Adapters (Yu et al., CVPR 2024), the reference's: 22 bottleneck experts of width 64 per block
  (output scale 0.1, dropout 0.1), each sample routed to its top 2 (noisy top-k router).
- CL-MoE (Huai et al., CVPR 2025), the release's ``--lora_r 32 --lora_alpha 64 --expert_num 4``:
  4 LoRA experts sharing the total rank 32 (scaling alpha / r), dropout 0.05 on their input,
  A ~ N(0, 0.01), dense instance routing (no top-k), instance-gate weight beta 0.5 at test time; the
  momentum merge's "previous" experts are task t-1's (``params.py``), and on a VLM the projector trains
  with the experts (the release's ``llava_arch.py`` makes ``mm_projector`` trainable after the LoRA wrap).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional


@dataclass(frozen=True)
class MoEAdaptersDefaults:
    num_experts: int = 22
    top_k: int = 2
    bottleneck: int = 64
    scale: float = 0.1
    dropout: float = 0.1


@dataclass(frozen=True)
class ClMoEDefaults:
    num_experts: int = 4
    r: int = 32  # total rank, split evenly over the experts
    alpha: float = 64.0
    dropout: float = 0.05
    init_std: float = 0.01
    top_k: Optional[int] = None  # None: dense softmax over all experts
    beta: float = 0.5
    previous_experts: str = "last_task"  # or "all_earlier" (the union of every earlier task's set)
    train_projector: bool = True  # VLM only


MOE_ADAPTERS = MoEAdaptersDefaults()
CL_MOE = ClMoEDefaults()


def check_at_most_experts(num_experts: int, counts: Mapping[str, Optional[int]], *, prefix: str = "",
                          minimum: int = 0, error: type[Exception] = ValueError) -> None:
    """Each of ``counts`` (a number of experts to route to, freeze or keep, by setting name; None: not
    set) lies in [``minimum``, ``num_experts``]; else ``error`` naming the setting as the user writes
    it (``prefix`` + name: ``strategy.`` where the run reports it, nothing where the config validator
    adds the section itself)."""
    for key, v in counts.items():
        if v is None:
            continue
        if v < minimum:
            raise error(f"{prefix}{key}={v} must be at least {minimum}")
        if v > num_experts:
            raise error(f"{prefix}{key}={v} exceeds {prefix}num_experts={num_experts}")


def check_rank_split(r: int, num_experts: int, *, prefix: str = "", error: type[Exception] = ValueError) -> None:
    """CL-MoE's total LoRA rank ``r`` splits evenly over ``num_experts`` (rank ``r / E`` each)."""
    if num_experts < 1 or r % num_experts:
        raise error(f"the total rank {prefix}r={r} must split evenly over {prefix}num_experts={num_experts}")
