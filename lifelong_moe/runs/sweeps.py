"""Sweeps: configs x variants x grid points x seeds, one results directory per run, run as Ray tasks.

Each run is an ordinary :func:`lifelong_moe.runs.runner.run` into ``DIR/<name>[-key=value...]-seed<N>``.
Where a run's directory already holds a run, the sweep continues it: a complete run whose saved
configuration is this one is skipped, a stopped or killed one resumed from its last completed
experience, and a directory without ``results.json`` (killed before its first write) is started over.
A run that fails is reported with its error; the others go on.

Scheduling is Ray's (``ray.remote`` tasks with a CPU / GPU request per run; a local Ray instance by
default, a cluster through ``address`` or ``RAY_ADDRESS``), or, with ``local=True``, one run after
the other in this process. Ray is an optional extra: ``pip install 'lifelong-moe[ray]'``.
"""
from __future__ import annotations

import itertools
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError

INSTALL_RAY = ("sweeps run on Ray, which is not installed: pip install 'lifelong-moe[ray]' "
               "(or run the sweep one run at a time in this process with --local)")


@dataclass
class SweepRun:
    dir: str  # directory name under the sweep's output
    name: str  # the run's name (results.json ``name``): the same for every seed of one setting
    seed: int
    grid: dict[str, str]  # key -> value as given on the command line
    config: dict  # the resolved configuration (RunConfig.to_dict())
    cpus: float = 1
    gpus: float = 0


@dataclass
class RunStatus:
    dir: str
    name: str
    seed: int
    status: str  # complete | skipped | failed
    action: str = ""  # started | resumed | restarted (killed before its first write) | already complete
    seconds: float = 0.0
    last: float | None = None  # the run's ``last`` metric (fraction), when complete
    error: str | None = None


@dataclass
class SweepResult:
    output: Path
    runs: list[RunStatus]
    compare: list[Path] = field(default_factory=list)  # comparison directories written

    @property
    def failed(self) -> list[RunStatus]:
        return [r for r in self.runs if r.status == "failed"]


