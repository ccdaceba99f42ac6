"""Continual-learning metrics over an accuracy matrix (pure numpy, no torch).

Conventions
-----------
* ``A`` is a ``(T, T)`` float array (lists are accepted): ``A[i, j]`` is the accuracy on the
  test set of task ``j`` after training task ``i``. Indices are 0-based here; the papers cited
  are 1-based, and the formulas below are rewritten 0-based. Values are fractions in [0, 1],
  never percent.
* ``zero_shot`` (optional) is a length-``T`` vector: the accuracy of the model before any
  continual training (the row ``R[0][.]`` of the papers).
* Not-yet-evaluated entries are NaN. A run in progress has its first ``k`` rows filled and the
  rest NaN, or only ``k`` rows at all (a ``(k, T)`` array). ``k = completed_rows(A)``, and every
  metric is computed on what has been trained so far, as if ``T`` were ``k``: "the last row" is
  row ``k-1`` and the seen tasks are ``0..k-1``. The MTIL metrics use the ``k x k`` top-left block.
* NaN entries inside completed rows (not evaluated) are skipped: every mean is nan-aware over
  the entries its formula needs. A metric that is undefined (forgetting/BWT/FWT/Transfer with a
  single trained task, FWT without ``zero_shot``, no completed row) is ``float('nan')``.
* Every metric function has the signature ``f(A, zero_shot=None) -> float`` so that ``METRICS``
  can be iterated uniformly; only ``fwt`` uses ``zero_shot`` (the others just validate it).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

NAN = float("nan")


def _nanmean(x) -> float:
    x = np.asarray(x, dtype=float).ravel()
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else NAN


def _nanmax(x) -> float:
    x = np.asarray(x, dtype=float).ravel()
    x = x[~np.isnan(x)]
    return float(x.max()) if x.size else NAN


def _check(A, zero_shot=None):
    """Validate and return ``(A as float array, zero_shot as float array or None)``."""
    A = np.array(A, dtype=float)
    if A.ndim != 2:
        raise ValueError(f"accuracy matrix must be 2-D (T, T) or (k, T), got shape {A.shape}")
    n, T = A.shape
    if n > T:
        raise ValueError(f"accuracy matrix must be square (T, T) or have fewer rows than "
                         f"tasks for a partial run; got {n} rows for {T} tasks (shape {A.shape})")
    if zero_shot is not None:
        zero_shot = np.array(zero_shot, dtype=float)
        if zero_shot.ndim != 1 or zero_shot.shape[0] != T:
            raise ValueError(f"zero_shot must be a vector of length T={T}, "
                             f"got shape {zero_shot.shape}")
    return A, zero_shot


def _rows(A):
    """Completed rows of ``A``: ``(A[:k], k)``."""
    k = 0
    for row in A:
        if np.isnan(row).all():
            break
        k += 1
    return A[:k], k


def completed_rows(A) -> int:
    """Number of completed rows: rows with at least one non-NaN entry, counted from the top
    until the first all-NaN row (later rows are ignored)."""
    return _rows(_check(A)[0])[1]


def accuracy_curve(A) -> list:
    """Average accuracy after each experience, for every completed row ``t``:

        A_t = mean_{j <= t} A[t, j]

    (the points whose mean is ``avg_incremental``; Rebuffi et al., iCaRL, CVPR 2017).
    """
    B, k = _rows(_check(A)[0])
    return [_nanmean(B[t, : t + 1]) for t in range(k)]


def last(A, zero_shot=None) -> float:
    """Final average accuracy over seen tasks (ACC of GEM; the "Last" of CIL papers):

        ACC = (1/k) sum_{j<k} A[k-1, j]

    Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017.
    """
    B, k = _rows(_check(A, zero_shot)[0])
    return _nanmean(B[k - 1, :k]) if k else NAN


def avg_incremental(A, zero_shot=None) -> float:
    """Average incremental accuracy:

        (1/k) sum_{t<k} (1/(t+1)) sum_{j<=t} A[t, j]

    Rebuffi et al., "iCaRL: Incremental Classifier and Representation Learning", CVPR 2017.
    """
    _check(A, zero_shot)
    return _nanmean(accuracy_curve(A))


def forgetting(A, zero_shot=None) -> float:
    """Average forgetting (Chaudhry et al., "Riemannian Walk for Incremental Learning:
    Understanding Forgetting and Intransigence", ECCV 2018, eq. 3):

        f_j = max_{l in [j, k-2]} A[l, j] - A[k-1, j]          for j < k-1
        F   = (1/(k-1)) sum_{j<k-1} f_j

    The max runs over the rows after task j was learned and before the last one (as continuum
    does), so it is never taken over zero-shot/pre-training accuracies. It can be negative
    (when the final accuracy exceeds every earlier one). This is NOT Avalanche's "forgetting",
    which is A[j, j] - A[k-1, j] (= -BWT). VQACL's AF is this quantity (see ``vqacl_af``). NaN with
    a single trained task.
    """
    B, k = _rows(_check(A, zero_shot)[0])
    if k < 2:
        return NAN
    return _nanmean([_nanmax(B[j : k - 1, j]) - B[k - 1, j] for j in range(k - 1)])


def bwt(A, zero_shot=None) -> float:
    """Backward transfer (Lopez-Paz & Ranzato, GEM, NeurIPS 2017):

        BWT = (1/(k-1)) sum_{j<k-1} (A[k-1, j] - A[j, j])

    Negative values mean forgetting. NaN with a single trained task.
    """
    B, k = _rows(_check(A, zero_shot)[0])
    if k < 2:
        return NAN
    return _nanmean([B[k - 1, j] - B[j, j] for j in range(k - 1)])


def fwt(A, zero_shot=None) -> float:
    """Forward transfer (Lopez-Paz & Ranzato, GEM, NeurIPS 2017) against the zero-shot row
    (GEM's ``b_j``, here the model before continual training):

        FWT = (1/(k-1)) sum_{j=1}^{k-1} (A[j-1, j] - zero_shot[j])

    NaN without ``zero_shot`` or with a single trained task.
    """
    A, zero_shot = _check(A, zero_shot)
    B, k = _rows(A)
    if zero_shot is None or k < 2:
        return NAN
    return _nanmean([B[j - 1, j] - zero_shot[j] for j in range(1, k)])


def mtil_transfer(A, zero_shot=None) -> float:
    """MTIL "Transfer" (Zheng et al., "Preventing Zero-Shot Transfer Degradation in Continual
    Learning of Vision-Language Models" (ZSCL), ICCV 2023):

        Transfer = (1/(T-1)) sum_{j=1}^{T-1} mean_{i<j} A[i, j]

    The strict upper triangle, averaged column by column; the zero-shot row is not included
    and the first task (no column entry above the diagonal) is excluded. For a partial run it is
    computed over the k x k top-left block. NaN when T (or k) is 1.
    """
    B, k = _rows(_check(A, zero_shot)[0])
    return _nanmean([_nanmean(B[:j, j]) for j in range(1, k)])


def mtil_avg(A, zero_shot=None) -> float:
    """MTIL "Avg" (Zheng et al., ZSCL, ICCV 2023): the mean of all T^2 entries, both triangles,
    as column means then averaged:

        Avg = (1/T) sum_j (1/T) sum_i A[i, j]

    For a partial run it is computed over the k x k top-left block.
    """
    B, k = _rows(_check(A, zero_shot)[0])
    return _nanmean([_nanmean(B[:, j]) for j in range(k)])


def mtil_last(A, zero_shot=None) -> float:
    """MTIL "Last" (Zheng et al., ZSCL, ICCV 2023): the final row over ALL T tasks:

        Last = (1/T) sum_j A[T-1, j]

    For a partial run it is computed over the k x k top-left block (and then equals ``last``).
    """
    B, k = _rows(_check(A, zero_shot)[0])
    return _nanmean(B[k - 1, :k]) if k else NAN


def vqacl_ap(A, zero_shot=None) -> float:
    """VQACL average performance (Zhang et al., "VQACL: A Novel Visual Question Answering
    Continual Learning Setting", CVPR 2023):

        AP = (1/k) sum_{j<k} A[k-1, j]

    Coincides with ``last``; kept under its own name because VQA papers report it.
    """
    return last(A, zero_shot)


def vqacl_af(A, zero_shot=None) -> float:
    """VQACL average forgetting (Zhang et al., "VQACL", CVPR 2023) as its evaluation code computes
    it (``zhangxi1997/VQACL``, ``Question_type.py``, ``evaluate_metric``): for every earlier task,
    the best accuracy it had in any row before the last minus its final accuracy, averaged,

        AF = (1/(k-1)) sum_{j<k-1} [max_{l in [j, k-2]} A[l, j] - A[k-1, j]]

    (Chaudhry's form). VQACL fills only the lower triangle (entries above the diagonal are -1 and
    never win the max), so the max runs from row j; here too rows before j (zero-shot transfer)
    are excluded. Coincides with ``forgetting``; kept under its own name because VQA papers report
    it. It is not first-after-training minus final (-BWT). NaN with a single trained task.
    """
    return forgetting(A, zero_shot)


METRICS = OrderedDict([
    ("last", (last, "mean_j A[k-1, j] over seen tasks (final average accuracy; GEM, 2017)")),
    ("avg_incremental", (avg_incremental, "mean over t of mean_{j<=t} A[t, j] (iCaRL, 2017)")),
    ("forgetting", (forgetting, "mean_{j<k-1} [max_{j<=l<=k-2} A[l, j] - A[k-1, j]] "
                                "(Chaudhry et al., RWalk, 2018)")),
    ("bwt", (bwt, "mean_{j<k-1} (A[k-1, j] - A[j, j]) (backward transfer; GEM, 2017)")),
    ("fwt", (fwt, "mean_{j>=1} (A[j-1, j] - zero_shot[j]) (forward transfer; GEM, 2017)")),
    ("mtil_transfer", (mtil_transfer, "mean over j>=1 of mean_{i<j} A[i, j] (ZSCL MTIL Transfer)")),
    ("mtil_avg", (mtil_avg, "mean over j of mean_i A[i, j], all entries (ZSCL MTIL Avg)")),
    ("mtil_last", (mtil_last, "mean_j A[T-1, j] over all tasks (ZSCL MTIL Last)")),
    ("vqacl_ap", (vqacl_ap, "mean_j A[k-1, j] over seen tasks (VQACL AP; = last)")),
    ("vqacl_af", (vqacl_af, "mean_{j<k-1} [max_{j<=l<=k-2} A[l, j] - A[k-1, j]] "
                            "(VQACL AF, its evaluation code; = forgetting)")),
])


def compute_all(A, zero_shot=None) -> dict:
    """Every metric of ``METRICS``: ``{name: {"value": float or None, "definition": str}}``,
    with ``None`` where the metric is undefined (NaN), so that it serialises to JSON null."""
    A, zero_shot = _check(A, zero_shot)
    out = {}
    for name, (fn, definition) in METRICS.items():
        v = float(fn(A, zero_shot))
        out[name] = {"value": v if np.isfinite(v) else None, "definition": definition}
    return out
