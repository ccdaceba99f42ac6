"""One process per run directory: a second one is refused with the holder's pid; a lock left by a
killed run does not block --resume."""
import json
import os
import signal
import subprocess
import sys

import pytest

from lifelong_moe.cli import main
from lifelong_moe.errors import UserError
from lifelong_moe.results import LOCK_NAME, RunDir

CONFIG = """name: t
stream: {kind: class_incremental, dataset: digits, classes_per_experience: [5, 5],
         samples_per_class: {train: 4, test: 2}}
strategy: {name: finetune}
training: {epochs: 1, batch_size: 8}
evaluation: {batch_size: 64}
runtime: {threads: 1}
"""
HOLD = "import sys, time\nfrom lifelong_moe.results import RunDir\nd = RunDir(sys.argv[1])\nd.hold()\nprint('held', flush=True)\ntime.sleep(300)\n"


@pytest.fixture
def holder():
    """Start a process that holds a run directory's lock until killed."""
    procs = []

    def start(path):
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_second_process_is_refused_then_resumes_after_the_first_is_killed(tmp_path, holder, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "-o", str(out), "--stop-after", "1", "-q"]) == 0
    first = holder(out)
    before = snapshot(out)
    capsys.readouterr()
    for flag in ("--resume", "--overwrite"):
        assert main(["run", str(cfg), "-o", str(out), flag, "-q"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{out} is in use by another run (pid {first.pid})" in err
    assert snapshot(out) == before  # refused before anything was touched
    first.send_signal(signal.SIGKILL)  # dies holding the lock: the OS drops it
    first.wait()
    assert (out / LOCK_NAME).read_text().split()[0] == str(first.pid)  # the stale file stays, unlocked
    assert main(["run", str(cfg), "-o", str(out), "--resume", "-q"]) == 0
    rec = json.loads((out / "results.json").read_text())
    assert rec["status"] == "complete" and len(rec["matrix"]) == 2
    assert (out / LOCK_NAME).read_text().split()[0] == str(os.getpid())  # the last holder was this run


def test_hold_is_exclusive_across_processes_and_released(tmp_path, holder):
    d = RunDir(tmp_path / "r")
    p = holder(d.path)
    with pytest.raises(UserError, match=f"pid {p.pid}"):
        d.hold()
    with pytest.raises(UserError, match=f"pid {p.pid}"):
        d.check_unlocked()
    p.kill()
    p.wait()
    d.hold()  # free again once the holder is gone
    d.check_unlocked()  # our own lock does not refuse us
    d.release()
    other = RunDir(d.path)
    other.hold()  # and released for the next one
    other.release()
