"""Variants of one config run side by side, each in its own process (``runtime.jobs`` / ``--jobs``).

On a small CPU machine a tiny model keeps two cores only half busy with one run's intra-op
threads; two one-thread runs side by side finish a set of variants sooner. Every variant is the
same ``runner.run`` as in a sequential run, with the config's ``runtime.threads``; so with
``threads`` set, the numbers are the same whether the variants run one after the other or at once.
Shared assets (the synthetic-world backbone) are prepared here first, once.

Workers fork from a ``forkserver`` that has imported the framework (torch, open_clip, Avalanche:
several seconds) but never computed, so no OpenMP state is forked; :func:`start_early` launches it
while the parent is still loading the config.
"""
from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from ..config import RunConfig
from ..errors import UserError
from ..registry import strategy_modules


PRELOAD = ["lifelong_moe.runs.runner", "lifelong_moe.runs.edit_runner", "lifelong_moe.streams.builder", "lifelong_moe.evaluation.evaluator",
           *(f"lifelong_moe.strategies.{m}" for m in strategy_modules())]


def _context():
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start_early() -> None:
    """Start the worker server now, so its imports overlap the caller's own work."""
    if _context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def prepare_assets(configs: list[RunConfig], progress: bool = True) -> None:
    """Pretrain (or find cached) every synthetic backbone the configs name, in this process."""
    from ..families import family_of

    for cfg in configs:  # trains on the first call, finds the cached copy after
        family_of(cfg.backbone).prepare_assets(cfg.backbone, progress=progress)


def cost(cfg: RunConfig) -> float:
    from ..registry import strategy_class

    return strategy_class(cfg.strategy.name, cfg.backbone.family).cost_hint


def _run_variant(kind: str, config: str, overrides: list[str], variant: str, out: str, options: dict,
                 quiet: bool) -> str:
    """One variant in a worker process: ``kind`` "run" (``runner.run``) or "edit" (``edit_runner.run_edit``)."""
    if kind == "edit":
        from .edit_runner import run_edit as run_one
        from ..editing.config import load_edit_config as load
    else:
        from ..config import load_config as load
        from .runner import run as run_one

    cfg = load(config, overrides, only=[variant])[0]
    t = time.perf_counter()
    run_one(cfg, out, progress=False, log=(lambda *_: None) if quiet else (lambda m: print(m, flush=True)), **options)
    if not quiet:
        print(f"[{cfg.name}] finished in {time.perf_counter() - t:.1f} s", flush=True)
    return out


def run_parallel(config: str, overrides: list[str], configs: list, outs: list[Path], jobs: int,
                 options: dict, quiet: bool = False, *, kind: str = "run", cost_of=None) -> None:
    """Run ``configs`` (variants of ``config`` with ``overrides``) into ``outs``, ``jobs`` at a time,
    costliest first (``cost_of(cfg)``, default the strategy's cost hint). ``kind``: "run" (continual
    runs) or "edit" (``lifelong-moe edit``). A failing variant stops the others from starting and
    re-raises here."""
    cost_of = cost_of or cost
    from ..runtime.device import resolve_device

    for cfg in configs:  # an unavailable device fails before any pretraining or run starts
        resolve_device(cfg.runtime.device)  # (no CUDA context here: the workers create their own)
    prepare_assets(configs, progress=not quiet)
    order = sorted(range(len(configs)), key=lambda i: -cost_of(configs[i]))  # stable: config order on ties
    if not quiet:
        print(f"running {len(configs)} variants, {min(jobs, len(configs))} at a time in separate processes "
              f"(runtime.jobs / --jobs; --jobs 1 runs them one after the other with progress bars)", flush=True)
    with ProcessPoolExecutor(max_workers=min(jobs, len(configs)), mp_context=_context()) as pool:
        futures = [pool.submit(_run_variant, kind, config, list(overrides), configs[i].name.rsplit("/", 1)[-1],
                               str(outs[i]), options, quiet) for i in order]
        _, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in pending:
            f.cancel()
        for f in futures:
            if f.done() and not f.cancelled() and f.exception() is not None:
                if isinstance(f.exception(), BrokenProcessPool):
                    raise UserError("a variant's worker process died without a Python error (out of memory, "
                                    "or killed); finished variants are kept: rerun with --jobs 1 "
                                    "(and --resume for a stopped one) to see which") from None
                raise f.exception()
