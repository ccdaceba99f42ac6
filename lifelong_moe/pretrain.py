"""Pretrain the tiny open_clip model ``lmoe-tiny-vit`` on the synthetic world, offline, in ~1 minute.

No pretrained weights can be downloaded here and a random CLIP has no zero-shot ability, so the
embedded default backbone is made on the spot: contrastive image-caption training (CLIP's
symmetric InfoNCE with a learnable logit scale) on pairs from :func:`streams.synthetic.caption_batch`.
Short captions ("a photo of a red object.") are true of many images of a batch, so by default the
targets are *multi-positive*: every caption true of an image (known from the scene attributes) is
a positive, with the probability mass spread evenly (plain CLIP when all captions are distinct).

The checkpoint is cached as ``<cache>/clip/<model>-<hash>.safetensors`` (``$LIFELONG_MOE_CACHE``,
default ``~/.cache/lifelong_moe``), loadable with ``open_clip.create_model_and_transforms(
"lmoe-tiny-vit", pretrained=<path>)``; a JSON beside it records the config, training time and the
zero-shot accuracy on each synthetic domain. ``python -m lifelong_moe.pretrain [--force]``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .clip import MODEL_CONFIG_DIR, register_model_configs

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines the pretrained weights (all of it enters the cache key)."""

    model: str = "lmoe-tiny-vit"
    seed: int = 0
    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.05       # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 40
    weight_decay: float = 0.1
    focus: float = 0.5               # share of captions naming one attribute only
    p_attr: float = 0.5              # otherwise: chance each attribute is named
    multi_positive: bool = True      # every true caption of an image is a positive
    sincos_init: bool = True         # 2-D sin-cos init of the image tower's position embedding
    threads: int = 2
    # evaluation only (not part of the cache key)
    eval_test_per_class: int = 50
    eval_seed: int = 0

    def key_dict(self) -> dict:
        d = asdict(self)
        for k in ("eval_test_per_class", "eval_seed", "threads"):
            d.pop(k)
        return d


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    root = cache_dir or os.environ.get("LIFELONG_MOE_CACHE") or "~/.cache/lifelong_moe"
    return Path(root).expanduser()


def model_config(name: str) -> dict:
    path = MODEL_CONFIG_DIR / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    import open_clip

    register_model_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {name!r}")
    return cfg


