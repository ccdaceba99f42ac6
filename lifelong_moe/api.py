"""The Python API (``lifelong_moe.run``, ``.sweep``, ``.load_run``, ``.compare``): what the CLI
commands do, as functions for notebooks and scripts; ``lifelong-moe run|sweep|compare`` call these.

    import lifelong_moe as lm
    dirs = lm.run("configs/quickstart.yaml", overrides=["training.iterations=20"], output="runs/qs")
    res = lm.sweep("configs/quickstart.yaml", seeds=[0, 1, 2], output="sweeps/qs", local=True)
    r = lm.load_run(dirs[0]); r.matrix, r.zero_shot, r.tasks, r.metrics, r.config
    figs = lm.compare(dirs)          # {"forgetting_curves": Figure, "average_accuracy": ..., "heatmaps": ...}
"""
from __future__ import annotations

from pathlib import Path

from .errors import UserError


def _jobs_in(config, overrides) -> int:
    """``runtime.jobs`` of a config at a glance (1 when unreadable: load_config reports why)."""
    from .config import apply_overrides, read_yaml_tree

    try:
        return int(apply_overrides(read_yaml_tree(config), list(overrides)).get("runtime", {}).get("jobs", 1))
    except Exception:  # noqa: BLE001 - validation proper comes next
        return 1


def run(config, overrides=None, output=None, *, only=None, resume: bool = False, overwrite: bool = False,
        stop_after: int | None = None, jobs: int | None = None, quiet: bool = True) -> list[Path]:
    """Run a config file (every variant, or those in ``only``) with dotted ``key=value`` ``overrides``
    into ``output`` (default: the config's ``output.dir``; with several variants, one sub-directory
    each); or run a :class:`~lifelong_moe.config.RunConfig` as it is. Returns the results directories."""
    from .config import RunConfig, load_config
    from .results import RunDir
    from .runs.runner import output_dir, run as run_one

    overrides = list(overrides or [])
    only = [only] if isinstance(only, str) else only
    for opt, v in (("--stop-after", stop_after), ("--jobs", jobs)):
        if v is not None and v < 1:
            raise UserError(f"{opt} must be at least 1, got {v}")
    log = (lambda *_: None) if quiet else print
    options = {"resume": resume, "overwrite": overwrite, "stop_after": stop_after}
    if isinstance(config, RunConfig):
        if overrides or only:
            raise UserError("run(RunConfig): overrides and only apply to a config file; change the RunConfig instead")
        from .runs.runner import resolve_runtime

        resolve_runtime(config)
        return [run_one(config, output_dir(config, output), progress=not quiet, log=log, **options)]
    from .runtime import distributed

    if not distributed.launched() and (jobs if jobs is not None else _jobs_in(config, overrides)) > 1:
        from .runs.jobs import start_early

        start_early()  # the workers' imports overlap the validation below
    configs = load_config(config, overrides, only=only)
    multi = len(configs) > 1 or "/" in configs[0].name
    outs = [Path(output) / cfg.name.rsplit("/", 1)[-1] if (output and multi) else output_dir(cfg, output)
            for cfg in configs]
    jobs = jobs if jobs is not None else configs[0].runtime.jobs
    if distributed.launched():  # torchrun: every variant in turn, each data-parallel over the processes
        jobs = 1
    if jobs > 1 and len(configs) > 1:
        from .runs.jobs import run_parallel

        for cfg, out in zip(configs, outs):  # refuse before any variant starts writing
            RunDir(out).check_start(cfg, resume=resume, overwrite=overwrite)
        run_parallel(str(config), overrides, configs, outs, jobs, options, quiet=quiet)
    else:
        from .runs.runner import resolve_runtime

        for cfg in configs:  # an unavailable device fails before any variant starts writing
            resolve_runtime(cfg)
        for cfg, out in zip(configs, outs):
            run_one(cfg, out, progress=not quiet, log=log, **options)
    return outs


def sweep(configs, *, seeds=None, grid=(), overrides=(), output="sweeps", only=None, address=None,
          local: bool = False, num_cpus=None, cpus_per_run=None, gpus_per_run=None, progress: bool = True):
    """Run configs x variants x ``grid`` (``{"training.optimizer.lr": [1e-3, 3e-3]}`` or
    ``["key=v1,v2"]``) x ``seeds`` as Ray tasks (``local=True``: one after the other here); see
    :mod:`lifelong_moe.runs.sweeps`. Returns a :class:`~lifelong_moe.runs.sweeps.SweepResult`."""
    from .runs.sweeps import sweep as run_sweep

    return run_sweep(configs, seeds=seeds, grid=grid, overrides=overrides, output=output, only=only, address=address,
                     local=local, num_cpus=num_cpus, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run,
                     progress=progress, log=print if progress else (lambda *_: None))


def load_run(path, label: str | None = None):
    """A results directory as a :class:`~lifelong_moe.report.compare.RunResult`: ``matrix`` (numpy, rows =
    experiences trained), ``zero_shot`` (numpy or None), ``tasks``, ``metrics`` (name -> value),
    ``config`` (the resolved configuration, a dict), ``seed``, ``status``."""
    from .report.compare import load_run as load

    return load(path, label)


def compare(runs, output=None, *, labels=None) -> dict:
    """The comparison figures (matplotlib ``Figure`` objects, by name) of run directories or loaded
    runs; runs that differ only by seed are drawn as mean +- std. With ``output``, also writes every
    file ``lifelong-moe compare`` writes there."""
    from .report.compare import compare_figures, compare_runs

    runs = list(runs) if not isinstance(runs, (str, Path)) else [runs]
    if output is not None:
        compare_runs(runs, output, labels=labels)
    return compare_figures(runs, labels=labels)
