"""Pretrain the tiny open_clip model ``lmoe-tiny-vit`` on the synthetic world, offline, in ~80 s.

No pretrained weights can be downloaded here and a random CLIP has no zero-shot ability, so the
embedded default backbone is made on the spot, in two stages:

1. the image tower learns every scene attribute at once (one linear head per attribute: shape,
   colour, digit, count, position, texture, size, style, background; heads discarded);
2. the text tower is aligned to the locked image tower contrastively (LiT, Zhai et al. CVPR 2022)
   on generated image-caption pairs (:func:`streams.synthetic.caption_batch`): CLIP's symmetric
   InfoNCE with *multi-positive* targets (a short caption such as "a photo of a red object." is
   true of many images of a batch; every true caption is a positive, known from the scene
   attributes), plus an attribute-grouped term over one short caption per attribute value
   (:func:`bank_loss`).

Measured on 2 cores: plain contrastive training from scratch for the same minute learns colour
but leaves shape, digit and position at chance; the two stages put every domain above chance.
``supervised_steps=0, lock_image=False`` gives plain CLIP training.

The checkpoint is cached as ``<cache>/clip/<model>-<hash>.safetensors`` (``$LIFELONG_MOE_CACHE``,
default ``~/.cache/lifelong_moe``; the hash covers this config, the model config, the generator
version and the seed), loadable with ``open_clip.create_model_and_transforms("lmoe-tiny-vit",
pretrained=<path>)``; a JSON beside it records the config, training time and the zero-shot accuracy
on each synthetic domain. ``lifelong-moe pretrain clip [CONFIG] [key=value ...] [--force]``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from .clip import MODEL_CONFIG_DIR, create_clip, encode_text, image_stats, register_model_configs
from ..errors import UserError
from ..io import atomic_path, write_text
from ..runtime.threads import torch_threads
from .shipped import find

T = TypeVar("T")
RECIPE_VERSION = 3  # bump when the training code changes the weights a config produces (cache key)


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines the pretrained weights (all of it enters the cache key)."""

    model: str = "lmoe-tiny-vit"
    seed: int = 0
    steps: int = 150
    batch_size: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.05       # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 40
    weight_decay: float = 0.1
    focus: float = 0.5               # share of captions naming one attribute only
    p_attr: float = 0.5              # otherwise: chance each attribute is named
    multi_positive: bool = True      # every true caption of an image is a positive
    supervised_steps: int = 300      # stage 1: attribute heads on the image tower (0: plain CLIP)
    supervised_lr: float = 1e-3
    supervised_min_lr_ratio: float = 1.0  # stage 1 cosine-decays to supervised_lr * this (1: constant)
    lock_image: bool = True          # stage 2 trains the text tower only (LiT)
    clip_weight: float = 1.0         # weight of CLIP's InfoNCE over the batch's captions
    bank_weight: float = 1.0         # weight of the attribute-grouped contrastive term (0: plain CLIP loss)
    sincos_init: bool = True         # 2-D sin-cos init of the image tower's position embedding
    freeze_token_embedding: bool = True  # keep the (random) 49k-row token table fixed: ~2x faster steps
    threads: int = 2
    # evaluation only (not part of the cache key)
    eval_test_per_class: int = 50
    eval_seed: int = 0

    def __post_init__(self) -> None:
        """Types as the defaults have them and the bounds training needs (ValueError names the field)."""
        for f in fields(self):
            v, kind = getattr(self, f.name), type(f.default)
            accepted = {float: (int, float), int: int}.get(kind, kind)  # an int where a float goes is fine
            if not isinstance(v, accepted) or (isinstance(v, bool) and kind is not bool):
                raise ValueError(f"{f.name}: expected {kind.__name__}, got {v!r}")
        positive = ("steps", "batch_size", "lr", "supervised_lr", "threads", "eval_test_per_class")
        fractions = ("min_lr_ratio", "focus", "p_attr", "supervised_min_lr_ratio")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be greater than 0, got {getattr(self, name)}")
        for name in ("seed", "eval_seed", "warmup_steps", "supervised_steps", "weight_decay", "clip_weight",
                     "bank_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must not be negative, got {getattr(self, name)}")
        for name in fractions:
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)}")

    def key_dict(self) -> dict:
        d = asdict(self)
        for k in ("eval_test_per_class", "eval_seed", "threads"):
            d.pop(k)
        return d


