"""Routers: map a per-sample routing feature ``c`` [B, D] (and a task id) to expert gates.

A router returns a sparse :class:`Routing` (``indices`` [B, k], ``weights`` [B, k]) that the expert
pools of :mod:`.experts` dispatch directly; a dense (soft) router may return ``indices=None`` with
``weights`` [B, E]. The base class keeps per-expert usage counts and the last auxiliary loss.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .settings import MOE_ADAPTERS, check_at_most_experts

_MASKED = -1e9  # logit of an expert hidden from a task (added by ``grow`` after the task); finite: no NaN grads


class Routing(NamedTuple):
    indices: torch.Tensor | None  # [B, k] long, or None = all experts
    weights: torch.Tensor  # [B, k] (or [B, E] when indices is None)

    def dense(self, num_experts: int) -> torch.Tensor:
        """The gate vector g [B, E] (zeros for unselected experts)."""
        if self.indices is None:
            return self.weights
        return self.weights.new_zeros(self.weights.shape[0], num_experts).scatter(1, self.indices, self.weights)


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, ``var(x) / (mean(x)^2 + 1e-10)`` (unbiased var; 0 if E = 1)."""
    if x.numel() <= 1:
        return x.new_zeros(())
    x = x.float()
    return x.var() / (x.mean() ** 2 + 1e-10)


