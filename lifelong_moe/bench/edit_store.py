"""Bytes of the edit store at LLaVA-1.5 sizes: per stored edit in memory and on disk, and written by
one ``save()`` of one new edit into a store of ``--edits`` edits.

No model runs: each edit carries three distinct 336 x 336 images (``image``, ``image_rephrase``,
``m_loc``) preprocessed as LLaVA-1.5's CLIP processor does (8-bit pixels rescaled and normalised per
channel, float32), and fake method tensors of the shapes LiveEdit makes on a 4096-wide backbone
(160 KiB: ``r`` [8, 4096], ``vision_key`` [7, 1024], ``text_key`` [1024], ``c`` [1]). ``--images``:
``photo`` (smooth multi-scale content with a little pixel noise) or ``noise`` (uniform 8-bit noise, which
no lossless codec compresses: the worst case). Bytes per edit are measured on ``--distinct`` edits; the
store is then filled up to ``--edits`` with edits reusing those images (stored once) and their own
method tensors, saved, and one edit with three new images is added and saved. Bytes written are the
process's ``wchar`` (/proc/self/io) around that save.

Run it as ``lifelong-moe bench edit_store [--edits 10000] [--distinct 300] [--images photo]``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEADER = {"method": "liveedit", "method_config": {}, "backbone": {"name": "llava-1.5-shapes", "config": None,
                                                                   "fingerprint": "0" * 16}}


def image(kind: str, g: torch.Generator, size: int = 336) -> torch.Tensor:
    """One preprocessed image: uint8 content rescaled and normalised like CLIP's processor."""
    if kind == "noise":
        u = torch.randint(0, 256, (3, size, size), generator=g).float()
    else:
        x = torch.zeros(1, 3, size, size)
        for s, a in ((4, 70), (16, 35), (64, 15)):
            x += a * F.interpolate(torch.randn(1, 3, s, s, generator=g), size=size, mode="bicubic", align_corners=False)
        u = (x[0] + 128 + 2 * torch.randn(3, size, size, generator=g)).clamp(0, 255).round()
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return (u * (1 / 255) - mean) / std


def method_tensors(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"c": torch.randn(1, generator=g), "r": torch.randn(8, 4096, generator=g),
            "text_key": torch.randn(1024, generator=g), "vision_key": torch.randn(7, 1024, generator=g)}


def request(i: int) -> dict[str, str]:
    return {"src": f"What is the object in the picture, number {i}?", "alt": f"answer {i}", "pred": "a cat",
            "rephrase": f"Which object does image {i} show?", "loc": "nq question: who wrote the iliad",
            "loc_ans": "homer", "m_loc_q": "what sport is played here?", "m_loc_a": "tennis"}


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def wchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def disk(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


def store_bytes(edits: int = 10000, distinct: int = 300, images: str = "photo", seed: int = 0,
                directory: str | None = None) -> dict:
    from ..editing.store import EditStore

    g = torch.Generator().manual_seed(seed)
    fields = ("image", "image_rephrase", "m_loc")
    method = sum(t.numel() * t.element_size() for t in method_tensors(g).values())
    float_images = 3 * 3 * 336 * 336 * 4
    store = EditStore(HEADER)
    from ..editing import image_codec

    image_codec.decode(image_codec.encode(image(images, torch.Generator().manual_seed(-1))))  # imports before RSS
    before, add_s = rss(), 0.0
    for i in range(distinct):
        imgs = {f: image(images, g) for f in fields}
        t = time.perf_counter()
        store.add(request(i), imgs, method_tensors(g))
        add_s += (time.perf_counter() - t) / distinct
    del imgs
    ram = (rss() - before) / distinct
    held = store.nbytes() / distinct
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        small = Path(tmp) / "distinct"
        store.save(small, {})
        on_disk = disk(small) / distinct
        made = list(store.history.values())
        while len(store) < edits:  # fill up: the images of the distinct edits again (stored once)
            e = made[len(store) % len(made)]
            store.add(request(len(store)), e.images, method_tensors(g))
        d = Path(tmp) / "store"
        t = time.perf_counter()
        store.save(d, {})
        full_s, full_bytes = time.perf_counter() - t, disk(d)
        store.add(request(len(store)), {f: image(images, g) for f in fields}, method_tensors(g))
        w, t = wchar(), time.perf_counter()
        store.save(d, {})
        one_s, one_written = time.perf_counter() - t, wchar() - w
        t = time.perf_counter()
        back, _ = EditStore.load(d)
        load_s = time.perf_counter() - t
        assert len(back) == len(store)
        index = json.loads((d / "store.json").read_text())
        index_bytes = (d / "store.json").stat().st_size
    return {"setup": {"edits": len(store), "distinct": distinct, "images": images, "image_fields": list(fields),
                      "method_bytes_per_edit": method, "float_image_bytes_per_edit": float_images},
            "ram_bytes_per_edit_rss": ram, "ram_bytes_per_edit_held": held,
            "ram_beyond_method_rss": ram - method, "ram_beyond_method_held": held - method,
            "disk_bytes_per_edit": on_disk, "disk_beyond_method": on_disk - method,
            "add_s": add_s, "full_save_s": full_s, "full_store_bytes": full_bytes,
            "one_edit_save_written_bytes": one_written, "one_edit_save_s": one_s,
            "segments": index["segments"], "store_json_bytes": index_bytes,
            "load_s": load_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lifelong-moe bench edit_store", description=__doc__.split("\n\n")[0])
    ap.add_argument("--edits", type=int, default=10000)
    ap.add_argument("--distinct", type=int, default=300, help="edits with their own three images (bytes per edit)")
    ap.add_argument("--images", choices=["photo", "noise"], default="photo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="where the temporary stores are written (default: the system's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    for opt, v in (("--distinct", a.distinct), ("--threads", a.threads)):
        if v < 1:
            raise UserError(f"{opt} must be at least 1, got {v}")
    if a.edits < a.distinct:
        raise UserError(f"--edits ({a.edits}) must be at least --distinct ({a.distinct})")
    torch.set_num_threads(a.threads)
    r = store_bytes(a.edits, a.distinct, a.images, a.seed, a.dir)
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    k, s = 1024, r["setup"]
    print(f"{s['edits']} edits, images: {s['images']} (3 x 336 px; float32 would be "
          f"{s['float_image_bytes_per_edit'] / k:,.0f} KiB per edit), method tensors "
          f"{s['method_bytes_per_edit'] / k:,.0f} KiB per edit")
    print(f"RAM per edit: {r['ram_bytes_per_edit_rss'] / k:,.0f} KiB (process RSS), "
          f"{r['ram_bytes_per_edit_held'] / k:,.0f} KiB held; beyond the method tensors "
          f"{r['ram_beyond_method_rss'] / k:,.0f} / {r['ram_beyond_method_held'] / k:,.0f} KiB")
    print(f"disk per edit: {r['disk_bytes_per_edit'] / k:,.0f} KiB; beyond the method tensors "
          f"{r['disk_beyond_method'] / k:,.0f} KiB")
    print(f"one save() of one new edit into the {s['edits'] - 1}-edit store: "
          f"{r['one_edit_save_written_bytes'] / k:,.0f} KiB written in {r['one_edit_save_s'] * 1e3:.0f} ms (the whole "
          f"store: {r['full_store_bytes'] / 2**20:,.0f} MiB, saved in {r['full_save_s']:.1f} s; loaded in "
          f"{r['load_s']:.1f} s)")
    print(f"encoding three images on add(): {r['add_s'] * 1e3:.0f} ms per edit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
