"""Vectorised numpy renderer of the synthetic world (see :mod:`.synthetic`).

A scene is a row of integer attributes (shape, colour, texture, size, position, count, background,
style, digit); :func:`render` turns ``n`` of them into ``uint8`` images ``[n, 3, 32, 32]``. Shapes are
signed-distance functions on the pixel grid (1-pixel anti-aliasing), digits are sklearn's bundled
8x8 glyphs upscaled, textures modulate brightness, styles act on the whole image afterwards.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

SIZE = 32
SHAPES = ["circle", "square", "triangle", "diamond", "cross", "star", "ring", "heart", "crescent", "arrow"]
SHAPE_PLURALS = ["circles", "squares", "triangles", "diamonds", "crosses", "stars", "rings", "hearts",
                 "crescents", "arrows"]
COLORS = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "brown", "white"]
_RGB = np.array([[230, 35, 35], [255, 140, 0], [240, 230, 40], [30, 170, 50], [40, 225, 235],
                 [40, 80, 240], [145, 45, 210], [255, 125, 200], [135, 75, 25], [245, 245, 245]],
                np.float32) / 255.0
TEXTURES = ["solid", "striped", "dotted", "checkered"]
SIZES = ["small", "large"]
POSITIONS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
BACKGROUNDS = ["black", "gray", "dark blue", "dark green", "dark red"]
_BG_RGB = np.array([[0.04, 0.04, 0.04], [0.36, 0.36, 0.36], [0.05, 0.06, 0.32], [0.04, 0.22, 0.07],
                    [0.30, 0.04, 0.05]], np.float32)
STYLES = ["clean", "noisy", "blurry", "inverted", "outlined"]
COUNTS = ["one", "two", "three", "four"]  # count c is COUNTS[c - 1]
DIGITS = [str(d) for d in range(10)]
ATTRS = ["shape", "color", "texture", "size", "position", "count", "background", "style", "digit"]
A = {name: i for i, name in enumerate(ATTRS)}  # column of each attribute in a scene array
_CELL = np.array([6.0, 16.0, 26.0], np.float32)  # grid cell centres (pixels)
_RADIUS = {0: (4.6, 5.6), 1: (7.8, 9.4)}  # small / large shape radius range (pixels)
_GLYPH = {0: 13, 1: 19}  # small / large digit side (pixels)

_Y, _X = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


# ----------------------------------------------------------------------------- shapes (u, v in radii)
def _sdf(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    rho = np.sqrt(u * u + v * v)
    if shape == 0:  # circle
        return rho - 0.9
    if shape == 1:  # square
        return np.maximum(au, av) - 0.76
    if shape == 2:  # triangle, apex up (v grows downwards)
        w = v - 0.2
        return np.maximum(np.maximum(w, 0.866 * u - 0.5 * w), -0.866 * u - 0.5 * w) - 0.55
    if shape == 3:  # diamond
        return (au + av - 1.0) * 0.7071
    if shape == 4:  # cross
        return np.minimum(np.maximum(au - 0.3, av - 0.95), np.maximum(av - 0.3, au - 0.95))
    if shape == 5:  # five-pointed star, one point up
        f = np.mod((np.arctan2(v, u) + np.pi / 2) * (5 / (2 * np.pi)), 1.0)
        return (rho - (0.42 + 0.6 * np.abs(2 * f - 1) ** 1.6)) * 0.7
    if shape == 6:  # ring
        return np.abs(rho - 0.7) - 0.25
    if shape == 7:  # heart: two lobes over a downward wedge
        lobes = np.minimum(np.sqrt((u + 0.42) ** 2 + (v + 0.28) ** 2), np.sqrt((u - 0.42) ** 2 + (v + 0.28) ** 2)) - 0.48
        wedge = np.maximum(np.maximum(0.8 * u + 0.6 * v - 0.5, -0.8 * u + 0.6 * v - 0.5), -v - 0.28)
        return np.minimum(lobes, wedge)
    if shape == 8:  # crescent opening to the right
        return np.maximum(rho - 0.92, 0.72 - np.sqrt((u - 0.45) ** 2 + (v + 0.08) ** 2))
    if shape == 9:  # arrow pointing right: shaft and head
        shaft = np.maximum(np.abs(u + 0.375) - 0.575, av - 0.2)
        head = np.maximum(0.1 - u, (av - 0.706 * (0.95 - u)) * 0.817)
        return np.minimum(shaft, head)
    raise ValueError(shape)


def _texture(texture: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Brightness factor in [0.45, 1] of textured fill; ``xs``/``ys`` are object-relative pixels."""
    t = texture[:, None, None]
    stripes = (np.mod(ys + 0.5, 4.0) < 2.0).astype(np.float32)
    dots = (((np.mod(xs, 4.0) - 2.0) ** 2 + (np.mod(ys, 4.0) - 2.0) ** 2) < 1.5).astype(np.float32)
    checks = np.mod(np.floor(xs / 3.0) + np.floor(ys / 3.0), 2.0)
    p = np.where(t == 1, stripes, np.where(t == 2, 1.0 - dots, np.where(t == 3, checks, 1.0)))
    return 0.45 + 0.55 * p


