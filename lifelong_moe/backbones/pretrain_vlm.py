"""Pretrain the tiny LLaVA ``lmoe-tiny-llava`` on the synthetic world, offline, in about a minute.

LLaVA's recipe (Liu et al., NeurIPS 2023, Sec. 4.1) on the synthetic world: the vision tower is
the pretrained tiny CLIP's (converted, frozen); the projector and the LLM learn from scratch, by
teacher-forced next-token cross-entropy on the answer (:meth:`VisionLanguageModel.answer_logprobs`,
averaged per example),
on a mix of

- captions (:func:`streams.synthetic.caption_batch`): "<image> question: describe the picture
  answer:" -> "a photo of two red circles ." (feature alignment, LLaVA's stage 1), and
- questions of :data:`streams.vqa_synthetic.PRETRAIN_TYPES` only (LLaVA's stage 2, instruction
  tuning); the other question types stay unseen, so a continual VQA stream has something to learn.

The result is cached as a ``save_pretrained`` directory ``<cache>/vlm/<model>-<hash>/``
(``$LIFELONG_MOE_CACHE``, default ``~/.cache/lifelong_moe``; the hash covers this config, the
shipped model config, the tiny CLIP checkpoint it starts from, the generators' versions, the
vocabulary and the seed), built in a temporary directory and renamed into place, and loaded with
``from_pretrained(<dir>)`` as a user's own LLaVA directory is. A JSON beside it records the
config, the training time and the zero-shot exact-match accuracy on each of the ten question types.
``lifelong-moe pretrain vlm [CONFIG] [key=value ...] [--force]``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..io import write_text
from ..runtime.threads import torch_threads

RECIPE_VERSION = 2  # bump when the training code changes the weights a config produces (cache key)


def _default_types() -> tuple[str, ...]:
    from ..streams.vqa_synthetic import PRETRAIN_TYPES

    return tuple(PRETRAIN_TYPES)


@dataclass(frozen=True)
class VlmPretrainConfig:
    """Everything that determines the pretrained weights (all of it but ``threads`` and the
    evaluation fields enters the cache key)."""

    model: str = "lmoe-tiny-llava"
    seed: int = 0
    steps: int = 6000
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.05      # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.01
    caption_share: float = 0.4      # share of each batch that is image-caption pairs
    captions: str = "full"          # full: describe_scene (every attribute, in words); partial: the tiny CLIP's
    vision_steps: int = 3000        # stage 0: the tiny CLIP's image tower goes on learning the world's attributes
    vision_lr: float = 1e-3         # (its stage 1, attribute heads, on the caption scenes), then stays frozen
    vision_lr_ratio: float = 0.0    # the vision tower's lr / lr in the LLaVA stages (0: frozen, as LLaVA-1.5)
    question_types: tuple[str, ...] = field(default_factory=_default_types)  # the rest stay unseen
    threads: int = 2                # torch threads (as the tiny CLIP's): 1.55x faster than 1 on a quiet 2-core machine, same
                                    # weights bit for bit (checked); use 1 when other jobs share the cores (OpenMP stalls)
    # evaluation only (not part of the cache key)
    eval_test: int = 100            # test questions per type
    eval_seed: int = 0
    eval_probe: int = 600           # training images per type of the vision tower's linear probe (0: no probe)

    def __post_init__(self):
        from ..streams.vqa_synthetic import QUESTION_TYPES

        object.__setattr__(self, "question_types", tuple(self.question_types))
        bad = [t for t in self.question_types if t not in QUESTION_TYPES]
        if bad:
            raise ValueError(f"question_types: unknown type {bad[0]!r}; types: {', '.join(QUESTION_TYPES)}")
        if not 0.0 <= self.caption_share <= 1.0 or (self.caption_share < 1.0 and not self.question_types):
            raise ValueError("caption_share must be in [0, 1] (and 1 when question_types is empty)")
        if self.captions not in ("full", "partial"):
            raise ValueError(f"captions must be 'full' or 'partial', not {self.captions!r}")
        if self.vision_lr_ratio < 0 or self.vision_steps < 0 or self.vision_lr <= 0:
            raise ValueError("vision_lr_ratio and vision_steps must be >= 0, vision_lr > 0")
        if self.steps < 0 or self.batch_size < 2:
            raise ValueError("steps must be >= 0 and batch_size >= 2")

    def key_dict(self) -> dict:
        d = asdict(self)
        for k in ("eval_test", "eval_seed", "eval_probe", "threads"):
            d.pop(k)
        return d


# ----------------------------------------------------------------------------- cache
def cache_key(cfg: VlmPretrainConfig, clip_checkpoint: str) -> str:
    from ..streams.synthetic import GENERATOR_VERSION
    from ..streams.vqa_synthetic import VQA_GENERATOR_VERSION
    from .vlm_tiny import tiny_spec, tiny_words

    spec = tiny_spec(cfg.model)
    blob = json.dumps({"config": cfg.key_dict(), "model_cfg": spec, "recipe": RECIPE_VERSION,
                       "clip": Path(clip_checkpoint).name, "generator_version": GENERATOR_VERSION,
                       "vqa_generator_version": VQA_GENERATOR_VERSION, "vocabulary": sorted(set(tiny_words(spec))),
                       "seed": cfg.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def checkpoint_dir(cfg: VlmPretrainConfig, clip_checkpoint: str, cache_dir=None) -> Path:
    from .pretrain_clip import cache_root

    return cache_root(cache_dir) / "vlm" / f"{cfg.model}-{cache_key(cfg, clip_checkpoint)}"


def info_path(checkpoint: str | os.PathLike) -> Path:
    """The JSON record beside a pretrained VLM directory (config, time, zero-shot accuracy)."""
    p = Path(checkpoint)
    return p.with_name(p.name + ".json")


def read_info(checkpoint: str | os.PathLike) -> dict:
    p = info_path(checkpoint)
    return json.loads(p.read_text()) if p.is_file() else {}


def _complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- data
def _qa_examples(qtype: str, n: int, rng: np.random.Generator):
    """``n`` (image uint8, question, answer) of ``qtype`` on pretraining glyphs (the tasks' train and
    test images use the other glyph splits)."""
    from ..streams import vqa_synthetic as vqa
    from ..streams.synthetic_render import render

    mix = vqa._spec(qtype).mix
    scenes = vqa.sample_for(qtype, n, rng)
    images = render(scenes, rng, glyph_split="pretrain", rotation=mix.rotation, style_strength=mix.style_strength)
    questions, answers = vqa.make_questions(scenes, qtype, rng)
    return images, questions, answers


def full_caption_batch(n: int, rng: np.random.Generator):
    """``n`` scenes drawn from :func:`caption_mix` with their :func:`describe_scene` captions."""
    from ..streams.synthetic import sample_scenes
    from ..streams.synthetic_render import render
    from ..streams.vqa_synthetic import describe_scene

    mix = caption_mix()
    sc = sample_scenes(n, rng, mix)
    images = render(sc, rng, glyph_split="pretrain", rotation=mix.rotation, style_strength=mix.style_strength)
    return images, [describe_scene(row) for row in sc]


def caption_mix():
    """The scenes the full captions describe: every style, texture and size often enough to be put
    into words (the tiny CLIP's pretraining mix is 72 % clean)."""
    from ..streams.synthetic import SceneMix

    return SceneMix(p_digit=0.25, p_group=0.25, textures=(1, 1, 1, 1), sizes=(1, 1), styles=(2, 1, 1, 1, 1),
                    style_strength=(0.8, 1.4))


def make_batch_source(cfg: VlmPretrainConfig, caption_question: str, rng: np.random.Generator):
    """A function drawing one pretraining batch ``(images uint8 [B, 3, 32, 32], questions, answers)``:
    ``caption_share`` of it captions, the rest questions spread evenly over ``question_types``."""
    from ..streams.synthetic import caption_batch

    n_cap = int(round(cfg.batch_size * cfg.caption_share))
    types = list(cfg.question_types)
    captions = full_caption_batch if cfg.captions == "full" else caption_batch

    def draw():
        parts_img, qs, ans = [], [], []
        if n_cap:
            img, caps = captions(n_cap, rng)
            parts_img.append(img)
            qs += [caption_question] * n_cap
            ans += caps
        n_qa = cfg.batch_size - n_cap
        if n_qa and types:
            counts = np.bincount(rng.permutation(np.arange(n_qa) % len(types)), minlength=len(types))
            for t, k in zip(types, counts):
                if k:
                    img, q, a = _qa_examples(t, int(k), rng)
                    parts_img.append(img)
                    qs += q
                    ans += a
        return np.concatenate(parts_img), qs, ans

    return draw


def _normalize(vlm, images) -> torch.Tensor:
    x = torch.as_tensor(images)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (vlm.mean, vlm.std))
    return (x - mean) / std


