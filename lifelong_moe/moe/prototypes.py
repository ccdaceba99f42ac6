"""Task prototypes for test-time task inference (CL-MoE, Sec. 4.2 "task indexing", Eq. 7-8, and the
framework figure: each task a cluster with a centre and a radius in a frozen feature space).

After task ``t`` is trained, its centre is the mean of the frozen features of its training inputs and
its radius the ``quantile`` of their distances to the centre (1.0: the largest). A test input goes
to the nearest centre among the tasks whose radius contains it (``rule="nearest"``: Euclidean
distance; ``"normalized"``: distance divided by the radius); outside every radius it gets -1 (no
task: the instance router alone). The release has no such module (its issue #6).
"""
from __future__ import annotations

import torch
from torch import nn

RULES = ("nearest", "normalized")


class TaskPrototypes(nn.Module):
    """Centres [T, D] and radii [T] of the tasks added so far (buffers: saved with the model)."""

    def __init__(self, dim: int, quantile: float = 1.0, rule: str = "nearest"):
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        self.dim, self.quantile, self.rule = dim, quantile, rule
        self.register_buffer("centres", torch.zeros(0, dim))
        self.register_buffer("radii", torch.zeros(0))

    def __len__(self) -> int:
        return self.centres.shape[0]

    @torch.no_grad()
    def add(self, feats: torch.Tensor) -> int:
        """Add one task's prototype from its training features [N, D]; returns its index."""
        if feats.ndim != 2 or feats.shape[1] != self.dim or feats.shape[0] == 0:
            raise ValueError(f"features must have shape [N > 0, {self.dim}], got {list(feats.shape)}")
        f = feats.float().to(self.centres.device)
        centre = f.mean(0)
        radius = torch.quantile((f - centre).norm(dim=1), self.quantile)
        self.centres = torch.cat([self.centres, centre[None]])
        self.radii = torch.cat([self.radii, radius[None]])
        return len(self) - 1

    def distances(self, feats: torch.Tensor) -> torch.Tensor:
        """[B, T] Euclidean distances to every centre."""
        return torch.cdist(feats.float().to(self.centres.device), self.centres)

    @torch.no_grad()
    def infer(self, feats: torch.Tensor) -> torch.Tensor:
        """Per input the inferred task [B] (long), -1 where no radius contains it."""
        if len(self) == 0:
            return torch.full((feats.shape[0],), -1, dtype=torch.long)
        d = self.distances(feats)
        inside = d <= self.radii
        score = d / self.radii.clamp_min(1e-12) if self.rule == "normalized" else d
        score = torch.where(inside, score, torch.full_like(score, float("inf")))
        best = score.argmin(1)
        return torch.where(inside.any(1), best, -1).cpu()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        c = state_dict.get(prefix + "centres")
        if c is not None:  # as many tasks as the checkpoint holds
            self.centres = torch.zeros_like(c, device=self.centres.device)
            self.radii = torch.zeros(c.shape[0], device=self.radii.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def summary(self) -> list[dict]:
        return [{"centre_norm": float(c.norm()), "radius": float(r)} for c, r in zip(self.centres, self.radii)]