class Router(nn.Module):
    """Base class. ``usage`` [E] counts, per expert, the samples routed to it in training mode (not in
    eval). ``last_aux_loss`` is the last training forward's auxiliary loss (None in eval), computed
    lazily on first read from inputs stashed by the forward: unread, it costs nothing. Read it before
    ``backward()`` to train on it."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.register_buffer("usage", torch.zeros(num_experts, dtype=torch.long))
        self._aux_args, self._aux_cache = None, None

    def compute_aux_loss(self, *args) -> torch.Tensor:
        raise NotImplementedError

    @property
    def last_aux_loss(self) -> torch.Tensor | None:
        if self._aux_cache is None and self._aux_args is not None:
            self._aux_cache = self.compute_aux_loss(*self._aux_args)
        return self._aux_cache

    def _stash_aux(self, args: tuple | None) -> None:
        self._aux_args, self._aux_cache = args, None

    def __getstate__(self):  # deepcopy / pickle: drop the stashed graph tensors
        state = dict(self.__dict__)
        state["_aux_args"], state["_aux_cache"] = None, None
        if "_stack_cache" in state:
            state["_stack_cache"] = {}  # weak references: rebuilt on demand
        return state

    def reset_usage(self) -> None:
        self.usage.zero_()

    @torch.no_grad()
    def record_usage(self, indices: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        ones = torch.ones_like(indices) if keep is None else keep.long().unsqueeze(1).expand_as(indices)
        self.usage.index_add_(0, indices.reshape(-1), ones.reshape(-1))

    def grow(self, n: int) -> None:
        self.usage = torch.cat([self.usage, self.usage.new_zeros(n)])
        self.num_experts += n


class NoisyTopKRouter(Router):
    """Per-task noisy top-k gate of MoE-Adapters (Shazeer et al. 2017, Eq. 3-5; MoE-Adapters Eq.
    ``W^t = Softmax(TopK(R^t(c)))``): ``l = c W_g^t``; in training only ``l += eps * (softplus(c W_n^t)
    + 0.01)``, ``eps ~ N(0, 1)``; keep the top k logits, softmax over them, 0 elsewhere.

    One zero-initialised (W_g^t, W_n^t) pair per task, created by :meth:`add_task`. Only the newest
    task's pair is a Parameter (``gate``, ``noise`` [D, E]); adding a task moves it to the buffers
    ``past_gate`` / ``past_noise`` [T-1, D, E], so earlier routers are frozen bit-exactly and stay
    usable. ``task`` may be an int or a per-sample LongTensor [B] of task ids (>= 0).

    ``use_noise=False`` switches the noise term off in training as well (it is always off in eval).

    ``last_aux_loss`` (training only, if ``aux_loss``) = CV^2(importance) + CV^2(load), with
    importance = sum_b g_b and load = sum_b P(expert in top-k) (Shazeer Eq. 6-10, smooth load; the
    count of non-zero gates when there is no noise or k = E). Unweighted and never added to a loss
    here: the MoE-Adapters reference computes it (x0.01) and discards it.
    """

    def __init__(self, d_model: int, num_experts: int, k: int = MOE_ADAPTERS.top_k, noise_epsilon: float = 0.01,
                 aux_loss: bool = True, use_noise: bool = True):
        super().__init__(num_experts)
        check_at_most_experts(num_experts, {"k": k}, minimum=1)
        self.d_model, self.k, self.noise_epsilon, self.aux_loss = d_model, k, noise_epsilon, aux_loss
        self.use_noise = use_noise  # False: noise-free gating in training too
        self.register_parameter("gate", None)
        self.register_parameter("noise", None)
        self.register_buffer("past_gate", torch.zeros(0, d_model, num_experts))
        self.register_buffer("past_noise", torch.zeros(0, d_model, num_experts))
        self.register_buffer("logit_mask", torch.zeros(0, num_experts))  # [T, E]: 0 or _MASKED
        self._masked = False
        self._stack_cache: dict = {}  # id(past buffer) -> (weakref, version, [D, T*E] buffer)

    @property
    def num_tasks(self) -> int:
        return self.logit_mask.shape[0]

    @torch.no_grad()
    def add_task(self) -> int:
        """Freeze the current task's gate and noise matrices; start zero ones for a new task."""
        if self.gate is not None:
            self.past_gate = torch.cat([self.past_gate, self.gate.detach()[None]])
            self.past_noise = torch.cat([self.past_noise, self.noise.detach()[None]])
        ref = self.past_gate
        self.gate = nn.Parameter(ref.new_zeros(self.d_model, self.num_experts))
        self.noise = nn.Parameter(ref.new_zeros(self.d_model, self.num_experts))
        self.logit_mask = torch.cat([self.logit_mask, self.logit_mask.new_zeros(1, self.num_experts)])
        return self.num_tasks - 1

    @torch.no_grad()
    def grow(self, n: int) -> None:
        """Add ``n`` experts: earlier tasks never select them; the current task may."""
        super().grow(n)
        pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:-1], n)], dim=-1)  # noqa: E731
        self.past_gate, self.past_noise = pad(self.past_gate), pad(self.past_noise)
        self.logit_mask = torch.cat([self.logit_mask, self.logit_mask.new_full((self.num_tasks, n), _MASKED)], 1)
        if self.gate is not None:
            self.gate, self.noise = nn.Parameter(pad(self.gate.detach())), nn.Parameter(pad(self.noise.detach()))
            self.logit_mask[-1] = 0
        self._masked = bool((self.logit_mask != 0).any())

    def _project(self, c: torch.Tensor, task, current: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        T, E = self.num_tasks, self.num_experts
        if isinstance(task, int):
            return c @ (current if task == T - 1 else past[task])
        all_logits = (c @ self._stacked(current, past)).view(-1, T, E)  # per-sample task ids [B]
        return all_logits.gather(1, task.view(-1, 1, 1).expand(-1, 1, E)).squeeze(1)

    def _stacked(self, current: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        """Every task's matrix side by side, ``[D, T*E]`` (task-major columns). Without autograd the
        past tasks' part is cached (rebuilt when ``past`` is replaced or changed in place: add_task,
        grow, load_state_dict, device moves) and only the current task's ``[D, E]`` block is copied
        in per call, so the cost no longer grows with the number of tasks; same values, same layout."""
        T, E, D = self.num_tasks, self.num_experts, self.d_model
        if torch.is_grad_enabled() and current.requires_grad:
            return torch.cat([past, current[None]]).permute(1, 0, 2).reshape(D, T * E)
        key = id(past)
        hit = self._stack_cache.get(key)
        if hit is None or hit[0]() is not past or hit[1] != past._version or hit[2].dtype != current.dtype:
            buf = past.new_empty(D, T * E, dtype=current.dtype)
            buf[:, :(T - 1) * E].copy_(past.permute(1, 0, 2).reshape(D, (T - 1) * E))
            self._stack_cache = {k: v for k, v in self._stack_cache.items() if v[0]() is not None}
            hit = self._stack_cache[key] = (weakref.ref(past), past._version, buf)
        buf = hit[2]
        buf[:, (T - 1) * E:].copy_(current)
        return buf

    def forward(self, c: torch.Tensor, task, keep: torch.Tensor | None = None) -> Routing:
        """``c`` [B, D]; ``task`` int or LongTensor [B]; ``keep`` optional bool [B] (False = sample is
        bypassed: not counted in usage nor in the aux loss)."""
        if self.gate is None:
            raise RuntimeError("NoisyTopKRouter has no task: call add_task() first")
        if isinstance(task, int) and not 0 <= task < self.num_tasks:
            raise IndexError(f"task {task} out of range [0, {self.num_tasks})")
        clean = self._project(c, task, self.gate, self.past_gate)
        if self._masked:
            clean = clean + self.logit_mask[task]
        noisy = self.training and self.use_noise
        if noisy:
            std = F.softplus(self._project(c, task, self.noise, self.past_noise)) + self.noise_epsilon
            logits = clean + torch.randn_like(clean) * std
        else:
            logits = clean
        want_aux = self.training and self.aux_loss
        smooth = noisy and want_aux and self.k < self.num_experts
        top_v, top_i = logits.topk(self.k + 1 if smooth else self.k, dim=1)
        idx, w = top_i[:, :self.k], F.softmax(top_v[:, :self.k], dim=1)
        if self.training:
            self.record_usage(idx, keep)
        self._stash_aux((idx, w, clean, logits, std if smooth else None, top_v, keep) if want_aux else None)
        return Routing(idx, w)

    def compute_aux_loss(self, idx, w, clean, noisy, std, top_v, keep) -> torch.Tensor:
        gates = Routing(idx, w).dense(self.num_experts)
        if std is not None:  # smooth load: P(l_i + new noise stays in the top k, others fixed)
            thr_in, thr_out = top_v[:, self.k:self.k + 1], top_v[:, self.k - 1:self.k]
            p_in = torch.special.ndtr((clean - thr_in) / std)
            p_out = torch.special.ndtr((clean - thr_out) / std)
            load = torch.where(noisy > thr_in, p_in, p_out)
        else:
            load = (gates > 0).to(gates.dtype)
        if keep is not None:
            m = keep.to(gates.dtype).unsqueeze(1)
            gates, load = gates * m, load * m
        return cv_squared(gates.sum(0)) + cv_squared(load.sum(0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        mask = state_dict.get(prefix + "logit_mask")
        if mask is not None:  # recreate as many tasks / experts as the checkpoint has
            if mask.shape[1] > self.num_experts:
                self.grow(mask.shape[1] - self.num_experts)
            while self.num_tasks < mask.shape[0]:
                self.add_task()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._masked = bool((self.logit_mask != 0).any())
