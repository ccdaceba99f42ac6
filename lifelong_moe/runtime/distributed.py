"""Data-parallel runs under ``torchrun``: the process group and every cross-rank reduction.

``torchrun --nproc_per_node N -m lifelong_moe run CONFIG`` starts N processes (ranks) that each build
the same model from the same seed. Per training step every rank scores its slice of the configured
global batch (``training.batch_size / N`` samples), and the gradients of the trainable parameters are
averaged over the ranks, weighted by slice size, before the optimiser steps: every rank then holds the
same trainable state, and the step is the single-process step on the whole batch (up to float
summation order). Evaluation shards each test set and sums the counts. Only rank 0 touches the
results directory (lock, writes); the others receive its decisions (errors included) by broadcast.

Why an all-reduce of gradients rather than ``DistributedDataParallel``: DDP synchronises only
gradients produced through its own ``forward`` over a parameter set fixed at construction, while the
strategies here compute losses outside the module's forward (class prompts re-encoded per step,
replayed groups through ``encode_image``, EWC's penalty added after the forward) and add parameters
per experience (a router per task, grown experts). The reduction is DDP's (mean of gradients; a
parameter no rank touched keeps no gradient, so Adam skips it as in one process), in one bucket.

Backend: ``nccl`` when the run's device is a GPU (each rank on ``cuda:LOCAL_RANK``), else ``gloo``.
Every collective has a timeout (``LIFELONG_MOE_DIST_TIMEOUT`` seconds, default 600): a rank that dies
or hangs stops the others with an error instead of a silent wait.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Subset

from ..errors import UserError

TIMEOUT_ENV = "LIFELONG_MOE_DIST_TIMEOUT"


def launched() -> bool:
    """True when started by ``torchrun`` (or another launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (torchrun's ``RANK`` before the group is joined; 0 in one process)."""
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0")) if launched() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "600")
    try:
        return timedelta(seconds=float(raw))
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds") from None


def setup(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (once per process); return this rank's device."""
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if not dist.is_available():
            raise UserError("torchrun started several processes but this torch has no torch.distributed")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timeout(), device_id=device if device.type == "cuda" else None)
    return device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_batch(batch_size: int, sizes: list[int] = ()) -> None:
    """The configured batch is the global one: it must split evenly over the ranks, and no epoch may
    end with fewer samples than ranks (``sizes``: the experiences' training set sizes)."""
    if not active():
        return
    if batch_size % world() != 0:
        raise UserError(f"training.batch_size={batch_size} does not split over {world()} processes; "
                        f"use a multiple of {world()} (each rank trains on batch_size / processes samples)")
    for n in sizes:
        ShardedBatches.check_tail(n, batch_size, world())


# ------------------------------------------------------------------------------------------ rank 0
def _broadcast_bytes(data: bytes | None, device: torch.device) -> bytes:
    n = torch.tensor([len(data) if data is not None else 0], dtype=torch.long, device=device)
    dist.broadcast(n, 0)
    buf = torch.zeros(int(n), dtype=torch.uint8, device=device)
    if is_main():
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, 0)
    return data if is_main() else buf.cpu().numpy().tobytes()


def on_main(fn, device: torch.device | str = "cpu"):
    """Run ``fn`` on rank 0 only and hand its JSON-able result (or its UserError) to every rank, so
    that all ranks go on, or all stop with the same error. JSON, not pickle, crosses the ranks."""
    if not active():
        return fn()
    device = torch.device(device)
    payload, failure = None, None
    if is_main():
        try:
            payload = json.dumps({"ok": fn()}).encode()
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, not wait for a timeout
            payload, failure = json.dumps({"error": str(e)}).encode(), e
    out = json.loads(_broadcast_bytes(payload, device).decode())
    if failure is not None:
        raise failure  # rank 0: the error as raised (the CLI reports it)
    if "error" in out:
        raise UserError(out["error"])  # the others stop too, quietly (rank 0 prints)
    return out["ok"]


class MainRunDir:
    """A :class:`~lifelong_moe.results.RunDir` seen from one rank: rank 0 checks, locks and writes;
    the other ranks get rank 0's answers and write nothing. Reads (checkpoints) go to the same files,
    so the ranks share a filesystem (one machine, or a shared mount)."""

    def __init__(self, inner, device: torch.device | str = "cpu"):
        self.inner, self.path, self.device = inner, inner.path, device

    def check_start(self, cfg, **kw) -> dict:
        return on_main(lambda: self.inner.check_start(cfg, **kw), self.device)

    def acquire(self, cfg, **kw) -> dict:
        return on_main(lambda: self.inner.acquire(cfg, **kw), self.device)

    def load_checkpoint(self, i: int) -> dict:
        box = {}

        def main():  # rank 0 reads first: a missing checkpoint stops every rank with its error
            box["state"] = self.inner.load_checkpoint(i)
            return True

        on_main(main, self.device)
        return box["state"] if is_main() else self.inner.load_checkpoint(i)

    def __getattr__(self, name):  # start, save_progress, finish, release, releasing ...
        attr = getattr(self.inner, name)
        if name in ("start", "write_record", "save_progress", "finish", "hold") and not is_main():
            return lambda *a, **k: None
        return attr


# ------------------------------------------------------------------------------------------ data
class ShardedBatches(BatchSampler):
    """This rank's slice of each global batch of the single-process order: the global batches are
    those of ``DataLoader(data, batch_size, shuffle=True, generator=g)`` (same draws from ``g``), and
    rank r takes the r-th of N contiguous near-equal parts of each. A tail batch smaller than N
    leaves some ranks empty: the ranks cannot step together, so that is refused up front."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, rank: int, world: int):
        super().__init__(RandomSampler(range(n), generator=generator), batch_size, drop_last=False)
        self.rank, self.world = rank, world
        self.check_tail(n, batch_size, world)

    @staticmethod
    def check_tail(n: int, batch_size: int, world: int) -> None:
        tail = n % batch_size
        if 0 < tail < world:
            raise UserError(f"an experience of {n} training samples ends each epoch with a batch of {tail}, "
                            f"fewer than the {world} processes; choose training.batch_size so that "
                            f"{n} % batch_size is 0 or at least {world}")

    def __iter__(self):
        for batch in super().__iter__():
            yield np.array_split(np.asarray(batch), self.world)[self.rank].tolist()


def train_loader(dataset, batch_size: int, generator: torch.Generator, **kw) -> DataLoader:
    """The training loader: the single-process one, or this rank's shard of each of its batches."""
    if not active():
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, **kw)
    sampler = ShardedBatches(len(dataset), batch_size, generator, rank(), world())
    return DataLoader(dataset, batch_sampler=sampler, generator=generator, **kw)


