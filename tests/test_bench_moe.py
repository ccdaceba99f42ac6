"""The cost benchmarks of MoE-Adapters (``lifelong-moe bench moe / moe_scale / quickstart``): their
records hold the times and the ratios they name, the CLI passes its options; timings are never asserted."""
import math
from pathlib import Path

import pytest
import torch

from lifelong_moe.bench.moe_adapters import train_gap_breakdown


def test_bench_moe_cost_smoke():
    from lifelong_moe.bench.moe_adapters import moe_cost

    r = moe_cost(experts=4, batch=4, prompts=3, infer_batch=8, repeats=1, warmup=0, threads=1)
    assert "train_gap_breakdown_s" not in r  # only on request
    assert r["setup"] == {"model": "lmoe-tiny-vit-p4", "experts": 4, "top_k": 2, "towers": ["image", "text"],
                          "batch": 4, "prompts": 3, "infer_batch": 8, "repeats": 1, "threads": 1}
    times = {**{f"train.{k}": v for k, v in r["train_step_s"].items()},
             **{f"inference.{k}": v for k, v in r["inference_s"].items()}}
    assert set(times) == {"train.moe", "train.dense", "train.dense_k", "inference.moe", "inference.plain", "inference.dense",
                          "inference.dense_k", "inference.moe_ddas", "inference.moe_ddas_before"}
    assert all(math.isfinite(v) and v > 0 for v in times.values()), times
    ratios = {"train_ratio_vs_dense_adapter": ("train.moe", "train.dense"),
              "train_ratio_vs_dense_k_width": ("train.moe", "train.dense_k"),
              "inference_ratio_vs_plain_clip": ("inference.moe", "inference.plain"),
              "inference_ratio_vs_dense_adapter": ("inference.moe", "inference.dense"),
              "inference_ratio_vs_dense_k_width": ("inference.moe", "inference.dense_k"),
              "inference_with_ddas_ratio_vs_plain_clip": ("inference.moe_ddas", "inference.plain"),
              "inference_with_ddas_before_ratio_vs_plain_clip": ("inference.moe_ddas_before", "inference.plain")}
    for key, (num, den) in ratios.items():  # each ratio is the quotient of the times it names
        assert r[key] == pytest.approx(times[num] / times[den], rel=1e-12), key


def test_bench_cli_passes_options_and_prints_the_record(monkeypatch, capsys):
    import json

    from lifelong_moe.bench import moe_adapters as bench
    from lifelong_moe.cli import main

    calls = []
    record = {"setup": {"infer_batch": 128}, "train_step_s": {"moe": 0.3, "dense": 0.2, "dense_k": 0.25},
              "train_ratio_vs_dense_k_width": 1.2,
              "inference_s": {"moe": 0.12, "plain": 0.1, "dense": 0.11, "dense_k": 0.115, "moe_ddas": 0.25},
              "train_ratio_vs_dense_adapter": 1.5, "inference_ratio_vs_plain_clip": 1.2,
              "inference_ratio_vs_dense_adapter": 0.12 / 0.11, "inference_ratio_vs_dense_k_width": 0.12 / 0.115,
              "inference_with_ddas_ratio_vs_plain_clip": 2.5}
    monkeypatch.setattr(bench, "moe_cost", lambda **kw: calls.append(kw) or record)
    assert main(["bench", "moe", "--experts", "3", "--top-k", "1", "--model", "lmoe-tiny-vit", "--repeats", "2",
                 "--threads", "1", "--json"]) == 0
    assert calls == [{"experts": 3, "k": 1, "model": "lmoe-tiny-vit", "repeats": 2, "threads": 1, "breakdown": False}]
    assert json.loads(capsys.readouterr().out) == record
    assert main(["bench", "moe"]) == 0
    assert calls[-1] == {"experts": 22, "k": 2, "model": "lmoe-tiny-vit-p4", "repeats": 30, "threads": 2,
                         "breakdown": False}
    out = capsys.readouterr().out
    assert "MoE 300.0 ms, dense adapter 200.0 ms -> 1.50x" in out and "plain CLIP 100.0 ms -> 1.20x" in out
    assert "width k*64 (250.0 ms): 1.20x" in out
    assert "inference (128 images)" in out and "250.0 ms -> 2.50x" in out
    assert "over the k*r floor" not in out
    record["train_gap_breakdown_s"] = {"total": 0.05, "optimizer_over_moe_params": 0.004, "per_sample_dispatch": 0.04,
                                       "routing": 0.006}
    assert main(["bench", "moe", "--breakdown"]) == 0
    assert calls[-1]["breakdown"] is True
    assert ("the 50.0 ms over the k*r floor: optimiser over the MoE's parameters +4.0 ms, per-sample gathered "
            "dispatch +40.0 ms, routers +6.0 ms") in capsys.readouterr().out


