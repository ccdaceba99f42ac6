"""Hand-computed checks of lifelong_moe.evaluation.metrics (the arithmetic is written in the comments)."""
import json
import math

import numpy as np
import pytest

from lifelong_moe.evaluation import metrics as M

nan = float("nan")


def approx(x):
    return pytest.approx(x, rel=1e-12, abs=1e-12)


# A[i, j] = accuracy on task j after training task i.
A3 = [
    [0.70, 0.20, 0.16],
    [0.75, 0.90, 0.30],
    [0.60, 0.80, 0.95],
]
ZS3 = [0.30, 0.15, 0.05]

NAMES = ["last", "avg_incremental", "forgetting", "bwt", "fwt", "mtil_transfer", "mtil_avg",
         "mtil_last", "vqacl_ap", "vqacl_af"]


def values(A, zs=None):
    return {k: v["value"] for k, v in M.compute_all(A, zs).items()}


def test_3x3_every_metric():
    # last = (0.60 + 0.80 + 0.95) / 3 = 2.35 / 3
    assert M.last(A3) == approx(2.35 / 3)
    # curve: t0 = 0.70; t1 = (0.75 + 0.90) / 2 = 0.825; t2 = 2.35 / 3
    assert M.accuracy_curve(A3) == [approx(0.70), approx(0.825), approx(2.35 / 3)]
    # avg_incremental = (0.70 + 0.825 + 2.35/3) / 3
    assert M.avg_incremental(A3) == approx((0.70 + 0.825 + 2.35 / 3) / 3)
    # forgetting: j=0: max(A[0,0], A[1,0]) - A[2,0] = max(0.70, 0.75) - 0.60 = 0.15
    #             j=1: max(A[1,1]) - A[2,1] = 0.90 - 0.80 = 0.10        -> (0.15 + 0.10) / 2
    assert M.forgetting(A3) == approx(0.125)
    # bwt: (0.60 - 0.70) + (0.80 - 0.90) = -0.20 -> / 2
    assert M.bwt(A3) == approx(-0.10)
    # fwt: (A[0,1] - zs[1]) + (A[1,2] - zs[2]) = (0.20 - 0.15) + (0.30 - 0.05) = 0.30 -> / 2
    assert M.fwt(A3, ZS3) == approx(0.15)
    assert math.isnan(M.fwt(A3))
    # transfer: column 1: 0.20; column 2: (0.16 + 0.30) / 2 = 0.23 -> (0.20 + 0.23) / 2
    # (a flat mean of the three upper entries would give 0.66 / 3 = 0.22 instead)
    assert M.mtil_transfer(A3) == approx(0.215)
    # avg: columns (0.70+0.75+0.60)/3, (0.20+0.90+0.80)/3, (0.16+0.30+0.95)/3
    #      = 2.05/3, 1.90/3, 1.41/3 -> (2.05 + 1.90 + 1.41) / 9 = 5.36 / 9
    assert M.mtil_avg(A3) == approx(5.36 / 9)
    assert M.mtil_last(A3) == approx(2.35 / 3)
    assert M.vqacl_ap(A3) == approx(2.35 / 3)
    # af (VQACL's code: best earlier row minus final): (0.75 - 0.60) + (0.90 - 0.80) = 0.25 -> / 2
    assert M.vqacl_af(A3) == approx(0.125)
    assert M.completed_rows(A3) == 3


def test_3x3_compute_all_matches_functions():
    got = values(np.array(A3), np.array(ZS3))
    for name, (fn, _) in M.METRICS.items():
        assert got[name] == approx(fn(A3, ZS3)), name


def test_aliases():
    assert M.vqacl_ap(A3) == M.last(A3)
    assert M.vqacl_af(A3) == M.forgetting(A3)


def test_single_task():
    A1, zs = [[0.9]], [0.4]
    v = values(A1, zs)
    for name in ["last", "avg_incremental", "mtil_avg", "mtil_last", "vqacl_ap"]:
        assert v[name] == approx(0.9), name
    for name in ["forgetting", "bwt", "fwt", "mtil_transfer", "vqacl_af"]:
        assert v[name] is None, name
        assert math.isnan(M.METRICS[name][0](A1, zs)), name
    assert M.accuracy_curve(A1) == [approx(0.9)]


