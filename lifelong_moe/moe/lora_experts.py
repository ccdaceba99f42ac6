"""LoRA experts with instance and task routing on frozen ``nn.Linear`` layers (CL-MoE, Huai et al.,
CVPR 2025, Sec. 4.1 "Dual-Router MoE"), injected by module name as peft users write ``target_modules``.

Each targeted linear keeps its identity, name and weights (its class is switched to
:class:`LoRAMoELinear`, which adds the submodules ``experts`` and ``router``; the backbone's state-dict
keys are unchanged) and computes

    y = W0 x + (alpha / r) * sum_i g_i(x) B_i A_i Drop(x),
    g(x) = beta * G^I(x) + (1 - beta) * G^T(t)        (CL-MoE's RMoE mixture)

with ``E`` experts of rank ``r / E`` each (the total rank ``r`` split evenly, scaling from the total
``r``: the release's ``clitmoelora.py``), G^I the instance router (one bias-free linear per layer,
token-wise softmax, dense or top-k) and G^T(t) the task router's expert distribution of a task
``t`` (per sample; set through the shared :class:`RoutingState`). Samples with no task (``t = -1``)
use the instance router alone.

Dense dispatch runs as one LoRA of rank ``r``: the stacked ``A`` [E, r_e, in] and ``B`` [E, r_e, out]
flatten without a copy to [r, in] / [r, out] and the gates scale the rank-``r`` activations, so the
mixture costs two GEMMs plus the router's tiny one. Expert freezing is bit-exact (StackedExperts).
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .experts import StackedExperts
from .settings import CL_MOE, check_at_most_experts, check_rank_split


class LoRAExperts(StackedExperts):
    """``E`` LoRA experts ``E_i(x) = B_i A_i x`` of rank ``rank`` (per expert) on one linear.

    Storage: ``A`` [E, rank, in] (peft's ``lora_A.weight`` layout per expert), ``B`` [E, rank, out]
    (``lora_B.weight`` transposed). Init as the release: ``A ~ N(0, init_std)``, ``B = 0`` (every
    expert starts as an exact no-op)."""

    def __init__(self, in_features: int, out_features: int, num_experts: int, rank: int,
                 init_std: float = CL_MOE.init_std):
        self.in_features, self.out_features, self.rank, self.init_std = in_features, out_features, rank, init_std
        super().__init__(num_experts, {"A": (rank, in_features), "B": (rank, out_features)})

    def reset_expert(self, i: int) -> None:
        nn.init.normal_(self.A.data[i], mean=0.0, std=self.init_std)
        self.B.data[i].zero_()

    def down_weight(self) -> torch.Tensor:
        """Every expert's ``A`` stacked as one [E * rank, in] matrix (a view, no copy)."""
        return self.effective("A").reshape(self.num_experts * self.rank, self.in_features)

    def up(self, z: torch.Tensor, gates: torch.Tensor, out: torch.Tensor | None = None,
           alpha: float = 1.0) -> torch.Tensor:
        """``z`` = x A^T [..., E*rank], ``gates`` [..., E] -> ``alpha sum_i gates_i B_i z_i`` [..., out];
        added IN PLACE into ``out`` when given (a fresh tensor autograd does not need)."""
        E, r = self.num_experts, self.rank
        b = self.effective("B").reshape(E * r, self.out_features)
        z = (z.unflatten(-1, (E, r)) * gates.unsqueeze(-1).to(z.dtype)).flatten(-2)
        if out is None:
            b = b.to(z.dtype)
            return alpha * (z @ b) if alpha != 1.0 else z @ b
        # in place, autocast does not cast: under bf16/fp16 autocast ``out`` (the frozen layer's output) is
        # half precision while the experts' weights stay fp32, so the update is computed in out's dtype
        out.view(-1, self.out_features).addmm_(z.reshape(-1, E * r).to(out.dtype), b.to(out.dtype), alpha=alpha)
        return out

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """``x`` [..., in] (already dropped out), ``gates`` [..., E] (scaling folded in) ->
        ``sum_i gates_i B_i A_i x`` [..., out], as one rank ``E * rank`` LoRA."""
        return self.up(F.linear(x, self.down_weight()), gates)

    def expert_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``i`` alone, unscaled (reference path for tests)."""
        p = self.expert_parameters(i)
        return x @ p["A"].t() @ p["B"]


class RoutingState:
    """What every adapted layer of one model shares at run time.

    ``active``: False bypasses all experts (the exact frozen backbone). ``task_ids`` [B] (or None):
    per-sample task index into each layer's ``task_gates`` (-1: instance router alone); ``beta``:
    weight of the instance gate where a task is set. ``record``: layers count the top-``record_k``
    instance selections per expert over the tokens ``token_mask`` [B, L] marks (None: all).
    Setting ``task_ids`` or ``beta`` bumps ``version``: layers rebuild their cached mixing terms
    once, not at every decoding step."""

    def __init__(self, beta: float = CL_MOE.beta):
        self.active = True
        self._beta, self._task_ids, self.version = beta, None, 0
        self.record = False
        self.record_k = 2
        self.token_mask: torch.Tensor | None = None

    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._beta, self.version = float(value), self.version + 1

    @property
    def task_ids(self) -> torch.Tensor | None:
        return self._task_ids

    @task_ids.setter
    def task_ids(self, ids: torch.Tensor | None) -> None:
        self._task_ids, self.version = ids, self.version + 1

    def mix_weights(self, device) -> torch.Tensor | None:
        """Per-sample instance weight [B] (beta with a task, 1 without); None: no task mixing."""
        if self._task_ids is None or self._beta >= 1.0:
            return None
        ids = self._task_ids.to(device)
        return torch.where(ids >= 0, self._beta, 1.0).float()


class LoRAMoELinear(nn.Linear):
    """A frozen ``nn.Linear`` with CL-MoE's LoRA-expert branch (see the module docstring).

    Buffers: ``task_gates`` [T, E] (the task router's distribution per task, filled by the
    statistics pass), ``usage`` [E] (top-k selection counts while ``state.record``)."""

    experts: LoRAExperts
    router: nn.Linear
    state: RoutingState

    def _setup(self, num_experts: int, rank: int, scaling: float, dropout: float, top_k: int | None,
               init_std: float, state: RoutingState) -> None:
        ref = self.weight
        self.experts = LoRAExperts(self.in_features, self.out_features, num_experts, rank, init_std).to(ref.device)
        self.router = nn.Linear(self.in_features, num_experts, bias=False, device=ref.device)
        self.drop = nn.Dropout(dropout)
        self.scaling, self.top_k, self.state = scaling, top_k, state
        self.register_buffer("task_gates", torch.zeros(0, num_experts, device=ref.device))
        self.register_buffer("usage", torch.zeros(num_experts, dtype=torch.long, device=ref.device))
        # experts and router stay fp32 (trainable state) whatever the frozen layer's dtype: forward casts
        # them to the activations' dtype, as autocast would (a no-op on an fp32 backbone)

    def instance_gates(self, x: torch.Tensor) -> torch.Tensor:
        """G^I(x): token-wise softmax over the experts; with ``top_k`` the softmax over the k largest
        logits (0 elsewhere)."""
        return self._gates(self.router(x))

    def _gates(self, logits: torch.Tensor) -> torch.Tensor:
        if self.top_k is None or self.top_k >= logits.shape[-1]:
            return logits.softmax(-1)
        v, i = logits.topk(self.top_k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, i, v.softmax(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        st = self.state
        if not st.active:
            return y
        a = self.experts.down_weight()
        if self.training and self.drop.p > 0:
            logits, z = F.linear(x, self.router.weight.to(x.dtype)), F.linear(self.drop(x), a.to(x.dtype))
        else:  # no dropout: the router and every expert's A read x in one GEMM
            z, logits = F.linear(x, torch.cat([a, self.router.weight]).to(x.dtype)).split(
                [a.shape[0], self.router.out_features], -1)
        g = self._gates(logits)
        if st.record:
            self._record(g)
        mix = self._mixing(st, g) if st.task_ids is not None and self.task_gates.shape[0] else None
        if mix is not None:  # w G^I + (1 - w) G^T(t) in one fused op over the tokens
            g = torch.addcmul(mix[1], g, mix[0])
        return self.experts.up(z, g, out=y, alpha=self.scaling)

    def _mixing(self, st: RoutingState, g: torch.Tensor):
        """``(w, (1 - w) G^T(t))`` shaped to broadcast over ``g`` [B, ..., E], or over tokens flattened
        batch-major ``[B * L, E]`` (OPT's MLP) (cached per state version and leading size)."""
        key = (st.version, g.dim(), g.shape[0], g.dtype, g.device)
        if getattr(self, "_mix_key", None) != key:
            w = st.mix_weights(g.device)
            if w is None:
                self._mix = None
            else:
                if g.dim() < 2 or g.shape[0] % w.shape[0]:
                    raise ValueError(f"{w.shape[0]} per-sample task ids for an input of batch {g.shape[0]} "
                                     "(task mixing needs batch-first inputs)")
                ids = st.task_ids.to(g.device)
                if g.shape[0] != w.shape[0]:  # flattened tokens: each sample's rows are contiguous
                    per = g.shape[0] // w.shape[0]
                    w, ids = w.repeat_interleave(per), ids.repeat_interleave(per)
                shape = (w.shape[0],) + (1,) * (g.dim() - 2)
                gt = self.task_gates[ids.clamp(min=0)]
                self._mix = (w.to(g.dtype).view(*shape, 1), ((1 - w)[:, None] * gt).to(g.dtype).view(*shape, -1))
            self._mix_key = key
        return self._mix

    @torch.no_grad()
    def _record(self, g: torch.Tensor) -> None:
        k = min(self.state.record_k, g.shape[-1])
        idx = g.sort(dim=-1, descending=True, stable=True).indices[..., :k]  # [..., k]; ties: lower id
        mask = self.state.token_mask
        if mask is not None and mask.shape == idx.shape[:-1]:
            idx = idx[mask.to(idx.device)]
        elif mask is not None and idx.dim() == 2 and mask.numel() == idx.shape[0]:  # flattened [B * L] tokens
            idx = idx[mask.reshape(-1).to(idx.device)]
        self.usage += torch.bincount(idx.reshape(-1), minlength=self.usage.shape[0])

    def add_task_gate(self, gate: torch.Tensor) -> int:
        """Append one task's distribution [E]; returns its index."""
        self.task_gates = torch.cat([self.task_gates, gate.to(self.task_gates)[None]])
        self._mix_key = None
        return self.task_gates.shape[0] - 1

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        g = state_dict.get(prefix + "task_gates")
        if g is not None and g.shape != self.task_gates.shape:
            self.task_gates = torch.zeros_like(g, device=self.task_gates.device)
        self._mix_key = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def matches(name: str, targets: str | Sequence[str]) -> bool:
    """peft's ``target_modules`` rule: a string is a regex matched against the full name; a list
    names modules by their last name components (``"q_proj"`` matches ``....q_proj``)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


class LoRAMoE:
    """Handle over the adapted layers of one model (by qualified name) and their shared state.
    Rebuild it at any time with ``LoRAMoE(model)``: all tensors live in the model."""

    def __init__(self, model: nn.Module, state: RoutingState | None = None):
        self.model = model
        self.layers: dict[str, LoRAMoELinear] = {n: m for n, m in model.named_modules() if isinstance(m, LoRAMoELinear)}
        if state is None:
            state = next(iter(self.layers.values())).state if self.layers else RoutingState()
        self.state = state

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def num_experts(self) -> int:
        return next(iter(self.layers.values())).experts.num_experts

    @property
    def num_tasks(self) -> int:
        return next(iter(self.layers.values())).task_gates.shape[0]

    def parameters(self) -> list[nn.Parameter]:
        """Trainable tensors: experts (stacked A, B) and instance routers."""
        return [p for m in self.layers.values() for p in (*m.experts.parameters(), *m.router.parameters())
                if p.requires_grad]

    def expert_pools(self) -> dict[str, LoRAExperts]:
        return {n: m.experts for n, m in self.layers.items()}

    def reset_usage(self) -> None:
        for m in self.layers.values():
            m.usage.zero_()

    def usage(self) -> dict[str, torch.Tensor]:
        return {n: m.usage.clone() for n, m in self.layers.items()}

    def remove(self) -> None:
        """Undo the injection: plain ``nn.Linear`` modules again (the expert weights are dropped)."""
        for m in self.layers.values():
            for attr in ("experts", "router", "drop"):
                delattr(m, attr)
            for attr in ("task_gates", "usage"):
                delattr(m, attr)
            del m.state, m.scaling, m.top_k
            m.__class__ = nn.Linear
        self.layers = {}


def inject_lora_experts(model: nn.Module, targets: str | Sequence[str], *, num_experts: int = CL_MOE.num_experts,
                        r: int = CL_MOE.r, alpha: float = CL_MOE.alpha, dropout: float = CL_MOE.dropout,
                        top_k: int | None = CL_MOE.top_k, init_std: float = CL_MOE.init_std,
                        beta: float = CL_MOE.beta, exclude: Iterable[str] = ()) -> LoRAMoE:
    """Add CL-MoE LoRA experts to every ``nn.Linear`` of ``model`` whose name ``matches`` ``targets``
    and contains none of ``exclude`` (release: q,k,v,o,gate,up,down of every LLM layer; never the
    projector, vision tower or lm_head). ``r`` is the total rank, split evenly (``r % num_experts ==
    0``); scaling ``alpha / r``. Only the experts and routers are trainable afterwards."""
    check_rank_split(r, num_experts)
    check_at_most_experts(num_experts, {"top_k": top_k}, minimum=1)
    exclude = tuple(exclude)
    state = RoutingState(beta)
    found = [(n, m) for n, m in model.named_modules()
             if type(m) is nn.Linear and matches(n, targets) and not any(e in n for e in exclude)]
    if not found:
        raise ValueError(f"no nn.Linear module matches target_modules {targets!r}")
    for _, m in found:
        m.__class__ = LoRAMoELinear
        m._setup(num_experts, r // num_experts, alpha / r, dropout, top_k, init_std, state)
        m.weight.requires_grad_(False)
        if m.bias is not None:
            m.bias.requires_grad_(False)
    return LoRAMoE(model, state)


def task_gate(counts: torch.Tensor, keep: int) -> torch.Tensor:
    """G^T(t) from one layer's top-k selection counts over task t's training data: the ``keep`` most
    selected experts (ties: lower id), their frequencies normalised to sum 1, 0 elsewhere (the
    release's ``statistic.py`` index list, per layer; ``keep < E`` or it is degenerate)."""
    counts = counts.double()
    order = torch.sort(counts, descending=True, stable=True).indices[:keep]
    gate = torch.zeros_like(counts)
    gate[order] = counts[order]
    total = gate.sum()
    if total <= 0:  # nothing recorded: uniform over the kept experts
        gate[order] = 1.0
        total = gate.sum()
    return (gate / total).float()


def top_set(counts: torch.Tensor, keep: int) -> set[int]:
    """The experts a task "uses" in one layer: its ``keep`` most selected (ties: lower id), seen at least once."""
    order = torch.sort(counts, descending=True, stable=True).indices[:keep]
    return {int(i) for i in order if counts[i] > 0}


__all__ = ["LoRAExperts", "LoRAMoELinear", "LoRAMoE", "RoutingState", "inject_lora_experts", "matches",
           "task_gate", "top_set"]