def test_bench_moe_scale_smoke_and_cli(monkeypatch, capsys):
    from lifelong_moe.bench import scale as bench_scale
    from lifelong_moe.cli import main

    r = bench_scale.scale_cost([3, 1], model="lmoe-tiny-vit", batch=2, repeats=1, warmup=0, threads=1, experts=4)
    assert [row["tasks"] for row in r["rows"]] == [1, 3] and r["setup"]["ddas_dim"] == 256  # AlexNet conv5 at 32 px
    for row in r["rows"]:
        times = {**row["inference_s"], **row["parts_s"]}
        assert all(math.isfinite(v) and v > 0 for v in times.values()), times
        for key in ("moe", "ddas_loop", "ddas_stacked"):
            assert row[f"ratio_{key}_vs_plain"] == pytest.approx(times[key] / times["plain"], rel=1e-12)
        assert row["tasks_in_batch"] == min(2, row["tasks"])
    calls = []
    monkeypatch.setattr(bench_scale, "scale_cost", lambda tasks, **kw: calls.append((tasks, kw)) or r)
    assert main(["bench", "moe_scale", "--tasks", "2,7", "--batch", "3", "--repeats", "1", "--threads", "1"]) == 0
    assert calls[-1] == ([2, 7], {"model": "ViT-B-16", "batch": 3, "repeats": 1, "threads": 1, "experts": 22, "k": 2,
                                  "log": print})
    assert main(["bench", "moe_scale", "--tasks", "x"]) == 2
    assert "--tasks must be comma-separated integers" in capsys.readouterr().err


def test_bench_quickstart_runs_cold_then_warm_on_one_fresh_cache(monkeypatch, tmp_path, capsys):
    import subprocess

    from lifelong_moe.cli import main

    seen = []

    def fake_run(cmd, env):
        cache = Path(env["LIFELONG_MOE_CACHE"])
        seen.append((cmd, cache, cache.exists() and any(cache.iterdir())))
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "model.safetensors").write_text("x")  # what a cold run leaves behind
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    keep = tmp_path / "keep"
    assert main(["bench", "quickstart", "--only", "zeroshot", "--keep", str(keep)]) == 0
    (cold, cache, warm_before), (warm, cache2, warm_now) = seen
    assert cache == cache2 == keep / "cache" and not warm_before and warm_now
    assert cold[-5:] == ["-o", str(keep / "run_cold"), "-q", "--only", "zeroshot"] and cold[1:4] == ["-m", "lifelong_moe", "run"]
    assert "cold (empty cache, pretraining included) 0 min" in capsys.readouterr().out
    assert main(["bench", "quickstart", "--keep", str(keep)]) == 2  # not empty: the cold run would be warm
    assert main(["bench", "quickstart", "--config", str(tmp_path / "nope.yaml")]) == 2


def test_train_gap_breakdown_on_hand_made_times():
    """optimiser = floor with the MoE's parameter count - floor; dispatch = fixed-routing MoE - floor -
    optimiser; routing = MoE - fixed-routing MoE: exact values, and the parts sum to the gap."""
    t = {"moe": 0.400, "dense_k": 0.300, "dense_k_moe_params": 0.310, "moe_fixed_routing": 0.380, "dense": 0.25}
    b = train_gap_breakdown(t)
    assert b == pytest.approx({"total": 0.100, "optimizer_over_moe_params": 0.010, "per_sample_dispatch": 0.070,
                               "routing": 0.020}, abs=1e-12)
    assert b["optimizer_over_moe_params"] + b["per_sample_dispatch"] + b["routing"] == pytest.approx(b["total"], abs=1e-12)


def test_bench_moe_breakdown_runs_the_two_extra_variants(monkeypatch):
    """--breakdown times the fixed-routing MoE (its routers replaced, every sample on experts 0..k-1)
    and the floor stepping as many parameters as the MoE; the record splits the gap from those times."""
    from lifelong_moe.bench import moe_adapters as bench

    routed = []
    real = bench._FixedRouter.forward

    def spy(self, c, task=None, keep=None):
        out = real(self, c, task, keep)
        routed.append(out.indices)
        return out

    monkeypatch.setattr(bench._FixedRouter, "forward", spy)
    r = bench.moe_cost(experts=4, batch=4, prompts=3, infer_batch=8, repeats=1, warmup=0, threads=1, breakdown=True)
    t = r["train_step_s"]
    assert set(t) == {"moe", "dense", "dense_k", "moe_fixed_routing", "dense_k_moe_params"}
    assert all(math.isfinite(v) and v > 0 for v in t.values()), t
    assert r["train_gap_breakdown_s"] == train_gap_breakdown(t)
    assert routed and all(torch.equal(i, torch.tensor([0, 1]).expand(i.shape[0], -1)) for i in routed)
