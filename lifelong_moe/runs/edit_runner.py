"""``lifelong-moe edit``: a lifelong knowledge-editing benchmark from YAML into a results directory.

Protocol (LiveEdit's ``evaluate_sequential_edit``, ``vllm_editor_eval.py:69-134``): the pre-edit
model's locality outputs are cached once, before any edit; then for each edit count T the eval
records are cut into consecutive chunks of T (a trailing partial chunk dropped, at most
``evaluation.max_chunks``); per chunk the T edits are applied one after another, all T records are
scored, and the model is restored (``Editor.reset``). Metrics are averaged over chunks, weighted by
records.

The results directory is the one ``run`` writes (:mod:`.results`): ``tasks`` are the
``evaluation.matrix_chunks`` parts of the largest count's first chunk, the ``zero_shot`` row is the
unedited model's reliability on each part, row i of ``matrix`` the reliability (teacher-forced token
accuracy) on every part after parts 0..i were applied, so ``metrics`` / ``compare`` / plots read
forgetting of edits as they read forgetting of tasks. ``edit_metrics.csv`` and
``results.json["extra"]["edit_table"]`` hold the metrics per edit count.

Fitted weights: a method that learns before it edits (LiveEdit) is meta-trained on the train split,
unless the Editor already holds fitted weights: ``fitted: <path>``, or (``fitted: auto``, the default)
the shipped ones when they were fitted on this backbone with these settings and, if the config has a
train split, on the same one (:mod:`lifelong_moe.editing.fitted`); the log says which.
``lifelong-moe fit liveedit CONFIG --out DIR`` (:func:`fit_and_save`) meta-trains on a config's train
split and writes the fitted weights, ``--ship`` into the package with a manifest.

Resuming (``resume=True``, ``lifelong-moe edit --resume``): the table is saved after every edit
count and the meta-trained weights after the fit (``checkpoints/fit.safetensors``), so a stopped
run reloads the weights instead of meta-training again and continues at the first edit count it had
not finished, with the same numbers as an uninterrupted run (every count starts from the unedited
model; the pre-edit outputs are recomputed, deterministically).
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path

from .. import results as R
from ..editing import metrics as EM
from ..editing.config import EditConfig
from ..errors import UserError
from ..io import atomic_path, write_text
from ..provenance import versions
from ..runtime.threads import torch_threads

TABLE_COLUMNS = [f"{m}.{k}" for m in EM.METRICS for k in ("token_acc", "exact_match")]


def output_dir(cfg: EditConfig, override: str | Path | None = None) -> Path:
    return Path(override) if override else Path(cfg.output.dir.format(name=cfg.name))


def load_data(cfg: EditConfig, vlm):
    """``(train records, eval records)``; UserError on a missing or malformed source."""
    return load_train(cfg, vlm), load_eval(cfg, vlm)


def _synthetic():
    try:
        from ..streams.edit_synthetic import edit_records
    except ModuleNotFoundError:
        raise UserError("data.source: synthetic needs streams/edit_synthetic.py (not in this installation); "
                        "use data.source: json") from None
    return edit_records


def load_train(cfg: EditConfig, vlm) -> list:
    """The meta-training records (``data.train`` synthetic ones, or ``data.train_path`` cut to ``data.train``)."""
    d = cfg.data
    if d.source == "synthetic":
        return _synthetic()("train", d.train, seed=cfg.seed) if d.train else []
    from ..editing.records import load_records

    train = load_records(d.train_path, vlm, image_root=d.image_root, ignore_fields=d.ignore_fields) \
        if d.train_path else []
    return train[:d.train] if d.train and train else train


def load_eval(cfg: EditConfig, vlm) -> list:
    d = cfg.data
    if d.source == "synthetic":
        return _synthetic()("test", d.eval, seed=cfg.seed)
    from ..editing.records import load_records

    return load_records(d.eval_path, vlm, image_root=d.image_root, limit=d.eval, ignore_fields=d.ignore_fields)


def describe_train(cfg: EditConfig, n: int) -> dict:
    """The train split a fit used (recorded with fitted weights; ``fitted: auto`` compares it)."""
    d = cfg.data
    return {"source": d.source, "records": n, "seed": cfg.seed,
            **({"path": Path(d.train_path).name} if d.source == "json" and d.train_path else {})}


def new_record(cfg: EditConfig, parts: list[tuple[int, int]], params: dict) -> dict:
    return {"schema_version": R.SCHEMA_VERSION, "name": cfg.name, "strategy": cfg.method.name, "status": "running",
            "seed": cfg.seed, "stream_kind": "edit", "metric_kind": "edit reliability (token accuracy)",
            "versions": versions(), "tasks": [{"name": f"edits {a + 1}-{b}", "edits": b - a} for a, b in parts],
            "zero_shot": None, "matrix": [], "metrics": {}, "params": params, "timings": {"experiences": []},
            "extra": {}, "skipped_images": {}}


def _weighted(rows: list[tuple[dict, int]]) -> dict:
    """Record-weighted means of per-chunk metric summaries (None where no chunk had the metric)."""
    out = {}
    for key in TABLE_COLUMNS:
        m = key.split(".")[0]
        vals = [(s["metrics"][key], s["n"][m]) for s, _ in rows if s["metrics"][key] is not None and s["n"][m]]
        n = sum(w for _, w in vals)
        out[key] = sum(v * w for v, w in vals) / n if n else None
    return out


def table_csv(table: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["edits", "chunks"] + TABLE_COLUMNS + ["edit_s"])
    for t, row in table.items():
        w.writerow([t, row["chunks"]] + ["" if row[k] is None else f"{row[k]:.6f}" for k in TABLE_COLUMNS]
                   + [f"{row['edit_s']:.6f}"])
    return buf.getvalue()


SHORT = {"reliability": "Rel", "text_generality": "T-Gen", "image_generality": "M-Gen", "text_locality": "T-Loc",
         "image_locality": "M-Loc"}


def format_table(rows: list[tuple[str, dict]], key: str = "token_acc") -> str:
    """One line per (run, edit count): the five metrics in percent (``key``: token_acc or exact_match)."""
    w = max([len(n) for n, _ in rows] + [6])
    lines = [f"{'run':<{w}}  {'edits':>6}  " + "  ".join(f"{SHORT[m]:>6}" for m in EM.METRICS) + f"   ({key})"]
    for name, table in rows:
        for t, row in table.items():
            cells = ["     -" if row[f"{m}.{key}"] is None else f"{100 * row[f'{m}.{key}']:6.1f}" for m in EM.METRICS]
            lines.append(f"{name:<{w}}  {t:>6}  " + "  ".join(cells))
    return "\n".join(lines)


def run_edit(cfg: EditConfig, out: str | Path | None = None, *, resume: bool = False, overwrite: bool = False,
             progress: bool = True, log=print) -> Path:
    """Run (or resume) one edit configuration; return the results directory."""
    run_dir = R.RunDir(output_dir(cfg, out))
    with torch_threads(cfg.runtime.threads), run_dir.releasing():
        return _run(cfg, run_dir, resume=resume, overwrite=overwrite, log=log)


def cost_hint(cfg: EditConfig) -> float:
    """Variants that meta-train first (LiveEdit) run longest: start them first."""
    return float(cfg.data.train > 0 or bool(cfg.data.train_path))


def _fit_checkpoint(run_dir: R.RunDir) -> Path:
    return run_dir.path / "checkpoints" / "fit.safetensors"


def fit_plan(cfg: EditConfig, editor, train: list) -> tuple[str, str]:
    """``(plan, why)`` before editing: ``fit`` (meta-train on ``train``; baselines: a no-op),
    ``loaded`` (the editor holds fitted weights) or ``none`` (nothing to learn). Shipped weights fitted
    on another train split than this config's are set aside for a fit. UserError when the method needs
    fitting and neither is possible (before anything is written)."""
    if not editor.needs_fit:
        return ("fit" if train else "none"), ""
    got = editor.fitted if editor.is_fitted else None
    if got is not None and got.get("source") == "shipped" and train:
        mine = describe_train(cfg, len(train))
        if got.get("train") != mine:
            return "fit", (f"{cfg.method.name}: the shipped fitted weights {Path(got['path']).name} were fitted on "
                           f"{got.get('train')}, this config's train split is {mine}: meta-training")
    if got is not None:
        where = "shipped " if got.get("source") == "shipped" else ""
        return "loaded", (f"{cfg.method.name}: {where}fitted weights loaded from {got['path']} ({got.get('steps')} "
                          f"steps on {got.get('train')}) instead of meta-training")
    if train:
        given = "fitted: none" if getattr(cfg.method_params(), "fitted", "auto") == "none" else \
            "no fitted weights shipped for this backbone with these settings"
        return "fit", f"{cfg.method.name}: meta-training on {len(train)} train records ({given})"
    raise UserError(f"{cfg.method.name} needs fitted weights: data.train is 0 (nothing to meta-train on) and no "
                    f"fitted weights match this backbone and these settings; set data.train, or method.fitted="
                    f"<path> (`lifelong-moe fit {cfg.method.name} CONFIG --out DIR` makes them)")


def fit_and_save(cfg: EditConfig, out: str | Path | None, *, ship: bool = False, command: str = "",
                 log=print, commit: str | None = None) -> Path:
    """``lifelong-moe fit``: meta-train ``cfg``'s method on its train split and write the fitted weights
    into ``out`` (:mod:`lifelong_moe.editing.fitted`), or with ``ship`` into the package's
    ``editing/weights/<method>/`` with a manifest (the shipped tiny VLM only). Returns the .safetensors path."""
    from ..backbones.pretrain_vlm import shipped_vlm
    from ..editing import fitted as F
    from ..editing.editor import Editor
    from ..editing.registry import build_method

    if ship and out:
        raise UserError("--ship writes into the package's editing/weights/; it takes no --out")
    if not ship and not out:
        raise UserError("fit: give --out DIR (or --ship, maintainers)")
    b = cfg.backbone
    if ship and (b.pretrained != "synthetic" or b.pretrain or shipped_vlm(b.name) is None):
        raise UserError(f"--ship: fitted weights are shipped for the shipped tiny VLM only (backbone: {{name: "
                        f"lmoe-tiny-llava, pretrained: synthetic}}, default recipe, shipped: lifelong-moe pretrain vlm "
                        f"--ship); this config's backbone is {b.model_dump(exclude_none=True)}")
    if not cfg.data.train and not cfg.data.train_path:
        raise UserError("fit: the config has no train split (data.train is 0); set data.train=N")
    with torch_threads(cfg.runtime.threads):
        from ..runtime.device import resolve_device
        from ..runs.runner import seed_everything

        seed_everything(cfg.seed)
        method = build_method(cfg.method.name, F.without_fitted(cfg.method_params()))  # fit from scratch
        if not getattr(method, "needs_fit", False):
            raise UserError(f"method {cfg.method.name!r} learns nothing before editing: nothing to fit")
        editor = Editor(cfg.backbone.model_dump(mode="json"), method, seed=cfg.seed,
                        device=resolve_device(cfg.runtime.device), precision=cfg.runtime.precision)
        if ship and not editor.backbone_source.get("shipped"):
            raise UserError("--ship: the backbone did not resolve to the shipped tiny VLM")
        train = load_train(cfg, editor.vlm)
        log(f"[{cfg.name}] meta-training {cfg.method.name} on {len(train)} train records "
            f"({getattr(cfg.method_params(), 'steps', '?')} steps)")
        stats = editor.fit(train, train=describe_train(cfg, len(train)), progress=lambda m: log(f"[{cfg.name}] {m}"))
    path = editor.save_fitted(F.shipped_dir(cfg.method.name) if ship else out)
    log(f"[{cfg.name}] fitted in {stats.get('seconds')} s (final losses {stats.get('final_losses')}): {path}")
    if ship:
        manifest, removed = F.ship(path, command, commit)
        log(f"shipped: {manifest}" + (f" (removed {', '.join(removed)})" if removed else ""))
    return path


def _run(cfg: EditConfig, run_dir: R.RunDir, *, resume: bool, overwrite: bool, log) -> Path:
    from ..editing.editor import Editor

    state = run_dir.check_start(cfg, resume=resume, overwrite=overwrite)  # raises before any write
    if resume and state.get("status") == "complete":
        log(f"[{cfg.name}] {run_dir.path} is complete; nothing to resume")
        return run_dir.path
    t0 = time.perf_counter()
    editor = Editor.from_edit_config(cfg)  # loads fitted weights (fitted: <path>, or shipped ones that match)
    with editor.autocast():  # runtime.precision over every model call: fit, pre-edit cache, edits, scoring
        return _edit(cfg, run_dir, editor, t0, resume=resume, overwrite=overwrite, log=log)


def _edit(cfg: EditConfig, run_dir: R.RunDir, editor, t0: float, *, resume: bool, overwrite: bool, log) -> Path:
    train, evals = load_data(cfg, editor.vlm)
    plan, why = fit_plan(cfg, editor, train)
    ev = cfg.evaluation
    biggest = ev.edit_counts[-1]
    if len(evals) < biggest:
        raise UserError(f"evaluation.edit_counts: {biggest} edits need at least {biggest} eval records, "
                        f"the data has {len(evals)}")
    editor.records(evals)  # validate every record (e.g. images the method needs) before writing
    state = run_dir.acquire(cfg, resume=resume, overwrite=overwrite)
    resume = bool(state)  # {}: a new run, or --resume with nothing to resume (acquire said so): from the beginning
    k = ev.matrix_chunks
    bounds = [round(i * biggest / k) for i in range(k + 1)]
    parts = list(zip(bounds[:-1], bounds[1:]))
    fresh = new_record(cfg, parts, {"trainable": sum(v.numel() for v in editor.method.state_dict().values())})
    record = state if resume else fresh
    if resume and record.get("tasks") != fresh["tasks"]:
        raise UserError(f"--resume: {run_dir.path} was cut into other edit chunks; start it again with --overwrite")
    record["timings"]["setup_s"] = round(time.perf_counter() - t0, 3)
    R.record_runtime(record, str(editor.vlm.device), editor.precision, editor.dtype)  # as applied
    ckpt = _fit_checkpoint(run_dir)
    if not resume:
        ckpt.unlink(missing_ok=True)  # --overwrite: never reuse an older run's meta-training
        run_dir.start(cfg, record)
    extra = record.setdefault("extra", {})
    t = time.perf_counter()
    if plan == "fit" and resume and ckpt.is_file():
        from safetensors.torch import load_file

        editor.method.load_state_dict(load_file(str(ckpt)))
        fit_log = extra.get("fit", {})
        log(f"[{cfg.name}] meta-trained weights reloaded from {ckpt}")
    elif plan == "loaded":
        log(f"[{cfg.name}] {why}")
        fit_log = {"loaded": editor.fitted}
        extra["fit"] = _jsonable(fit_log)
        run_dir.write_record(record)
    else:
        if why:
            log(f"[{cfg.name}] {why}")
        fit_log = (editor.fit(train, train=describe_train(cfg, len(train)), progress=lambda m: log(f"[{cfg.name}] {m}"))
                   if plan == "fit" else {})
        record["timings"]["fit_s"] = round(time.perf_counter() - t, 3)
        if plan == "fit" and cfg.output.checkpoints:
            from safetensors.torch import save_file

            ckpt.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(ckpt) as tmp:
                save_file(editor.method.state_dict(), str(tmp))
        extra["fit"] = _jsonable(fit_log)
        run_dir.write_record(record)
    bs, mnt = ev.batch_size, ev.max_new_tokens
    t = time.perf_counter()
    used = max(min(len(evals) // c, ev.max_chunks) * c for c in ev.edit_counts)
    pre = EM.cache_pre_edit(editor.vlm, evals[:used], bs, mnt)  # the unedited model, once
    record["timings"]["pre_edit_s"] = round(time.perf_counter() - t, 3)
    part_recs = [evals[a:b] for a, b in parts]
    record["zero_shot"] = [_reliability(editor, recs, bs) for recs in part_recs]
    table, per_chunk = dict(extra.get("edit_table", {})), dict(extra.get("edit_chunks", {}))  # {} unless resumed
    for count in ev.edit_counts:
        if str(count) in table:
            log(f"[{cfg.name}] {count} edits: finished before the stop, kept")
            continue
        if count == biggest:  # the matrix is made in this count: start it again
            record["matrix"], record["timings"]["experiences"] = [], []
        chunks = min(len(evals) // count, ev.max_chunks)
        rows, edit_s = [], 0.0
        for c in range(chunks):
            start = c * count
            recs = evals[start:start + count]
            editor.reset()
            t = time.perf_counter()
            if count == biggest and c == 0:  # the matrix: parts applied in turn, reliability on all after each
                for i, (a, b) in enumerate(parts):
                    te = time.perf_counter()
                    editor.edit_batch(evals[a:b])
                    train_s = time.perf_counter() - te
                    te = time.perf_counter()
                    row = [_reliability(editor, r, bs) for r in part_recs]
                    record["matrix"].append(row)
                    record["timings"]["experiences"].append({"train_s": round(train_s, 3),
                                                             "eval_s": round(time.perf_counter() - te, 3)})
                    log(f"[{cfg.name}] after edits 1-{b}: reliability " + " ".join(f"{v:.3f}" for v in row))
                    run_dir.save_progress(record, _NoCheckpoint(), step_log=[])
                    edit_s += train_s
            else:
                editor.edit_batch(recs)
                edit_s += time.perf_counter() - t
            s = EM.score(editor.vlm, recs, pre.window(start, start + count), bs, mnt)
            rows.append(({"metrics": EM.summary(s), "n": {m: v["n"] for m, v in s.items()}}, count))
        editor.reset()
        table[str(count)] = {"chunks": chunks, "records": chunks * count, **_weighted(rows),
                             "edit_s": edit_s / max(1, chunks * count)}
        per_chunk[str(count)] = [r for r, _ in rows]
        record["extra"] = {**extra, "edit_table": table, "edit_chunks": per_chunk}
        run_dir.write_record(record)  # a stop after this keeps the count (resume)
        log(f"[{cfg.name}] {count} edits x {chunks} chunk(s): " + " ".join(
            f"{SHORT[m]} {_pct(table[str(count)][f'{m}.token_acc'])}" for m in EM.METRICS))
    record["timings"]["total_s"] = round(time.perf_counter() - t0, 3)
    extra = {"edit_table": table, "edit_chunks": per_chunk, "fit": _jsonable(fit_log),
             "protocol": {"edit_counts": ev.edit_counts, "max_chunks": ev.max_chunks, "matrix_chunks": k,
                          "text_only_supported": EM.text_only_supported(editor.vlm),
                          "metrics": "token_acc: teacher-forced token accuracy (answer tokens, EOS excluded; locality vs the "
                                     "pre-edit argmax); exact_match: greedy generation equal to the target "
                                     "(locality: to the pre-edit generation)"}}
    write_text(run_dir.path / "edit_metrics.csv", table_csv(table))
    run_dir.finish(record, extra)
    return run_dir.path


class _NoCheckpoint:
    """The editing runner keeps no per-row checkpoints (a run restarts from scratch)."""

    class cfg:
        class output:
            checkpoints = False


def _reliability(editor, recs, batch_size: int) -> float:
    probes = [EM.Probe(i, r.image, r.src, r.alt) for i, r in enumerate(recs)]
    toks = EM.answer_tokens(editor.vlm, probes, batch_size)
    return sum((p == y).float().mean().item() for p, y in toks) / len(toks)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)
