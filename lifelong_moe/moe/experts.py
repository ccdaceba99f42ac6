"""Expert pools with stacked storage, grouped (gathered-bmm) dispatch and bit-exact freezing.

Every pool stores each kind of expert tensor stacked along dim 0 (``[E, ...]``, one Parameter per
kind), so a batch runs only the experts it selected, with a fixed number of batched matmuls and no
Python loop over experts or host synchronisation.

Freezing (bit-exact, design choice): each stacked Parameter ``<name>`` has a twin buffer
``frozen_<name>`` and the pool a bool buffer ``frozen_mask`` [E]. ``freeze(ids)`` copies those rows
into the buffers; the forward then reads ``where(frozen_mask, frozen_<name>, <name>)``. A buffer is
never an optimiser parameter, so weight decay, Adam moments from earlier steps or a later
``requires_grad_(True)`` on the model cannot change a frozen expert by a single bit. The
Parameter's rows of frozen experts become inert shadows: they get a zero gradient, an optimiser may
still drift them, and ``state_dict`` writes the effective values in their place. Frozen experts
remain selectable. ``grow`` and ``add`` replace the Parameters: rebuild the optimiser afterwards.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.device import autocast_active
from .settings import MOE_ADAPTERS


class StackedExperts(nn.Module):
    """Base class: ``E`` experts whose tensors are stacked along dim 0, with per-expert freezing.

    Subclasses pass ``{name: per-expert shape}``, implement ``reset_expert(i)`` (in-place init of
    row ``i``) and ``forward(h, indices, weights)``, which returns ``sum_j weights[b, j] *
    E_{indices[b, j]}(h[b])``. ``indices=None`` means dense routing over all experts (soft routers,
    e.g. CL-MoE's instance router or LiveEdit's soft weights).
    """

    def __init__(self, num_experts: int, shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.num_experts = num_experts
        self._shapes = {k: tuple(v) for k, v in shapes.items()}
        for name, tail in self._shapes.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(num_experts, *tail)))
            self.register_buffer("frozen_" + name, torch.zeros(num_experts, *tail))
        self.register_buffer("frozen_mask", torch.zeros(num_experts, dtype=torch.bool))
        self._any_frozen = False
        with torch.no_grad():
            for i in range(num_experts):
                self.reset_expert(i)

    def reset_expert(self, i: int) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ storage
    def effective(self, name: str) -> torch.Tensor:
        """The stacked tensor the forward uses: frozen rows from the buffer, the rest trainable."""
        p = getattr(self, name)
        if not self._any_frozen:
            return p
        mask = self.frozen_mask.view(-1, *([1] * (p.dim() - 1)))
        return torch.where(mask, getattr(self, "frozen_" + name), p)

    def expert_parameters(self, i: int) -> dict[str, torch.Tensor]:
        """Expert ``i``'s current (effective) tensors, detached views keyed by stacked name."""
        frozen = bool(self.frozen_mask[i])
        return {n: (getattr(self, "frozen_" + n) if frozen else getattr(self, n))[i].detach()
                for n in self._shapes}

    @torch.no_grad()
    def freeze(self, ids) -> None:
        """Freeze experts ``ids`` bit-exactly (they stay selectable)."""
        for i in sorted({int(i) for i in ids}):
            if not 0 <= i < self.num_experts:
                raise IndexError(f"expert {i} out of range [0, {self.num_experts})")
            if not self.frozen_mask[i]:
                for n in self._shapes:
                    getattr(self, "frozen_" + n)[i].copy_(getattr(self, n)[i])
                self.frozen_mask[i] = True
        self._any_frozen = bool(self.frozen_mask.any())

    @torch.no_grad()
    def unfreeze(self, ids) -> None:
        """Make experts trainable again from their frozen values (their optimiser state is stale)."""
        for i in {int(i) for i in ids}:
            if self.frozen_mask[i]:
                for n in self._shapes:
                    getattr(self, n)[i].copy_(getattr(self, "frozen_" + n)[i])
                self.frozen_mask[i] = False
        self._any_frozen = bool(self.frozen_mask.any())

    def frozen_ids(self) -> list[int]:
        return self.frozen_mask.nonzero().flatten().tolist()

    @torch.no_grad()
    def grow(self, n: int) -> None:
        """Append ``n`` freshly initialised (no-op) experts. Rebuild the optimiser afterwards."""
        old = self.num_experts
        for name, tail in self._shapes.items():
            p, buf = getattr(self, name), getattr(self, "frozen_" + name)
            new = p.new_zeros(n, *tail)
            setattr(self, name, nn.Parameter(torch.cat([p.detach(), new]), requires_grad=p.requires_grad))
            setattr(self, "frozen_" + name, torch.cat([buf, new]))
        self.frozen_mask = torch.cat([self.frozen_mask, self.frozen_mask.new_zeros(n)])
        self.num_experts = old + n
        for i in range(old, old + n):
            self.reset_expert(i)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._any_frozen:  # save the effective values, not the inert shadows
            for n in self._shapes:
                t = self.effective(n)
                destination[prefix + n] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        mask = state_dict.get(prefix + "frozen_mask")
        if mask is not None and mask.shape[0] > self.num_experts:
            self.grow(mask.shape[0] - self.num_experts)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._any_frozen = bool(self.frozen_mask.any())