def config_from_overrides(cls, name: str, pretrain: dict | None):
    """``cls(model=name, **pretrain)`` for a pretraining config dataclass (tiny CLIP or tiny VLM); an
    unknown key (with a close match) or a bad value is one UserError naming ``backbone.pretrain``."""
    import difflib
    from dataclasses import fields

    from ..errors import UserError

    over = dict(pretrain or {})
    known = {f.name for f in fields(cls)} - {"model"}
    bad = sorted(set(over) - known)
    if bad:
        close = difflib.get_close_matches(bad[0], sorted(known), n=1, cutoff=0.5)
        raise UserError(f"backbone.pretrain: unknown key {bad[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                        + f"; known keys: {', '.join(sorted(known))}")
    try:
        return cls(model=name, **over)
    except (TypeError, ValueError) as e:
        raise UserError(f"backbone.pretrain: {e}") from None


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
        raise UserError(f"model: unknown open_clip model {name!r}")
    return cfg


def cache_key(cfg: PretrainConfig) -> str:
    from ..streams.synthetic import GENERATOR_VERSION

    blob = json.dumps({"config": cfg.key_dict(), "model_cfg": model_config(cfg.model), "recipe": RECIPE_VERSION,
                       "generator_version": GENERATOR_VERSION, "seed": cfg.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def checkpoint_path(cfg: PretrainConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / "clip" / f"{cfg.model}-{cache_key(cfg)}.safetensors"


def normalizer(model):
    """uint8 or [0, 1] images -> the image tower's normalised input."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in image_stats(model))
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


def prefetched(produce: Callable[[], T], n: int, depth: int = 2) -> Iterator[T]:
    """``produce()`` called ``n`` times in a background thread, ``depth`` batches ahead, yielded in
    order: the numpy scene rendering (which releases the GIL) overlaps the model's step. Only the
    producer touches its random generator, so the batches are those of a plain loop."""
    q: queue.Queue = queue.Queue(maxsize=depth)

    def work():
        try:
            for _ in range(n):
                q.put((True, produce()))
        except BaseException as e:  # handed to the consumer
            q.put((False, e))

    threading.Thread(target=work, daemon=True, name="pretrain-prefetch").start()
    for _ in range(n):
        ok, item = q.get()
        if not ok:
            raise item
        yield item


def _warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Learning-rate factor: linear warm-up, then cosine from 1 down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


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


def bank_loss(logits: torch.Tensor, scenes: np.ndarray, bank_mentions: np.ndarray) -> torch.Tensor:
    """Attribute-grouped contrastive term: for each attribute (shape, colour, count, ...), a softmax
    over the short captions of that attribute's values ("a photo of a circle.", "... a square.", ...),
    the true one as target; averaged over attributes and the images it applies to. It is CLIP's
    image-to-text InfoNCE with negatives drawn from the same attribute, which is exactly the choice
    a zero-shot prompt classifier faces; ``logits`` is ``[images, bank captions]``."""
    from ..streams.synthetic import caption_matches

    pos = torch.from_numpy(caption_matches(scenes, bank_mentions))
    group = (bank_mentions != -1).argmax(1)
    terms = []
    for g in np.unique(group):
        cols = torch.from_numpy(np.flatnonzero(group == g))
        p = pos[:, cols]
        ok = p.sum(1) == 1  # images the attribute applies to (e.g. no shape for a digit)
        if ok.any():
            terms.append(F.cross_entropy(logits[ok][:, cols], p[ok].float().argmax(1)))
    return torch.stack(terms).mean()


def supervise_image_tower(model, cfg: "PretrainConfig", rng: np.random.Generator, progress: bool = True,
                          mix=None) -> dict:
    """Stage 1: the image tower learns every scene attribute at once, one linear head per attribute
    (cross-entropy, heads discarded afterwards). A ViT trained from scratch contrastively on 2 CPU
    cores for a minute learns colour but hardly shape or position; supervised attribute heads give
    every image a signal on every attribute, after which the text tower is aligned to the image
    features (stage 2, LiT: Zhai et al., "LiT: Zero-Shot Transfer with Locked-image text Tuning", CVPR 2022)."""
    from ..streams.synthetic import ATTRIBUTE_VALUES, PRETRAIN_MIX, sample_scenes
    from ..streams.synthetic_render import A, render

    dim = model.visual.output_dim
    heads = torch.nn.ModuleDict({a: torch.nn.Linear(dim, len(v)) for a, v in ATTRIBUTE_VALUES.items()})
    params = [p for p in model.visual.parameters()] + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.supervised_lr, weight_decay=0.01)
    norm = normalizer(model)
    losses = []

    mix = mix or PRETRAIN_MIX

    def batch():
        scenes = sample_scenes(cfg.batch_size, rng, mix)
        return scenes, render(scenes, rng, glyph_split="pretrain", rotation=mix.rotation,
                              style_strength=mix.style_strength)

    for step, (scenes, images) in enumerate(prefetched(batch, cfg.supervised_steps)):
        x = norm(torch.from_numpy(images))
        feats = model.visual(x)
        terms = []
        for a, head in heads.items():
            y = torch.from_numpy(scenes[:, A[a]] - (1 if a == "count" else 0))
            ok = y >= 0
            if ok.any():
                terms.append(F.cross_entropy(head(feats[ok]), y[ok]))
        loss = torch.stack(terms).mean()
        for g in opt.param_groups:
            g["lr"] = cfg.supervised_lr * _warmup_cosine(step, cfg.supervised_steps, cfg.warmup_steps,
                                                         cfg.supervised_min_lr_ratio)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress and (step + 1) % max(1, cfg.supervised_steps // 5) == 0:
            print(f"  image tower {step + 1:4d}/{cfg.supervised_steps}  attribute loss {np.mean(losses[-20:]):.3f}",
                  flush=True)
    return {"supervised_steps": cfg.supervised_steps,
            "supervised_final_loss": round(float(np.mean(losses[-20:])), 4) if losses else None}


def train_clip(model, tokenizer, cfg: PretrainConfig, progress: bool = True) -> dict:
    """Both pretraining stages on ``model`` in place (see the module docstring); returns statistics."""
    from ..streams.synthetic import attribute_bank, caption_batch, caption_matches

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 0xC11B])
    if cfg.sincos_init:
        sincos_position_init(model)
    tok = CachedTokenizer(tokenizer)
    norm = normalizer(model)
    if cfg.freeze_token_embedding:  # the world's vocabulary is ~100 words: random fixed rows do
        for n, p in model.named_parameters():
            if n.endswith("token_embedding.weight"):
                p.requires_grad_(False)
                p.data.copy_(p.data.half().float())  # fp16 values: the checkpoint stores the table in fp16, losslessly
    start = time.perf_counter()
    model.train()
    sup = supervise_image_tower(model, cfg, rng, progress) if cfg.supervised_steps else {}
    if cfg.supervised_steps and cfg.lock_image:  # LiT: align the text tower to the locked image tower
        for p in model.visual.parameters():
            p.requires_grad_(False)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)

    losses = []

    def batch():
        images, captions, scenes, mentions = caption_batch(cfg.batch_size, rng, focus=cfg.focus, p_attr=cfg.p_attr,
                                                           return_attrs=True)
        bank = attribute_bank(rng) if cfg.bank_weight > 0 else ([], None)
        return images, captions, scenes, mentions, bank

    for step, (images, captions, scenes, mentions, (bank, bank_mentions)) in enumerate(prefetched(batch, cfg.steps)):
        # short captions repeat within a batch: encode each distinct caption once
        first = {c: i for i, c in reversed(list(enumerate(captions)))}
        uniq = sorted(first.values())
        distinct = [captions[i] for i in uniq]
        img = F.normalize(model.encode_image(norm(torch.from_numpy(images))), dim=-1)
        txt = F.normalize(encode_text(model, tok(distinct + bank), buckets=3), dim=-1)
        scale = model.logit_scale.exp()
        logits = scale * img @ txt[:len(distinct)].t()
        if cfg.multi_positive:
            pos = torch.from_numpy(caption_matches(scenes, mentions[uniq])).float()
        else:  # plain CLIP over distinct captions: an image's own caption is its positive
            col = {c: j for j, c in enumerate(distinct)}
            pos = torch.zeros(len(images), len(uniq))
            pos[torch.arange(len(images)), torch.tensor([col[c] for c in captions])] = 1.0
        loss = 0.5 * cfg.clip_weight * (F.cross_entropy(logits, pos / pos.sum(1, keepdim=True))
                                         + F.cross_entropy(logits.t(), pos.t() / pos.t().sum(1, keepdim=True)))
        if bank:
            loss = loss + cfg.bank_weight * bank_loss(scale * img @ txt[len(distinct):].t(), scenes, bank_mentions)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
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
    for p in model.parameters():
        p.requires_grad_(True)
    return {"train_seconds": round(time.perf_counter() - start, 2), "steps": cfg.steps, **sup,
            "final_loss": round(float(np.mean(losses[-20:])), 4) if losses else None}


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, domains: Sequence[str] | None = None, seed: int = 0,
                       n_test_per_class: int = 50, batch_size: int = 512) -> dict[str, float]:
    """Zero-shot accuracy on each synthetic domain's test split: CLIP's prompt classifier (class
    names in the domain's template, cosine similarity). See :func:`chance_level`."""
    from ..streams.synthetic import DOMAINS, load_domain

    model.eval()
    norm = normalizer(model)
    out = {}
    for name in domains or DOMAINS:
        data = load_domain(name, seed=seed, n_train_per_class=1, n_test_per_class=n_test_per_class)
        prompts = [tpl.format(c) for c in data.class_names for tpl in data.templates]
        txt = F.normalize(encode_text(model, tokenizer(prompts)), dim=-1)
        txt = F.normalize(txt.view(len(data.class_names), len(data.templates), -1).mean(1), dim=-1)
        images, targets = data.test.images, torch.tensor(data.test_targets)
        correct = 0
        for i in range(0, len(targets), batch_size):
            img = F.normalize(model.encode_image(norm(images[i:i + batch_size])), dim=-1)
            correct += int(((img @ txt.t()).argmax(1) == targets[i:i + batch_size]).sum())
        out[name.split("/")[-1]] = correct / len(targets)
    return out


def chance_level(domain: str) -> float:
    from ..streams.synthetic import get_domain

    return 1.0 / len(get_domain(domain).class_names)


def format_table(acc: dict[str, float]) -> str:
    lines = [f"{'domain':<10} {'zero-shot':>9} {'chance':>7}"]
    lines += [f"{d:<10} {100 * a:8.1f}% {100 * chance_level(d):6.1f}%" for d, a in acc.items()]
    return "\n".join(lines)


def info_path(checkpoint: str | os.PathLike) -> Path:
    """The JSON record written beside a pretrained checkpoint (config, time, zero-shot accuracy)."""
    return Path(checkpoint).with_suffix(".json")


def read_info(checkpoint: str | os.PathLike) -> dict:
    p = info_path(checkpoint)
    return json.loads(p.read_text()) if p.is_file() else {}


def pretrain_clip(cfg: PretrainConfig = PretrainConfig(), *, cache_dir: str | os.PathLike | None = None,
                  force: bool = False, progress: bool = True) -> Path:
    """Path of the cached checkpoint for ``cfg``; train (and evaluate) it first if missing or ``force``."""
    path = checkpoint_path(cfg, cache_dir)
    found = None if force else find(path, cache_root(cache_dir), Path.is_file)
    if found is not None:
        return found
    from safetensors.torch import save_file

    # the caller's thread count and RNG state are left as they were
    with torch_threads(cfg.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the random init is part of what the cache key names
        model, tokenizer, *_ = create_clip(cfg.model, None)
        if progress:
            print(f"pretraining {cfg.model} on the synthetic world: {cfg.steps} steps of {cfg.batch_size} "
                  f"(cache: {path})", flush=True)
        stats = train_clip(model, tokenizer, cfg, progress)
        acc = zero_shot_accuracy(model, tokenizer, seed=cfg.eval_seed, n_test_per_class=cfg.eval_test_per_class)
    from ..streams.synthetic import GENERATOR_VERSION

    info = {"model": cfg.model, "checkpoint": path.name, "config": asdict(cfg), "model_cfg": model_config(cfg.model),
            "generator_version": GENERATOR_VERSION, **stats, "torch_threads": cfg.threads,
            "zero_shot": {d: {"accuracy": round(a, 4), "chance": round(chance_level(d), 4)} for d, a in acc.items()}}
    # the record first, the checkpoint last: an existing checkpoint always has its record
    write_text(info_path(path), json.dumps(info, indent=2) + "\n")
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if cfg.freeze_token_embedding:  # 49k fixed rows of fp16 values (train_clip): half the bytes, same numbers
        state = {k: v.half() if k.endswith("token_embedding.weight") else v for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    if progress:
        print(f"trained in {stats['train_seconds']:.1f}s; zero-shot accuracy on the synthetic domains:")
        print(format_table(acc), flush=True)
    return path


def resolve_synthetic(name: str, pretrain: dict | None = None, progress: bool = True, force: bool = False,
                      cache_dir: str | None = None) -> str:
    """Path of the tiny CLIP ``name`` pretrained on the synthetic world (trained on first use, then
    cached); ``pretrain`` overrides fields of :class:`PretrainConfig`."""
    cfg = config_from_overrides(PretrainConfig, name, pretrain)
    return str(pretrain_clip(cfg, progress=progress, force=force, cache_dir=cache_dir))
