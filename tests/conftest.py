import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep every test's caches (pretrained tiny CLIP, datasets) out of the user's home."""
    cache = os.environ.get("LIFELONG_MOE_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "cache")
    monkeypatch.setenv("LIFELONG_MOE_CACHE", cache)
    monkeypatch.setenv("LIFELONG_MOE_DATA", str(tmp_path_factory.getbasetemp() / "data"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one torch thread is faster and immune to OpenMP stalls on a shared 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