def shard(dataset):
    """This rank's contiguous part of a test set (all of it in one process)."""
    if not active():
        return dataset
    return Subset(dataset, np.array_split(np.arange(len(dataset)), world())[rank()].tolist())


# ------------------------------------------------------------------------------------------ reductions
def average_gradients(params: list[torch.nn.Parameter], loss: torch.Tensor, weight: int) -> float:
    """Weighted mean over ranks of each parameter's gradient (weight: this rank's sample count), and
    of the loss, in one all-reduce; returns the global loss. A parameter without a gradient on every
    rank keeps none (optimisers skip it, as in one process)."""
    if not params:
        return float(loss)
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() * weight for p in params]
    head = torch.stack([loss.detach().float().reshape(()) * weight,
                        torch.tensor(float(weight), device=device)])
    flat = torch.cat([head, has, *grads])
    dist.all_reduce(flat)
    total = flat[1]
    offset = 2 + len(params)
    for p, h in zip(params, flat[2:offset]):
        n = p.numel()
        if h > 0:
            g = (flat[offset:offset + n] / total).view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)
        offset += n
    return float(flat[0] / total)


def sum_(t: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over ranks (a copy; the input is unchanged)."""
    if not active():
        return t
    out = t.clone()
    dist.all_reduce(out)
    return out


def sum_dict(d: dict, device: torch.device | str = "cpu") -> dict:
    """Each tensor of ``d`` summed over ranks (keys in sorted order, one all-reduce)."""
    if not active() or not d:
        return d
    keys = sorted(d)
    flat = torch.cat([d[k].reshape(-1).to(device, torch.float64) for k in keys])
    dist.all_reduce(flat)
    out, offset = {}, 0
    for k in keys:
        n = d[k].numel()
        out[k] = flat[offset:offset + n].view_as(d[k]).to(d[k].dtype).to(d[k].device)
        offset += n
    return out


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (bitwise identical, whatever kernels ran)."""
    if not active():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, 0)


