"""Bad input, as a new user would give it, to every command: one line ``error: ...`` naming the
culprit, exit status 2, no traceback, and nothing written (an existing run left byte-identical)."""
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lifelong_moe.cli import main

BASE = """name: t
stream: {kind: class_incremental, dataset: digits, classes_per_experience: [5, 5],
         samples_per_class: {train: 4, test: 2}}
strategy: {name: finetune}
training: {epochs: 1, batch_size: 8}
evaluation: {batch_size: 64}
"""
TASKS = [{"index": i, "name": f"digits[{i}]", "label_space": "digits", "classes": [i], "class_names": [str(i)]}
         for i in range(2)]


def record(**over) -> dict:
    rec = {"schema_version": 1, "name": "t", "strategy": "finetune", "status": "complete", "seed": 0,
           "metric_kind": "accuracy", "tasks": TASKS, "zero_shot": [0.5, 0.4], "matrix": [[0.9, 0.3], [0.7, 0.8]],
           "metrics": {}, "params": {}, "timings": {"experiences": []}, "extra": {}}
    return {**rec, **over}


def run_dir(path: Path, results: str | bytes | None = None, **over) -> Path:
    """A saved run as the runner leaves it (results.json, config.yaml), results.json replaceable."""
    path.mkdir(parents=True)
    text = json.dumps(record(**over)) if results is None else results
    (path / "results.json").write_bytes(text.encode() if isinstance(text, str) else text)
    (path / "config.yaml").write_text("name: t\n")
    return path


def png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, 255 - value, 0)).save(path)


def image_folder(root: Path, bad: dict[str, bytes] = {}) -> Path:
    for c in ("cat", "dog"):
        for i in range(4):
            png(root / c / f"{i}.png", 40 * i + (100 if c == "dog" else 0))
    for name, data in bad.items():
        (root / name).write_bytes(data)
    return root


def truncated_jpeg() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def object_npz(path: Path) -> Path:
    np.savez(path, x_train=np.zeros((2, 8, 8, 3), np.uint8), y_train=np.zeros(2, int), x_test=np.zeros((1, 8, 8, 3),
             np.uint8), y_test=np.zeros(1, int), class_names=np.array([{"a": 1}], dtype=object))
    return path


