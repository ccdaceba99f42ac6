"""``lifelong-moe`` command line: run, edit, fit, compare, metrics, pretrain, bench, list."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from .errors import UserError


def _print_table(rows: list[tuple[str, dict]], keys: list[str]) -> None:
    w = max([len(n) for n, _ in rows] + [4])
    print(f"{'run':<{w}}  " + "  ".join(f"{k:>15}" for k in keys))
    for name, m in rows:
        cells = []
        for k in keys:
            v = (m.get(k) or {}).get("value")
            cells.append(f"{'-' if v is None else f'{100 * v:.2f}':>15}")
        print(f"{name:<{w}}  " + "  ".join(cells))


SUMMARY_KEYS = ["last", "avg_incremental", "forgetting", "bwt", "mtil_transfer", "mtil_avg", "mtil_last"]
VQA_SUMMARY_KEYS = ["vqacl_ap", "vqacl_af", "last", "avg_incremental", "bwt", "fwt"]  # VQACL reports AP / AF


def summary_keys(records: list[dict]) -> list[str]:
    return VQA_SUMMARY_KEYS if all(r.get("stream_kind") == "vqa" for r in records) else SUMMARY_KEYS


def compare_variants(outs: list[Path], what: str = "plots and tables") -> None:
    """Plots and tables of several variants' runs beside them (``<common parent>/compare``)."""
    if len(outs) < 2:
        return
    from .report.compare import compare_runs

    dest = Path(os.path.commonpath([str(o.resolve()) for o in outs])) / "compare"
    try:
        compare_runs(outs, dest)
        print(f"\n{what}: {dest}")
    except UserError as e:  # e.g. variants on different streams: the runs themselves are fine
        print(f"\nno comparison plots: {e}")


def _skip_data_needs_dry_run(a) -> None:
    if getattr(a, "skip_data", False) and not getattr(a, "dry_run", False):
        raise UserError("--skip-data only applies to --dry-run (a real run reads its data)")


def cmd_run(a) -> int:
    from .api import run

    only = [w.strip() for w in a.only.split(",") if w.strip()] if a.only else None
    _skip_data_needs_dry_run(a)
    if getattr(a, "dry_run", False):  # plan it, writing nothing (lifelong_moe/runs/dry_run.py)
        from .config import load_config
        from .runs.dry_run import dry_run

        dry_run("run", load_config(a.config, a.overrides, only=only), check_data=not getattr(a, "skip_data", False))
        return 0
    outs = run(a.config, a.overrides, a.output, only=only, resume=a.resume, overwrite=a.overwrite,
               stop_after=a.stop_after, jobs=a.jobs, quiet=a.quiet)
    from .runtime import distributed

    if not distributed.is_main():  # rank 0 prints the table and draws the comparison
        return 0
    from .results import load_record

    records = [(str(o), load_record(o)) for o in outs]
    if all(r["status"] == "complete" for _, r in records):
        print()
        _print_table([(r["name"], r["metrics"]) for _, r in records], summary_keys([r for _, r in records]))
        compare_variants(outs)
    return 0


def cmd_edit(a) -> int:
    """A lifelong knowledge-editing benchmark (:mod:`.edit_runner`)."""
    from .runs.edit_runner import cost_hint, format_table, output_dir, run_edit
    from .editing.config import load_edit_config
    from .results import RunDir, load_record

    only = [w.strip() for w in a.only.split(",") if w.strip()] if a.only else None
    overrides = list(a.overrides) + list(a.set or [])
    _skip_data_needs_dry_run(a)
    configs = load_edit_config(a.config, overrides, only=only)
    if getattr(a, "dry_run", False):  # plan it (lifelong_moe/runs/dry_run.py)
        from .runs.dry_run import dry_run

        dry_run("edit", configs, check_data=not getattr(a, "skip_data", False))
        return 0
    multi = len(configs) > 1 or "/" in configs[0].name
    outs = [Path(a.output) / cfg.name.rsplit("/", 1)[-1] if (a.output and multi) else output_dir(cfg, a.output)
            for cfg in configs]
    for cfg, out in zip(configs, outs):  # refuse before any variant starts writing
        RunDir(out).check_start(cfg, resume=a.resume, overwrite=a.overwrite)
    jobs = a.jobs if a.jobs is not None else configs[0].runtime.jobs
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    options = {"resume": a.resume, "overwrite": a.overwrite}
    if jobs > 1 and len(configs) > 1:  # one process per variant, `jobs` at a time
        from .runs.jobs import run_parallel

        run_parallel(a.config, overrides, configs, outs, jobs, options, quiet=a.quiet, kind="edit", cost_of=cost_hint)
    else:
        for cfg, out in zip(configs, outs):
            run_edit(cfg, out, progress=not a.quiet, log=(lambda *_: None) if a.quiet else print, **options)
    records = [(r["name"], r["extra"]["edit_table"]) for r in (load_record(o) for o in outs)]
    print()
    print(format_table(records, "token_acc"))
    print()
    print(format_table(records, "exact_match"))
    compare_variants(outs, "plots and tables (reliability of edits as they accumulate)")
    return 0


