"""Image preprocessing for a CLIP backbone: PIL images and [0, 1] tensors alike end as normalised
``[3, S, S]`` float tensors."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ..data import ClassificationData


class ImageTransform:
    """Resize (shorter side, bicubic) + centre crop to ``size``, grey -> RGB, CLIP normalisation."""

    def __init__(self, size: int, mean, std):
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def tensor(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: float ``[C, H, W]`` or ``[N, C, H, W]`` in [0, 1] with C in {1, 3}."""
        batched = x.ndim == 4
        if x.ndim not in (3, 4) or x.shape[-3] not in (1, 3):
            raise ValueError(f"image tensor must be [C, H, W] or [N, C, H, W] with C in (1, 3), got {list(x.shape)}")
        x = x if batched else x.unsqueeze(0)
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        if (h, w) != (self.size, self.size):
            scale = self.size / min(h, w)
            nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
            top, left = (nh - self.size) // 2, (nw - self.size) // 2
            x = x[..., top:top + self.size, left:left + self.size]
        x = (x - self.mean) / self.std
        return x if batched else x[0]

    def __call__(self, img) -> torch.Tensor:
        if isinstance(img, torch.Tensor):
            return self.tensor(img)
        from torchvision.transforms.functional import pil_to_tensor

        return self.tensor(pil_to_tensor(img.convert("RGB")).float() / 255.0)


class Mapped(Dataset):
    """``(transform(image), target)`` over a dataset of ``(image, target)``."""

    def __init__(self, base: Dataset, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        img, target = self.base[i]
        return self.transform(img), int(target)


def prepare(ds: Dataset, targets: list[int], transform: ImageTransform, batch: int = 512) -> Dataset:
    """Apply ``transform``; tensor-backed datasets are transformed once, up front, in batches."""
    if len(ds) and isinstance(ds[0][0], torch.Tensor):
        xs = []
        for start in range(0, len(ds), batch):
            imgs = torch.stack([ds[i][0] for i in range(start, min(start + batch, len(ds)))])
            xs.append(transform.tensor(imgs))
        return TensorDataset(torch.cat(xs), torch.as_tensor(targets, dtype=torch.long))
    return Mapped(ds, transform)


def transformed(data: ClassificationData, transform: ImageTransform) -> tuple[Dataset, Dataset]:
    return prepare(data.train, data.train_targets, transform), prepare(data.test, data.test_targets, transform)
