"""DDAS, MoE-Adapters' Distribution Discriminative Auto-Selector (Yu et al., CVPR 2024, Sec. 3.3),
built on the Expert Gate recipe (Aljundi et al., CVPR 2017): one undercomplete autoencoder per
trained task, plus an optional *reference* autoencoder fitted on generic ("general") images.

For a feature ``x`` of an image, every participating autoencoder ``A_j`` gives a reconstruction
error ``e_j(x) = mean_d (A_j(x)_d - x_d)^2``; then

    j* = argmin_j e_j(x);   decision = OOD  if  e_{j*}(x) > tau  or  j* = reference,  else  task j*

and an OOD sample is served by the frozen zero-shot CLIP. ``tau`` is a fixed value (reference
code: 0.0655 full shot, 0.06 few shot) or calibrated from held-out in-distribution errors.
Only autoencoders of tasks that finished training take part (``active``): the reference code also
lets the randomly initialised autoencoders of future tasks enter the argmin.

Feature extractors (frozen): AlexNet conv5 before its ReLU, flattened, then a sigmoid (the
reference), or the frozen CLIP image embedding ``sigmoid(sqrt(D) * f / |f|)`` (unit-RMS scaled,
squashed into (0, 1) like the AlexNet feature; the offline default).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

OOD = -1


class AutoEncoder(nn.Module):
    """Expert Gate autoencoder: ``x_hat = sigmoid(W_2 ReLU(W_1 x + b_1) + b_2)`` (D -> hidden -> D)."""

    def __init__(self, dim: int, hidden: int = 100):
        super().__init__()
        self.encoder = nn.Linear(dim, hidden)
        self.decoder = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(F.relu(self.encoder(x))))

    def errors(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample reconstruction error (MSE over feature dims) [B]."""
        return (self(x) - x).pow(2).mean(dim=1)