# ----------------------------------------------------------------------------- training
def _vision_stage(cfg: VlmPretrainConfig, progress: bool):
    """Stage 0: the tiny CLIP's image tower learns every scene attribute further (the CLIP's own stage 1,
    attribute heads, :func:`~.pretrain_clip.supervise_image_tower`) for ``vision_steps`` on the caption
    scenes, before it becomes the VLM's vision tower. The tiny CLIP trains it for 300 steps; the
    held-out question types ask for shape, texture and digit details that need more."""
    from dataclasses import replace

    from .pretrain_clip import PretrainConfig, supervise_image_tower

    def prepare(clip):
        stage = replace(PretrainConfig(), supervised_steps=cfg.vision_steps, supervised_lr=cfg.vision_lr,
                        supervised_min_lr_ratio=cfg.min_lr_ratio, warmup_steps=cfg.warmup_steps)  # batches of 128
        for p in clip.visual.parameters():
            p.requires_grad_(True)
        clip.train()
        supervise_image_tower(clip, stage, np.random.default_rng([cfg.seed, 0x715]), progress, mix=caption_mix())
        clip.eval()
        for p in clip.visual.parameters():
            p.requires_grad_(False)

    return prepare


def train_vlm(vlm, cfg: VlmPretrainConfig, caption_question: str, progress: bool = True) -> dict:
    """Projector and LLM learn the answers (vision tower frozen); in place; returns statistics."""
    from .pretrain_clip import _warmup_cosine, prefetched

    rng = np.random.default_rng([cfg.seed, 0x11A7A])
    named = [(n, p) for n, p in vlm.model.named_parameters()
             if cfg.vision_lr_ratio > 0 or ".vision_tower." not in f".{n}"]
    trainable = [p for _, p in named]
    for p in trainable:
        p.requires_grad_(True)
    groups = []
    for vision in (False, True):
        ps = [p for n, p in named if (".vision_tower." in f".{n}") == vision]
        scale = cfg.vision_lr_ratio if vision else 1.0
        groups += [{"params": [p for p in ps if p.ndim >= 2], "weight_decay": cfg.weight_decay, "scale": scale},
                   {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0, "scale": scale}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.98))
    start = time.perf_counter()
    losses = []
    vlm.model.train()
    for step, (images, qs, ans) in enumerate(prefetched(make_batch_source(cfg, caption_question, rng), cfg.steps)):
        batch = vlm.batch(_normalize(vlm, images), qs, ans)
        # each example weighs the same: a ten-word caption would otherwise outweigh five one-word answers
        loss = -(vlm.answer_logprobs(batch) / batch.answer_mask.sum(1)).mean()
        for g in opt.param_groups:
            g["lr"] = g["scale"] * cfg.lr * _warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        losses.append(loss.item())
        if progress and (step + 1) % max(1, cfg.steps // 10) == 0:
            print(f"  step {step + 1:4d}/{cfg.steps}  answer loss {np.mean(losses[-20:]):.3f}  "
                  f"{time.perf_counter() - start:5.1f}s", flush=True)
    vlm.model.eval()
    for p in vlm.model.parameters():
        p.requires_grad_(False)
    return {"train_seconds": round(time.perf_counter() - start, 2), "steps": cfg.steps,
            "final_loss": round(float(np.mean(losses[-20:])), 4) if losses else None}


@torch.no_grad()
def zero_shot_accuracy(vlm, types: Sequence[str] | None = None, seed: int = 0, n_test: int = 100,
                       batch_size: int = 200) -> dict[str, float]:
    """Exact-match accuracy (greedy answer == target) on each question type's test split."""
    from ..streams.vqa_synthetic import QUESTION_TYPES, load_question_type

    out = {}
    for t in types or QUESTION_TYPES:
        data = load_question_type(t, seed=seed, n_train=1, n_test=n_test)
        right = 0
        for i in range(0, len(data.test_records), batch_size):
            recs = data.test_records[i:i + batch_size]
            x = _normalize(vlm, torch.stack([data.test[j][0] for j in range(i, i + len(recs))]))
            preds = vlm.generate(x, [r.question for r in recs], max_new_tokens=4)
            right += sum(p == r.answer for p, r in zip(preds, recs))
        out[t] = right / len(data.test_records)
    return out


@torch.no_grad()
def probe_accuracy(vlm, types: Sequence[str] | None = None, seed: int = 0, n_train: int = 600,
                   n_test: int = 200) -> dict[str, float]:
    """How much of each question type's answer the vision tower hands the LLM: a linear probe
    (logistic regression) on the features the projector reads (``vision_feature_layer``, mean over
    tokens), trained on ``n_train`` and scored on ``n_test`` images of the type. Judge is left out (its
    answer depends on the question, not on the picture alone)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from ..streams.vqa_synthetic import QUESTION_TYPES, answer_space, load_question_type

    inner = getattr(vlm.model, "model", vlm.model)
    tower = getattr(inner, "vision_tower", None) or vlm.model.vision_tower
    layer = vlm.model.config.vision_feature_layer

    def features(images):
        hidden = tower(_normalize(vlm, images), output_hidden_states=True).hidden_states[layer]
        return hidden.mean(1).float().numpy()

    out = {}
    for t in types or [t for t in QUESTION_TYPES if t != "judge"]:
        data = load_question_type(t, seed=seed, n_train=n_train, n_test=n_test)
        space = answer_space(t)
        y_tr = [space.index(r.answer) for r in data.train_records]
        y_te = [space.index(r.answer) for r in data.test_records]
        scaler = StandardScaler().fit(features(data.train.images))
        clf = LogisticRegression(max_iter=3000).fit(scaler.transform(features(data.train.images)), y_tr)
        out[t] = float(clf.score(scaler.transform(features(data.test.images)), y_te))
    return out


def format_table(acc: dict[str, float], pretrained_types: Sequence[str], probe: dict[str, float] | None = None) -> str:
    from ..streams.vqa_synthetic import chance_level

    probe = probe or {}
    lines = [f"{'question type':<13} {'pretrained':>10} {'zero-shot':>9} {'chance':>7}" + ("  vision probe" if probe else "")]
    lines += [f"{t:<13} {'yes' if t in pretrained_types else 'no':>10} {100 * a:8.1f}% {100 * chance_level(t):6.1f}%"
              + (f"  {100 * probe[t]:11.1f}%" if t in probe else "") for t, a in acc.items()]
    return "\n".join(lines)


def pretrain_vlm(cfg: VlmPretrainConfig = None, *, cache_dir=None, force: bool = False,
                 progress: bool = True) -> Path:
    """Directory of the cached pretrained VLM for ``cfg``; train (and evaluate) it first if missing
    or ``force``. Concurrent callers wait for one another (a file lock) instead of training twice."""
    from filelock import FileLock

    from .pretrain_clip import cache_root, resolve_synthetic
    from .shipped import find
    from .vlm import VisionLanguageModel, _quiet_transformers
    from .vlm_tiny import build_tiny_llava, tiny_spec

    cfg = cfg or VlmPretrainConfig()
    spec = tiny_spec(cfg.model)
    clip_ckpt = resolve_synthetic(spec["vision_from_clip"], None, progress=progress, cache_dir=cache_dir)
    path = checkpoint_dir(cfg, clip_ckpt, cache_dir)
    found = None if force else find(path, cache_root(cache_dir), _complete)
    if found is not None:
        return found
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if _complete(path) and not force:  # another process trained it meanwhile
            return path
        with torch_threads(cfg.threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            t0 = time.perf_counter()
            model, processor = build_tiny_llava(cfg.model, clip_ckpt, seed=cfg.seed,
                                                prepare_visual=_vision_stage(cfg, progress) if cfg.vision_steps else None)
            vlm = VisionLanguageModel(model, processor, name=cfg.model)
            if progress:
                print(f"pretraining {cfg.model} on the synthetic world: {cfg.steps} steps of {cfg.batch_size} "
                      f"(captions and {', '.join(cfg.question_types)} questions; cache: {path})", flush=True)
            vision_seconds = time.perf_counter() - t0
            stats = train_vlm(vlm, cfg, spec["caption_question"], progress)
            # wall time of both stages (stage 0 included)
            stats = {**stats, "vision_seconds": round(vision_seconds, 2),
                     "train_seconds": round(stats["train_seconds"] + vision_seconds, 2)}
            acc = zero_shot_accuracy(vlm, seed=cfg.eval_seed, n_test=cfg.eval_test)
            probe = probe_accuracy(vlm, seed=cfg.eval_seed, n_train=cfg.eval_probe) if cfg.eval_probe else {}
        from ..streams.synthetic import GENERATOR_VERSION
        from ..streams.vqa_synthetic import VQA_GENERATOR_VERSION, chance_level

        info = {"model": cfg.model, "checkpoint": path.name, "config": asdict(cfg), "model_cfg": spec,
                "clip_checkpoint": Path(clip_ckpt).name, "generator_version": GENERATOR_VERSION,
                "vqa_generator_version": VQA_GENERATOR_VERSION, **stats, "torch_threads": cfg.threads,
                "zero_shot": {t: {"accuracy": round(a, 4), "chance": round(chance_level(t), 4),
                                  "pretrained": t in cfg.question_types} for t, a in acc.items()},
                "vision_probe": {t: round(a, 4) for t, a in probe.items()}}
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            with _quiet_transformers():
                vlm.model.save_pretrained(tmp)
                vlm.processor.save_pretrained(tmp)
            # the record first, the directory last: an existing checkpoint always has its record
            write_text(info_path(path), json.dumps(info, indent=2) + "\n")
            if path.exists():  # force: move the old one aside, then swap
                old = path.with_name(f".{path.name}.old{os.getpid()}")
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"trained in {stats['train_seconds']:.1f}s; zero-shot exact match on the synthetic question types:")
        print(format_table(acc, cfg.question_types, probe), flush=True)
    return path


def shipped_vision_clip(name: str) -> Path | None:
    """The shipped tiny CLIP checkpoint tiny VLM ``name`` is built on (default recipe), or None."""
    from .pretrain_clip import PretrainConfig, checkpoint_path
    from .shipped import SHIPPED_ROOT, shipped_path
    from .vlm_tiny import tiny_spec

    return shipped_path(checkpoint_path(PretrainConfig(model=tiny_spec(name)["vision_from_clip"]), SHIPPED_ROOT),
                        SHIPPED_ROOT)


def shipped_vlm(name: str) -> Path | None:
    """The shipped checkpoint directory of tiny VLM ``name`` with the default recipe, or None when it is
    not shipped (computed from the cache keys: nothing is trained or loaded)."""
    from .shipped import SHIPPED_ROOT, shipped_path
    from .vlm_tiny import shipped_vlm_names

    clip = shipped_vision_clip(name) if name in shipped_vlm_names() else None
    if clip is None:
        return None
    return shipped_path(checkpoint_dir(VlmPretrainConfig(model=name), str(clip), SHIPPED_ROOT), SHIPPED_ROOT)


def resolve_synthetic_vlm(name: str, pretrain: dict | None = None, progress: bool = True, force: bool = False,
                          cache_dir=None) -> str:
    """Directory of the tiny VLM ``name`` pretrained on the synthetic world (trained on first use);
    ``pretrain`` overrides fields of :class:`VlmPretrainConfig`. Bad keys or values: UserError."""
    from .pretrain_clip import config_from_overrides

    cfg = config_from_overrides(VlmPretrainConfig, name, pretrain)
    return str(pretrain_vlm(cfg, progress=progress, force=force, cache_dir=cache_dir))


def cli_pretrain_vlm(a) -> int:
    """``lifelong-moe pretrain vlm [CONFIG] [key=value ...] [--force] [--cache-dir DIR] [-q]``."""
    from ..config import apply_overrides, read_yaml_tree
    from ..errors import UserError
    from .shipped import ship_root, train_for_cli

    overrides = list(a.overrides)
    if a.config and "=" in a.config and not Path(a.config).exists():
        overrides.insert(0, a.config)
        a.config = None
    data = apply_overrides(read_yaml_tree(a.config) if a.config else {}, overrides)
    model = data.pop("model", VlmPretrainConfig.model)
    if a.ship:  # the VLM is built on the shipped tiny CLIP, never on one trained into weights/ on the way
        ship_root(a)  # --ship with --cache-dir: that error first
        if shipped_vision_clip(model) is None:
            from .vlm_tiny import tiny_spec

            raise UserError(f"ship the tiny CLIP first: lifelong-moe pretrain clip --ship (no shipped "
                            f"{tiny_spec(model)['vision_from_clip']} with its default recipe)")
    path = train_for_cli(a, model, data, resolve_synthetic_vlm)
    info = read_info(path)
    if a.quiet:
        print(path)
        return 0
    print(f"checkpoint: {path}  (trained in {info.get('train_seconds')} s, {info.get('steps')} steps)")
    zs = info.get("zero_shot", {})
    print(format_table({t: v["accuracy"] for t, v in zs.items()}, [t for t, v in zs.items() if v.get("pretrained")],
                       info.get("vision_probe")))
    print(f"use it with  backbone: {{family: vlm, name: {model}, pretrained: synthetic}}  or  name: {path}")
    return 0