# ----------------------------------------------------------------------------- digits
@lru_cache(maxsize=1)
def _digit_glyphs() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def _bilinear_matrix(n_out: int, n_in: int = 8) -> np.ndarray:
    pos = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 1)
    hi = np.clip(lo + 1, 0, n_in - 1)
    w = np.clip(pos - lo, 0, 1).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), lo] += 1 - w
    m[np.arange(n_out), hi] += w
    return m


@lru_cache(maxsize=4)
def _upscaled_glyphs(side: int) -> np.ndarray:
    m = _bilinear_matrix(side)
    g = np.einsum("ij,njk,lk->nil", m, _digit_glyphs()[0], m)
    return np.clip((g - 0.25) * 2.0, 0.0, 1.0)


@lru_cache(maxsize=16)
def digit_pool(split: str) -> tuple[np.ndarray, ...]:
    """Glyph indices per digit for ``split``: ``pretrain`` (half of them), ``train``, ``test``
    (a quarter each), so that no domain image reuses a glyph seen in pretraining."""
    part = {"pretrain": (0, 1), "train": (2,), "test": (3,)}[split]
    _, targets = _digit_glyphs()
    idx = np.flatnonzero(np.isin(np.arange(len(targets)) % 4, part))
    return tuple(idx[targets[idx] == d] for d in range(10))


