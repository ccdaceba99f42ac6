"""Exact, compact bytes for the edit store's image tensors.

A record's images reach the store as preprocessed pixel tensors (float32 ``[3, S, S]``, see
:mod:`.records`); the source file is gone by then. A VLM's processor maps 8-bit pixels through a
per-channel affine map (rescale, normalise), so each channel holds at most 256 distinct values. Such a
tensor is stored as its per-channel palette (the distinct values' bit patterns, sorted by value) and a
PNG of the palette indices, which keeps the picture's structure and compresses like the picture;
decoding looks the indices up and gives back the same bits. Anything else (more than 256 values in a
channel, another shape) is stored as its raw bytes, zlib-compressed. Either way the round trip is
bit-exact, dtype and shape included.

A blob is ``b"LMIM" | u32 header length | header JSON | payload``; the header holds ``codec``
(``palette-png`` or ``zlib``), ``dtype``, ``shape`` and, for ``palette-png``, the palette sizes.
"""
from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib

import numpy as np
import torch

MAGIC = b"LMIM"
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # a same-size integer view of a dtype


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def encode(t: torch.Tensor, png_level: int = 6) -> bytes:
    """The blob of a CPU tensor (see the module doc)."""
    t = t.detach().to("cpu").contiguous()
    header = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    if t.ndim == 3 and t.shape[0] == 3 and t.shape[1] * t.shape[2] > 0 and t.element_size() in _BITS:
        bits = t.view(_BITS[t.element_size()]).reshape(3, -1)
        pal, idx = [], []
        for c in range(3):
            uniq, inverse = torch.unique(bits[c], return_inverse=True)
            if uniq.numel() > 256:
                break
            values = uniq.view(t.dtype)
            order = torch.argsort(values.float() if values.is_floating_point() else values, stable=True)
            rank = torch.empty_like(order)
            rank[order] = torch.arange(order.numel())
            pal.append(uniq[order])
            idx.append(rank[inverse].to(torch.uint8))
        else:
            from PIL import Image

            png = io.BytesIO()
            hw = tuple(t.shape[1:])
            Image.fromarray(torch.stack(idx, -1).reshape(*hw, 3).numpy(), "RGB").save(
                png, format="PNG", compress_level=png_level)
            header |= {"codec": "palette-png", "palette": [p.numel() for p in pal]}
            payload = b"".join(p.numpy().tobytes() for p in pal) + png.getvalue()
            return _pack(header, payload)
    header["codec"] = "zlib"
    return _pack(header, zlib.compress(t.reshape(-1).view(torch.uint8).numpy().tobytes(), 6))


def _pack(header: dict, payload: bytes) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(h)) + h + payload


def decode(blob: bytes) -> torch.Tensor:
    """The tensor of a blob; ``ValueError`` if it is not one."""
    blob = bytes(blob)
    if blob[:4] != MAGIC or len(blob) < 8:
        raise ValueError("not an image blob")
    (n,) = struct.unpack("<I", blob[4:8])
    header = json.loads(blob[8:8 + n])
    payload = blob[8 + n:]
    dt, shape = _dtype(header["dtype"]), tuple(int(s) for s in header["shape"])
    size = torch.empty((), dtype=dt).element_size()
    if header["codec"] == "zlib":
        raw = bytearray(zlib.decompress(payload))
        if not raw:
            return torch.empty(shape, dtype=dt)
        return torch.frombuffer(raw, dtype=torch.uint8).view(dt).reshape(shape).clone()
    if header["codec"] != "palette-png":
        raise ValueError(f"unknown image codec {header['codec']!r}")
    from PIL import Image

    sizes = [int(k) for k in header["palette"]]
    pal, at = [], 0
    for k in sizes:
        pal.append(torch.frombuffer(bytearray(payload[at:at + k * size]), dtype=_BITS[size]))
        at += k * size
    with Image.open(io.BytesIO(payload[at:])) as im:
        idx = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).reshape(-1, 3).long()
    bits = torch.stack([pal[c][idx[:, c]] for c in range(3)])
    return bits.view(dt).reshape(shape).clone()


def key(blob: bytes) -> str:
    """The blob's content name (SHA-256, 32 hex digits)."""
    return hashlib.sha256(blob).hexdigest()[:32]
