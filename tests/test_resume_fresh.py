"""``--resume`` of a run that has nothing to resume (no directory, or one a run killed before its
first results.json left) starts the run from the beginning, says so in one line on stderr, and gives
what an uninterrupted run gives; for ``run``, ``edit`` and ``lifelong_moe.run``. The refusals that
protect a saved run stay: ``--resume`` with ``--overwrite``, and a directory of another config."""
import json

import pytest

import lifelong_moe
from edit_records import TINY_EDIT_CONFIG, write_record_file
from lifelong_moe.cli import main
from lifelong_moe.results import RunDir

RUN = """name: t
seed: 0
stream: {kind: class_incremental, dataset: digits, classes_per_experience: [5, 5],
         samples_per_class: {train: 4, test: 2}}
backbone: {name: lmoe-tiny-vit}
strategy: {name: finetune}
training: {epochs: 1, batch_size: 8}
evaluation: {batch_size: 64}
runtime: {device: cpu, threads: 1}
"""


class Killed(BaseException):
    """The process dying at that point (not an error the CLI reports)."""


@pytest.fixture
def run_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(RUN)
    return path


@pytest.fixture
def edit_config(tmp_path):
    write_record_file(tmp_path / "data", 12)
    path = tmp_path / "edit.yaml"
    path.write_text(TINY_EDIT_CONFIG.format(data=tmp_path / "data"))
    return path


def record(out):
    return json.loads((out / "results.json").read_text())


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def killed_before_first_results(monkeypatch, argv, out):
    """Run ``argv`` and kill it at its first results.json write (after config.yaml, log.jsonl and the
    lock file are written): what a kill early in a run leaves."""
    def die(self, rec):
        raise Killed
    with monkeypatch.context() as m:
        m.setattr(RunDir, "write_record", die)
        with pytest.raises(Killed):
            main(argv)
    assert out.is_dir() and (out / "config.yaml").is_file() and not (out / "results.json").exists()


def notice(err, out):
    """The one stderr line that says the resume starts from the beginning."""
    lines = [line for line in err.splitlines() if "nothing to resume" in line]
    assert lines == [f"--resume: nothing to resume in {out} (no results.json): starting from the beginning"], err
    return lines[0]


def edit_numbers(rec):
    """The edit table without its timing, the matrix and the zero-shot row."""
    table = {t: {k: v for k, v in row.items() if k != "edit_s"} for t, row in rec["extra"]["edit_table"].items()}
    return table, rec["matrix"], rec["zero_shot"]


@pytest.mark.parametrize("left", ["no directory", "killed before its first results.json"])
def test_run_resume_with_nothing_to_resume_runs_from_the_beginning(run_config, tmp_path, monkeypatch, capsys, left):
    whole = tmp_path / "whole"
    assert main(["run", str(run_config), "-o", str(whole), "-q"]) == 0
    out = tmp_path / "out"
    if left != "no directory":
        killed_before_first_results(monkeypatch, ["run", str(run_config), "-o", str(out), "-q"], out)
    capsys.readouterr()
    assert main(["run", str(run_config), "-o", str(out), "-q", "--resume"]) == 0
    notice(capsys.readouterr().err, out)
    rec, ref = record(out), record(whole)
    assert rec["status"] == "complete" and len(rec["matrix"]) == 2
    assert rec["matrix"] == ref["matrix"] and rec["zero_shot"] == ref["zero_shot"]
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(s["experience"], s["loss"]) for s in steps] == \
        [(s["experience"], s["loss"]) for s in map(json.loads, (whole / "log.jsonl").read_text().splitlines())]


def test_api_run_resume_with_nothing_to_resume_runs_from_the_beginning(run_config, tmp_path, capsys):
    [whole] = lifelong_moe.run(str(run_config), output=str(tmp_path / "whole"))
    capsys.readouterr()
    [out] = lifelong_moe.run(str(run_config), output=str(tmp_path / "out"), resume=True)
    notice(capsys.readouterr().err, out)
    assert record(out)["status"] == "complete" and record(out)["matrix"] == record(whole)["matrix"]


@pytest.mark.parametrize("left", ["no directory", "killed before its first results.json"])
def test_edit_resume_with_nothing_to_resume_runs_from_the_beginning(edit_config, tmp_path, monkeypatch, capsys,
                                                                    left):
    whole = tmp_path / "whole"
    assert main(["edit", str(edit_config), "-o", str(whole), "-q"]) == 0
    out = tmp_path / "out"
    if left != "no directory":
        killed_before_first_results(monkeypatch, ["edit", str(edit_config), "-o", str(out), "-q"], out)
    capsys.readouterr()
    assert main(["edit", str(edit_config), "-o", str(out), "-q", "--resume"]) == 0
    captured = capsys.readouterr()
    notice(captured.err, out)
    assert "Rel" in captured.out  # the table is printed as after any edit run
    rec = record(out)
    assert rec["status"] == "complete" and edit_numbers(rec) == edit_numbers(record(whole))
    assert (out / "edit_metrics.csv").is_file()
    assert main(["edit", str(edit_config), "-o", str(out), "-q", "--resume"]) == 0  # complete: left as it is
    assert "nothing to resume in" not in capsys.readouterr().err  # the notice is for a run started afresh only


@pytest.mark.parametrize("kind", ["run", "edit"])
def test_resume_with_overwrite_is_still_refused(run_config, edit_config, tmp_path, capsys, kind):
    config = run_config if kind == "run" else edit_config
    out = tmp_path / "out"
    assert main([kind, str(config), "-o", str(out), "-q", "--resume", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: give one of --resume") and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("kind, change, key", [("run", "training.epochs=2", "training"),
                                               ("edit", "method.threshold=0.5", "method")])
@pytest.mark.parametrize("left", ["a saved run", "killed before its first results.json"])
def test_resume_of_another_configs_directory_is_still_refused(run_config, edit_config, tmp_path, monkeypatch,
                                                              capsys, kind, change, key, left):
    config = run_config if kind == "run" else edit_config
    out = tmp_path / "out"
    argv = [kind, str(config), "-o", str(out), "-q"]
    if left == "a saved run":
        assert main(argv) == 0
    else:
        killed_before_first_results(monkeypatch, argv, out)
    before = snapshot(out)
    capsys.readouterr()
    assert main(argv + ["--resume", change]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --resume: the configuration differs from the saved run in: {key}\n"
    assert snapshot(out) == before  # refused before anything was touched
