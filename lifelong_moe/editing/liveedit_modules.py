"""LiveEdit's trainable parts (Chen et al., "Lifelong Knowledge Editing for Vision Language Models
with Low-Rank Mixture-of-Experts", CVPR 2025; official code ``qizhou000/LiveEdit``
``editor/vllm_editors/liveedit/modules.py``): learned-query cross-attention, the low-rank expert
generator, the routing-feature extractor with its vision sentinel, the slot-wise similarity and the
expert residual. Every module takes a batch of variable-length spans as ``(reps [B, L, d], mask
[B, L])``; masked-out positions are never attended to."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class QueryAttention(nn.Module):
    """Multi-head attention of given queries ``[B, n, q_dim]`` over ``(reps, mask)``: keys
    ``d -> q_dim``, values ``d -> v_dim``, one softmax per head, no output projection (the
    reference's ``Attention``). A row whose mask is empty gets zeros."""

    def __init__(self, q_dim: int, d: int, v_dim: int, heads: int):
        super().__init__()
        if q_dim % heads or v_dim % heads:
            raise ValueError(f"heads ({heads}) must divide the query ({q_dim}) and value ({v_dim}) widths")
        self.heads = heads
        self.q = nn.Linear(q_dim, q_dim)
        self.k = nn.Linear(d, q_dim)
        self.v = nn.Linear(d, v_dim)

    def forward(self, queries: torch.Tensor, reps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = queries.shape
        h = self.heads
        q = self.q(queries).view(b, n, h, -1).transpose(1, 2)              # [B, h, n, dq]
        k = self.k(reps).view(b, reps.shape[1], h, -1).transpose(1, 2)     # [B, h, L, dq]
        v = self.v(reps).view(b, reps.shape[1], h, -1).transpose(1, 2)     # [B, h, L, dv]
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        attn = torch.nan_to_num(scores.softmax(-1), nan=0.0)                # empty span -> zeros
        return (attn @ v).transpose(1, 2).reshape(b, n, -1)


class LowRankGenerator(nn.Module):
    """One expert factor ``[B, r, d]`` from an edit's layer representations: ``r`` learned queries
    cross-attend over LayerNorm(reps), scaled by ``1 / (lora_scale * sqrt(r))`` (the reference's
    ``LowRankGenerator``; 0.1 at its r=4, lora_scale=5)."""

    def __init__(self, d: int, module_dim: int, rank: int, heads: int, lora_scale: float):
        super().__init__()
        self.queries = nn.Parameter(torch.empty(1, rank, module_dim))
        nn.init.kaiming_normal_(self.queries)
        self.norm = nn.LayerNorm(d)
        self.attn = QueryAttention(module_dim, d, d, heads)
        self.scale = 1.0 / (lora_scale * math.sqrt(rank))

    def forward(self, reps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.queries.expand(reps.shape[0], -1, -1)
        return self.attn(q, self.norm(reps), mask) * self.scale


class FeatureExtractor(nn.Module):
    """Routing features of one input (the reference's ``QVExtractor``): the text feature psi
    (``slots`` learned queries over the prompt span) and the text-conditioned visual feature phi
    (other learned queries over the prompt span, whose result then attends over the vision span),
    both ``[B, slots, module_dim]``. With ``sentinel_tokens`` it also holds the vision sentinel, a
    learned pseudo-image ``[sentinel_tokens, d]`` whose phi under the same question is the per-query
    threshold of the hard filter."""

    def __init__(self, d: int, module_dim: int, slots: int, heads: int, sentinel_tokens: int = 0):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.text_queries = nn.Parameter(torch.empty(1, slots, module_dim))
        self.vision_queries = nn.Parameter(torch.empty(1, slots, module_dim))
        for p in (self.text_queries, self.vision_queries):
            nn.init.kaiming_normal_(p)
        self.text_attn = QueryAttention(module_dim, d, module_dim, heads)
        self.question_attn = QueryAttention(module_dim, d, module_dim, heads)
        self.vision_attn = QueryAttention(module_dim, d, module_dim, heads)
        self.sentinel = nn.Parameter(torch.randn(1, sentinel_tokens, d)) if sentinel_tokens else None

    def text(self, prompt: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        q = self.text_queries.expand(prompt.shape[0], -1, -1)
        return self.text_attn(q, self.norm(prompt), prompt_mask)

    def vision(self, prompt: torch.Tensor, prompt_mask: torch.Tensor, vision: torch.Tensor,
               vision_mask: torch.Tensor) -> torch.Tensor:
        q = self.vision_queries.expand(prompt.shape[0], -1, -1)
        asked = self.question_attn(q, self.norm(prompt), prompt_mask)
        return self.vision_attn(asked, self.norm(vision), vision_mask)

    def sentinel_vision(self, prompt: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """phi of the learned pseudo-image under each input's question (the hard filter's threshold)."""
        s = self.sentinel.expand(prompt.shape[0], -1, -1)
        return self.vision(prompt, prompt_mask, s, torch.ones(s.shape[:2], dtype=torch.bool, device=s.device))


def slot_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[A, B]`` similarities of features ``a [A, slots, m]`` and ``b [B, slots, m]``: slot e against
    slot e only, dot products averaged over the slots and divided by sqrt(m) (reference
    ``liveedit.py:139,141,193``). One batched product, whatever B is."""
    return torch.einsum("asm,bsm->ab", a, b) / (a.shape[1] * math.sqrt(a.shape[2]))


def paired_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[A]``: :func:`slot_similarity` of row i of ``a`` with row i of ``b``."""
    return (a * b).sum((1, 2)) / (a.shape[1] * math.sqrt(a.shape[2]))


def soft_weights(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``w = softmax(s) * sigmoid(s)`` over the kept experts of each row (zeros elsewhere, and a zero
    row when none is kept): a relative and an absolute relevance (reference ``liveedit.py:192-198``)."""
    masked = scores.masked_fill(~keep, float("-inf"))
    rel = torch.nan_to_num(masked.softmax(-1), nan=0.0)
    return rel * torch.sigmoid(scores) * keep


def expert_residual(x: torch.Tensor, c: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_m w[b, m] * ReLU(x_b C_m^T) R_m`` at every position: ``x [B, L, d]`` (already
    layer-normed), ``c, r [M, rank, d]``, ``w [B, M]``; two batched products over all M experts."""
    m, rank, d = c.shape
    act = F.relu(x @ c.reshape(m * rank, d).T)                           # [B, L, M*rank]
    act = act * w.repeat_interleave(rank, dim=1)[:, None, :]
    return act @ r.reshape(m * rank, d)


def gather_experts(c: torch.Tensor, r: torch.Tensor, w: torch.Tensor, idx: torch.Tensor):
    """Each row's own experts as two ``[B, K*rank, d]`` operands: ``idx [B, K]`` indexes the bank ``c, r
    [M, rank, d]`` and ``w [B, K]`` (0 for padding) is folded into R. Built once per prompt and reused
    on every cached generation step."""
    b, k = idx.shape
    m, rank, d = c.shape
    cs = c[idx].reshape(b, k * rank, d)
    rs = (r[idx] * w[:, :, None, None]).reshape(b, k * rank, d)
    return cs, rs


def apply_experts(x: torch.Tensor, cs: torch.Tensor, rs: torch.Tensor) -> torch.Tensor:
    """``sum_k ReLU(x C_k^T) (w_k R_k)`` for ``x [B, L, d]`` and :func:`gather_experts`' operands: two
    batched matmuls whose cost grows with the most experts any one row keeps, not with the store."""
    return torch.bmm(F.relu(torch.bmm(x, cs.transpose(1, 2))), rs)


def routed_residual(x: torch.Tensor, c: torch.Tensor, r: torch.Tensor, w: torch.Tensor,
                    idx: torch.Tensor) -> torch.Tensor:
    """:func:`expert_residual` with each row's own experts (``idx [B, K]``, weights ``w [B, K]``)."""
    return apply_experts(x, *gather_experts(c, r, w, idx))
