"""Atomic writes: the usual file mode, data on disk before the rename, the old file kept on failure."""
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from lifelong_moe import io as lio


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_of_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    lio.write_json(tmp_path / "results.json", {"a": 1})
    with lio.atomic_path(tmp_path / "ckpt.safetensors") as tmp:  # the checkpoint writer recreates the file
        save_file({"w": torch.zeros(3)}, str(tmp))
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what the user expects: the mode of an ordinary new file
    for name in ("results.json", "ckpt.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode == stat.S_IMODE(plain.stat().st_mode)


def test_data_is_synced_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", "dir" if stat.S_ISDIR(st.st_mode) else st.st_size))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(lio.os, "fsync", fsync)
    monkeypatch.setattr(lio.os, "replace", replace)
    text = "x" * 5000
    lio.write_text(tmp_path / "a.txt", text)
    # the file's whole content is flushed and synced, then renamed, then the directory synced
    assert events == [("fsync", len(text)), ("replace", "a.txt"), ("fsync", "dir")]
    assert (tmp_path / "a.txt").read_text() == text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    lio.write_json(target, {"old": True})
    with pytest.raises(RuntimeError):
        with lio.atomic_path(target) as tmp:
            tmp.write_text('{"half": ')
            raise RuntimeError("crash mid-write")
    assert lio.read_json(target) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
