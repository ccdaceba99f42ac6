"""An offline, procedural "synthetic world": captioned scenes for pretraining a tiny CLIP and
MTIL-style classification domains to continually learn.

Scenes are 32x32 RGB images of one to four objects (a shape or a handwritten digit from sklearn's
bundled ``load_digits``) with attributes shape, colour, texture, size, position (3x3 grid), count,
background and style (clean, noisy, blurry, inverted, outlined: domain shifts). Everything is
deterministic by seed, vectorised numpy, and needs no file or network.

- :func:`caption_batch` draws pretraining pairs: mostly clean scenes from their own random stream
  and their own half of the digit glyphs, each with a templated caption that mentions some of the
  scene's attributes ("a photo of two small red circles.", "a photo of an object in the top left.").
- :func:`load_domain` builds one domain of :data:`DOMAINS` (e.g. ``shapes``: which shape, shown
  noisy) as a :class:`~lifelong_moe.data.ClassificationData` whose class names, inside the domain's
  prompt template, are captions seen in pretraining; its images come from other seeds, other glyphs
  and mostly other styles, so zero-shot transfer works, but imperfectly.
"""
from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data import ClassificationData
from ..errors import UserError
from .synthetic_render import (A, ATTRS, BACKGROUNDS, COLORS, COUNTS, DIGITS, POSITIONS, SHAPE_PLURALS, SHAPES,
                               SIZES, STYLES, TEXTURES, render)

GENERATOR_VERSION = 2  # bump whenever images or captions change (part of the pretrained-CLIP cache key)

__all__ = ["GENERATOR_VERSION", "DOMAINS", "ATTRIBUTE_VALUES", "load_domain", "load", "caption_batch",
           "caption_matches", "attribute_bank",
           "sample_scenes", "SceneMix", "Domain", "UnknownDomainError", "ATTRS", "SHAPES", "COLORS", "TEXTURES",
           "SIZES", "POSITIONS", "BACKGROUNDS", "STYLES", "COUNTS", "DIGITS"]


class UnknownDomainError(UserError, ValueError):
    """An unknown synthetic domain name."""


# ----------------------------------------------------------------------------- scene sampling
@dataclass(frozen=True)
class SceneMix:
    """Distribution of scene attributes (probabilities need not be normalised)."""

    p_digit: float = 0.2            # a digit glyph rather than shapes
    p_group: float = 0.25           # two to four objects rather than one
    shapes: tuple[int, ...] = tuple(range(len(SHAPES)))
    colors: tuple[int, ...] = tuple(range(len(COLORS)))
    textures: tuple[float, ...] = (0.4, 0.2, 0.2, 0.2)
    sizes: tuple[float, ...] = (0.5, 0.5)
    backgrounds: tuple[float, ...] = (0.4, 0.15, 0.15, 0.15, 0.15)
    styles: tuple[float, ...] = (0.72, 0.07, 0.07, 0.07, 0.07)
    style_strength: tuple[float, float] = (0.8, 1.2)
    rotation: float = 12.0


PRETRAIN_MIX = SceneMix()


def _choice(rng: np.random.Generator, n: int, probs) -> np.ndarray:
    p = np.asarray(probs, np.float64)
    return rng.choice(len(p), size=n, p=p / p.sum())


