"""Dynamic momentum merge of experts at a task boundary (CL-MoE, Sec. 4.3 "MMoE"):

    theta_t = lambda_i * theta_{t-1} + (1 - lambda_i) * phi_t      per expert i (all its tensors),

with theta_{t-1} the experts before task t, phi_t after training on it, and lambda_i chosen from
expert i's role in its layer: used by the new task only (``new``), by the previous task(s) only
(``previous``), by both, or by neither ("used": among a task's top experts in that layer,
:func:`~lifelong_moe.moe.lora_experts.top_set`). Which earlier tasks count as previous is the
caller's choice: the release's ``params.py:28-32`` compares task t's set with task t-1's only
(its ``exclusive`` experts, in index_{t-1} but not in index_t, get 0.3); the union of every earlier
task's set is a variant of ours (CL-MoE's ``previous_experts: last_task`` (default) ``| all_earlier``).

Default lambdas: the release's ``params.py`` (0.3 for experts top for the previous task but not the
new one, 0.7 otherwise); ``UNIFORM`` = 0.7 everywhere, what the release's settings reduce to once
its key bug is fixed. The release's merge silently touched nothing (its keys never matched): this
merge counts the tensors it merged and raises unless that is exactly the expected number.
Routers are not merged (they keep phi_t). Frozen experts are left as they are.
"""
from __future__ import annotations

import torch

from .experts import StackedExperts

ROLES = ("new", "previous", "both", "neither")
REFERENCE_LAMBDAS = {"new": 0.7, "previous": 0.3, "both": 0.7, "neither": 0.7}
UNIFORM_LAMBDAS = dict.fromkeys(ROLES, 0.7)


def expert_roles(new: set[int], previous: set[int], num_experts: int) -> list[str]:
    """Each expert's role from the set of experts the new task uses and the set counted as previous
    (the release: task t-1's; or the union of all earlier tasks')."""
    roles = []
    for i in range(num_experts):
        a, b = i in new, i in previous
        roles.append("both" if a and b else "new" if a else "previous" if b else "neither")
    return roles


def snapshot(pools: dict[str, StackedExperts]) -> dict[str, dict[str, torch.Tensor]]:
    """theta_{t-1}: every pool's effective stacked tensors, cloned."""
    return {name: {k: pool.effective(k).detach().clone() for k in pool._shapes} for name, pool in pools.items()}


class MergeError(RuntimeError):
    pass


@torch.no_grad()
def momentum_merge(pools: dict[str, StackedExperts], previous: dict[str, dict[str, torch.Tensor]],
                   lambdas: dict[str, torch.Tensor]) -> int:
    """Merge every trainable expert of ``pools`` (phi_t, in place) with its ``previous`` value
    (theta_{t-1}) using ``lambdas[name]`` [E]. Returns the number of (expert, tensor) pairs merged;
    raises :class:`MergeError` unless it equals the number of trainable experts times their tensors
    (and is > 0): a pool missing from ``previous`` or ``lambdas`` is an error, never a silent skip."""
    expected = merged = 0
    missing = []
    for name, pool in pools.items():
        live = ~pool.frozen_mask
        expected += int(live.sum()) * len(pool._shapes)
        old, lam = previous.get(name), lambdas.get(name)
        if old is None or lam is None or set(old) != set(pool._shapes):
            missing.append(name)
            continue
        lam = torch.as_tensor(lam, dtype=torch.float32, device=live.device)
        if lam.shape != (pool.num_experts,):
            raise MergeError(f"{name}: {lam.numel()} lambdas for {pool.num_experts} experts")
        for k in pool._shapes:
            p = getattr(pool, k)
            shape = (-1,) + (1,) * (p.dim() - 1)
            w = lam.to(p.dtype).view(shape)
            p.copy_(torch.where(live.view(shape), w * old[k].to(p) + (1 - w) * p, p))
            merged += int(live.sum())
    if missing or merged != expected or merged == 0:
        raise MergeError(f"momentum merge touched {merged} expert tensors, expected {expected} "
                         f"(no previous state for {missing[:3]}{' ...' if len(missing) > 3 else ''})")
    return merged
