"""Seeded end-to-end run of the quickstart (toy MTIL on the synthetic world, pretrained tiny CLIP):
zero-shot transfer, forgetting under fine-tuning and a method that prevents it must be real."""
import json
import os

import numpy as np
import pytest

from lifelong_moe.cli import main

from conftest import CONFIGS

pytestmark = pytest.mark.slow

VARIANTS = ["zeroshot", "finetune", "lora", "lwf", "replay", "moe_adapters"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    with pytest.MonkeyPatch.context() as mp:  # the session's test caches (conftest sets them per test)
        mp.setenv("LIFELONG_MOE_CACHE", os.environ.get("LIFELONG_MOE_TEST_CACHE")
                  or str(tmp_path_factory.getbasetemp() / "cache"))
        mp.setenv("LIFELONG_MOE_DATA", str(tmp_path_factory.getbasetemp() / "data"))
        assert main(["run", str(CONFIGS / "quickstart.yaml"), "-o", str(out), "-q", "--only", ",".join(VARIANTS)]) == 0
    return {d.name: json.loads((d / "results.json").read_text()) for d in out.iterdir() if d.name != "compare"}


def chance(r, j):
    return 1.0 / len(r["tasks"][j]["classes"])


def metric(r, name):
    return r["metrics"][name]["value"]


def test_zero_shot_transfer_is_real_on_every_domain(runs):
    """The pretrained tiny CLIP classifies every domain above chance before any training, and
    fine-tuning on a domain beats it on average."""
    zs = np.asarray(runs["zeroshot"]["zero_shot"])
    ft = np.asarray(runs["finetune"]["matrix"])
    for j, a in enumerate(zs):
        assert a >= chance(runs["zeroshot"], j) + 0.05, (j, a)
    assert np.diag(ft).mean() >= zs.mean() + 0.05


def test_finetune_forgets_and_loses_transfer(runs):
    ft, zs = runs["finetune"], runs["zeroshot"]
    assert metric(ft, "forgetting") >= 0.05
    assert metric(ft, "mtil_transfer") < metric(zs, "mtil_transfer") - 0.005
    assert metric(zs, "forgetting") == 0.0


def test_mtil_metrics_are_computed_for_every_run(runs):
    for name in VARIANTS:
        for m in ("mtil_transfer", "mtil_avg", "mtil_last"):
            assert metric(runs[name], m) is not None, (name, m)


def test_moe_adapters_forgets_less_and_keeps_zero_shot_transfer(runs):
    moe, ft, zs = runs["moe_adapters"], runs["finetune"], runs["zeroshot"]
    assert metric(moe, "forgetting") <= metric(ft, "forgetting") - 0.04
    assert metric(moe, "mtil_transfer") >= metric(zs, "mtil_transfer") - 0.01
    assert metric(moe, "mtil_last") >= np.diag(np.asarray(ft["matrix"])).mean() - 0.08
    assert metric(moe, "mtil_last") >= metric(zs, "mtil_last") + 0.03  # it learned the domains


def test_ddas_picks_trained_tasks_and_sends_new_domains_to_zero_shot(runs):
    """MoE-Adapters' task selector on the toy MTIL: a trained domain's test images mostly go to its
    own router, a domain not yet trained mostly goes to the zero-shot CLIP (the paper's DDAS)."""
    sel = runs["moe_adapters"]["extra"]["moe_adapters"]["ddas"]["selection"]
    rows = [r for r in sel if r != "-1"]
    seen = [sel[r][t]["accuracy"] for r in rows for t in sel[r] if sel[r][t]["expected"] != "ood"]
    new = [sel[r][t]["ood_rate"] for r in rows for t in sel[r] if sel[r][t]["expected"] == "ood"]
    assert len(seen) == 15 and len(new) == 10
    assert np.mean(seen) >= 0.7, seen
    assert np.mean(new) >= 0.6, new
    assert all(v["ood_rate"] == 1.0 for v in sel["-1"].values())  # nothing trained: all zero-shot