def fit_autoencoder(ae: AutoEncoder, batches: Iterator[torch.Tensor], *, iterations: int, lr: float = 0.01,
                    weight_decay: float = 1e-4, steps_per_epoch: int = 1, decay: float = 0.1,
                    decay_every: int = 10) -> list[float]:
    """Reference schedule: Adam, MSE, ``lr_t = lr * decay^floor(epoch / decay_every)`` with
    ``epoch = floor(t / steps_per_epoch)``. Returns the loss of every step."""
    opt = torch.optim.Adam(ae.parameters(), lr=lr, weight_decay=weight_decay)
    ae.train()
    losses = []
    for t in range(iterations):
        for g in opt.param_groups:
            g["lr"] = lr * decay ** ((t // max(1, steps_per_epoch)) // decay_every)
        x = next(batches)
        loss = F.mse_loss(ae(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    ae.eval()
    return losses


class DDAS(nn.Module):
    """The autoencoders and the decision rule. Slots are keyed by task index (``task_aes``), the
    reference autoencoder is ``reference`` (or absent). ``calibration[t]`` holds task t's quantile of
    held-out in-distribution errors under its own autoencoder (NaN when not calibrated)."""

    def __init__(self, dim: int, hidden: int = 100, num_tasks: int = 0, stacked: bool = False):
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.task_aes = nn.ModuleDict()
        self.reference: AutoEncoder | None = None
        self.register_buffer("calibration", torch.full((num_tasks,), float("nan")))
        # stacked: one forward for all participating autoencoders (weights stacked once, cached);
        # equal to the per-autoencoder loop up to float rounding
        self.stacked = stacked
        self._stack: tuple | None = None  # (key, stacked tensors, the parameters the key names)

    def new_autoencoder(self) -> AutoEncoder:
        return AutoEncoder(self.dim, self.hidden).to(self.calibration.device)

    def set_task_ae(self, task: int, ae: AutoEncoder) -> None:
        self.task_aes[str(task)] = ae

    def set_reference(self, ae: AutoEncoder | None) -> None:
        self.reference = ae

    def calibrated_threshold(self, tasks) -> float | None:
        """tau = max over the given tasks of their held-out error quantiles (None if none calibrated)."""
        vals = [self.calibration[t] for t in tasks if t < len(self.calibration)]
        vals = [v for v in vals if not torch.isnan(v)]
        return float(torch.stack(vals).max()) if vals else None

    def task_thresholds(self, tasks) -> dict[int, float]:
        """tau_t = task t's own held-out error quantile, for the calibrated tasks among ``tasks``."""
        return {int(t): float(self.calibration[t]) for t in tasks
                if t < len(self.calibration) and not torch.isnan(self.calibration[t])}

    @torch.no_grad()
    def errors(self, feats: torch.Tensor, active) -> tuple[torch.Tensor, list[int]]:
        """Errors [B, S] of the participating slots and their labels (task index, or OOD for the
        reference autoencoder), reference first."""
        slots = ([(OOD, self.reference)] if self.reference is not None else [])
        slots += [(int(t), self.task_aes[str(int(t))]) for t in active if str(int(t)) in self.task_aes]
        if not slots:
            return feats.new_zeros(feats.shape[0], 0), []
        if self.stacked and len(slots) > 1:
            return self._stacked_errors(feats, [ae for _, ae in slots]), [s for s, _ in slots]
        return torch.stack([ae.errors(feats) for _, ae in slots], dim=1), [s for s, _ in slots]

    def _stacked_weights(self, aes: list[AutoEncoder]) -> tuple[torch.Tensor, ...]:
        """Encoders side by side ``[S*H, D]`` (+ biases), decoders as a batch ``[S, H, D]`` (+ biases
        ``[S, D]``); rebuilt when an autoencoder, a parameter or its version changes."""
        params = [p for ae in aes for p in (ae.encoder.weight, ae.encoder.bias, ae.decoder.weight, ae.decoder.bias)]
        key = tuple((id(p), p._version) for p in params)
        if self._stack is None or self._stack[0] != key:
            self._stack = None  # free the old stack first
            w = (torch.cat([ae.encoder.weight for ae in aes]), torch.cat([ae.encoder.bias for ae in aes]),
                 torch.stack([ae.decoder.weight.t() for ae in aes]), torch.stack([ae.decoder.bias for ae in aes]))
            self._stack = (key, tuple(t.detach().contiguous() for t in w), params)  # params: ids stay taken
        return self._stack[1]

    def _stacked_errors(self, feats: torch.Tensor, aes: list[AutoEncoder], max_floats: int = 2 ** 25) -> torch.Tensor:
        """Errors [B, S] of ``S`` autoencoders in one encoder GEMM and one batched decoder GEMM
        (chunked over samples so that the ``[S, b, D]`` reconstructions stay under ``max_floats``)."""
        enc_w, enc_b, dec_w, dec_b = self._stacked_weights(aes)
        S, H, D = dec_w.shape
        out = []
        for x in feats.split(max(1, max_floats // (S * D))):
            z = F.relu(F.linear(x, enc_w, enc_b)).view(x.shape[0], S, H).transpose(0, 1)
            rec = torch.sigmoid(torch.baddbmm(dec_b.unsqueeze(1), z, dec_w))  # [S, b, D]
            out.append(rec.sub_(x).pow_(2).mean(dim=2).t())
        return torch.cat(out)

    @torch.no_grad()
    def decide(self, feats: torch.Tensor, active, threshold: float | dict[int, float] | None,
               mode: str = "sample") -> torch.Tensor:
        """Task index per sample (LongTensor [B]), OOD (-1) for the reference slot or an error above
        ``threshold``: one tau for every task, or ``{task: tau_t}`` (the winning task's own; a task
        without one never falls back). ``mode="batch"``: one decision for the whole batch from the
        batch-mean errors (the reference; assumes single-task test batches)."""
        B = feats.shape[0]
        err, labels = self.errors(feats, active)
        if not labels:
            return torch.full((B,), OOD, dtype=torch.long, device=feats.device)
        if mode == "batch":
            err = err.mean(dim=0, keepdim=True)
        best, arg = err.min(dim=1)
        out = torch.as_tensor(labels, device=feats.device)[arg]
        if isinstance(threshold, dict):
            tau = torch.tensor([threshold.get(s, float("inf")) for s in labels], device=feats.device)
            out = torch.where(best > tau[arg], torch.full_like(out, OOD), out)
        elif threshold is not None:
            out = torch.where(best > threshold, torch.full_like(out, OOD), out)
        return out.expand(B).clone() if mode == "batch" else out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Recreate the autoencoder slots a checkpoint holds (resume)."""
        for key in state_dict:
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            if rest.startswith("task_aes."):
                t = rest.split(".")[1]
                if t not in self.task_aes:
                    self.task_aes[t] = self.new_autoencoder()
            elif rest.startswith("reference.") and self.reference is None:
                self.reference = self.new_autoencoder()
        cal = state_dict.get(prefix + "calibration")
        if cal is not None and cal.shape != self.calibration.shape:
            self.calibration = torch.full(cal.shape, float("nan"), device=self.calibration.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ----------------------------------------------------------------------------- feature extractors
class ClipFeatures(nn.Module):
    """``sigmoid(sqrt(D) * f / |f|)`` of a frozen image encoder ``encode`` (called without the
    experts by the caller)."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.encode = encode

    @staticmethod
    def squash(f: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.normalize(f, dim=-1) * math.sqrt(f.shape[-1]))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.squash(self.encode(x))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file: safetensors, or a torch file read with ``weights_only``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path} (weights are never downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class AlexNetFeatures(nn.Module):
    """The reference extractor: torchvision AlexNet ``features[:-2]`` (conv5 before its ReLU),
    flattened, then a sigmoid; frozen, weights read from ``weights`` (never downloaded). Inputs are
    the CLIP-normalised images, as in the reference."""

    def __init__(self, weights: str | Path):
        super().__init__()
        from torchvision.models import alexnet

        net = alexnet(weights=None)
        net.load_state_dict(load_weights(weights))
        self.body = net.features[:-2].eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "AlexNetFeatures":
        return super().train(False)  # always frozen, always eval

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(x).flatten(1))


class PixelFeatures(nn.Module):
    """Low-level image statistics, an offline stand-in for AlexNet conv5 when no weights are at
    hand: the 8x8 colour layout, the 4x4 map of high-frequency energy ``|x - blur3(x)|`` (noise,
    blur, edges) and the per-channel contrast, squashed by a sigmoid. Parameter-free, so nothing
    to download or pretrain; unlike the final CLIP embedding it keeps the style of an image."""

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = F.adaptive_avg_pool2d(x, 8).flatten(1)
        detail = (x - F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)).abs()
        energy = F.adaptive_avg_pool2d(detail, 4).flatten(1) * 4.0
        contrast = x.flatten(2).std(dim=2)
        return torch.sigmoid(torch.cat([layout, energy, contrast], dim=1))
