"""``lifelong-moe edit`` end to end on a hand-written record file: the results directory ``run`` writes
(edit-chunk x edit-chunk reliability matrix, metrics, compare) plus the table per edit count; bad
configs fail with one error before anything is written."""
import json

import numpy as np
import pytest

from edit_records import TINY_EDIT_CONFIG, write_record_file
from lifelong_moe.cli import main
from lifelong_moe.errors import UserError


@pytest.fixture
def config(tmp_path):
    write_record_file(tmp_path / "data", 12)
    path = tmp_path / "edit.yaml"
    path.write_text(TINY_EDIT_CONFIG.format(data=tmp_path / "data"))
    return path


def test_edit_run_writes_the_results_directory_and_the_table(config, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["edit", str(config), "-o", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "Rel" in printed and "M-Loc" in printed and "(exact_match)" in printed
    rec = json.loads((out / "results.json").read_text())
    assert rec["status"] == "complete" and rec["stream_kind"] == "edit"
    assert [t["name"] for t in rec["tasks"]] == ["edits 1-2", "edits 3-4", "edits 5-6", "edits 7-8"]
    A, zs = np.array(rec["matrix"]), np.array(rec["zero_shot"])
    assert A.shape == (4, 4)
    # retrieval with an exact-match threshold: applied parts are answered exactly, the others as before
    assert np.all(A[np.tril_indices(4)] == 1.0)
    assert all(A[i, j] == zs[j] for i in range(4) for j in range(i + 1, 4))
    assert rec["metrics"]["last"]["value"] == 1.0 and rec["metrics"]["forgetting"]["value"] == 0.0
    table = rec["extra"]["edit_table"]
    assert list(table) == ["1", "4", "8"] and [table[k]["chunks"] for k in table] == [2, 2, 1]
    assert all(table[k]["reliability.token_acc"] == 1.0 and table[k]["reliability.exact_match"] == 1.0 for k in table)
    assert all(table[k]["image_locality.token_acc"] == 1.0 for k in table)
    csv = (out / "edit_metrics.csv").read_text().splitlines()
    assert csv[0].startswith("edits,chunks,reliability.token_acc") and len(csv) == 4
    assert main(["metrics", str(out)]) == 0 and main(["compare", str(out), "-o", str(tmp_path / "cmp")]) == 0
    assert main(["edit", str(config), "-o", str(out), "-q"]) == 2  # a run is there: refused
    before = (out / "results.json").read_bytes()
    assert main(["edit", str(config), "-o", str(out), "-q", "--resume"]) == 0  # complete: left as it is
    assert (out / "results.json").read_bytes() == before and "Rel" in capsys.readouterr().out


@pytest.mark.parametrize("override, message", [
    ("method.name=retreival", "unknown editing method 'retreival' (did you mean 'retrieval'?)"),
    ("evaluation.edit_counts=[1,20]", "20 edits need at least 20 eval records"),
    ("evaluation.edit_counts=[4,1]", "edit_counts must be increasing"),
    ("method.steps=3", "method.steps"),
])
def test_bad_configs_fail_with_one_error_before_writing(config, tmp_path, capsys, override, message):
    out = tmp_path / "run"
    assert main(["edit", str(config), "-o", str(out), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (out / "results.json").exists()


def test_variants_run_in_parallel_processes_and_are_compared(config, tmp_path, capsys):
    text = config.read_text().replace("evaluation: {edit_counts: [1, 4, 8], max_chunks: 2, matrix_chunks: 4",
                                      "evaluation: {edit_counts: [2, 4], max_chunks: 1, matrix_chunks: 2")
    config.write_text(text + "variants:\n  - {name: exact, method: {name: retrieval, threshold: 0.999}}\n"
                             "  - {name: loose, method: {name: retrieval, threshold: -1.0}}\n")
    out = tmp_path / "runs"
    assert main(["edit", str(config), "-o", str(out), "-j", "2", "-q"]) == 0
    assert "plots and tables" in capsys.readouterr().out and (out / "compare").is_dir()
    exact, loose = (json.loads((out / v / "results.json").read_text()) for v in ("exact", "loose"))
    assert exact["name"] == "tiny_edit/exact" and exact["extra"]["edit_table"]["4"]["reliability.token_acc"] == 1.0
    # threshold -1: every input takes some stored answer, so the unrelated locality questions change
    assert loose["extra"]["edit_table"]["4"]["image_locality.exact_match"] < 1.0


def test_bench_edit_reports_the_three_costs(capsys, monkeypatch):
    import torch

    threads = torch.get_num_threads()
    assert main(["bench", "edit", "--random-init", "--edits", "40", "--real", "4", "--batch", "4", "--repeats", "1",
                 "--threads", "1", "--json"]) == 0
    assert torch.get_num_threads() == threads  # the bench's thread count is put back for the caller
    r = json.loads(capsys.readouterr().out)
    assert r["setup"]["edits"] == 40 and r["answer_ratio_stored_vs_none"] > 0 and r["edit_s"] > 0
    assert r["method_bytes_per_edit"] > 0 and r["store_bytes_per_edit"] > r["method_bytes_per_edit"]
    # bad arguments fail before the backbone is loaded (the default one is pretrained from an empty cache)
    monkeypatch.setattr("lifelong_moe.backbones.factory.load_vlm", lambda *a, **k: pytest.fail("backbone loaded"))
    assert main(["bench", "edit", "--edits", "0"]) == 2
    assert main(["bench", "edit", "--method", "retrieval", "--fit", "5"]) == 2  # nothing to meta-train
    assert "has nothing to meta-train" in capsys.readouterr().err


def test_bench_edit_meta_trains_liveedit_and_counts_the_experts_each_question_keeps(capsys):
    assert main(["bench", "edit", "--method", "liveedit", "--fit", "2", "--random-init", "--edits", "20", "--real", "4",
                 "--batch", "4", "--repeats", "1", "--threads", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["setup"]["fit_steps"] == 2 and r["setup"]["fit_s"] > 0
    kept = r["experts_kept_per_question"]
    assert 0 <= kept["mean"] <= kept["max"] <= 20


def test_the_shipped_edit_configs_validate():
    from conftest import CONFIGS
    from lifelong_moe.editing.config import load_edit_config

    import importlib.util

    import yaml

    live = importlib.util.find_spec("lifelong_moe.strategies.liveedit") is not None  # merged from its branch
    for path in sorted(CONFIGS.glob("edit_*.yaml")):
        only = [v["name"] for v in yaml.safe_load(path.read_text())["variants"] if live or v["name"] != "liveedit"]
        cfgs = load_edit_config(path, only=only)
        assert cfgs and all(c.evaluation.edit_counts == [1, 10, 100, 1000] for c in cfgs), path


LIVE = """
name: live_edit
backbone: {name: lmoe-tiny-llava}
method: {name: liveedit, steps: 4, batch_size: 4, lora_scale: 0.02}  # large experts: the numbers depend on the weights
data: {source: synthetic, train: 8, eval: 8}
evaluation: {edit_counts: [1, 4, 8], max_chunks: 2, matrix_chunks: 4, max_new_tokens: 3}
runtime: {device: cpu, threads: 1}
"""


class Stop(Exception):
    pass


def test_a_stopped_edit_run_resumes_with_the_meta_trained_weights_and_the_same_numbers(tmp_path, monkeypatch):
    from lifelong_moe.runs.edit_runner import run_edit
    from lifelong_moe.editing.config import load_edit_config
    from lifelong_moe.strategies.liveedit import Method

    path = tmp_path / "live.yaml"
    path.write_text(LIVE)
    cfg = load_edit_config(str(path))[0]
    whole = json.loads((run_edit(cfg, tmp_path / "whole", log=lambda *_: None) / "results.json").read_text())

    def stop_after_four(msg):
        if "] 4 edits x" in msg:
            raise Stop
    with pytest.raises(Stop):
        run_edit(cfg, tmp_path / "cut", log=stop_after_four)
    cut = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert cut["status"] == "running" and list(cut["extra"]["edit_table"]) == ["1", "4"]
    assert (tmp_path / "cut" / "checkpoints" / "fit.safetensors").is_file()

    def no_fit(self, *a, **k):
        raise AssertionError("meta-trained again on resume")
    monkeypatch.setattr(Method, "fit", no_fit)
    logs = []
    with pytest.raises(UserError, match="already holds a run"):
        run_edit(cfg, tmp_path / "cut", log=logs.append)
    run_edit(cfg, tmp_path / "cut", resume=True, log=logs.append)
    assert any("reloaded" in m for m in logs) and any("4 edits: finished before the stop" in m for m in logs)
    again = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert again["status"] == "complete"
    def metrics(table):  # every number but the timing
        return {t: {k: v for k, v in row.items() if k != "edit_s"} for t, row in table.items()}
    assert metrics(again["extra"]["edit_table"]) == metrics(whole["extra"]["edit_table"])
    assert again["matrix"] == whole["matrix"] and again["zero_shot"] == whole["zero_shot"]
    assert again["extra"]["fit"]["final_losses"] == whole["extra"]["fit"]["final_losses"]
    assert whole["extra"]["edit_table"]["8"]["image_locality.token_acc"] < 1.0  # the experts act
    logs.clear()
    run_edit(cfg, tmp_path / "cut", resume=True, log=logs.append)  # complete: nothing to do
    assert logs and "nothing to resume" in logs[0]
    with pytest.raises(UserError, match="not both"):
        run_edit(cfg, tmp_path / "cut", resume=True, overwrite=True)
