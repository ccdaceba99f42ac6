"""Real-scale inference cost of MoE-Adapters with DDAS as tasks accumulate (CPU, random weights).

An open_clip ViT-B/16 built without pretrained weights (224 px), MoE-Adapters in its image tower
(``experts`` per block, top-``k``) with one router per trained task, and DDAS on AlexNet-size
features (conv5 before its ReLU of a random torchvision AlexNet: 256x13x13 = 43,264 dims) with
one autoencoder per trained task plus the reference ("general images") autoencoder. For 1, 5, 20
and 50 trained tasks it times, as interleaved repeated medians in one process:

- ``plain``: the image tower of plain CLIP (the experts bypassed, bit-exact frozen blocks);
- ``moe``: the MoE pass with one task's router (the oracle task id);
- ``ddas_loop`` / ``ddas_stacked``: the DDAS features, the decision of every sample (autoencoders
  one after the other / in one stacked forward), then the MoE pass with per-sample routers.

Every sample is routed to a task (the reference autoencoder is made never to win, and no threshold
applies): the worst case, the MoE pass runs on the whole batch. As random autoencoders pick one task
for all, the batch is then spread over the tasks (sample i to task i mod T) so that the per-sample
router path runs. The class prompts' text features are
cached per router by the strategy, so the text tower is not part of the per-batch cost. Also timed
on their own: the DDAS decision (loop / stacked) and the per-sample router stack of the image tower
built on every call (as before the cache) / cached.

``lifelong-moe bench moe_scale`` prints the curve (``--json``: the whole record).
"""
from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from .timing import median_times
from ..errors import UserError
from ..moe import inject_moe_adapters
from ..moe.ddas import DDAS


def alexnet_conv5(seed: int = 0) -> nn.Module:
    """``sigmoid(flatten(conv5))`` of a random AlexNet: the reference DDAS feature's shape and cost."""
    from torchvision.models import alexnet

    torch.manual_seed(seed)
    body = alexnet(weights=None).features[:-2].eval().requires_grad_(False)
    return nn.Sequential(body, nn.Flatten(1), nn.Sigmoid())


def scale_cost(tasks=(1, 5, 20, 50), model: str = "ViT-B-16", batch: int = 4, repeats: int = 3, warmup: int = 1,
               threads: int = 2, experts: int = 22, k: int = 2, hidden: int = 100, seed: int = 0,
               log=None) -> dict:
    """Median seconds per inference batch at each task count, and the ratios to plain CLIP."""
    import open_clip

    from ..backbones.clip import register_model_configs

    register_model_configs()  # the shipped tiny models too (tests)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    clip = open_clip.create_model(model, pretrained=None).eval().requires_grad_(False)
    size = clip.visual.image_size
    size = size if isinstance(size, int) else size[0]
    handle = inject_moe_adapters(clip, towers=("image",), num_experts=experts, k=k)
    with torch.no_grad():
        for m in handle.select():  # non-zero experts (the cost does not depend on the values)
            for name in m.experts._shapes:
                getattr(m.experts, name).normal_(0, 0.02)
    features = alexnet_conv5(seed)
    x = torch.randn(batch, 3, size, size)
    dim = features(x[:1]).shape[1]
    ddas = DDAS(dim, hidden)
    ref = ddas.new_autoencoder()
    with torch.no_grad():
        ref.decoder.bias.fill_(-20.0)  # reconstructs ~0: never the argmin, every sample goes to a task
    ddas.set_reference(ref)
    encode = clip.encode_image

    def plain():
        handle.set_task(None)
        encode(x)

    def one_router():
        handle.set_task(handle.num_tasks - 1)
        encode(x)

    def with_ddas(stacked: bool):
        def run():
            ddas.stacked = stacked
            ddas.decide(features(x), active, None)
            # random autoencoders agree on one task; spread the batch (sample i -> task i mod T) so
            # that the per-sample router path runs whenever there are several tasks
            dec = torch.arange(batch) % len(active)
            handle.set_task(0 if len(active) == 1 else dec)
            encode(x)
        return run

    def decide(stacked: bool):
        f = features(x)

        def run():
            ddas.stacked = stacked
            ddas.decide(f, active, None)
        return run

    def router_stack(cached: bool):
        routers = [m.router for m in handle.select()]

        def run():
            for r in routers:
                if not cached:
                    r._stack_cache.clear()
                r._stacked(r.gate, r.past_gate)
        return run

    rows = []
    with torch.no_grad():
        for t in sorted(set(tasks)):
            while handle.num_tasks < t:
                handle.add_task()
                for m in handle.select():
                    m.router.gate.normal_()  # samples spread over the experts and combinations
                ddas.set_task_ae(handle.num_tasks - 1, ddas.new_autoencoder())
            active = list(range(t))
            spread = min(batch, t)
            times = median_times({"plain": plain, "moe": one_router, "ddas_loop": with_ddas(False),
                                   "ddas_stacked": with_ddas(True)}, repeats, warmup)
            parts = median_times({"decide_loop": decide(False), "decide_stacked": decide(True),
                                   "router_stack_rebuilt": router_stack(False),
                                   "router_stack_cached": router_stack(True)}, repeats, warmup)
            row = {"tasks": t, "tasks_in_batch": spread, "inference_s": times, "parts_s": parts,
                   "ratio_moe_vs_plain": times["moe"] / times["plain"],
                   "ratio_ddas_loop_vs_plain": times["ddas_loop"] / times["plain"],
                   "ratio_ddas_stacked_vs_plain": times["ddas_stacked"] / times["plain"]}
            rows.append(row)
            if log:
                log(format_row(row))
    return {"setup": {"model": model, "image_size": size, "batch": batch, "experts": experts, "top_k": k,
                      "towers": ["image"], "ddas_features": "alexnet conv5 (random)", "ddas_dim": dim,
                      "ddas_hidden": hidden, "repeats": repeats, "warmup": warmup, "threads": threads},
            "rows": rows}


