"""Cost of knowledge editing on the tiny VLM (``lmoe-tiny-llava``), CPU, for any editing method:

- answering (greedy generation of ``batch`` questions, ``max_new_tokens``) with ``edits`` stored edits
  against an empty store, as interleaved repeated medians (:func:`lifelong_moe.bench.timing.median_times`)
  and their ratio. The store holds ``real`` edits made by the method, cycled (float tensors with a
  little noise, so no two are equal) up to ``edits``; the questions are about other scenes;
- one ``edit()`` call (median over ``real`` edits) against one teacher-forced forward of the VLM on
  the same edit;
- bytes per stored edit: the method's tensors alone, and the saved store (request images included)
  divided by the number of edits.

Run it as ``lifelong-moe bench edit [--method retrieval] [--edits 10000]`` (``--json`` for the whole
record). Timings are never asserted in tests.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .timing import median_times
from ..errors import UserError


def world_records(vlm, n: int, seed: int):
    """Colour questions about synthetic scenes with a counterfactual colour as the edit (cost only)."""
    from ..editing.types import EditRecord
    from ..streams.synthetic_render import render
    from ..streams.vqa_synthetic import answer_space, make_questions, sample_for

    rng = np.random.default_rng(seed)
    scenes = sample_for("color", n, rng)
    x = torch.as_tensor(render(scenes, rng, glyph_split="test")).float() / 255.0
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (vlm.mean, vlm.std))
    x = (x - mean) / std
    q, truth = make_questions(scenes, "color", rng)
    colors = answer_space("color")
    return [EditRecord(src=q[i], alt=colors[(colors.index(truth[i]) + 1) % len(colors)], image=x[i], pred=truth[i])
            for i in range(n)]


def edit_cost(method: str = "retrieval", params: dict | None = None, edits: int = 10000, real: int = 32,
              batch: int = 64, max_new_tokens: int = 8, repeats: int = 10, warmup: int = 2, threads: int = 2,
              pretrained: str | None = "synthetic", seed: int = 0, fit: int = 0) -> dict:
    from ..editing.editor import Editor

    if fit and method != "liveedit":  # before the backbone is loaded (or pretrained, from an empty cache)
        raise UserError(f"--fit meta-trains LiveEdit; {method!r} has nothing to meta-train")
    if fit:
        params = {**(params or {}), "steps": fit}
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    # built from the config, not an instance: LiveEdit then takes the generators shipped for the tiny VLM
    # (and their settings) unless --set or --fit chooses others
    backbone = {"name": "lmoe-tiny-llava", "pretrained": pretrained}
    empty = Editor(backbone, method, seed=seed, **(params or {}))
    full = Editor(backbone, method, seed=seed, **(params or {}))
    vlm = full.vlm
    fit_s = None
    if fit:  # how many experts the trained hard filter keeps sets the cost of answering
        from ..streams.edit_synthetic import edit_records

        t = time.perf_counter()
        full.fit(edit_records("train", 600, seed=seed))
        fit_s = time.perf_counter() - t
    recs = world_records(vlm, real, seed)
    single, forward = [], []
    for r in recs:
        t = time.perf_counter()
        full.edit(image=r.image, prompt=r.src, target=r.alt)
        single.append(time.perf_counter() - t)
        b = vlm.batch(r.image.unsqueeze(0), [r.src], [r.alt])
        t = time.perf_counter()
        with torch.no_grad():
            type(vlm).logits(vlm, b)
        forward.append(time.perf_counter() - t)
    g = torch.Generator().manual_seed(seed)
    made = full.store.active
    while len(full.store) < edits:  # fill up to `edits`, cycling the real ones
        e = made[len(full.store) % len(made)]
        noisy = {k: v + 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                 for k, v in e.tensors.items()}
        full.store.add(e.request, e.images, noisy)
    full.method.set_edits(full.store.method_view())
    queries = world_records(vlm, batch, seed + 1)
    x = torch.stack([r.image for r in queries])
    qs = [r.src for r in queries]
    times = median_times({"none": lambda: empty.vlm.generate(x, qs, max_new_tokens),
                           "stored": lambda: full.vlm.generate(x, qs, max_new_tokens)}, repeats, warmup)
    kept = None
    if hasattr(full.method, "routing"):  # experts each question keeps (LiveEdit's hard filter and cap)
        keep, _ = full.method.routing(vlm.batch(x, qs))
        kept = {"mean": float(keep.sum(1).float().mean()), "max": int(keep.sum(1).max())}
    method_bytes = sum(v.numel() * v.element_size() for e in full.store.active for v in e.tensors.values())
    with tempfile.TemporaryDirectory() as d:
        full.save(Path(d) / "store")
        saved = sum(p.stat().st_size for p in (Path(d) / "store").iterdir())
    return {"setup": {"method": method, "params": full.method.config(), "edits": len(full.store), "real_edits": real,
                      "batch": batch, "max_new_tokens": max_new_tokens, "threads": threads, "backbone_pretrained": pretrained,
                      "fit_steps": fit, "fit_s": fit_s},
            "experts_kept_per_question": kept,
            "answer_s": times, "answer_ratio_stored_vs_none": times["stored"] / times["none"],
            "edit_s": statistics.median(single), "forward_s": statistics.median(forward),
            "edit_ratio_vs_forward": statistics.median(single) / statistics.median(forward),
            "method_bytes_per_edit": method_bytes / len(full.store), "store_bytes_per_edit": saved / len(full.store)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lifelong-moe bench edit", description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="retrieval", help="liveedit, ft, lora or retrieval")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a method parameter (repeatable)")
    ap.add_argument("--edits", type=int, default=10000)
    ap.add_argument("--real", type=int, default=32, help="edits actually made (the rest cycle them)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fit", type=int, default=0, metavar="STEPS",
                    help="meta-train the method first for STEPS steps on 600 synthetic train records (LiveEdit)")
    ap.add_argument("--random-init", action="store_true", help="the tiny VLM randomly initialised (no pretraining)")
    ap.add_argument("--json", action="store_true", help="print the whole record as JSON")
    a = ap.parse_args(argv)
    if a.fit < 0:
        raise UserError(f"--fit must be at least 0, got {a.fit}")
    for opt, v in (("--edits", a.edits), ("--real", a.real), ("--batch", a.batch), ("--repeats", a.repeats),
                   ("--threads", a.threads)):
        if v < 1:
            raise UserError(f"{opt} must be at least 1, got {v}")
    import yaml

    params = {}
    for item in a.set:
        k, sep, v = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r} is not of the form key=value")
        params[k.strip()] = yaml.safe_load(v)
    r = edit_cost(a.method, params, edits=a.edits, real=min(a.real, a.edits), batch=a.batch, repeats=a.repeats,
                  threads=a.threads, pretrained=None if a.random_init else "synthetic", fit=a.fit)
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        t = r["answer_s"]
        print(f"{a.method}: answering {a.batch} questions with {r['setup']['edits']} stored edits "
              f"{t['stored'] * 1e3:.1f} ms vs none {t['none'] * 1e3:.1f} ms -> {r['answer_ratio_stored_vs_none']:.2f}x")
        if r["experts_kept_per_question"]:
            k = r["experts_kept_per_question"]
            print(f"experts kept per question: mean {k['mean']:.1f}, max {k['max']}")
        print(f"one edit(): {r['edit_s'] * 1e3:.1f} ms = {r['edit_ratio_vs_forward']:.1f}x one forward of the VLM on "
              f"the edit ({r['forward_s'] * 1e3:.1f} ms)")
        print(f"bytes per stored edit: method tensors {r['method_bytes_per_edit']:.0f}, saved store "
              f"{r['store_bytes_per_edit']:.0f} (request images included)")
    return 0
