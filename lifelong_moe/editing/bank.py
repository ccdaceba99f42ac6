"""The stacked tensors of a method's stored edits, grown in place.

An edit store only grows between deletions, so a method keeps each kind of edit tensor stacked
(``[M, ...]``) in a buffer with spare rows: appending an edit writes one row (amortised O(1); the
buffer doubles when full) instead of restacking all M edits, so one ``edit()`` costs the same with
10 or 10,000 stored edits. A deletion or reload rebuilds the stack from the store."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch


class EditBank:
    """Rows of ``keys`` (one tensor per key per edit, equal shapes) on ``device`` as ``dtype``."""

    def __init__(self, keys: Sequence[str], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.keys, self.device, self.dtype = tuple(keys), torch.device(device), dtype
        self._buf: dict[str, torch.Tensor] = {}
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def rebuild(self, edits: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Exactly these edits, in this order."""
        self._buf, self.size = {}, 0
        self.extend(edits)

    def extend(self, edits: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Append edits after the current rows."""
        n = len(edits)
        if not n:
            return
        need = self.size + n
        if not self._buf or need > next(iter(self._buf.values())).shape[0]:
            cap = max(need, 2 * (next(iter(self._buf.values())).shape[0] if self._buf else 0))
            grown = {}
            for k in self.keys:
                t = torch.empty((cap, *edits[0][k].shape), dtype=self.dtype, device=self.device)
                if self.size:
                    t[:self.size] = self._buf[k][:self.size]
                grown[k] = t
            self._buf = grown
        for k in self.keys:
            self._buf[k][self.size:need] = torch.stack([e[k] for e in edits]).to(self.device, self.dtype)
        self.size = need

    def view(self) -> dict[str, torch.Tensor] | None:
        """``{key: [M, ...]}`` views of the stored rows (no copy), or None when empty."""
        if not self.size:
            return None
        return {k: t[:self.size] for k, t in self._buf.items()}
