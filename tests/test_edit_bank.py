"""EditBank (lifelong_moe/editing/bank.py): appending rows equals stacking the whole store, across
buffer growth, rebuilds and the views the methods route over."""
import torch

from lifelong_moe.editing.bank import EditBank


def edits(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"c": torch.randn(4, 8, generator=g), "k": torch.randn(3, generator=g)} for _ in range(n)]


def test_appending_equals_stacking_the_store_across_growth():
    bank, store = EditBank(["c", "k"]), []
    assert bank.view() is None and len(bank) == 0
    for chunk in (edits(1, 1), edits(1, 2), edits(3, 3), [], edits(9, 4), edits(1, 5)):
        bank.extend(chunk)
        store += chunk
        view = bank.view()
        assert len(bank) == len(store)
        for k in ("c", "k"):
            assert torch.equal(view[k], torch.stack([e[k] for e in store]))
    assert bank._buf["c"].shape[0] >= len(store)  # spare rows: the buffer doubles, it is not restacked per edit


def test_rebuild_replaces_the_rows_and_an_empty_rebuild_empties_the_bank():
    bank = EditBank(["c", "k"])
    bank.extend(edits(5))
    kept = edits(5)[1:3]
    bank.rebuild(kept)
    assert torch.equal(bank.view()["k"], torch.stack([e["k"] for e in kept]))
    bank.rebuild([])
    assert bank.view() is None and len(bank) == 0


def test_rows_are_stored_as_the_bank_dtype():
    bank = EditBank(["k"], dtype=torch.float32)
    bank.extend([{"k": torch.ones(2, dtype=torch.float64)}])
    assert bank.view()["k"].dtype == torch.float32