def fit_config(config: str | None, overrides: list[str], method: str, only: str | None = None):
    """The one variant of an edit config that uses ``method`` (``only`` names it among several); without
    a config, the tiny VLM's synthetic edit world with ``method``'s defaults."""
    from .config import read_yaml_tree
    from .editing.config import load_edit_config

    if config and "=" in config and not Path(config).exists():  # key=value without a config
        overrides, config = [config, *overrides], None
    if not config:
        base = {"name": f"fit_{method}", "backbone": {"name": "lmoe-tiny-llava", "pretrained": "synthetic"},
                "method": {"name": method}, "data": {"source": "synthetic", "train": 2000}}
        return load_edit_config(base, overrides)[0]
    data = read_yaml_tree(config)
    names = None
    if data.get("variants"):
        base_method = (data.get("method") or {}).get("name")
        names = [str(v["name"]) for v in data["variants"] if isinstance(v, dict) and "name" in v
                 and (v.get("method") or {}).get("name", base_method) == method]
        if only:
            names = [n for n in names if n == only]
        if len(names) != 1:
            raise UserError(f"{config}: {'no' if not names else len(names)} variant(s) use method {method!r}"
                            + (f" ({', '.join(names)}); pick one with --only" if names else ""))
    cfg = load_edit_config(config, overrides, only=names)[0]
    if cfg.method.name != method:
        raise UserError(f"{config}: its method is {cfg.method.name!r}, not {method!r}")
    return cfg


def cmd_fit(a) -> int:
    """Meta-train a method on an edit config's train split and write its fitted weights."""
    from .provenance import git_commit
    from .runs.edit_runner import fit_and_save

    cfg = fit_config(a.config, list(a.overrides), a.what, a.only)
    commit = git_commit()  # the code that trains, read before anything can change the tree
    path = fit_and_save(cfg, a.out, ship=a.ship, command=a.command_line,
                        log=(lambda *_: None) if a.quiet else print, commit=commit)
    if a.quiet:
        print(path)
    else:
        print(f"use them with  method: {{name: {a.what}, fitted: {path}}}  (or editor.load_fitted(path))")
    return 0


def cmd_compare(a) -> int:
    from .report.compare import compare_runs, format_summary

    paths = compare_runs([Path(d) for d in a.runs], Path(a.output))
    print(format_summary([Path(d) for d in a.runs]))  # per seed group when runs differ only by seed
    print("\n".join(f"wrote {p}" for p in paths.values()))
    return 0


