"""Cost of MoE-Adapters on a tiny CLIP (default ``lmoe-tiny-vit-p4``, random init), CPU.

``moe_cost`` times, as interleaved repeated medians:

- a training step (forward of ``batch`` images and ``prompts`` class prompts re-encoded through the
  adapted text tower, CE, backward, AdamW step) with MoE-Adapters (``experts`` per block, top-``k``,
  both towers, noisy per-task router) against the floor: one dense bottleneck adapter per block in
  the same towers, same width;
- with ``breakdown``, the training gap to the k*r floor split three ways by two more variants: the
  floor stepping an optimiser over as many parameters as the MoE has (all ``experts`` of every
  block: AdamW updates unselected experts too, as in the reference), and the MoE with its routers
  replaced by one fixed top-``k`` assignment (the gathered per-sample dispatch without routing);
- inference of ``infer_batch`` images with a task's router against plain CLIP, against the same
  dense-adapter floor, and against one dense adapter of width ``k * bottleneck`` (exactly the
  arithmetic of ``k`` experts: that ratio is the pure cost of routing and dispatch); and MoE
  inference with a DDAS decision on frozen-CLIP features in front (a frozen forward plus the
  autoencoders), with every other sample sent to zero-shot: those keep the frozen pass's embedding
  and the MoE pass runs on the rest (``moe_ddas``), or, as before, a second pass over the whole
  batch (``moe_ddas_before``).

``python -m lifelong_moe.bench.moe_adapters`` prints the ratios (the CLI exposes it as ``lifelong-moe bench moe``).
"""
from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from ..errors import UserError
from .timing import median_times
from ..moe import inject_moe_adapters
from ..moe.ddas import DDAS, ClipFeatures
from ..moe.routers import Routing


class DenseAdapterBlock(ResidualAttentionBlock):
    """The floor: ``out = h + MLP(LN_2(h)) + s * W_up Drop(ReLU(W_down h))`` with one adapter."""

    adapter: nn.Module

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        h = q_x + self.ls_1(self.attention(q_x=self.ln_1(q_x), attn_mask=attn_mask))
        return h + self.ls_2(self.mlp(self.ln_2(h))) + self.adapter(h)


class _Adapter(nn.Module):
    def __init__(self, d: int, r: int, scale: float, dropout: float):
        super().__init__()
        self.down, self.up, self.drop, self.scale = nn.Linear(d, r), nn.Linear(r, d), nn.Dropout(dropout), scale
        nn.init.zeros_(self.up.weight), nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return self.up(self.drop(F.relu(self.down(h)))) * self.scale


def inject_dense(model: nn.Module, towers=("image", "text"), bottleneck: int = 64) -> list[nn.Parameter]:
    """One zero-initialised bottleneck adapter per block of ``towers`` (in place); its parameters."""
    blocks = []
    if "image" in towers:
        blocks += list(model.visual.transformer.resblocks)
    if "text" in towers:
        blocks += list(model.transformer.resblocks)
    for b in blocks:
        b.__class__ = DenseAdapterBlock
        b.adapter = _Adapter(b.mlp.c_fc.weight.shape[1], bottleneck, 0.1, 0.1)
    return [p for b in blocks for p in b.adapter.parameters()]