def test_partial_equals_top_left_block():
    partial = np.array(A3)
    partial[2] = nan
    missing = np.array(A3)[:2]            # (2, 3): the third row not there at all
    block = np.array(A3)[:2, :2]           # [[0.70, 0.20], [0.75, 0.90]]
    assert M.completed_rows(partial) == M.completed_rows(missing) == 2
    expected = {
        "last": 0.825,                     # (0.75 + 0.90) / 2
        "avg_incremental": 0.7625,         # (0.70 + 0.825) / 2
        "forgetting": -0.05,               # max(A[0,0]) - A[1,0] = 0.70 - 0.75
        "bwt": 0.05,                       # 0.75 - 0.70
        "fwt": 0.05,                       # A[0,1] - zs[1] = 0.20 - 0.15
        "mtil_transfer": 0.20,             # column 1 only; A[0,2], A[1,2] are outside the block
        "mtil_avg": 0.6375,                # ((0.70+0.75)/2 + (0.20+0.90)/2) / 2 = (0.725+0.55)/2
        "mtil_last": 0.825,
        "vqacl_ap": 0.825,
        "vqacl_af": -0.05,                 # max(A[0,0]) - A[1,0] = 0.70 - 0.75
    }
    for A in (partial, missing):
        got = values(A, ZS3)
        for name in NAMES:
            assert got[name] == approx(expected[name]), name
    block_values = values(block, ZS3[:2])
    for name in NAMES:
        assert block_values[name] == approx(expected[name]), name
    assert M.accuracy_curve(partial) == [approx(0.70), approx(0.825)]


def test_nan_inside_completed_rows():
    A = np.array(A3)
    A[2, 1] = nan                          # task 1 not evaluated after task 2
    A[0, 2] = nan                          # task 2 not evaluated after task 0
    assert M.completed_rows(A) == 3
    assert M.last(A) == approx(0.775)                  # (0.60 + 0.95) / 2
    assert M.forgetting(A) == approx(0.15)             # only j=0: 0.75 - 0.60
    assert M.bwt(A) == approx(-0.10)                   # only j=0: 0.60 - 0.70
    assert M.vqacl_af(A) == approx(0.15)               # only j=0: max(0.70, 0.75) - 0.60
    assert M.mtil_transfer(A) == approx(0.25)          # (0.20 + 0.30 / 1) / 2
    # avg: columns 2.05/3, (0.20+0.90)/2 = 0.55, (0.30+0.95)/2 = 0.625
    assert M.mtil_avg(A) == approx((2.05 / 3 + 0.55 + 0.625) / 3)
    # curve: 0.70, 0.825, (0.60 + 0.95) / 2 = 0.775
    assert M.avg_incremental(A) == approx((0.70 + 0.825 + 0.775) / 3)
    zs = [0.30, nan, 0.05]                             # fwt: only j=2: 0.30 - 0.05
    assert M.fwt(A, zs) == approx(0.25)


def test_completed_rows_and_empty():
    assert M.completed_rows([[0.5, nan], [nan, nan]]) == 1
    assert M.completed_rows([[nan, nan], [0.5, 0.5]]) == 0   # counted from the top
    assert M.completed_rows(np.empty((0, 3))) == 0
    empty = np.full((3, 3), nan)
    assert M.accuracy_curve(empty) == []
    assert all(v is None for v in values(empty, ZS3).values())
    for fn, _ in M.METRICS.values():
        assert math.isnan(fn(empty))


def test_forgetting_negative():
    A = [[0.5, 0.1], [0.8, 0.9]]
    assert M.forgetting(A) == approx(-0.3)             # 0.5 - 0.8
    assert M.bwt(A) == approx(0.3)                     # 0.8 - 0.5


def test_forgetting_differs_from_minus_bwt():
    # In A3 the best accuracy on task 0 is after task 1 (0.75), not the diagonal (0.70):
    # forgetting = ((0.75 - 0.60) + (0.90 - 0.80)) / 2 = 0.125
    # -bwt       = ((0.70 - 0.60) + (0.90 - 0.80)) / 2 = 0.10   (Avalanche's "forgetting")
    assert M.forgetting(A3) == approx(0.125)
    assert -M.bwt(A3) == approx(0.10)
    assert M.forgetting(A3) != approx(-M.bwt(A3))