def cmd_sweep(a) -> int:
    from .api import sweep
    from .runs.sweeps import status_table

    for opt, v in (("--cpus", a.cpus), ("--cpus-per-run", a.cpus_per_run)):
        if v is not None and v <= 0:
            raise UserError(f"{opt} must be positive, got {v}")
    if a.gpus_per_run is not None and a.gpus_per_run < 0:
        raise UserError(f"--gpus-per-run must be 0 or more, got {a.gpus_per_run}")
    only = [w.strip() for w in a.only.split(",") if w.strip()] if a.only else None
    given = [c for c in a.configs if "=" in c and not Path(c).exists()]  # key=value among the configs
    a.overrides = given + list(a.overrides)
    a.configs = [c for c in a.configs if c not in given]
    res = sweep(a.configs, seeds=a.seeds, grid=a.grid or [], overrides=a.overrides, output=a.output, only=only,
                address=a.address, local=a.local, num_cpus=a.cpus, cpus_per_run=a.cpus_per_run,
                gpus_per_run=a.gpus_per_run, progress=not a.quiet)
    print()
    print(status_table(res.runs))
    for d in res.compare:
        print(f"\nseed-aggregated comparison: {d}")
        print((d / "results.md").read_text(encoding="utf-8"), end="")
    if res.failed:
        print(f"\n{len(res.failed)} of {len(res.runs)} runs failed (see above); the same command resumes the sweep")
    return 1 if res.failed else 0


def cmd_metrics(a) -> int:
    from .results import compute_metrics, load_record

    record = load_record(a.run)
    metrics = compute_metrics(record)
    for k, m in metrics.items():
        v = m["value"]
        print(f"{k:>16}  {'-' if v is None else f'{100 * v:7.2f}'}   {m['definition']}")
    return 0


def cmd_pretrain(a) -> int:
    if a.what == "vlm":
        from .backbones.pretrain_vlm import cli_pretrain_vlm

        return cli_pretrain_vlm(a)
    from .backbones.pretrain_clip import PretrainConfig, format_table, read_info, resolve_synthetic
    from .backbones.shipped import train_for_cli
    from .config import apply_overrides, read_yaml_tree

    overrides = list(a.overrides)
    if a.config and "=" in a.config and not Path(a.config).exists():
        overrides.insert(0, a.config)
        a.config = None
    data = apply_overrides(read_yaml_tree(a.config) if a.config else {}, overrides)
    if a.cache_dir and Path(a.cache_dir).exists() and not Path(a.cache_dir).is_dir():
        raise UserError(f"--cache-dir {a.cache_dir}: exists and is not a directory")
    model = data.pop("model", PretrainConfig.model)
    path = train_for_cli(a, model, data, resolve_synthetic)
    info = read_info(path)
    if not a.quiet:
        print(f"checkpoint: {path}  (trained in {info.get('train_seconds')} s, {info.get('steps')} steps)")
        print(format_table({d: v["accuracy"] for d, v in info.get("zero_shot", {}).items()}))
        print(f"use it with  backbone: {{name: {model}, pretrained: synthetic}}  or  pretrained: {path}")
    else:
        print(path)
    return 0


def cmd_bench(a) -> int:
    if a.what == "cl_moe":
        from .bench.cl_moe import main as bench_main
    elif a.what == "edit":
        from .bench.edit import main as bench_main
    elif a.what == "edit_store":
        from .bench.edit_store import main as bench_main
    elif a.what == "meta_cache":
        from .bench.meta_cache import main as bench_main
    elif a.what == "moe_scale":
        from .bench.scale import main as bench_main
    elif a.what == "quickstart":
        from .bench.quickstart import main as bench_main
    else:
        from .bench.moe_adapters import main as bench_main
    from .runtime.threads import torch_threads

    with torch_threads(None):  # the benches set torch's thread count: put it back for the caller
        return bench_main(a.args)