HEADER = ("tasks | plain CLIP | MoE, 1 router | MoE+DDAS loop | MoE+DDAS stacked | decide loop / stacked "
          "| router stack rebuilt / cached")


def format_row(r: dict) -> str:
    i, p = r["inference_s"], r["parts_s"]
    return (f"{r['tasks']:5d} | {i['plain'] * 1e3:8.0f} ms | {r['ratio_moe_vs_plain']:.3f}x | "
            f"{r['ratio_ddas_loop_vs_plain']:.3f}x | {r['ratio_ddas_stacked_vs_plain']:.3f}x | "
            f"{p['decide_loop'] * 1e3:.0f} / {p['decide_stacked'] * 1e3:.0f} ms | "
            f"{p['router_stack_rebuilt'] * 1e3:.2f} / {p['router_stack_cached'] * 1e3:.2f} ms")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lifelong-moe bench moe_scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="1,5,20,50", help="comma-separated numbers of trained tasks")
    ap.add_argument("--model", default="ViT-B-16", help="open_clip model name, built without weights")
    ap.add_argument("--batch", type=int, default=4, help="images per inference batch")
    ap.add_argument("--experts", type=int, default=22)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 on a machine shared with other work)")
    ap.add_argument("--json", action="store_true", help="print the whole record as JSON")
    a = ap.parse_args(argv)
    try:
        tasks = [int(t) for t in a.tasks.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--tasks must be comma-separated integers, got {a.tasks!r}") from None
    if not tasks or min(tasks) < 1:
        raise UserError(f"--tasks must list task counts of at least 1, got {a.tasks!r}")
    for opt, v in (("--batch", a.batch), ("--experts", a.experts), ("--top-k", a.top_k), ("--repeats", a.repeats),
                   ("--threads", a.threads)):
        if v < 1:
            raise UserError(f"{opt} must be at least 1, got {v}")
    if a.top_k > a.experts:
        raise UserError(f"--top-k {a.top_k} exceeds --experts {a.experts}")
    if not a.json:
        print(f"{a.model} at its image size, batch {a.batch}, {a.experts} experts top-{a.top_k} in the image "
              f"tower, DDAS on AlexNet conv5 features; ratios to plain CLIP (medians of {a.repeats})")
        print(HEADER)
    r = scale_cost(tasks, model=a.model, batch=a.batch, repeats=a.repeats, threads=a.threads, experts=a.experts,
                   k=a.top_k, log=None if a.json else print)
    if a.json:
        print(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