# ------------------------------------------------------------------------------------------ expansion
def parse_seeds(text: str | list | None) -> list[int] | None:
    """``"0,1,2"`` or ``"0-4"`` (inclusive) or a list -> seeds; None keeps each config's own."""
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = []
        for part in str(text).split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d+)-(\d+)", part)
            if m:
                items += list(range(int(m[1]), int(m[2]) + 1))
            elif part:
                items.append(part)
    try:
        seeds = [int(s) for s in items]
    except (TypeError, ValueError):
        raise UserError(f"--seeds {text!r}: give integers, e.g. 0,1,2 or 0-4") from None
    if not seeds or any(s < 0 or s >= 2**31 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: give distinct integers from 0 to 2**31-1, e.g. 0,1,2")
    return seeds


def split_values(text: str) -> list[str]:
    """``a,[1,2],{x: 1}`` -> ``["a", "[1,2]", "{x: 1}"]``: commas inside brackets or braces stay."""
    out, depth, cur = [], 0, ""
    for c in text:
        depth += c in "[{"
        depth -= c in "]}"
        if c == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += c
    out.append(cur.strip())
    return out


def parse_grid(items) -> list[tuple[str, list[str]]]:
    """``["training.optimizer.lr=1e-3,3e-3", ...]`` (or a dict key -> values) -> ``[(key, values)]``."""
    if isinstance(items, dict):
        pairs = [(str(k), [str(v) for v in (vs if isinstance(vs, (list, tuple)) else [vs])]) for k, vs in items.items()]
    else:
        pairs = []
        for item in items or []:
            key, sep, raw = str(item).partition("=")
            values = split_values(raw)
            if not sep or not key.strip() or not all(values):
                raise UserError(f"--grid {item!r}: expected key.path=value1,value2,...")
            pairs.append((key.strip(), values))
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise UserError(f"--grid: {', '.join(dup)} given more than once; list all its values in one --grid")
    for k, vs in pairs:
        if k in ("seed", "name", "variants") or k.split(".")[0] in ("output", "variants"):
            raise UserError(f"--grid {k}: not a swept setting (seeds go in --seeds; the sweep names the runs "
                            "and their directories)")
        if len(set(vs)) != len(vs):
            raise UserError(f"--grid {k}: the values {vs} repeat")
    return pairs


def _short_keys(keys: list[str]) -> dict[str, str]:
    """The last part of each dotted key, or the whole key where two last parts collide."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_") or "_"


def expand(configs, *, seeds=None, grid=(), overrides=(), only=None, cpus_per_run=None,
           gpus_per_run=None) -> list[SweepRun]:
    """Every run of the sweep, validated (a bad config, key or value is a UserError before anything runs)."""
    from ..config import load_config, validate

    seeds = parse_seeds(seeds)
    pairs = parse_grid(grid)
    short = _short_keys([k for k, _ in pairs])
    runs: list[SweepRun] = []
    for path in configs:
        for values in itertools.product(*[vs for _, vs in pairs]):
            point = dict(zip([k for k, _ in pairs], values))
            try:
                cfgs = load_config(path, list(overrides) + [f"{k}={v}" for k, v in point.items()], only=only)
            except UserError as e:
                if not point:
                    raise
                raise type(e)(f"{path} (grid point {', '.join(f'{k}={v}' for k, v in point.items())}): {e}") from None
            for cfg in cfgs:
                suffix = ",".join(f"{short[k]}={v}" for k, v in point.items())
                name = f"{cfg.name}[{suffix}]" if suffix else cfg.name
                for seed in seeds if seeds is not None else [cfg.seed]:
                    data = {**cfg.to_dict(), "name": name, "seed": seed}
                    resolved = validate(data).to_dict()
                    dirname = _safe("-".join([cfg.name.replace("/", "-")] + [f"{short[k]}={v}" for k, v in point.items()]
                                             + [f"seed{seed}"]))
                    gpus = gpus_per_run if gpus_per_run is not None else \
                        (1 if str(cfg.runtime.device).startswith("cuda") else 0)
                    runs.append(SweepRun(dirname, name, seed, point, resolved,
                                         cpus=cpus_per_run if cpus_per_run is not None else (cfg.runtime.threads or 1),
                                         gpus=gpus))
    dirs = [r.dir for r in runs]
    clash = sorted({d for d in dirs if dirs.count(d) > 1})
    if clash:
        raise UserError(f"two runs of the sweep would share a directory ({', '.join(clash[:3])}): give the configs "
                        "distinct names")
    return runs


# ------------------------------------------------------------------------------------------ one run
def execute(run: dict, root: str, cwd: str | None = None) -> dict:
    """Run (or skip / resume) one :class:`SweepRun` (as a dict) into ``root/run.dir``; never raises for
    a failing run: the error comes back in the :class:`RunStatus` (as a dict). ``cwd``: the sweep's
    working directory, where relative paths in configs (data roots) point; a Ray worker moves there
    when this node has it."""
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    from ..config import validate
    from ..results import RunDir, load_record
    from .runner import run as run_one

    status = RunStatus(run["dir"], run["name"], run["seed"], "failed")
    out = Path(root) / run["dir"]
    t = time.perf_counter()
    try:
        cfg = validate(run["config"])
        if (out / "results.json").is_file():
            state = RunDir(out).check_start(cfg, resume=True, overwrite=False)  # same config, not in use
            if state.get("status") == "complete":
                status.status, status.action = "skipped", "already complete"
            else:
                status.action = "resumed"
        else:
            status.action = "restarted" if out.exists() and any(out.iterdir()) else "started"
        if status.status != "skipped":
            run_one(cfg, out, resume=status.action == "resumed", overwrite=False, progress=False,
                    log=lambda *_: None)
            status.status = "complete"
        last = (load_record(out).get("metrics", {}).get("last") or {}).get("value")
        status.last = last if isinstance(last, (int, float)) else None
    except Exception as e:  # noqa: BLE001 - reported per run; the sweep goes on
        status.error = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
    status.seconds = round(time.perf_counter() - t, 2)
    return asdict(status)


# ------------------------------------------------------------------------------------------ the sweep
def _ray():
    try:
        import ray
    except ImportError:
        raise UserError(INSTALL_RAY) from None
    return ray


def _run_local(runs, root, bar) -> list[dict]:
    out = []
    for r in runs:
        bar.set_postfix_str(r.dir)
        out.append(execute(asdict(r), str(root)))
        bar.update(1)
    return out


def _complete(run_dir: Path) -> bool:
    from ..io import read_json

    try:
        return read_json(run_dir / "results.json").get("status") == "complete"
    except (OSError, ValueError, AttributeError):
        return False


def _run_ray(runs, root, bar, address, num_cpus) -> list[dict]:
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        kw = {"num_cpus": num_cpus} if num_cpus and not address else {}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False, **kw)
    try:
        task = ray.remote(execute)
        results: list[dict | None] = [None] * len(runs)
        have = ray.cluster_resources()
        refs = {}
        for i, r in enumerate(runs):
            if _complete(root / r.dir):  # checked (same config) and skipped here: no task, no resources
                results[i] = execute(asdict(r), str(root))
                bar.update(1)
                continue
            short = [f"{need:g} {what}" for what, need in (("CPU", r.cpus), ("GPU", r.gpus))
                     if need > have.get(what, 0)]
            if short:  # Ray would wait for it forever
                results[i] = asdict(RunStatus(r.dir, r.name, r.seed, "failed", error=(
                    f"asks for {' and '.join(short)} per run; the Ray cluster has {have.get('CPU', 0):g} CPU, "
                    f"{have.get('GPU', 0):g} GPU (--cpus-per-run / --gpus-per-run, runtime.threads / runtime.device)")))
                bar.update(1)
                continue
            refs[task.options(num_cpus=r.cpus, num_gpus=r.gpus, max_retries=0).remote(asdict(r), str(root),
                                                                                      os.getcwd())] = i
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                i = refs[ref]
                try:
                    results[i] = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - the worker died (killed, out of memory): resume later
                    results[i] = asdict(RunStatus(runs[i].dir, runs[i].name, runs[i].seed, "failed",
                                                  error=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"))
                bar.set_postfix_str(runs[i].dir)
                bar.update(1)
        return results
    finally:
        if started:
            ray.shutdown()


def status_table(statuses: list[RunStatus]) -> str:
    w = max([len(s.dir) for s in statuses] + [3])
    lines = [f"{'run':<{w}}  {'status':<8}  {'action':<16}  {'seconds':>8}  {'last':>6}  error"]
    for s in statuses:
        last = "-" if s.last is None else f"{100 * s.last:.2f}"
        lines.append(f"{s.dir:<{w}}  {s.status:<8}  {s.action:<16}  {s.seconds:>8.1f}  {last:>6}  {s.error or ''}")
    return "\n".join(lines)


def _compare(root: Path, statuses: list[RunStatus], log) -> list[Path]:
    """The seed-aggregated comparison of the completed runs, one per stream (task list)."""
    import json

    from ..report.compare import compare_runs, load_run

    done = [root / s.dir for s in statuses if s.status in ("complete", "skipped")]
    by_stream: dict[str, list[Path]] = {}
    for d in done:  # one stream: one stream section (its class order may still differ by seed)
        r = load_run(d)
        by_stream.setdefault(json.dumps((r.config or {}).get("stream", r.tasks), sort_keys=True), []).append(d)
    written = []
    for i, dirs in enumerate(by_stream.values()):
        dest = root / "compare" / (f"stream{i + 1}" if len(by_stream) > 1 else "")
        try:
            compare_runs(dirs, dest)
            written.append(dest)
        except UserError as e:
            log(f"no comparison for {dest}: {e}")
    return written


def sweep(configs, *, seeds=None, grid=(), overrides=(), output="sweeps", only=None, address=None, local=False,
          num_cpus=None, cpus_per_run=None, gpus_per_run=None, progress=True, log=print) -> SweepResult:
    """Expand and run a sweep (see the module docstring); write ``output/sweep.json`` (what ran, how it
    ended) and the seed-aggregated comparison under ``output/compare``."""
    from tqdm.auto import tqdm

    from ..io import write_json
    from .jobs import prepare_assets
    from ..results import _writable_dir

    configs = [configs] if isinstance(configs, (str, Path)) else list(configs)
    if not configs:
        raise UserError("sweep: give at least one config file")
    runs = expand(configs, seeds=seeds, grid=grid, overrides=overrides, only=only, cpus_per_run=cpus_per_run,
                  gpus_per_run=gpus_per_run)
    if not local:
        _ray()  # without Ray: say how to install it before anything is written
    root = Path(output).absolute()  # Ray workers need not share this process's working directory
    _writable_dir(root)
    if local or not (address or os.environ.get("RAY_ADDRESS")):  # on a cluster each node finds (or makes) its own
        from ..config import validate

        prepare_assets([validate(r.config) for r in {r.name: r for r in runs}.values()], progress=progress)
    root.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(runs), desc="sweep", unit="run", disable=not progress) as bar:
        raw = _run_local(runs, root, bar) if local else _run_ray(runs, root, bar, address, num_cpus)
    statuses = [RunStatus(**r) for r in raw]
    write_json(root / "sweep.json", {"configs": [str(c) for c in configs], "seeds": parse_seeds(seeds),
                                     "grid": dict(parse_grid(grid)), "overrides": list(overrides),
                                     "runs": [{**asdict(s), "grid": r.grid} for s, r in zip(statuses, runs)]})
    result = SweepResult(root, statuses)
    if any(s.status != "failed" for s in statuses):
        result.compare = _compare(root, statuses, log)
    return result