def sample_scenes(n: int, rng: np.random.Generator, mix: SceneMix = PRETRAIN_MIX,
                  fixed: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """``n`` scenes as an int array ``[n, len(ATTRS)]`` (-1 = not applicable); ``fixed`` pins
    attributes (arrays of length ``n``), the others follow ``mix`` and the pinned ones."""
    fixed = {k: np.broadcast_to(np.asarray(v), (n,)) for k, v in (fixed or {}).items()}
    sc = np.full((n, len(ATTRS)), -1, np.int64)
    if "digit" in fixed:
        digit = np.ones(n, bool)
    elif fixed.keys() & {"shape", "texture", "count"}:
        digit = np.zeros(n, bool)
    else:
        digit = rng.random(n) < mix.p_digit
    count = np.where(rng.random(n) < mix.p_group, rng.integers(2, 5, n), 1)
    sc[:, A["count"]] = np.where(digit, 1, fixed.get("count", count))
    shape = np.asarray(mix.shapes)[rng.integers(0, len(mix.shapes), n)]
    sc[:, A["shape"]] = np.where(digit, -1, fixed.get("shape", shape))
    sc[:, A["digit"]] = np.where(digit, fixed.get("digit", rng.integers(0, 10, n)), -1)
    sc[:, A["color"]] = fixed.get("color", np.asarray(mix.colors)[rng.integers(0, len(mix.colors), n)])
    sc[:, A["texture"]] = np.where(digit, 0, fixed.get("texture", _choice(rng, n, mix.textures)))
    single = sc[:, A["count"]] == 1
    sc[:, A["size"]] = np.where(single, fixed.get("size", _choice(rng, n, mix.sizes)), 0)
    sc[:, A["position"]] = np.where(single, fixed.get("position", rng.integers(0, 9, n)), -1)
    sc[:, A["background"]] = fixed.get("background", _choice(rng, n, mix.backgrounds))
    sc[:, A["style"]] = fixed.get("style", _choice(rng, n, mix.styles))
    return sc


# ----------------------------------------------------------------------------- captions
_FRAMES = ["a photo of {}.", "a photo of {}.", "{}.", "an image of {}.", "a picture of {}.", "there {} {}."]
_STYLE_FRAMES = ["a photo in {s} style of {np}.", "{np}, in {s} style.", "a {s} photo of {np}."]
_PLURAL = -2  # mention code for "count > 1" (plural noun without a number)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _describe(row: np.ndarray, mention: np.ndarray, rng: np.random.Generator) -> str:
    m = lambda k: mention[A[k]] != -1  # noqa: E731
    count = int(row[A["count"]])
    if m("digit"):
        noun = f"digit {DIGITS[row[A['digit']]]}"
    elif m("shape"):
        noun = (SHAPE_PLURALS if count > 1 else SHAPES)[row[A["shape"]]]
    else:
        noun = ("objects" if count > 1 else "object") if rng.random() < 0.7 else ("things" if count > 1 else "thing")
    adjs = [w for k, names in (("size", SIZES), ("color", COLORS), ("texture", TEXTURES))
            if m(k) for w in [names[row[A[k]]]]]
    words = adjs + [noun]
    if m("count"):
        words = [COUNTS[count - 1]] + words
    elif count == 1:
        words = [_article(words[0])] + words
    elif rng.random() < 0.3:
        words = ["some"] + words
    np_ = " ".join(words)
    if m("position"):
        np_ += f" in the {POSITIONS[row[A['position']]]}"
    if m("background"):
        np_ += f" on a {BACKGROUNDS[row[A['background']]]} background"
    if m("style"):
        s = STYLES[row[A["style"]]]
        if mention[A["style"]] != -1 and (mention != -1).sum() == 1 and rng.random() < 0.6:
            return f"a photo in {s} style."
        frame = _STYLE_FRAMES[rng.integers(len(_STYLE_FRAMES))]
        text = frame.format(s=s, np=np_)
        return text.replace("a inverted", "an inverted").replace("a outlined", "an outlined")
    frame = _FRAMES[rng.integers(len(_FRAMES))]
    return frame.format("are" if count > 1 else "is", np_) if frame.startswith("there") else frame.format(np_)


_FOCUS_WEIGHTS = {"shape": 3.0, "digit": 2.0, "color": 1.5, "texture": 1.5, "size": 0.6, "position": 2.0,
                  "count": 1.5, "background": 0.4, "style": 1.2}


def _mentions(sc: np.ndarray, rng: np.random.Generator, focus: float, p_attr: float) -> np.ndarray:
    """Which attributes each caption names: one (probability ``focus``) or a random subset."""
    n = len(sc)
    avail = sc != -1
    avail[:, A["texture"]] &= sc[:, A["digit"]] == -1
    w = np.array([_FOCUS_WEIGHTS[k] for k in ATTRS]) * avail
    one = (w / w.sum(1, keepdims=True)).cumsum(1) > rng.random((n, 1))
    one = np.eye(len(ATTRS), dtype=bool)[one.argmax(1)]
    some = avail & (rng.random(sc.shape) < p_attr)
    noun = rng.random(n) < 0.75
    some[:, A["shape"]] = avail[:, A["shape"]] & noun
    some[:, A["digit"]] = avail[:, A["digit"]] & (noun | some[:, A["digit"]])
    sel = np.where((rng.random(n) < focus)[:, None], one, some)
    ment = np.where(sel, sc, -1)
    plural = (ment[:, A["count"]] == -1) & (sc[:, A["count"]] > 1)
    ment[plural, A["count"]] = _PLURAL
    return ment


def caption_matches(scenes: np.ndarray, mentions: np.ndarray) -> np.ndarray:
    """``[n_scenes, n_captions]`` bool: caption ``j`` is true of scene ``i`` (for multi-positive
    contrastive targets: short captions such as "a red object" describe many scenes)."""
    s, c = scenes[:, None, :], mentions[None, :, :]
    ok = (c == -1) | (s == c)
    cnt = A["count"]
    ok[..., cnt] |= (c[..., cnt] == _PLURAL) & (s[..., cnt] > 1)
    return ok.all(-1)


def caption_batch(n: int, rng: np.random.Generator, *, focus: float = 0.5, p_attr: float = 0.5,
                  mix: SceneMix = PRETRAIN_MIX, return_attrs: bool = False):
    """``n`` pretraining pairs: ``(images uint8 [n, 3, 32, 32], captions)``; with ``return_attrs``
    also ``(scenes, mentions)`` for :func:`caption_matches`."""
    sc = sample_scenes(n, rng, mix)
    images = render(sc, rng, glyph_split="pretrain", rotation=mix.rotation, style_strength=mix.style_strength)
    ment = _mentions(sc, rng, focus, p_attr)
    caps = [_describe(sc[i], ment[i], rng) for i in range(n)]
    return (images, caps, sc, ment) if return_attrs else (images, caps)


# the value names of each describable attribute (count c is COUNTS[c - 1]), in a fixed order
ATTRIBUTE_VALUES = {"shape": SHAPES, "color": COLORS, "digit": DIGITS, "count": COUNTS, "position": POSITIONS,
                    "texture": TEXTURES, "size": SIZES, "style": STYLES, "background": BACKGROUNDS}


def attribute_bank(rng: np.random.Generator | None = None) -> tuple[list[str], np.ndarray]:
    """One short caption per (attribute, value): "a photo of a circle.", "a photo of two objects.",
    "a photo of digit 3.", ... with its mention row (only that attribute named). Added to every
    pretraining batch, they give each image a signal on every attribute at once. The captions of
    one attribute share their frame (drawn anew per call), so they differ only in the value's word."""
    rng = rng or np.random.default_rng(0)
    caps, rows = [], []
    for attr, names in ATTRIBUTE_VALUES.items():
        phrasing = int(rng.integers(2 ** 31))  # one frame per attribute: its captions differ in one word
        for v in range(len(names)):
            value = v + 1 if attr == "count" else v
            row = np.full(len(ATTRS), -1, np.int64)
            row[[A["count"], A["size"], A["texture"], A["background"], A["style"]]] = [1, 0, 0, 0, 0]
            row[A["digit"] if attr == "digit" else A["shape"]] = v if attr == "digit" else 0
            row[A[attr]] = value
            mention = np.full(len(ATTRS), -1, np.int64)
            mention[A[attr]] = value
            text = _describe(row, mention, np.random.default_rng(phrasing))
            caps.append(text)
            rows.append(mention)
    return caps, np.stack(rows)


# ----------------------------------------------------------------------------- domains
@dataclass(frozen=True)
class Domain:
    name: str
    attrs: tuple[str, ...]                 # attributes that define the class
    values: tuple[tuple[int, ...], ...]    # one value tuple per class
    class_names: tuple[str, ...]
    template: str
    mix: SceneMix
    fixed: dict = field(default_factory=dict)  # attributes pinned for every image of the domain
    description: str = ""


def _one(name, attr, names, template, mix, values=None, fixed=None, description=""):
    values = tuple((v,) for v in (values if values is not None else range(len(names))))
    return Domain(name, (attr,), values, tuple(names), template, mix, fixed or {}, description)


def _styled(style: int, strength=(1.0, 1.3), **kw) -> SceneMix:
    probs = [0.0] * len(STYLES)
    probs[style] = 1.0
    return SceneMix(styles=tuple(probs), style_strength=strength, **kw)


def _backdrop(name: str) -> tuple[float, ...]:
    """A domain's own background: like a real dataset's look, it tells its images apart from
    other domains' (what DDAS's autoencoders key on) without saying anything about the class."""
    return tuple(float(b == name) for b in BACKGROUNDS)


_FINE = list(itertools.product(range(8), range(8)))  # (shape, color)
_DOMAINS = [
    _one("shapes", "shape", SHAPES, "a photo of a {}.", _styled(1, p_group=0.0, backgrounds=_backdrop("black")),
         description="which shape (noisy, black backdrop)"),
    _one("colors", "color", COLORS, "a photo of a {} object.", _styled(2), description="which colour (blurry)"),
    _one("digits", "digit", DIGITS, "a photo of a digit {}.", _styled(1, backgrounds=_backdrop("dark blue")),
         description="which digit (noisy, dark blue backdrop)"),
    _one("counts", "count", [f"{c} object" + ("s" if i else "") for i, c in enumerate(COUNTS)], "a photo of {}.",
         _styled(0, backgrounds=_backdrop("gray")), values=[1, 2, 3, 4], description="how many objects (gray backdrop)"),
    _one("positions", "position", POSITIONS, "a photo of an object in the {}.", _styled(2),
         fixed={"count": 1}, description="where the object is (blurry)"),
    _one("textures", "texture", TEXTURES, "a photo of a {} object.", _styled(0, backgrounds=(0.2, 0.5, 0.3, 0, 0)),
         fixed={"count": 1, "size": 1}, description="which fill pattern"),
    Domain("fine", ("shape", "color"), tuple(_FINE),
           tuple(f"{COLORS[c]} {SHAPES[s]}" for s, c in _FINE), "a photo of a {}.",
           _styled(0, backgrounds=_backdrop("dark red"), rotation=20.0), {"count": 1},
           "shape and colour, 64 classes (dark red backdrop)"),
    _one("styles", "style", STYLES, "a photo in {} style.",
         SceneMix(style_strength=(1.0, 1.4), backgrounds=_backdrop("dark green")),
         description="which rendering style (dark green backdrop)"),
]
DOMAINS: list[str] = [d.name for d in _DOMAINS]
_BY_NAME = {d.name: d for d in _DOMAINS}


def get_domain(name: str) -> Domain:
    key = name.split("/", 1)[1] if name.startswith("synthetic/") else name
    if key not in _BY_NAME:
        close = difflib.get_close_matches(key, DOMAINS, n=1, cutoff=0.5)
        raise UnknownDomainError(f"unknown synthetic domain {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                                 + f"; domains: {', '.join(DOMAINS)}")
    return _BY_NAME[key]


def _generate(d: Domain, seed: int, split: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, DOMAINS.index(d.name), split, 0x5D0A1])
    n_cls = len(d.values)
    targets = rng.permutation(np.repeat(np.arange(n_cls), per_class))
    vals = np.asarray(d.values)[targets]
    fixed = {k: vals[:, i] for i, k in enumerate(d.attrs)}
    fixed.update({k: np.full(len(targets), v) for k, v in d.fixed.items()})
    sc = sample_scenes(len(targets), rng, d.mix, fixed)
    imgs = render(sc, rng, glyph_split=("train", "test")[split], rotation=d.mix.rotation,
                  style_strength=d.mix.style_strength)
    return imgs, targets


@lru_cache(maxsize=64)
def _cached(name: str, seed: int, n_train: int, n_test: int):
    d = _BY_NAME[name]
    tr, te = _generate(d, seed, 0, n_train), _generate(d, seed, 1, n_test)
    return tuple((torch.from_numpy(x), y.tolist()) for x, y in (tr, te))


class SyntheticImages(Dataset):
    """``(float image [3, 32, 32] in [0, 1], target)`` over a uint8 image tensor."""

    def __init__(self, images: torch.Tensor, targets: list[int]):
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i].float() / 255.0, self.targets[i]