def zip_of_text(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for k in ("x_train", "y_train", "x_test", "y_test"):
            z.writestr(f"{k}.npy", "no array here")
    return path


# Each case: (setup(tmp) -> argv, what the one error line must contain). setup writes the inputs
# under tmp; the test then checks that tmp is left exactly as setup made it.
def _run(tmp, *over, cfg=None, out="out"):
    p = tmp / "c.yaml"
    p.write_bytes(cfg if isinstance(cfg, bytes) else (cfg or BASE).encode())
    return ["run", str(p), *over, "-o", str(tmp / out)]


def _tensors(tmp, name, data):
    (tmp / name).write_bytes(data)
    return _run(tmp, f"stream.dataset={{dataset: tensors, path: {tmp / name}}}")


CASES = {
    # run: the configuration file and the schema
    "config not UTF-8": (lambda t: _run(t, cfg=BASE.encode() + "# caf\xe9\n".encode("latin-1")), "not UTF-8 text"),
    "config is a directory": (lambda t: ["run", str(t)], "config file not found"),
    "extends a number": (lambda t: _run(t, cfg=BASE + "extends: 3\n"), "'extends' must be a file name"),
    "lora rank 0": (lambda t: _run(t, "strategy.name=lora", "strategy.r=0"), "strategy.r: Input should be greater than 0"),
    "lora dropout 1": (lambda t: _run(t, "strategy.name=lora", "strategy.dropout=1"), "strategy.dropout"),
    "lora alpha 0": (lambda t: _run(t, "strategy.name=lora", "strategy.alpha=0"), "strategy.alpha"),
    "lora no targets": (lambda t: _run(t, "strategy.name=lora", "strategy.targets=[]"), "strategy.targets"),
    "finetune no towers": (lambda t: _run(t, "strategy.towers=[]"), "strategy.towers"),
    "ewc no towers": (lambda t: _run(t, "strategy.name=ewc", "strategy.towers=[]"), "strategy.towers"),
    "moe top_k > experts": (lambda t: _run(t, "strategy.name=moe_adapters", "strategy.num_experts=4",
                                           "strategy.top_k=5"), "top_k=5 exceeds num_experts=4"),
    "moe freeze > experts": (lambda t: _run(t, "strategy.name=moe_adapters", "strategy.num_experts=4",
                                            "strategy.freeze_top_k=6"), "freeze_top_k=6 exceeds num_experts=4"),
    "replay memory 0": (lambda t: _run(t, "strategy.name=replay", "strategy.memory_size=0"), "strategy.memory_size"),
    "no experiences": (lambda t: _run(t, "stream.classes_per_experience=[]"), "stream.classes_per_experience"),
    "empty experience": (lambda t: _run(t, "stream.classes_per_experience=[10, 0]"),
                         "stream.classes_per_experience[1]: Input should be greater than 0"),
    "no domains": (lambda t: _run(t, "stream.kind=multi_domain", "stream.dataset=null",
                                  "stream.classes_per_experience=null", "stream.domains=[]"), "stream.domains"),
    "bad on_bad_image": (lambda t: _run(t, "stream.on_bad_image=ignore"), "stream.on_bad_image"),
    "negative seed": (lambda t: _run(t, "seed=-1"), "seed: Input should be greater than or equal to 0"),
    "betas above 1": (lambda t: _run(t, "training.optimizer.betas=[2, 0.9]"), "training.optimizer.betas[0]"),
    "negative lr per experience": (lambda t: _run(t, "training.lr_per_experience=[-1, 1]"),
                                   "training.lr_per_experience[0]"),
    "template without {}": (lambda t: _run(t, "backbone.templates=['a photo']"), "exactly one '{}'"),
    "template with two fields": (lambda t: _run(t, "backbone.templates=['a {0} {1}']"), "backbone.templates[0]"),
    "output.dir placeholder": (lambda t: _run(t, "output.dir=" + str(t / "runs/{nme}")), "output.dir"),
    "absurd thread count": (lambda t: _run(t, "runtime.threads=100000"), "runtime.threads"),
    "empty name": (lambda t: _run(t, "name=''"), "name: String should have at least 1 character"),
    "variants by override": (lambda t: _run(t, "variants=[{name: a}]"), "variants cannot be set by an override"),
    # run: options
    "--stop-after 0": (lambda t: _run(t, "--stop-after", "0"), "--stop-after must be at least 1, got 0"),
    "--jobs 0": (lambda t: _run(t, "--jobs", "0"), "--jobs must be at least 1, got 0"),
    "--resume and --overwrite": (lambda t: _run(t, "--resume", "--overwrite"), "give one of --resume"),
    # run: the output directory
    "-o names a file": (lambda t: (t / "out").write_text("keep me") and _run(t), "exists and is not a directory"),
    "-o below a file": (lambda t: (t / "f").write_text("keep me") and _run(t, out="f/run"), "f is a file"),
    "--resume, results.json not JSON": (lambda t: run_dir(t / "out", "{'matrix': [") and _run(t, "--resume"),
                                        "--resume: " + "{t}/out/results.json is not valid JSON"),
    "--resume, results.json truncated": (lambda t: run_dir(t / "out", json.dumps(record())[:60]) and _run(t, "--resume"),
                                         "results.json is not valid JSON"),
    "--resume, matrix of strings": (lambda t: run_dir(t / "out", matrix=[["a", "b"]]) and _run(t, "--resume"),
                                    "'matrix' must be a list of at most 2 rows of 2 numbers"),
    "--resume, config.yaml gone": (lambda t: (run_dir(t / "out") / "config.yaml").unlink() or _run(t, "--resume"),
                                   "cannot read the saved configuration"),
    # run: data files
    "imagefolder, text named .jpg": (lambda t: _run(t, "stream.classes_per_experience=[1, 1]", "stream.dataset="
                                                    f"{{dataset: imagefolder, path: {image_folder(t / 'img', {'cat/x.jpg': b'hello'})}}}"),
                                     "1 image file(s) cannot be read: cat/x.jpg (cannot identify image file)"),
    "imagefolder, truncated JPEG": (lambda t: _run(t, "stream.classes_per_experience=[1, 1]", "stream.dataset="
                                                   f"{{dataset: imagefolder, path: {image_folder(t / 'img', {'dog/y.jpg': truncated_jpeg()})}}}"),
                                    "1 image file(s) cannot be read: dog/y.jpg ("),
    "tensors, text named .npz": (lambda t: _tensors(t, "d.npz", b"x_train,y_train\n1,2\n"), "is not a valid .npz file"),
    "tensors, pickle named .npz": (lambda t: _tensors(t, "d.npz", b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01."),
                                   "is not a valid .npz file"),
    "tensors, zip of text": (lambda t: _run(t, f"stream.dataset={{dataset: tensors, path: {zip_of_text(t / 'd.npz')}}}"),
                             "is not a valid .npz"),
    "tensors, object array": (lambda t: _run(t, f"stream.dataset={{dataset: tensors, path: {object_npz(t / 'd.npz')}}}"),
                              "holds an array of Python objects, which is never loaded"),
    "tensors, bad safetensors": (lambda t: _tensors(t, "d.safetensors", b"\xff" * 16), "is not a valid .safetensors"),
    # metrics
    "metrics, results.json not JSON": (lambda t: ["metrics", str(run_dir(t / "r", "{\"tasks\": [1,"))], "not valid JSON"),
    "metrics, results.json not UTF-8": (lambda t: ["metrics", str(run_dir(t / "r", b"\xff\xfe{"))], "not valid JSON"),
    "metrics, top level a list": (lambda t: ["metrics", str(run_dir(t / "r", "[1, 2]"))], "expected a JSON object"),
    "metrics, tasks a string": (lambda t: ["metrics", str(run_dir(t / "r", tasks="abc"))], "'tasks' must be"),
    "metrics, short matrix row": (lambda t: ["metrics", str(run_dir(t / "r", matrix=[[0.5]]))], "'matrix' must be"),
    "metrics, zero_shot of strings": (lambda t: ["metrics", str(run_dir(t / "r", zero_shot=["x", "y"]))],
                                      "'zero_shot' must be"),
    "metrics, timings a list": (lambda t: ["metrics", str(run_dir(t / "r", timings=[1]))], "'timings' must be"),
    "metrics, unknown schema": (lambda t: ["metrics", str(run_dir(t / "r", schema_version=7))], "schema_version 7"),
    "metrics, no run": (lambda t: ["metrics", str(t)], "no results.json"),
    # compare
    "compare, results.json not JSON": (lambda t: ["compare", str(run_dir(t / "a")), str(run_dir(t / "b", "{")),
                                                  "-o", str(t / "cmp")], "is not valid JSON"),
    "compare, metrics a list": (lambda t: ["compare", str(run_dir(t / "a", metrics=[1])), "-o", str(t / "cmp")],
                                "'metrics' must be an object"),
    "compare, different streams": (lambda t: ["compare", str(run_dir(t / "a")), str(run_dir(
        t / "b", tasks=[{**TASKS[0], "name": "synthetic/shapes"}, TASKS[1]])), "-o", str(t / "cmp")],
        "runs on different streams cannot be compared: {t}/a and {t}/b differ (task 1: 'digits[0]' vs "
        "'synthetic/shapes')"),
    "compare, other class order": (lambda t: ["compare", str(run_dir(t / "a")), str(run_dir(
        t / "b", tasks=[{**TASKS[0], "class_names": ["7"]}, TASKS[1]])), "-o", str(t / "cmp")],
        "task 1 ('digits[0]'): other classes"),
    "compare, different lengths": (lambda t: ["compare", str(run_dir(t / "a")), str(run_dir(
        t / "b", tasks=TASKS[:1], matrix=[[0.5]], zero_shot=None)), "-o", str(t / "cmp")], "2 tasks vs 1"),
    "compare, -o names a file": (lambda t: (t / "cmp").write_text("keep") and ["compare", str(run_dir(t / "a")),
                                                                              "-o", str(t / "cmp")],
                                 "exists and is not a directory"),
    # pretrain (validated before anything trains or is cached)
    "pretrain, steps 0": (lambda t: ["pretrain", "clip", "steps=0", "--cache-dir", str(t / "cache")],
                          "steps: must be greater than 0"),
    "pretrain, lr not a number": (lambda t: ["pretrain", "clip", "lr=abc", "--cache-dir", str(t / "cache")],
                                  "lr: expected float, got 'abc'"),
    "pretrain, unknown model": (lambda t: ["pretrain", "clip", "model=nope", "--cache-dir", str(t / "cache")],
                                "model: unknown open_clip model 'nope'"),
    "pretrain, config not UTF-8": (lambda t: (t / "p.yaml").write_bytes(b"steps: 3 # \xe9\n") and
                                   ["pretrain", "clip", str(t / "p.yaml"), "--cache-dir", str(t / "cache")],
                                   "not UTF-8 text"),
    "pretrain, --cache-dir a file": (lambda t: (t / "cache").write_text("x") and
                                     ["pretrain", "clip", "--cache-dir", str(t / "cache")], "exists and is not a directory"),
    # bench
    "bench, no experts": (lambda t: ["bench", "moe", "--experts", "0"], "--experts must be at least 1"),
    "bench, top-k above experts": (lambda t: ["bench", "moe", "--experts", "2", "--top-k", "5"],
                                   "--top-k 5 exceeds --experts 2"),
    "bench, no threads": (lambda t: ["bench", "moe", "--threads", "0"], "--threads must be at least 1"),
}


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    setup, expected = CASES[case]
    argv = setup(tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected.replace("{t}", str(tmp_path)) in err
    assert "Traceback" not in err and "allow_pickle" not in err
    assert snapshot(tmp_path) == before  # nothing written, nothing changed


def test_skipped_images_leave_the_stream_and_are_counted(tmp_path):
    from lifelong_moe.streams.sources import load_source

    root = image_folder(tmp_path / "img", {"cat/x.jpg": b"hello", "dog/y.jpg": truncated_jpeg()})
    with pytest.warns(UserWarning, match="skipped 2 image file"):
        data = load_source("imagefolder", root=None, path=root, on_bad_image="skip", test_fraction=0.25)
    kept = sorted(Path(p).name for p, _ in data.train.dataset.samples)
    assert data.meta["skipped_images"] == 2 and len(kept) == 8 and not {"x.jpg", "y.jpg"} & set(kept)
    assert len(data.train) + len(data.test) == 8 and sorted(data.train_targets + data.test_targets) == [0] * 4 + [1] * 4


def test_a_run_that_skips_images_says_how_many_in_results_json(tmp_path, capsys):
    root = image_folder(tmp_path / "img", {"cat/x.jpg": b"hello"})
    argv = _run(tmp_path, "stream.classes_per_experience=[1, 1]", "stream.on_bad_image=skip",
                f"stream.dataset={{dataset: imagefolder, path: {root}}}", "-q")
    with pytest.warns(UserWarning, match="skipped 1 image file"):
        assert main(argv) == 0
    rec = json.loads((tmp_path / "out" / "results.json").read_text())
    assert rec["status"] == "complete" and rec["skipped_images"] == {"img": 1}


def test_metrics_reads_a_run_directory_or_its_results_json(tmp_path, capsys):
    d = run_dir(tmp_path / "r")
    assert main(["metrics", str(d)]) == 0
    by_dir = capsys.readouterr().out
    assert main(["metrics", str(d / "results.json")]) == 0
    assert capsys.readouterr().out == by_dir and "last" in by_dir and "75.00" in by_dir  # mean of [0.7, 0.8]


def test_variants_on_different_streams_run_but_are_not_plotted_together(tmp_path, capsys, monkeypatch):
    import lifelong_moe.runs.runner as runner

    def fake_run(cfg, out, **_):  # a finished run whose first task is named after the class order
        return run_dir(Path(out), tasks=[{**TASKS[0], "name": f"digits[{cfg.stream.class_order}]"}, TASKS[1]])

    monkeypatch.setattr(runner, "run", fake_run)
    p = tmp_path / "c.yaml"
    p.write_text(BASE + "variants:\n  - {name: a, stream: {class_order: natural}}\n  - {name: b}\n")
    assert main(["run", str(p), "-o", str(tmp_path / "runs"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "no comparison plots: runs on different streams cannot be compared" in out
    assert "task 1: 'digits[natural]' vs 'digits[seed]'" in out
    assert sorted(q.name for q in (tmp_path / "runs").iterdir()) == ["a", "b"]