# ----------------------------------------------------------------------------- styles
def _blur(img: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur, one sigma per image; ``img`` is [n, 3, H, W]."""
    r = 3
    k = np.exp(-0.5 * (np.arange(-r, r + 1, dtype=np.float32)[None] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdims=True))[:, :, None, None, None]
    pad = np.pad(img, ((0, 0), (0, 0), (r, r), (r, r)), mode="edge")
    rows = sum(k[:, i] * pad[:, :, i:i + SIZE, :] for i in range(2 * r + 1))
    return sum(k[:, i] * rows[:, :, :, i:i + SIZE] for i in range(2 * r + 1))


def _edges(img: np.ndarray) -> np.ndarray:
    pad = np.pad(img, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    gx = pad[:, :, 1:-1, 2:] - pad[:, :, 1:-1, :-2]
    gy = pad[:, :, 2:, 1:-1] - pad[:, :, :-2, 1:-1]
    return np.clip(np.sqrt(gx * gx + gy * gy) * 1.6, 0.0, 1.0)


def apply_styles(img: np.ndarray, style: np.ndarray, strength: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``strength`` (per image, ~1) scales noise sigma and blur radius."""
    out = img.copy()
    for s in (1, 2, 3, 4):
        sel = np.flatnonzero(style == s)
        if not len(sel):
            continue
        x = img[sel]
        if s == 1:
            x = x + rng.normal(0.0, 1.0, x.shape).astype(np.float32) * (0.16 * strength[sel])[:, None, None, None]
        elif s == 2:
            x = _blur(x, 0.85 * strength[sel])
        elif s == 3:
            x = 1.0 - x
        else:
            x = _edges(x)
        out[sel] = x
    return np.clip(out, 0.0, 1.0)


# ----------------------------------------------------------------------------- scenes
def render(scenes: np.ndarray, rng: np.random.Generator, *, glyph_split: str = "pretrain",
           rotation: float = 12.0, style_strength: tuple[float, float] = (0.8, 1.2)) -> np.ndarray:
    """Render ``scenes`` (int array ``[n, len(ATTRS)]``) to ``uint8 [n, 3, 32, 32]``."""
    n = len(scenes)
    sc = scenes
    bg = _BG_RGB[sc[:, A["background"]]] + rng.uniform(-0.03, 0.03, (n, 1)).astype(np.float32)
    img = np.broadcast_to(bg[:, :, None, None], (n, 3, SIZE, SIZE)).astype(np.float32)
    color = np.clip(_RGB[sc[:, A["color"]]] * rng.uniform(0.88, 1.08, (n, 1)).astype(np.float32), 0, 1)
    count = np.maximum(sc[:, A["count"]], 1)
    size = sc[:, A["size"]]
    # cells: single objects use their position; groups take distinct random cells
    cells = np.argsort(rng.random((n, 9)), axis=1)[:, :4]
    single = sc[:, A["position"]] >= 0
    cells[single, 0] = sc[single, A["position"]]
    is_digit = sc[:, A["digit"]] >= 0
    for slot in range(4):
        active = np.flatnonzero(count > slot)
        if not len(active):
            break
        cell = cells[active, slot]
        cx = _CELL[cell % 3] + rng.uniform(-1.5, 1.5, len(active)).astype(np.float32)
        cy = _CELL[cell // 3] + rng.uniform(-1.5, 1.5, len(active)).astype(np.float32)
        mask = np.zeros((len(active), SIZE, SIZE), np.float32)
        fill = np.ones_like(mask)
        dig = is_digit[active]
        for big in (0, 1):  # digits
            sel = np.flatnonzero(dig & (size[active] == big))
            if not len(sel):
                continue
            side = _GLYPH[big]
            pools = digit_pool(glyph_split)
            glyph = np.array([rng.choice(pools[d]) for d in sc[active[sel], A["digit"]]])
            ox = np.round(np.clip(cx[sel], side / 2, SIZE - side / 2) - side / 2).astype(int)
            oy = np.round(np.clip(cy[sel], side / 2, SIZE - side / 2) - side / 2).astype(int)
            yy = np.arange(SIZE)[None, :, None] - oy[:, None, None]
            xx = np.arange(SIZE)[None, None, :] - ox[:, None, None]
            ok = (yy >= 0) & (yy < side) & (xx >= 0) & (xx < side)
            g = _upscaled_glyphs(side)[glyph[:, None, None], np.clip(yy, 0, side - 1), np.clip(xx, 0, side - 1)]
            mask[sel] = g * ok
        shp = sc[active, A["shape"]]
        for s in range(len(SHAPES)):
            sel = np.flatnonzero(~dig & (shp == s))
            if not len(sel):
                continue
            lo, hi = np.where(size[active[sel]] == 1, _RADIUS[1][0], _RADIUS[0][0]), \
                np.where(size[active[sel]] == 1, _RADIUS[1][1], _RADIUS[0][1])
            r = rng.uniform(lo, hi).astype(np.float32)
            margin = r * 0.8
            x0 = np.clip(cx[sel], margin, SIZE - margin)[:, None, None]
            y0 = np.clip(cy[sel], margin, SIZE - margin)[:, None, None]
            a = np.deg2rad(rng.uniform(-rotation, rotation, len(sel))).astype(np.float32)[:, None, None]
            xs, ys = _X[None] - x0, _Y[None] - y0
            u = np.cos(a) * xs + np.sin(a) * ys
            v = -np.sin(a) * xs + np.cos(a) * ys
            rr = r[:, None, None]
            mask[sel] = np.clip(0.5 - _sdf(s, u / rr, v / rr) * rr, 0.0, 1.0)
            fill[sel] = _texture(sc[active[sel], A["texture"]], u, v)
        obj = color[active][:, :, None, None] * fill[:, None]
        m = mask[:, None]
        img[active] = img[active] * (1 - m) + obj * m
    strength = rng.uniform(*style_strength, n).astype(np.float32)
    img = apply_styles(img, sc[:, A["style"]], strength, rng)
    return np.round(img * 255.0).astype(np.uint8)
