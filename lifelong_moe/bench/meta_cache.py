"""Memory of LiveEdit's meta-training cache at LLaVA-1.5 input sizes, CPU.

A randomly initialised mid-size LLaVA (CLIP-style vision tower at 336 px with 14 px patches: 576
image tokens; a Llama of ``--hidden`` width and ``--layers`` blocks with LLaVA-1.5's 32,064-token
vocabulary; the tiny VLM's word-level tokenizer for the text) meta-trains nothing: LiveEdit is
attached and its frozen-state cache (:mod:`lifelong_moe.editing.frozen_states`) is built for
``--records`` synthetic edit records with their pictures resized to 336 px. Reported per record: the
cache's bytes (counted), the part that is the pre-edit log-probabilities (answer tokens only) against
what keeping them at every position would take; and the growth of peak RSS over the build (the
frozen pass of one chunk of 8 records computes full-vocabulary logits for their locality inputs:
transient, per chunk, not per record). The
hooked-block states scale with the width: ``4 inputs x tokens x d x 4 bytes``; at d = 4096 (7B)
the cache holds 16x this run's states per record, which is why ``cache_limit_gb`` turns it off there.

Run it as ``lifelong-moe bench meta_cache [--records 64] [--hidden 1024] [--layers 4]``.
"""
from __future__ import annotations

import argparse
import json
import resource

import torch
import torch.nn.functional as F

from ..errors import UserError

VOCAB = 32064  # LLaVA-1.5's


def build(hidden: int, layers: int, seed: int = 0):
    """The mid-size random LLaVA at 336 px and its processor (the tiny VLM's tokenizer and image statistics)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from ..backbones.vlm import VisionLanguageModel
    from ..backbones.vlm_tiny import build_tiny_llava

    tiny, processor = build_tiny_llava(seed=seed)
    tok = processor.tokenizer
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                              image_size=336, patch_size=14, projection_dim=256)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                       num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tiny.config.image_token_id,
                      image_seq_length=576, vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg.prompt_template = tiny.config.prompt_template
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(cfg).eval()
    processor.patch_size = 14
    return VisionLanguageModel(model, processor, name="llava-1.5-shapes")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def cache_cost(records: int = 64, hidden: int = 1024, layers: int = 4, threads: int = 1, seed: int = 0) -> dict:
    from ..editing.frozen_states import bytes_per_record
    from ..editing.registry import build_method
    from ..streams.edit_synthetic import edit_records

    torch.set_num_threads(threads)
    vlm = build(hidden, layers, seed)
    recs = edit_records("train", records, seed=seed)
    for r in recs:  # the synthetic world's 32 px pictures at LLaVA-1.5's 336 px
        for f in ("image", "image_rephrase", "m_loc"):
            setattr(r, f, F.interpolate(getattr(r, f)[None], size=336, mode="bilinear", align_corners=False)[0])
    m = build_method("liveedit", {"module_dim": 256, "cache_limit_gb": 1024, "fitted": "none"})
    m.attach(vlm)
    lines: list[str] = []
    before = peak_rss()
    cache = m._frozen_cache(recs, chunk=8, progress=lines.append)
    grown = peak_rss() - before
    per = [bytes_per_record(r) for r in cache]
    loc = [r[-1] for r in cache]
    pre = [x["pre_loc_at"].numel() * 4 + x["pre_loc_pos"].numel() * 8 for x in loc]
    every = [len(x["labels"]) * VOCAB * 4 for x in loc]  # log-probs at every position, the earlier cache
    tokens = [len(r[0]["labels"]) for r in cache]
    return {"setup": {"records": records, "hidden": hidden, "layers": layers, "vocab": VOCAB, "image_tokens": 576,
                      "tokens_per_input_mean": sum(tokens) / len(tokens), "threads": threads},
            "said_before_building": lines, "cache_bytes_per_record": sum(per) / len(per),
            "pre_loc_bytes_per_record": sum(pre) / len(pre),
            "pre_loc_bytes_per_record_at_every_position": sum(every) / len(every),
            "peak_rss_growth": grown, "peak_rss_growth_per_record": grown / records}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lifelong-moe bench meta_cache", description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    for opt, v in (("--records", a.records), ("--hidden", a.hidden), ("--layers", a.layers), ("--threads", a.threads)):
        if v < 1:
            raise UserError(f"{opt} must be at least 1, got {v}")
    if a.hidden % 64:
        raise UserError(f"--hidden must be a multiple of 64 (heads of 64), got {a.hidden}")
    r = cache_cost(a.records, a.hidden, a.layers, a.threads)
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    kib = 2 ** 10
    print(*r["said_before_building"], sep="\n")
    print(f"per record ({r['setup']['tokens_per_input_mean']:.0f} tokens per input, d {a.hidden}, vocab {VOCAB}): "
          f"cache {r['cache_bytes_per_record'] / kib:.0f} KiB, of which pre-edit log-probs "
          f"{r['pre_loc_bytes_per_record'] / kib:.0f} KiB (at every position: "
          f"{r['pre_loc_bytes_per_record_at_every_position'] / kib:.0f} KiB); peak RSS grew "
          f"{r['peak_rss_growth'] / 2 ** 20:.0f} MiB while building it (the chunk of 8 records' full-vocabulary "
          f"logits, transient, and the cache)")
    return 0