def cache_key(cfg: PretrainConfig) -> str:
    from .streams.synthetic import GENERATOR_VERSION

    blob = json.dumps({"config": cfg.key_dict(), "model_cfg": model_config(cfg.model),
                       "generator_version": GENERATOR_VERSION, "seed": cfg.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def checkpoint_path(cfg: PretrainConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / "clip" / f"{cfg.model}-{cache_key(cfg)}.safetensors"


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def create_model(name: str, pretrained: str | None = None):
    """``(model, tokenizer)`` of a registered open_clip model; ``pretrained`` a local path or None."""
    import logging

    import open_clip

    register_model_configs()
    level = logging.getLogger().level
    logging.getLogger().setLevel(max(level, logging.ERROR))
    try:
        model, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    finally:
        logging.getLogger().setLevel(level)
    return model, open_clip.get_tokenizer(name)


def normalizer(model):
    vis = model.visual
    mean = torch.tensor(getattr(vis, "image_mean", None) or OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(getattr(vis, "image_std", None) or OPENAI_STD).view(1, 3, 1, 1)
    return lambda x: ((x.float() / 255.0 if x.dtype == torch.uint8 else x.float()) - mean) / std


class CachedTokenizer:
    """Tokenise each distinct caption once (captions repeat a lot)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if new:
            for t, row in zip(new, self.tokenizer(new)):
                self.cache[t] = row
        return torch.stack([self.cache[t] for t in texts])


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embedding" in n or "logit_scale" in n else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def sincos_position_init(model, scale: float = 0.5) -> None:
    """Overwrite a ViT's learnable position embedding with 2-D sin-cos values (class token: 0)."""
    pe = getattr(model.visual, "positional_embedding", None)
    if pe is None:
        return
    n, width = pe.shape
    side = int(round(math.sqrt(n - 1)))
    if side * side != n - 1 or width % 4:
        return
    freqs = 1.0 / (100.0 ** (torch.arange(width // 4, dtype=torch.float32) / (width // 4)))
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                            indexing="ij")
    ang_y, ang_x = ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs
    table = torch.cat([ang_y.sin(), ang_y.cos(), ang_x.sin(), ang_x.cos()], dim=1)
    with torch.no_grad():
        pe.zero_()
        pe[1:] = table * scale


def train_clip(model, tokenizer, cfg: PretrainConfig, progress: bool = True) -> dict:
    """Contrastive pretraining of ``model`` in place; returns training statistics."""
    from .streams.synthetic import caption_batch, caption_matches

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 0xC11B])
    if cfg.sincos_init:
        sincos_position_init(model)
    tok = CachedTokenizer(tokenizer)
    norm = normalizer(model)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    start, losses = time.perf_counter(), []
    for step in range(cfg.steps):
        images, captions, scenes, mentions = caption_batch(cfg.batch_size, rng, focus=cfg.focus, p_attr=cfg.p_attr,
                                                           return_attrs=True)
        x, t = norm(torch.from_numpy(images)), tok(captions)
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(t), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.t()
        if cfg.multi_positive:
            pos = torch.from_numpy(caption_matches(scenes, mentions)).float()
            loss = 0.5 * (F.cross_entropy(logits, pos / pos.sum(1, keepdim=True))
                          + F.cross_entropy(logits.t(), (pos / pos.sum(0, keepdim=True)).t()))
        else:
            labels = torch.arange(len(captions))
            loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if progress and (step + 1) % max(1, cfg.steps // 10) == 0:
            print(f"  step {step + 1:4d}/{cfg.steps}  loss {np.mean(losses[-20:]):.3f}  "
                  f"scale {model.logit_scale.exp().item():5.1f}  {time.perf_counter() - start:5.1f}s", flush=True)
    model.eval()
    return {"train_seconds": round(time.perf_counter() - start, 2), "steps": cfg.steps,
            "final_loss": round(float(np.mean(losses[-20:])), 4) if losses else None}


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, domains: Sequence[str] | None = None, seed: int = 0,
                       n_test_per_class: int = 50, batch_size: int = 512) -> dict[str, float]:
    """Zero-shot accuracy on each synthetic domain's test split: CLIP's prompt classifier (class
    names in the domain's template, cosine similarity). See :func:`chance_level`."""
    from .streams.synthetic import DOMAINS, load_domain

    model.eval()
    norm = normalizer(model)
    out = {}
    for name in domains or DOMAINS:
        data = load_domain(name, seed=seed, n_train_per_class=1, n_test_per_class=n_test_per_class)
        prompts = [tpl.format(c) for c in data.class_names for tpl in data.templates]
        txt = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
        txt = F.normalize(txt.view(len(data.class_names), len(data.templates), -1).mean(1), dim=-1)
        images, targets = data.test.images, torch.tensor(data.test_targets)
        correct = 0
        for i in range(0, len(targets), batch_size):
            img = F.normalize(model.encode_image(norm(images[i:i + batch_size])), dim=-1)
            correct += int(((img @ txt.t()).argmax(1) == targets[i:i + batch_size]).sum())
        out[name.split("/")[-1]] = correct / len(targets)
    return out


def chance_level(domain: str) -> float:
    from .streams.synthetic import get_domain

    return 1.0 / len(get_domain(domain).class_names)


def format_table(acc: dict[str, float]) -> str:
    lines = [f"{'domain':<10} {'zero-shot':>9} {'chance':>7}"]
    lines += [f"{d:<10} {100 * a:8.1f}% {100 * chance_level(d):6.1f}%" for d, a in acc.items()]
    return "\n".join(lines)


def pretrain_clip(cfg: PretrainConfig = PretrainConfig(), *, cache_dir: str | os.PathLike | None = None,
                  force: bool = False, progress: bool = True) -> Path:
    """Path of the cached checkpoint for ``cfg``; train (and evaluate) it first if missing or ``force``."""
    path = checkpoint_path(cfg, cache_dir)
    if path.is_file() and not force:
        return path
    from safetensors.torch import save_file

    torch.set_num_threads(cfg.threads)
    model, tokenizer = create_model(cfg.model)
    if progress:
        print(f"pretraining {cfg.model} on the synthetic world: {cfg.steps} steps of {cfg.batch_size} "
              f"(cache: {path})", flush=True)
    stats = train_clip(model, tokenizer, cfg, progress)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    _atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    acc = zero_shot_accuracy(model, tokenizer, seed=cfg.eval_seed, n_test_per_class=cfg.eval_test_per_class)
    from .streams.synthetic import GENERATOR_VERSION

    info = {"model": cfg.model, "checkpoint": path.name, "config": asdict(cfg), "model_cfg": model_config(cfg.model),
            "generator_version": GENERATOR_VERSION, **stats, "torch_threads": torch.get_num_threads(),
            "zero_shot": {d: {"accuracy": round(a, 4), "chance": round(chance_level(d), 4)} for d, a in acc.items()}}
    _atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))
    if progress:
        print(f"trained in {stats['train_seconds']:.1f}s; zero-shot accuracy on the synthetic domains:")
        print(format_table(acc), flush=True)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lifelong_moe.pretrain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="retrain even if a cached checkpoint exists")
    ap.add_argument("--steps", type=int, help="training steps (changes the cache key)")
    ap.add_argument("--seed", type=int, help="pretraining seed (changes the cache key)")
    ap.add_argument("--cache-dir", help="cache root (default $LIFELONG_MOE_CACHE or ~/.cache/lifelong_moe)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    over = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    cfg = PretrainConfig(**over)
    path = pretrain_clip(cfg, cache_dir=args.cache_dir, force=args.force, progress=not args.quiet)
    info = path.with_suffix(".json")
    if not args.force and info.is_file() and not args.quiet:
        data = json.loads(info.read_text())
        print(f"cached checkpoint (trained in {data.get('train_seconds')}s):")
        print(format_table({d: v["accuracy"] for d, v in data.get("zero_shot", {}).items()}))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
