"""Shared mixture-of-experts modules: stacked expert pools, routers and CLIP block injection.

CL-MoE (Huai et al., CVPR 2025): LoRA experts on frozen linears with instance and task routers
(``lora_experts``), task prototypes (``prototypes``) and the dynamic momentum merge (``momentum``).
Also: MoE-Adapters (Yu et al., CVPR 2024) -- bottleneck experts, per-task noisy top-k
routers, per-sample routing on the first (or EOT) token, bit-exact expert freezing and bypass.
The base classes (``StackedExperts``, ``Router``, ``Routing``) are meant for CL-MoE's LoRA experts
and instance/task routers and LiveEdit's soft-routed low-rank experts as well. Both methods' default
settings, and the checks of a setting against the expert pool, are written once in ``settings``.
"""
from .ddas import DDAS, AutoEncoder
from .experts import BottleneckExperts, StackedExperts
from .lora_experts import LoRAExperts, LoRAMoE, LoRAMoELinear, RoutingState, inject_lora_experts
from .momentum import MergeError, expert_roles, momentum_merge
from .prototypes import TaskPrototypes
from .inject import MoEAdapter, MoEAdapters, MoEResidualAttentionBlock, inject_moe_adapters
from .routers import NoisyTopKRouter, Router, Routing, cv_squared

__all__ = [
    "BottleneckExperts", "StackedExperts", "DDAS", "AutoEncoder",
    "NoisyTopKRouter", "Router", "Routing", "cv_squared",
    "MoEAdapter", "MoEAdapters", "MoEResidualAttentionBlock", "inject_moe_adapters",
    "LoRAExperts", "LoRAMoE", "LoRAMoELinear", "RoutingState", "inject_lora_experts",
    "MergeError", "expert_roles", "momentum_merge", "TaskPrototypes",
]
