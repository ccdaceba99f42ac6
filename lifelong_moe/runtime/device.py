"""Where a run computes and in which precision: ``runtime.device`` and ``runtime.precision``.

Backbone-agnostic helpers taking a device (string or ``torch.device``) and a precision name, shared by
every strategy. Mixed precision follows torch's recipe (https://pytorch.org/docs/stable/amp.html):
weights and optimiser state stay fp32, forward passes run under ``torch.autocast`` (losses are
computed in fp32), and fp16 scales the loss with a ``GradScaler`` so small gradients do not
underflow. ``fp32`` uses no autocast at all, so its numbers are those of plain fp32 code.

A backbone may also *store* its frozen weights in half precision (``backbone.dtype`` of a VLM):
:func:`resolve_precision` makes such a run compute under autocast in that dtype (trainable state,
kept fp32 by :func:`keep_trainable_fp32`, meets the half-precision activations under autocast), and
:func:`dtype_name` names the dtype the weights were actually loaded in, for the record.
"""
from __future__ import annotations

import contextlib
import re

import torch

from ..errors import UserError

DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d+)?"
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto``: the first CUDA device (``cuda:0``) if torch sees one, else the CPU; ``cpu``, ``cuda``
    (``cuda:0``), ``cuda:N``, ``mps``: that device, which must exist (UserError otherwise). Creates no
    CUDA context."""
    if not re.fullmatch(DEVICE_PATTERN, spec):
        raise UserError(f"runtime.device: {spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
            raise UserError(f"runtime.device: {spec!r} is not available: torch {torch.__version__} ({built}) "
                            "sees no CUDA device; use runtime.device: auto or cpu")
        index = dev.index or 0
        if index >= n:
            raise UserError(f"runtime.device: {spec!r} is not available: torch sees {n} CUDA device(s), "
                            f"cuda:0 to cuda:{n - 1}")
        return torch.device("cuda", index)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"runtime.device: 'mps' is not available (torch {torch.__version__} on this machine "
                        "has no Metal backend); use runtime.device: auto or cpu")
    return dev


def check_precision(device: str | torch.device, precision: str) -> None:
    """UserError for a precision the device cannot run (bf16 on a CUDA GPU without bf16 support)."""
    if precision not in PRECISIONS:
        raise UserError(f"runtime.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    dev = torch.device(device)
    if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UserError(f"runtime.precision: bf16 is not supported by {describe_device(dev)}; use fp16 or fp32")


def dtype_name(dtype: torch.dtype) -> str:
    """``fp32`` / ``bf16`` / ``fp16`` for a torch dtype (its torch name for any other)."""
    return next((k for k, v in PRECISIONS.items() if v == dtype), str(dtype).removeprefix("torch."))


def resolve_precision(dtype: str, precision: str | None, where: str = "runtime.precision") -> str:
    """The autocast precision for frozen weights stored in ``dtype``: ``precision`` when given (it must
    be ``dtype`` when the weights are half precision: trainable fp32 state meets half-precision
    activations only under autocast, so a bf16 backbone computing without it or under fp16 is
    refused), else ``dtype``. UserError on a mismatch."""
    if precision is None:
        return dtype
    if dtype != "fp32" and precision != dtype:
        raise UserError(f"{where}: {precision} with backbone.dtype {dtype}: weights stored in {dtype} compute under "
                        f"{dtype} autocast; set {where}: {dtype} (or leave it out), or backbone.dtype: fp32")
    return precision


def keep_trainable_fp32(module: torch.nn.Module) -> list[str]:
    """Cast every trainable floating-point parameter of ``module`` to fp32 in place (the Parameter
    objects stay the same); a half-precision backbone gives injected adapters its dtype (peft, CL-MoE's
    projector), but optimiser steps need fp32 master weights. Returns the names cast (none in fp32)."""
    cast = []
    for name, p in module.named_parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            cast.append(name)
    return cast


def describe_device(device: str | torch.device) -> str:
    """``cpu``, ``mps`` or ``cuda:N (<GPU name>)``, as recorded in results.json."""
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index or 0
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(dev)


def autocast(device: str | torch.device, precision: str):
    """Context for forward passes: ``torch.autocast`` to the precision's dtype; none for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=PRECISIONS[precision])


def autocast_active(device: str | torch.device) -> bool:
    """Whether an autocast is in effect for ``device``'s type (False for types without autocast)."""
    kind = torch.device(device).type
    return torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)


def full_precision(device: str | torch.device):
    """Context that switches an enclosing autocast off (fp32 islands, e.g. small auxiliary models
    whose decisions are thresholded); a no-op when no autocast is active."""
    if autocast_active(device):
        return torch.autocast(device_type=torch.device(device).type, enabled=False)
    return contextlib.nullcontext()


def grad_scaler(device: str | torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaler for fp16 (dynamic scaling, torch's defaults); a pass-through for fp32 and bf16."""
    kind = torch.device(device).type
    enabled = precision == "fp16"
    return torch.amp.GradScaler(kind if enabled else "cpu", enabled=enabled)