def broadcast_tensors(tensors: list[torch.Tensor]) -> None:
    if active():
        for t in tensors:
            dist.broadcast(t, 0)


def gather_rows(fn, n: int, device: torch.device) -> torch.Tensor:
    """``fn(indices)`` -> rows for those of ``range(n)``; each rank computes its contiguous part and
    every rank gets all ``n`` rows in order (the single-process result)."""
    if not active():
        return fn(list(range(n)))
    parts = np.array_split(np.arange(n), world())
    mine = fn(parts[rank()].tolist()).to(device)
    width, dtype = mine.shape[1:], mine.dtype
    size = max(len(p) for p in parts)
    padded = torch.zeros((size, *width), dtype=dtype, device=device)
    padded[:len(mine)] = mine
    out = [torch.empty_like(padded) for _ in parts]
    dist.all_gather(out, padded)
    return torch.cat([o[:len(p)] for o, p in zip(out, parts)])


def reduce_eval_records(strategy) -> None:
    """After an evaluation row: strategies that count something per test sample (DDAS choices,
    inferred tasks) sum this row's counts over the ranks (``reduce_eval_records`` on the strategy)."""
    if active() and hasattr(strategy, "reduce_eval_records"):
        strategy.reduce_eval_records()


def reduce_row_counts(records: dict, row: int, num_cols: int, width: int, device="cpu") -> None:
    """Sum over ranks, in place, the count vectors ``records[(row, col)]`` of one evaluation row
    (absent: zeros on this rank; kept only where some rank counted)."""
    if not active():
        return
    zero = torch.zeros(width, dtype=torch.long)
    stacked = torch.stack([records.get((row, c), zero).cpu() for c in range(num_cols)]).to(device)
    dist.all_reduce(stacked)
    for c, counts in enumerate(stacked.cpu()):
        if (row, c) in records or counts.any():
            records[(row, c)] = counts


@contextmanager
def stopped_peer():
    """Turn a failed collective (another rank died, or hung past the timeout) into one UserError that
    says what happened and how to continue; leave the process group on a normal exit."""
    try:
        yield
    except (dist.DistError, RuntimeError) as e:
        if not active() or not isinstance(e, dist.DistError) and not _looks_distributed(e):
            raise
        raise UserError(f"data-parallel run stopped on rank {rank()} of {world()}: another process "
                        f"stopped, or did not answer within {timeout().total_seconds():.0f} s ({TIMEOUT_ENV}) "
                        f"({_first_line(e)}); the results directory holds the last completed experience: "
                        "run the same command again with --resume") from None
    teardown()


def _looks_distributed(e: BaseException) -> bool:
    text = str(e).lower()
    return any(w in text for w in ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout"))


def _first_line(e: BaseException) -> str:
    lines = [w for w in str(e).splitlines() if w.strip()]
    return lines[0][:200] if lines else type(e).__name__


def gather_json(obj, device: torch.device | str = "cpu") -> list:
    """Every rank's JSON-able ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
    if not active():
        return [obj]
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world())]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.long, device=device))
    size = int(max(s.item() for s in sizes))
    padded = torch.zeros(size, dtype=torch.uint8, device=device)
    padded[:len(data)] = data
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded)
    return [json.loads(p[:int(n)].cpu().numpy().tobytes().decode()) for p, n in zip(parts, sizes)]