def test_forgetting_agrees_with_continuum():
    # continuum (continuum/metrics/metrics.py, `forgetting`, documented as Chaudhry et al. 2018
    # eq. 3) loops j over range(k-2), takes the max over rows l in range(k-2) with l >= j and
    # divides by k-1. On this matrix the j=k-2 term it omits is 0 (A[2,2] == A[3,2]) and row
    # k-2 is never the column max, so both definitions agree:
    A = [
        [0.90, 0.10, 0.10, 0.10],
        [0.80, 0.70, 0.10, 0.10],
        [0.60, 0.65, 0.50, 0.10],
        [0.40, 0.60, 0.50, 0.90],
    ]
    # ours: j=0: max(0.90, 0.80, 0.60) - 0.40 = 0.50; j=1: max(0.70, 0.65) - 0.60 = 0.10;
    #       j=2: 0.50 - 0.50 = 0                                     -> 0.60 / 3
    # continuum: j=0: max(0.90, 0.80) - 0.40 = 0.50; j=1: max(0.70) - 0.60 = 0.10 -> 0.60 / 3
    assert M.forgetting(A) == approx(0.2)
    # continuum's test: perfect predictions everywhere give zero forgetting
    assert M.forgetting(np.ones((4, 4))) == 0.0


def test_compute_all_keys_and_json():
    assert list(M.METRICS) == NAMES
    out = M.compute_all([[0.9]])
    assert list(out) == NAMES
    for name, entry in out.items():
        assert set(entry) == {"value", "definition"}
        assert isinstance(entry["definition"], str) and entry["definition"]
    assert out["last"]["value"] == approx(0.9)
    assert out["fwt"]["value"] is None and out["bwt"]["value"] is None
    assert json.loads(json.dumps(out))["forgetting"]["value"] is None
    assert isinstance(M.compute_all(A3, ZS3)["fwt"]["value"], float)


def test_every_metric_documented():
    for name, (fn, _) in M.METRICS.items():
        assert fn.__doc__ and "=" in fn.__doc__, name


@pytest.mark.parametrize("bad", [
    [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]],      # 3 rows, 2 tasks
    [0.5, 0.5],                                # 1-D
    np.zeros((2, 2, 2)),                       # 3-D
])
def test_bad_matrix_shape(bad):
    with pytest.raises(ValueError, match="matrix"):
        M.compute_all(bad)
    with pytest.raises(ValueError):
        M.last(bad)


@pytest.mark.parametrize("zs", [[0.1, 0.2], [0.1, 0.2, 0.3, 0.4], [[0.1, 0.2, 0.3]]])
def test_bad_zero_shot_shape(zs):
    with pytest.raises(ValueError, match="zero_shot"):
        M.compute_all(A3, zs)
    with pytest.raises(ValueError, match="zero_shot"):
        M.fwt(A3, zs)


def test_vqacl_af_is_the_max_form_of_its_evaluation_code():
    """VQACL's ``evaluate_metric`` (zhangxi1997/VQACL, Question_type.py) takes, per earlier task,
    the max over the rows before the last minus the final accuracy; the upper triangle is never
    filled there (-1), so zero-shot transfer entries above the diagonal never count."""
    A = [
        [0.50, 0.95, 0.90],   # A[0,1] = 0.95, A[0,2] = 0.90: above the diagonal, must be ignored
        [0.80, 0.60, 0.85],   # task 0 peaks after task 1, not right after its own training
        [0.40, 0.30, 0.70],
    ]
    # VQACL: j=0: max(0.50, 0.80) - 0.40 = 0.40; j=1: max(0.60) - 0.30 = 0.30   -> 0.35
    # first-after-training form (-BWT): (0.50 - 0.40) + (0.60 - 0.30) = 0.40       -> 0.20
    # a max that also took the upper triangle: j=1: 0.95 - 0.30 = 0.65            -> 0.525
    assert M.vqacl_af(A) == approx(0.35)
    assert -M.bwt(A) == approx(0.20)
    assert M.vqacl_af(A) != approx(-M.bwt(A))
    assert values(A)["vqacl_af"] == approx(0.35)
