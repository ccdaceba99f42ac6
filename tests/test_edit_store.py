"""The edit store on its own: bit-exact round trip of the whole log, a save killed at any moment keeps
the previous store loadable and intact, and what is not a store (or a damaged one) is refused."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lifelong_moe.editing.store import INDEX, EditStore, check_compatible
from lifelong_moe.errors import UserError

HEADER = {"method": "m", "method_config": {"a": 1}, "backbone": {"name": "b", "config": None, "fingerprint": "f"}}


def filled(n: int, seed: int = 0) -> EditStore:
    g = torch.Generator().manual_seed(seed)
    store = EditStore(HEADER)
    for i in range(n):
        store.add({"src": f"question {i}", "alt": f"answer {i}"}, {"image": torch.randn(3, 4, 4, generator=g)},
                  {"key": torch.randn(8, generator=g), "answer": torch.arange(i + 1)}, {"index": i})
    return store


def same(a: EditStore, b: EditStore, timestamps: bool = True) -> bool:
    """Equal stores, bit for bit (``timestamps=False``: for stores filled by different processes)."""
    def log(s):
        return s.log if timestamps else [{k: v for k, v in e.items() if k != "timestamp"} for e in s.log]

    if list(a.history) != list(b.history) or a.deleted != b.deleted or log(a) != log(b) or a.next_index != b.next_index:
        return False
    for k, x in a.history.items():
        y = b.history[k]
        if (x.request, x.meta) != (y.request, y.meta) or (timestamps and x.timestamp != y.timestamp):
            return False
        for d1, d2 in ((x.images, y.images), (x.tensors, y.tensors)):
            if set(d1) != set(d2) or not all(torch.equal(d1[n], d2[n]) and d1[n].dtype == d2[n].dtype for n in d1):
                return False
    return True


def test_round_trip_is_bit_exact_with_deletions_and_method_state(tmp_path):
    store = filled(5)
    store.delete("edit-000002")
    state = {"w": torch.randn(3, 3, dtype=torch.float64)}
    store.save(tmp_path, state)
    back, back_state = EditStore.load(tmp_path)
    assert same(store, back) and back.ids() == ["edit-000001", "edit-000003", "edit-000004", "edit-000005"]
    assert torch.equal(back_state["w"], state["w"]) and back_state["w"].dtype == torch.float64
    assert back.add({"src": "q", "alt": "a"}, {}, {}) == "edit-000006"  # ids are never reused
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[-1] == INDEX and len(names) == 3  # index + edits + method files, nothing stale


def test_resave_removes_only_files_the_new_index_no_longer_names(tmp_path):
    filled(2).save(tmp_path, {})
    store = filled(3)
    store.save(tmp_path, {})
    assert len(list(tmp_path.glob("edits-*.safetensors"))) == 1
    assert same(EditStore.load(tmp_path)[0], store)


SAVER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_edit_store import filled
    import lifelong_moe.editing.store as S
    stage, marker = sys.argv[1], Path(sys.argv[2])

    def stall():
        marker.write_text("ready")
        time.sleep(60)

    if stage == "tensors":  # killed while the edits file is half written
        import safetensors.torch as st
        real = st.save_file
        def slow(tensors, path, metadata=None):
            Path(path).write_bytes(b"partial")
            stall()
        st.save_file = slow
    elif stage == "index":  # killed with the new tensor files written, store.json half written
        def slow_json(path, obj):
            with S.atomic_path(path) as tmp:
                Path(tmp).write_text('{{"format": "lifelong-moe ed')
                stall()
        S.write_json = slow_json
    else:  # killed after store.json is replaced, before stale files are removed
        real_unlink = Path.unlink
        def slow_unlink(self, missing_ok=False):
            stall()
        Path.unlink = slow_unlink
    filled(7, seed=1).save(sys.argv[3], {{}})
""")


@pytest.mark.parametrize("stage", ["tensors", "index", "cleanup"])
def test_a_save_killed_at_any_moment_keeps_a_loadable_intact_store(tmp_path, stage):
    old = filled(3)
    d = tmp_path / "store"
    old.save(d, {"w": torch.ones(2)})
    script = tmp_path / "saver.py"
    script.write_text(SAVER.format(tests=str(Path(__file__).parent)))
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, str(script), stage, str(marker), str(d)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "the saving process ended before reaching the kill point"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    back, state = EditStore.load(d)
    if stage == "cleanup":  # the new index was in place: the new store, whole
        assert same(back, filled(7, seed=1), timestamps=False) and state == {}
    else:
        assert same(back, old) and torch.equal(state["w"], torch.ones(2))
    new = filled(2)
    new.save(d, {})  # and the directory takes the next save
    assert same(EditStore.load(d)[0], new)


def test_what_is_not_a_store_or_is_damaged_is_refused(tmp_path):
    with pytest.raises(UserError, match="is not an edit store .no store.json"):
        EditStore.load(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="refusing to write an edit store into .*holds other files"):
        filled(1).save(tmp_path, {})
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    d = tmp_path / "s"
    filled(2).save(d, {})
    edits = next(d.glob("edits-*.safetensors"))
    edits.write_bytes(edits.read_bytes()[:-1] + b"\0")
    with pytest.raises(UserError, match="does not match the checksum"):
        EditStore.load(d)
    (d / INDEX).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        EditStore.load(d)


def test_compatibility_names_what_differs():
    check_compatible(HEADER, HEADER, "s")
    with pytest.raises(UserError, match="differs in: a"):
        check_compatible(HEADER, {**HEADER, "method_config": {"a": 2}}, "s")
    with pytest.raises(UserError, match="fingerprint"):
        check_compatible(HEADER, {**HEADER, "backbone": {"name": "b", "fingerprint": "g"}}, "s")