def cmd_list(a) -> int:
    from .evaluation import metrics
    from .backbones.clip import shipped_model_names
    from .families import FAMILIES
    from .registry import STRATEGIES, STREAM_KINDS
    from .streams.mtil import NAMED_ORDERS
    from .streams.sources import KNOWN_SOURCES
    from .streams.vqa_sources import KNOWN_VQA_SOURCES
    from .backbones.vlm_tiny import shipped_vlm_names

    print("families:   " + "; ".join(f"{k}: {f.description}" for k, f in FAMILIES.items()))
    print("strategies: " + ", ".join(f"{n} ({'/'.join(f)})" for n, f in sorted(STRATEGIES.items())))
    print("streams:    " + ", ".join(STREAM_KINDS) + "   named orders: " + ", ".join(NAMED_ORDERS) + ", vqacl (vqa)")
    print("datasets:   " + ", ".join(KNOWN_SOURCES))
    print("vqa tasks:  " + ", ".join(KNOWN_VQA_SOURCES))
    print("backbones:  clip: shipped " + ", ".join(shipped_model_names()) + "; any open_clip name with "
          "pretrained=<tag or path> (see open_clip.list_pretrained())")
    print("            vlm: shipped " + ", ".join(shipped_vlm_names()) + " (pretrained: synthetic); any LLaVA "
          "hub id or local save_pretrained directory")
    print("metrics:    " + ", ".join(metrics.METRICS))
    from .editing.registry import EDIT_METHODS

    print("editing:    " + ", ".join(EDIT_METHODS) + " (lifelong-moe edit; docs/editing.md)")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lifelong-moe", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a continual benchmark from a YAML config")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. training.epochs=2")
    r.add_argument("-o", "--output", help="results directory (default: output.dir of the config)")
    r.add_argument("--resume", action="store_true", help="continue a stopped run from its last experience "
                   "(one killed before it saved anything starts from the beginning, and says so)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run in the output directory")
    r.add_argument("--stop-after", type=int, help="stop after this many experiences (resume later)")
    r.add_argument("--only", help="comma-separated variant names to run")
    r.add_argument("-j", "--jobs", type=int, help="variants run at once, one process each "
                   "(default: runtime.jobs of the config)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-row logs")
    r.add_argument("--dry-run", action="store_true", help="plan the run and print it: every data file checked, "
                   "the model built from its config on the meta device, one training and one generation step "
                   "traced, memory per device; offline, no weights loaded")
    r.add_argument("--skip-data", action="store_true", help="with --dry-run: do not check the data files")
    r.set_defaults(fn=cmd_run)
    sw = sub.add_parser("sweep", help="configs x variants x seeds x grid, one results directory per run, on Ray "
                        "(or --local); re-running it skips finished runs and resumes stopped ones")
    sw.add_argument("configs", nargs="+", metavar="CONFIG", help="config files, then any dotted key=value "
                    "overrides applied to every run")
    sw.add_argument("--seeds", help="e.g. 0,1,2 or 0-4 (default: each config's seed)")
    sw.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                    help="a swept setting and its values (repeatable; the grid is their product)")
    sw.add_argument("-o", "--output", default="sweeps", help="the sweep's directory (default: sweeps)")
    sw.add_argument("--only", help="comma-separated variant names to run")
    sw.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray instance)")
    sw.add_argument("--local", action="store_true", help="no Ray: one run after the other in this process")
    sw.add_argument("--cpus", type=float, help="CPUs of the local Ray instance (default: all)")
    sw.add_argument("--cpus-per-run", type=float, help="Ray CPU request per run (default: runtime.threads or 1)")
    sw.add_argument("--gpus-per-run", type=float, help="Ray GPU request per run (default: 1 where runtime.device "
                    "is cuda, else 0)")
    sw.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sw.set_defaults(fn=cmd_sweep, overrides=[])
    e = sub.add_parser("edit", help="a lifelong knowledge-editing benchmark from a YAML config (docs/editing.md)")
    e.add_argument("config", help="edit YAML: backbone, method, data, evaluation (configs/edit_quickstart.yaml)")
    e.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. method.threshold=0.8")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="an override (repeatable)")
    e.add_argument("-o", "--output", help="results directory (default: output.dir of the config)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing run in the output directory")
    e.add_argument("--resume", action="store_true", help="continue stopped runs: reload the meta-trained weights, "
                   "keep the finished edit counts (finished runs are left as they are; one killed before it saved "
                   "anything starts from the beginning, and says so)")
    e.add_argument("--only", help="comma-separated variant names to run")
    e.add_argument("-j", "--jobs", type=int, help="variants run at once, one process each (default: runtime.jobs)")
    e.add_argument("-q", "--quiet", action="store_true", help="no per-step logs")
    e.add_argument("--dry-run", action="store_true", help="plan the edit run (see run --dry-run)")
    e.add_argument("--skip-data", action="store_true", help="with --dry-run: do not check the record files")
    e.set_defaults(fn=cmd_edit)
    f = sub.add_parser("fit", help="meta-train an editing method on an edit config's train split and write its "
                       "fitted weights (docs/liveedit.md)")
    f.add_argument("what", choices=["liveedit"])
    f.add_argument("config", nargs="?", help="edit YAML (configs/edit_quickstart.yaml): its backbone, train split and "
                   "the method's settings (the variant that uses the method)")
    f.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. method.steps=2000 data.train=4000")
    f.add_argument("--out", help="directory to write the fitted weights into")
    f.add_argument("--ship", action="store_true", help="write them into the package (lifelong_moe/editing/weights/) "
                   "with a manifest, for the shipped tiny VLM (maintainers)")
    f.add_argument("--only", help="the variant to fit when several use the method")
    f.add_argument("-q", "--quiet", action="store_true", help="print only the path of the fitted weights")
    f.set_defaults(fn=cmd_fit)
    c = sub.add_parser("compare", help="plots and a metrics table for several runs")
    c.add_argument("runs", nargs="+")
    c.add_argument("-o", "--output", required=True)
    c.set_defaults(fn=cmd_compare)
    m = sub.add_parser("metrics", help="recompute and print the metrics of a saved run")
    m.add_argument("run")
    m.set_defaults(fn=cmd_metrics)
    pt = sub.add_parser("pretrain", help="pretrain the embedded tiny CLIP or tiny VLM on the synthetic world (cached)")
    pt.add_argument("what", choices=["clip", "vlm"])
    pt.add_argument("config", nargs="?", help="YAML of PretrainConfig (clip) or VlmPretrainConfig (vlm) fields "
                    "(model, steps, seed, ...)")
    pt.add_argument("overrides", nargs="*", help="key=value overrides of those fields")
    pt.add_argument("--force", action="store_true", help="retrain even if a cached checkpoint exists")
    pt.add_argument("--cache-dir", help="cache root (default $LIFELONG_MOE_CACHE or ~/.cache/lifelong_moe)")
    pt.add_argument("--ship", action="store_true", help="train into the package's shipped weights (lifelong_moe/"
                    "backbones/weights/) and write the artefact's manifest (maintainers)")
    pt.add_argument("-q", "--quiet", action="store_true")
    pt.set_defaults(fn=cmd_pretrain)
    b = sub.add_parser("bench", help="cost benchmarks (moe: MoE-Adapters vs dense adapter and plain CLIP; cl_moe: CL-MoE vs one dense LoRA on the tiny VLM; "
                       "moe_scale: MoE-Adapters + DDAS on ViT-B/16 shapes as tasks accumulate; quickstart: the CLIP quickstart cold and warm; "
                       "edit: answering with 10,000 stored edits, edit() cost, bytes per edit; "
                       "edit_store: the edit store's bytes per edit and per one-edit save at LLaVA-1.5 sizes; "
                       "meta_cache: LiveEdit's meta-training cache per record at LLaVA-1.5 input sizes)",
                       add_help=False)
    b.add_argument("what", choices=["moe", "cl_moe", "moe_scale", "quickstart", "edit", "edit_store", "meta_cache"])
    b.add_argument("args", nargs=argparse.REMAINDER, help="options of python -m lifelong_moe.bench.moe_adapters (--help)")
    b.set_defaults(fn=cmd_bench)
    sub.add_parser("list", help="known streams, datasets, backbones, strategies, metrics").set_defaults(fn=cmd_list)
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse; ``run``'s ``key=value`` overrides may stand anywhere among its options."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e
             or args.command not in ("run", "pretrain", "bench", "sweep", "edit", "fit")]
    if stray:
        p.error(f"unrecognized arguments: {' '.join(stray)}")
    args.command_line = shlex.join(["lifelong-moe", *(sys.argv[1:] if argv is None else argv)])
    if extra and args.command == "bench":
        args.args = list(args.args) + extra
    elif extra:
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun (lifelong_moe/runtime/distributed.py)
            from .runtime.distributed import stopped_peer

            with stopped_peer():  # a lost process becomes one UserError
                return args.fn(args)
        return args.fn(args)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0" or "data-parallel" in str(e):  # torchrun: one message, not N
            print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # e.g. a missing dataset directory
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the user named cannot be used: a file where a directory goes, no permission
        if e.filename is None:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
