"""Image preprocessing for a CLIP backbone: PIL images and [0, 1] tensors alike end as normalised
``[3, S, S]`` float tensors. Evaluation is always deterministic (resize + centre crop); training may
use CLIP's train transform (``training.augment: clip``, :class:`ClipTrainTransform`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ..data import ClassificationData


AUGMENTS = ("none", "clip")


class ImageTransform:
    """Resize (shorter side, bicubic) + centre crop to ``size``, grey -> RGB, CLIP normalisation.

    ``augment`` names the transform of the training images (:meth:`for_training`): ``none`` (this
    one) or ``clip`` (:class:`ClipTrainTransform`); test images always get this one."""

    random = False  # a deterministic transform: tensor datasets are transformed once, up front

    def __init__(self, size: int, mean, std, augment: str = "none"):
        if augment not in AUGMENTS:
            raise ValueError(f"training.augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.augment = augment

    def for_training(self) -> "ImageTransform":
        """The transform of training images."""
        if self.augment == "clip":
            return ClipTrainTransform(self.size, self.mean.flatten().tolist(), self.std.flatten().tolist())
        return self

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


class ClipTrainTransform(ImageTransform):
    """CLIP's train transform, as the reference trains with it (MoE-Adapters ``mtil/clip/clip.py``
    ``_transform(is_train=True)``; open_clip's default train transform): a random crop of 90-100 %
    of the image area with aspect ratio in [3/4, 4/3] (torchvision ``RandomResizedCrop``, scale
    (0.9, 1.0)), resized to ``size`` x ``size`` (bicubic), grey -> RGB, CLIP normalisation. A new
    crop at every draw, from torch's global generator (which the strategy seeds per experience)."""

    random = True
    SCALE = (0.9, 1.0)
    RATIO = (3 / 4, 4 / 3)

    def __init__(self, size: int, mean, std):
        super().__init__(size, mean, std)
        self.augment = "clip"

    def for_training(self) -> "ClipTrainTransform":
        return self

    def _params(self, img) -> tuple[int, int, int, int]:
        from torchvision.transforms import RandomResizedCrop

        return RandomResizedCrop.get_params(img, list(self.SCALE), list(self.RATIO))

    def tensor(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: float ``[C, H, W]`` or ``[N, C, H, W]`` in [0, 1] with C in {1, 3}; one crop per image."""
        if x.ndim not in (3, 4) or x.shape[-3] not in (1, 3):
            raise ValueError(f"image tensor must be [C, H, W] or [N, C, H, W] with C in (1, 3), got {list(x.shape)}")
        if x.ndim == 4:
            return torch.stack([self.tensor(img) for img in x]) if len(x) else self._normalise(x.float())
        x = x.float().expand(3, -1, -1)
        top, left, h, w = self._params(x)
        crop = x[None, :, top:top + h, left:left + w]
        out = F.interpolate(crop, size=(self.size, self.size), mode="bicubic", align_corners=False,
                            antialias=True).clamp(0, 1)[0]
        return self._normalise(out)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def __call__(self, img) -> torch.Tensor:
        if isinstance(img, torch.Tensor):
            return self.tensor(img)
        from torchvision.transforms.functional import InterpolationMode, pil_to_tensor, resized_crop

        img = img.convert("RGB")
        top, left, h, w = self._params(img)
        img = resized_crop(img, top, left, h, w, [self.size, self.size], InterpolationMode.BICUBIC)
        return self._normalise(pil_to_tensor(img).float() / 255.0)


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
    """Apply ``transform``; tensor-backed datasets are transformed once, up front, in batches, unless
    the transform is random (then every access draws anew)."""
    if len(ds) and not transform.random and isinstance(ds[0][0], torch.Tensor):
        xs = []
        for start in range(0, len(ds), batch):
            imgs = torch.stack([ds[i][0] for i in range(start, min(start + batch, len(ds)))])
            xs.append(transform.tensor(imgs))
        return TensorDataset(torch.cat(xs), torch.as_tensor(targets, dtype=torch.long))
    return Mapped(ds, transform)


def transformed(data: ClassificationData, transform: ImageTransform) -> tuple[Dataset, Dataset]:
    """``(train, test)``: training images through ``transform.for_training()``, test images through
    ``transform`` itself (deterministic)."""
    return (prepare(data.train, data.train_targets, transform.for_training()),
            prepare(data.test, data.test_targets, transform))