class BottleneckExperts(StackedExperts):
    """MoE-Adapters experts (Sec. 3, expert = adapter): ``E_i(h) = s * (W_up^i Drop(ReLU(W_down^i h
    + b_down^i)) + b_up^i)``, D -> r -> D, with W_down kaiming_uniform(a=sqrt(5)) and W_up, b_down,
    b_up zero, so every expert starts as an exact no-op.

    Storage: ``down_weight`` [E, r, D] (W_down, nn.Linear layout), ``down_bias`` [E, r],
    ``up_weight`` [E, r, D] (W_up transposed), ``up_bias`` [E, D]. Both weights share the layout
    [E, r, D] so that a gather of the k selected experts of each sample is directly a [B, k*r, D]
    operand: the mixture ``sum_j g_j E_j(h)`` is then two ``baddbmm`` calls per block.
    """

    def __init__(self, d_model: int, num_experts: int, bottleneck: int = MOE_ADAPTERS.bottleneck,
                 scale: float = MOE_ADAPTERS.scale, dropout: float = MOE_ADAPTERS.dropout):
        self.d_model, self.bottleneck = d_model, bottleneck
        super().__init__(num_experts, {"down_weight": (bottleneck, d_model), "down_bias": (bottleneck,),
                                       "up_weight": (bottleneck, d_model), "up_bias": (d_model,)})
        self.scale = scale
        self.drop = nn.Dropout(dropout)
        # no-grad forwards group samples by expert combination when a batch holds at least this
        # many samples per combination on average (0: always per-sample gathered weights)
        self.group_min = 4

    def reset_expert(self, i: int) -> None:
        nn.init.kaiming_uniform_(self.down_weight.data[i], a=math.sqrt(5))
        for n in ("down_bias", "up_weight", "up_bias"):
            getattr(self, n).data[i].zero_()

    def forward(self, h: torch.Tensor, indices: torch.Tensor | None, weights: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """``h`` [B, L, D]; ``indices`` [B, k] (or None: all experts); ``weights`` [B, k] -> the
        mixture [B, L, D], or ``out + mixture`` accumulated IN PLACE into ``out`` when given (saves a
        pass; ``out`` must not be needed by autograd, e.g. the fresh result of an addition)."""
        B, L, D = h.shape
        if indices is None:
            indices = torch.arange(self.num_experts, device=h.device).expand(B, -1)
        k, r = indices.shape[1], self.bottleneck
        flat = indices.reshape(-1)
        sw = (weights * self.scale).to(h.dtype)  # fold s into the gates: s*sum g(...) = sum (s g)(...)
        if self.group_min and not torch.is_grad_enabled() and B >= 2 * self.group_min:
            combos, inv = torch.unique(indices, dim=0, return_inverse=True)
            if combos.shape[0] * self.group_min <= B:
                return self._forward_by_combination(h, combos, inv, sw, out)
        w_down = self.effective("down_weight").index_select(0, flat).view(B, k * r, D)
        b_down = self.effective("down_bias").index_select(0, flat).view(B, 1, k * r)
        z = self.drop(F.relu(torch.baddbmm(b_down, h, w_down.transpose(1, 2))))  # [B, L, k*r]
        z = (z.view(B, L, k, r) * sw.view(B, 1, k, 1)).view(B, L, k * r)
        w_up = self.effective("up_weight").index_select(0, flat).view(B, k * r, D)
        b_up = torch.bmm(sw.unsqueeze(1), self.effective("up_bias").index_select(0, flat).view(B, k, D))
        if out is None:
            return torch.baddbmm(b_up, z, w_up)
        if autocast_active(h.device):  # an in-place baddbmm_ would mix autocast's dtypes
            return out.add_(torch.baddbmm(b_up, z, w_up))
        return out.baddbmm_(z, w_up).add_(b_up)

    def _forward_by_combination(self, h, combos, inv, sw, out):
        """Inference path: samples that selected the same experts (in the same order) share one
        GEMM pair with the combination's weights instead of per-sample gathered weights; routing on
        CLS/SOT usually concentrates a batch on a few combinations (one in the text tower)."""
        B, L, D = h.shape
        U, k, r = combos.shape[0], combos.shape[1], self.bottleneck
        wd, bd = self.effective("down_weight"), self.effective("down_bias")
        wu, bu = self.effective("up_weight"), self.effective("up_bias")
        res = out if out is not None else h.new_zeros(B, L, D)
        order = inv.argsort(stable=True)
        start = 0
        for u, n in enumerate(torch.bincount(inv, minlength=U).tolist()):
            rows, start = order[start:start + n], start + n
            c = combos[u]
            hg, s = (h, sw) if U == 1 else (h.index_select(0, rows), sw.index_select(0, rows))
            z = self.drop(F.relu(F.linear(hg, wd.index_select(0, c).view(k * r, D), bd.index_select(0, c).view(-1))))
            z = (z.view(n, L, k, r) * s.view(n, 1, k, 1)).view(n, L, k * r)
            y = torch.matmul(z, wu.index_select(0, c).view(k * r, D)).add_((s @ bu.index_select(0, c))[:, None])
            if U == 1:
                res.add_(y)
            else:
                res.index_add_(0, rows, y.to(res.dtype))  # autocast: y may be in lower precision
        return res

    def expert_forward(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """One expert applied on its own (reference path for tests and debugging)."""
        p = self.expert_parameters(i)
        z = self.drop(F.relu(h @ p["down_weight"].t() + p["down_bias"]))
        return self.scale * (z @ p["up_weight"] + p["up_bias"])