class _FixedRouter(nn.Module):
    """Stands in for a block's router in the breakdown: every sample to experts ``0..k-1``, equal gates."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, c, task=None, keep=None):
        B = c.shape[0]
        idx = torch.arange(self.k, device=c.device).expand(B, -1)
        return Routing(idx, c.new_full((B, self.k), 1.0 / self.k))


def moe_cost(experts: int = 22, k: int = 2, model: str = "lmoe-tiny-vit-p4", batch: int = 64, prompts: int = 10,
             infer_batch: int = 128,
             repeats: int = 30, warmup: int = 5, threads: int = 2, seed: int = 0, breakdown: bool = False) -> dict:
    """Median seconds per training step / inference batch and the MoE-over-baseline ratios."""
    from ..backbones.clip import create_clip

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    base, tokenizer, *_ = create_clip(model, None)
    base.requires_grad_(False)
    size = base.visual.image_size
    size = size if isinstance(size, int) else size[0]
    x, xi = torch.randn(batch, 3, size, size), torch.randn(infer_batch, 3, size, size)
    tokens = tokenizer([f"a photo of a class {i}." for i in range(prompts)])
    y = torch.randint(0, prompts, (batch,))

    moe = copy.deepcopy(base)
    handle = inject_moe_adapters(moe, num_experts=experts, k=k)
    handle.add_task()
    handle.set_task(0)
    with torch.no_grad():
        for p in handle.parameters():
            p.normal_(0, 0.02)
    dense = copy.deepcopy(base)
    dense_params = inject_dense(dense)
    dense_k = copy.deepcopy(base)  # the arithmetic of k experts in one dense adapter
    with torch.no_grad():
        for p in inject_dense(dense_k, bottleneck=k * 64) + dense_params:
            p.normal_(0, 0.02)
    dense_k_params = [p for b in list(dense_k.visual.transformer.resblocks) + list(dense_k.transformer.resblocks)
                      for p in b.adapter.parameters()]
    opts = {"moe": torch.optim.AdamW(handle.parameters(), lr=1e-4),
            "dense": torch.optim.AdamW(dense_params, lr=1e-4),
            "dense_k": torch.optim.AdamW(dense_k_params, lr=1e-4)}
    scale = base.logit_scale.exp().detach()

    def step(model, opt, extra_opt=None):
        def run():
            model.train()
            img = F.normalize(model.encode_image(x), dim=-1)
            txt = F.normalize(model.encode_text(tokens), dim=-1)
            loss = F.cross_entropy(scale * img @ txt.t(), y, label_smoothing=0.2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if extra_opt is not None:
                extra_opt.step()
        return run

    variants = {name: step(m, opts[name]) for name, m in (("moe", moe), ("dense", dense), ("dense_k", dense_k))}
    if breakdown:
        fixed = copy.deepcopy(moe)
        fixed_handle = type(handle)(fixed)
        for m in fixed_handle.select():
            m.router = _FixedRouter(k)
        # zero-gradient stand-ins for the MoE parameters the floor lacks, stepped by a second AdamW
        pad = sum(p.numel() for p in handle.parameters()) - sum(p.numel() for p in dense_k_params)
        pad_param = nn.Parameter(torch.zeros(max(pad, 1)))
        pad_param.grad = torch.zeros_like(pad_param)
        variants["moe_fixed_routing"] = step(fixed, torch.optim.AdamW(fixed_handle.parameters(), lr=1e-4))
        variants["dense_k_moe_params"] = step(dense_k, opts["dense_k"], torch.optim.AdamW([pad_param], lr=1e-4))
    train = median_times(variants, repeats, warmup)

    ddas = DDAS(base.visual.output_dim, num_tasks=1)
    ddas.set_task_ae(0, ddas.new_autoencoder())
    ddas.set_reference(ddas.new_autoencoder())

    half = torch.arange(infer_batch) % 2 == 0  # DDAS's answer, fixed: every other sample to zero-shot

    def infer(model, with_ddas=None):
        @torch.no_grad()
        def run():
            model.eval()
            if model is moe:
                handle.set_task(0)
            if with_ddas:
                handle.set_task(None, towers=("image",))
                plain = model.encode_image(xi)  # the frozen pass DDAS's features come from
                ddas.decide(ClipFeatures.squash(plain), [0], None)
                dec = torch.where(half, -1, 0)
                if with_ddas == "before":  # one MoE pass over the batch, zero-shot rows bypassed
                    handle.set_task(dec, towers=("image",))
                    return model.encode_image(xi)
                rows = (~half).nonzero().flatten()  # zero-shot rows keep the frozen pass's embedding
                handle.set_task(dec[rows], towers=("image",), masked=True)
                return plain.index_copy(0, rows, model.encode_image(xi[rows]))
            return model.encode_image(xi)
        return run

    handle.set_task(0)
    inference = median_times({"moe": infer(moe), "plain": infer(base), "dense": infer(dense),
                               "dense_k": infer(dense_k), "moe_ddas": infer(moe, "split"),
                               "moe_ddas_before": infer(moe, "before")}, repeats, warmup)
    record = {
        "setup": {"model": model, "experts": experts, "top_k": k, "towers": ["image", "text"],
                  "batch": batch, "prompts": prompts, "infer_batch": infer_batch, "repeats": repeats,
                  "threads": threads},
        "train_step_s": train, "inference_s": inference,
        "train_ratio_vs_dense_adapter": train["moe"] / train["dense"],
        "train_ratio_vs_dense_k_width": train["moe"] / train["dense_k"],
        "inference_ratio_vs_plain_clip": inference["moe"] / inference["plain"],
        "inference_ratio_vs_dense_adapter": inference["moe"] / inference["dense"],
        "inference_ratio_vs_dense_k_width": inference["moe"] / inference["dense_k"],
        "inference_with_ddas_ratio_vs_plain_clip": inference["moe_ddas"] / inference["plain"],
        "inference_with_ddas_before_ratio_vs_plain_clip": inference["moe_ddas_before"] / inference["plain"],
    }
    if breakdown:
        record["train_gap_breakdown_s"] = train_gap_breakdown(train)
    return record


def train_gap_breakdown(train: dict[str, float]) -> dict[str, float]:
    """Split ``moe - dense_k`` (seconds per training step) into the optimiser over the MoE's extra
    parameters, the gathered per-sample dispatch (fixed routing) and the routers; the parts add up."""
    optimizer = train["dense_k_moe_params"] - train["dense_k"]
    dispatch = train["moe_fixed_routing"] - train["dense_k"] - optimizer
    return {"total": train["moe"] - train["dense_k"], "optimizer_over_moe_params": optimizer,
            "per_sample_dispatch": dispatch, "routing": train["moe"] - train["moe_fixed_routing"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lifelong-moe bench moe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="lmoe-tiny-vit-p4",
                    help="open_clip model (default: the 65-token tiny ViT the reference ratios were measured on)")
    ap.add_argument("--experts", type=int, default=22)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--breakdown", action="store_true",
                    help="also split the training gap to the k*r floor into optimiser, dispatch and routing")
    ap.add_argument("--json", action="store_true", help="print the whole record as JSON")
    a = ap.parse_args(argv)
    for opt, v, low in (("--experts", a.experts, 1), ("--top-k", a.top_k, 1), ("--repeats", a.repeats, 1),
                        ("--threads", a.threads, 1)):
        if v < low:
            raise UserError(f"{opt} must be at least {low}, got {v}")
    if a.top_k > a.experts:
        raise UserError(f"--top-k {a.top_k} exceeds --experts {a.experts}")
    r = moe_cost(experts=a.experts, k=a.top_k, model=a.model, repeats=a.repeats, threads=a.threads,
                 breakdown=a.breakdown)
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        t, i = r["train_step_s"], r["inference_s"]
        print(f"train step: MoE {t['moe'] * 1e3:.1f} ms, dense adapter {t['dense'] * 1e3:.1f} ms "
              f"-> {r['train_ratio_vs_dense_adapter']:.2f}x (reference code: 1.55x); vs one dense adapter of "
              f"width k*64 ({t['dense_k'] * 1e3:.1f} ms): {r['train_ratio_vs_dense_k_width']:.2f}x")
        if "train_gap_breakdown_s" in r:
            b = {key: v * 1e3 for key, v in r["train_gap_breakdown_s"].items()}
            print(f"  the {b['total']:.1f} ms over the k*r floor: optimiser over the MoE's parameters "
                  f"{b['optimizer_over_moe_params']:+.1f} ms, per-sample gathered dispatch {b['per_sample_dispatch']:+.1f} ms, "
                  f"routers {b['routing']:+.1f} ms")
        print(f"inference ({r['setup']['infer_batch']} images): MoE {i['moe'] * 1e3:.1f} ms, plain CLIP "
              f"{i['plain'] * 1e3:.1f} ms -> {r['inference_ratio_vs_plain_clip']:.2f}x (reference code: 1.2x)")
        print(f"inference vs the dense-adapter floor ({i['dense'] * 1e3:.1f} ms): "
              f"{r['inference_ratio_vs_dense_adapter']:.2f}x; vs one dense adapter of width k*64, the same "
              f"arithmetic as k experts ({i['dense_k'] * 1e3:.1f} ms): {r['inference_ratio_vs_dense_k_width']:.2f}x")
        print(f"inference with a DDAS decision (frozen-CLIP features; half of the batch to zero-shot): "
              f"{i['moe_ddas'] * 1e3:.1f} ms -> {r['inference_with_ddas_ratio_vs_plain_clip']:.2f}x")
        if "moe_ddas_before" in i:
            print(f"  the same with the former second pass over the whole batch: {i['moe_ddas_before'] * 1e3:.1f} ms "
                  f"-> {r['inference_with_ddas_before_ratio_vs_plain_clip']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
