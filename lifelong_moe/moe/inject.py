"""Injection of MoE-Adapters into the residual blocks of an open_clip CLIP, by module name.

Targets ``visual.transformer.resblocks.{i}`` (image tower) and ``transformer.resblocks.{i}`` (text
tower; ``text.transformer...`` for CustomTextCLIP). Each targeted ``ResidualAttentionBlock`` keeps its
identity, name, weights and forward signature ``(q_x, k_x, v_x, attn_mask)``: its class is switched to
:class:`MoEResidualAttentionBlock` and an :class:`MoEAdapter` is added as its ``moe`` submodule
(state-dict keys ``...resblocks.{i}.moe.*``; the CLIP keys are unchanged).
"""
from __future__ import annotations

import numbers
from typing import Iterable

import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from .experts import BottleneckExperts
from .routers import NoisyTopKRouter
from .settings import MOE_ADAPTERS

_TOWERS = {"image": ("visual.transformer.resblocks",),
           "text": ("transformer.resblocks", "text.transformer.resblocks")}
_TOKEN_EMBEDDING = ("token_embedding", "text.token_embedding")


class MoEAdapter(nn.Module):
    """One block's MoE branch (MoE-Adapters Eq. ``y^t = sum_i W_i^t E_i(x^t)``): ``MoE(h) = sum_i
    g_i(c) E_i(h)`` with ``c = h[b, p_b]`` (p = 0: CLS / SOT; or the EOT position of each prompt)
    and g from the active task's noisy top-k router; each sample's k experts act on all its tokens.

    Runtime state: ``task`` is None (bypass), an int, or a per-sample LongTensor [B] with -1 = bypass
    (set by :meth:`set_task`); ``route_positions`` [B] for ``route_token="eot"``.
    """

    def __init__(self, d_model: int, num_experts: int = MOE_ADAPTERS.num_experts, k: int = MOE_ADAPTERS.top_k,
                 bottleneck: int = MOE_ADAPTERS.bottleneck, scale: float = MOE_ADAPTERS.scale,
                 dropout: float = MOE_ADAPTERS.dropout, route_token: str = "first"):
        super().__init__()
        if route_token not in ("first", "eot"):
            raise ValueError(f"route_token must be 'first' or 'eot', got {route_token!r}")
        self.experts = BottleneckExperts(d_model, num_experts, bottleneck, scale, dropout)
        self.router = NoisyTopKRouter(d_model, num_experts, k)
        self.route_token = route_token
        self.route_positions: torch.Tensor | None = None
        self.last_routing = None
        self.set_task(None)

    @property
    def active(self) -> bool:
        return self._task is not None

    def set_task(self, task, masked: bool = False) -> None:
        """None / -1: bypass (exact frozen block); int t: task t's router; [B] ids, -1 = bypass.
        ``masked`` (per-sample ids only): sum ``out + MoE(h)`` as a batch with bypassed samples does,
        so that a sample's result is bit-identical whether or not bypassed samples shared its batch."""
        self._task, self._keep, n = None, None, self.router.num_tasks
        if isinstance(task, numbers.Integral) and task >= n:
            raise ValueError(f"task {task} has no router (num_tasks={n}); call add_task() first")
        if task is None or isinstance(task, numbers.Integral):
            self._task = int(task) if task is not None and task >= 0 else None
            return
        t = torch.as_tensor(task, dtype=torch.long).flatten()
        if t.numel() and (int(t.min()) < -1 or int(t.max()) >= n):
            raise ValueError(f"task ids must lie in [-1, {n}), got {t.tolist()}")
        keep = t >= 0
        if bool(keep.any()):  # one host sync here, none per block
            self._task = t.clamp(min=0)
            self._keep = None if bool(keep.all()) and not masked else keep

    def forward(self, out: torch.Tensor, h: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Return ``out + MoE(h)`` (accumulated into ``out`` if ``inplace``); bypassed samples: ``out``."""
        B = h.shape[0]
        task, keep = self._task, self._keep
        if isinstance(task, torch.Tensor):
            if task.shape[0] != B:
                raise ValueError(f"per-sample task ids have length {task.shape[0]}, batch has {B}")
            task = task.to(h.device)
            keep = None if keep is None else keep.to(h.device)
        if self.route_token == "eot":
            pos = self.route_positions
            if pos is None or pos.shape[0] != B:  # set by the token-embedding hook or set_route_positions
                raise RuntimeError(f"route_token='eot' needs route_positions [{B}], got {getattr(pos, 'shape', None)}")
            c = h[torch.arange(B, device=h.device), pos.to(h.device)]
        else:
            c = h[:, 0]
        routing = self.router(c, task, keep)
        self.last_routing = (routing.indices.detach(), routing.weights.detach())
        if keep is None:
            return self.experts(h, routing.indices, routing.weights, out=out if inplace else out.clone())
        return torch.where(keep.view(B, 1, 1), out + self.experts(h, routing.indices, routing.weights), out)


class MoEResidualAttentionBlock(ResidualAttentionBlock):
    """open_clip block with the parallel MoE branch (MoE-Adapters, after the attention residual):
    ``h = x + ls_1(attn(ln_1(x)))``, ``out = h + ls_2(mlp(ln_2(h))) + MoE(h)``. When the branch is
    inactive the block runs open_clip's own forward, so its output is bit-identical to plain CLIP.
    (Compare under the same mode and grad state: nn.MultiheadAttention picks its fused eval path
    from them, e.g. eval under no_grad as the evaluator runs, or training.)"""

    moe: MoEAdapter

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        if not self.moe.active:
            return super().forward(q_x, k_x, v_x, attn_mask)
        k_x = self.ln_1_kv(k_x) if hasattr(self, "ln_1_kv") and k_x is not None else None
        v_x = self.ln_1_kv(v_x) if hasattr(self, "ln_1_kv") and v_x is not None else None
        h = q_x + self.ls_1(self.attention(q_x=self.ln_1(q_x), k_x=k_x, v_x=v_x, attn_mask=attn_mask))
        return self.moe(h + self.ls_2(self.mlp(self.ln_2(h))), h, inplace=True)  # a fresh sum: safe


class _EotRecorder:
    """Forward pre-hook on the token embedding: EOT position = argmax of the token ids (open_clip's
    convention), handed to the text tower's MoE branches. An object, so deepcopy remaps its modules."""

    def __init__(self, adapters: list[MoEAdapter]):
        self.adapters = adapters

    def __call__(self, module, args):
        pos = args[0].argmax(dim=-1)
        for a in self.adapters:
            a.route_positions = pos


def _clip_of(model: nn.Module) -> nn.Module:
    clip = getattr(model, "clip", None)  # accept the project's ClipClassifier too
    return clip if isinstance(clip, nn.Module) else model


def _find(model: nn.Module, names: tuple[str, ...]) -> nn.Module:
    mods = dict(model.named_modules())
    found = [mods[n] for n in names if n in mods]
    if not found:
        raise ValueError(f"module not found in the CLIP model (looked for {', '.join(names)})")
    return found[0]


def _key(name: str) -> tuple[str, int]:
    prefix, idx = name.rsplit(".", 1)
    return ("image" if prefix in _TOWERS["image"] else "text"), int(idx)


def inject_moe_adapters(clip_model: nn.Module, towers: Iterable[str] = ("image", "text"),
                        layers: Iterable[int] | None = None, num_experts: int = MOE_ADAPTERS.num_experts,
                        k: int = MOE_ADAPTERS.top_k, bottleneck: int = MOE_ADAPTERS.bottleneck,
                        scale: float = MOE_ADAPTERS.scale, dropout: float = MOE_ADAPTERS.dropout,
                        route_token: str = "first") -> "MoEAdapters":
    """Add MoE-Adapters to the targeted blocks (``layers=None``: all) and return their handle.
    ``route_token`` applies to the text tower (images always route on CLS). No router exists until
    ``add_task()``; the branches start inactive (``set_task``)."""
    model = _clip_of(clip_model)
    text_adapters = []
    for tower in towers:
        if tower not in _TOWERS:
            raise ValueError(f"unknown tower {tower!r} (choose from {sorted(_TOWERS)})")
        blocks = _find(model, _TOWERS[tower])
        ids = range(len(blocks)) if layers is None else [i % len(blocks) for i in layers]
        for i in ids:
            block = blocks[i]
            if type(block) is not ResidualAttentionBlock:
                raise TypeError(f"{tower} block {i} is a {type(block).__name__}: only a plain open_clip "
                                "ResidualAttentionBlock (not injected yet) can take MoE adapters")
            ref = block.mlp.c_fc.weight
            moe = MoEAdapter(ref.shape[1], num_experts, k, bottleneck, scale, dropout,
                             route_token if tower == "text" else "first").to(ref.device, ref.dtype)
            moe.train(block.training)
            block.__class__ = MoEResidualAttentionBlock
            block.moe = moe
            if tower == "text":
                text_adapters.append(moe)
    if route_token == "eot" and text_adapters:
        _find(model, _TOKEN_EMBEDDING).register_forward_pre_hook(_EotRecorder(text_adapters))
    return MoEAdapters(model)


class MoEAdapters:
    """Handle over the MoE branches of one CLIP, keyed ``(tower, layer)``. Rebuild it at any time
    with ``MoEAdapters(model)`` (e.g. after deepcopy or loading): all state lives in the model."""

    def __init__(self, clip_model: nn.Module):
        self.model = _clip_of(clip_model)
        self.adapters: dict[tuple[str, int], MoEAdapter] = {
            _key(n): m.moe for n, m in self.model.named_modules() if isinstance(m, MoEResidualAttentionBlock)}

    def __len__(self) -> int:
        return len(self.adapters)

    def __getitem__(self, key: tuple[str, int]) -> MoEAdapter:
        return self.adapters[key]

    def select(self, towers=None) -> list[MoEAdapter]:
        return [m for (t, _), m in self.adapters.items() if towers is None or t in towers]

    @property
    def num_tasks(self) -> int:
        return next(iter(self.adapters.values())).router.num_tasks if self.adapters else 0

    def add_task(self) -> int:
        """A new zero router in every block; earlier ones frozen. Returns the new task id."""
        return [m.router.add_task() for m in self.adapters.values()][-1]

    def set_task(self, task, towers=None, masked: bool = False) -> None:
        """None / int / per-sample ids [B] (-1 = bypass) on all branches, or only ``towers``
        (``masked``: see :meth:`MoEAdapter.set_task`)."""
        for m in self.select(towers):
            m.set_task(task, masked)

    def set_route_positions(self, positions: torch.Tensor, towers=("text",)) -> None:
        for m in self.select(towers):
            m.route_positions = positions

    def parameters(self) -> list[nn.Parameter]:
        """Trainable MoE tensors (experts + current routers), for the optimiser."""
        return [p for m in self.adapters.values() for p in m.parameters() if p.requires_grad]

    def usage(self) -> dict[tuple[str, int], torch.Tensor]:
        return {key: m.router.usage.clone() for key, m in self.adapters.items()}

    def reset_usage(self) -> None:
        for m in self.adapters.values():
            m.router.reset_usage()

    def top_used(self, n: int = 2) -> dict[tuple[str, int], list[int]]:
        """The n most used experts per block (MoE-Adapters' activate-freeze choice; ties: lower id)."""
        return {key: torch.sort(u, descending=True, stable=True).indices[:n].tolist()
                for key, u in self.usage().items()}

    def freeze_experts(self, spec: dict[tuple[str, int], Iterable[int]]) -> None:
        for key, ids in spec.items():
            self.adapters[key].experts.freeze(ids)

    def frozen_experts(self) -> dict[tuple[str, int], list[int]]:
        return {key: m.experts.frozen_ids() for key, m in self.adapters.items()}

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the blocks' last load-balancing losses (None if none was computed)."""
        losses = [m.router.last_aux_loss for m in self.adapters.values() if m.router.last_aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def grow(self, n: int) -> None:
        """Add n experts to every block (earlier tasks' routers never pick them)."""
        for m in self.adapters.values():
            m.experts.grow(n)
            m.router.grow(n)

    def remove(self) -> None:
        """Undo the injection: plain open_clip blocks again (the MoE weights are dropped)."""
        for m in self.model.modules():
            if isinstance(m, MoEResidualAttentionBlock):
                del m.moe
                m.__class__ = ResidualAttentionBlock
            hooks = getattr(m, "_forward_pre_hooks", {})
            for hid in [h for h, fn in hooks.items() if isinstance(fn, _EotRecorder)]:
                del hooks[hid]
        self.adapters = {}
