"""Cost of CL-MoE on the tiny VLM (``lmoe-tiny-llava``, random init), CPU, against the floor: the same
backbone with one dense LoRA (peft) of the same total rank on the same linears.

``cl_moe_cost`` times, as interleaved repeated medians (:func:`lifelong_moe.bench.timing.median_times`):

- a training step (teacher-forced forward of ``batch`` questions, answer CE, backward, AdamW step);
- greedy generation (``max_new_tokens``, KV cache) of ``infer_batch`` answers through the
  strategies' own ``answer``: CL-MoE with its test-time task router (prototype inference inside the
  forward, beta-mixed gates) and with the instance router alone. Timed before any training step,
  on random adapters that never emit EOS, so every variant decodes the same number of tokens.

Run it as ``lifelong-moe bench cl_moe`` (``--json`` for the whole record). Timings are never asserted.
"""
from __future__ import annotations

import argparse
import json

import torch

from .timing import median_times


def _strategy(name: str, extra: dict, batch: int, seed: int):
    from ..config import validate
    from ..runs.runner import build

    cfg = validate({
        "name": "bench", "seed": seed,
        "stream": {"kind": "vqa", "dataset": "synthetic_vqa", "question_types": ["color", "type"],
                   "questions_per_type": {"train": batch, "test": batch}},
        "backbone": {"family": "vlm", "name": "lmoe-tiny-llava"},
        "strategy": {"name": name, **extra},
        "training": {"iterations": 1, "batch_size": batch},
    })
    stream, strategy, _ = build(cfg, progress=False)
    return stream, strategy


def cl_moe_cost(batch: int = 32, infer_batch: int = 64, max_new_tokens: int = 4, num_experts: int = 4, r: int = 32,
                repeats: int = 20, warmup: int = 3, threads: int = 2, seed: int = 0) -> dict:
    """Median seconds per training step / generation batch and the CL-MoE-over-LoRA ratios."""
    from ..moe.lora_experts import task_gate

    torch.set_num_threads(threads)
    stream, clmoe = _strategy("cl_moe", {"num_experts": num_experts, "r": r, "alpha": 2.0 * r, "train_projector": False},
                              batch, seed)  # like for like: LoRA trains no projector
    _, lora = _strategy("lora", {"r": r, "alpha": 2.0 * r, "dropout": 0.05}, batch, seed)
    task = stream.tasks[0]
    data = stream.train_stream[0].dataset
    x = torch.stack([data[i][0] for i in range(batch)])
    recs = [task.train_records[int(data[i][1])] for i in range(batch)]
    xi = torch.stack([data[i % len(data)][0] for i in range(infer_batch)])
    questions = [task.train_records[int(data[i % len(data)][1])].question for i in range(infer_batch)]
    for s in (clmoe, lora):
        with torch.no_grad():
            for p in s.model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.02)
    # a "trained" task router: two tasks' prototypes around these questions, task gates from real usage
    st = clmoe.moe.state
    b = clmoe.model.batch(x, [q.question for q in recs], [q.answer for q in recs])
    st.record, st.token_mask = True, b.attention_mask.bool()
    clmoe._probe.expect(b.image_mask, b.prompt_mask)
    with torch.no_grad():
        clmoe.model.logits(b)
    st.record, st.token_mask = False, None
    feats = torch.cat(clmoe._feats)
    clmoe._feats = []
    for shift in (0.0, 1.0):
        clmoe.prototypes.add(feats + shift)
        for m in clmoe.moe.layers.values():
            m.add_task_gate(task_gate(m.usage, clmoe.params.task_experts))
    clmoe.prototypes.radii *= 1.5  # the farthest question sits on the radius: keep it inside despite round-off
    clmoe.trained_count = 2

    clmoe.cfg.evaluation.max_new_tokens = lora.cfg.evaluation.max_new_tokens = max_new_tokens

    def generate(s, task_router=True):
        def run():
            beta = clmoe.moe.state.beta
            if not task_router:
                clmoe.moe.state.beta = 1.0  # mixes_tasks() is False: the instance router alone
            try:
                s.answer(xi, questions, task)
            finally:
                clmoe.moe.state.beta = beta
        return run

    # random adapters emit no EOS, so both generate exactly max_new_tokens (checked): trained ones
    # would stop at different steps and time different work
    lengths = {k: int((st_.model.generate_ids(xi, questions, max_new_tokens) != st_.model.eos_token_id).all(1).sum())
               for k, st_ in (("cl_moe", clmoe), ("lora", lora))}
    gen = median_times({"cl_moe": generate(clmoe), "cl_moe_instance_only": generate(clmoe, False),
                         "lora": generate(lora)}, repeats, warmup)

    def step(s):
        opt = torch.optim.AdamW([p for p in s.model.parameters() if p.requires_grad], lr=1e-4)

        def run():
            s.model.train()
            loss = s.model.answer_loss(s.qa_batch(x, recs))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    train = median_times({"cl_moe": step(clmoe), "lora": step(lora)}, repeats, warmup)
    inferred = clmoe.inference.get((1, task.index))
    return {
        "setup": {"model": "lmoe-tiny-llava", "experts": num_experts, "r": r, "batch": batch,
                  "infer_batch": infer_batch, "max_new_tokens": max_new_tokens, "repeats": repeats, "threads": threads,
                  "adapted_linears": len(clmoe.moe)},
        "train_step_s": train, "generation_s": gen,
        "train_ratio_vs_lora": train["cl_moe"] / train["lora"],
        "generation_ratio_vs_lora": gen["cl_moe"] / gen["lora"],
        "generation_instance_only_ratio_vs_lora": gen["cl_moe_instance_only"] / gen["lora"],
        "rows_without_eos": lengths,
        "task_inference_fallback_rate": float(inferred[0] / inferred.sum()) if inferred is not None else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lifelong-moe bench cl_moe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--r", type=int, default=32, help="total rank (CL-MoE splits it over the experts)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--infer-batch", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print the whole record as JSON")
    a = ap.parse_args(argv)
    res = cl_moe_cost(batch=a.batch, infer_batch=a.infer_batch, max_new_tokens=a.max_new_tokens,
                      num_experts=a.experts, r=a.r, repeats=a.repeats, threads=a.threads)
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    t, g = res["train_step_s"], res["generation_s"]
    print(f"train step ({a.batch} questions): CL-MoE {t['cl_moe'] * 1e3:.1f} ms, dense LoRA r={a.r} "
          f"{t['lora'] * 1e3:.1f} ms -> {res['train_ratio_vs_lora']:.2f}x (target <= 1.3x)")
    print(f"generation ({a.infer_batch} answers, {a.max_new_tokens} tokens): CL-MoE with task router "
          f"{g['cl_moe'] * 1e3:.1f} ms, dense LoRA {g['lora'] * 1e3:.1f} ms -> {res['generation_ratio_vs_lora']:.2f}x "
          f"(target <= 1.15x); instance router only {res['generation_instance_only_ratio_vs_lora']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