def load_domain(name: str, *, seed: int = 0, n_train_per_class: int = 100,
                n_test_per_class: int = 50) -> ClassificationData:
    """Domain ``name`` (``"shapes"`` or ``"synthetic/shapes"``), balanced, deterministic by seed."""
    d = get_domain(name)
    if n_train_per_class < 1 or n_test_per_class < 1:
        raise ValueError("n_train_per_class and n_test_per_class must be >= 1")
    (xtr, ytr), (xte, yte) = _cached(d.name, int(seed), int(n_train_per_class), int(n_test_per_class))
    return ClassificationData(
        name=f"synthetic/{d.name}", class_names=list(d.class_names),
        train=SyntheticImages(xtr, ytr), test=SyntheticImages(xte, yte),
        train_targets=list(ytr), test_targets=list(yte), templates=[d.template],
        meta={"source": "synthetic", "domain": d.name, "description": d.description, "seed": int(seed),
              "generator_version": GENERATOR_VERSION, "image_size": 32})


def load(dataset: str, *, seed: int = 0, n_train_per_class: int = 100, n_test_per_class: int = 50,
         **_ignored) -> ClassificationData:
    """Source entry point: ``load("synthetic/shapes", seed=...)``; other keyword arguments of the
    generic source loaders (root, download, ...) are accepted and ignored."""
    return load_domain(dataset, seed=seed, n_train_per_class=n_train_per_class, n_test_per_class=n_test_per_class)

