"""MTIL (Multi-domain Task-Incremental Learning, ZSCL) dataset orders.

Each name is a source of :func:`lifelong_moe.streams.sources.load_source`; a ``multi_domain``
stream with ``order: mtil_order1`` (or ``mtil_order2``) trains on these 11 datasets in turn.
"""
from __future__ import annotations

import difflib

from ..errors import ConfigError

MTIL_ORDER_I = ["fgvc_aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers102", "food101",
                "mnist", "oxford_pet", "stanford_cars", "sun397"]
MTIL_ORDER_II = ["stanford_cars", "food101", "mnist", "oxford_pet", "flowers102", "sun397", "fgvc_aircraft",
                 "caltech101", "dtd", "eurosat", "cifar100"]
MTIL_DATASETS = sorted(MTIL_ORDER_I)

NAMED_ORDERS: dict[str, list[str]] = {"mtil_order1": MTIL_ORDER_I, "mtil_order2": MTIL_ORDER_II}


class OrderError(ConfigError, ValueError):
    """An unknown named order or a malformed list of datasets."""


def resolve_order(name_or_list) -> list[str]:
    """The dataset names of a named order (``"mtil_order1"``, ``"mtil_order2"``), or a copy of an
    explicit list of names after checking it (non-empty strings, no repeats)."""
    if isinstance(name_or_list, str):
        key = name_or_list.strip().lower()
        if key in NAMED_ORDERS:
            return list(NAMED_ORDERS[key])
        close = difflib.get_close_matches(key, list(NAMED_ORDERS), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise OrderError(f"stream.order: unknown named order {name_or_list!r}{hint}; "
                         f"known: {', '.join(NAMED_ORDERS)}")
    if name_or_list is None:
        raise OrderError(f"stream.order: give a named order ({', '.join(NAMED_ORDERS)}) or a list of datasets")
    try:
        order = list(name_or_list)
    except TypeError:
        raise OrderError(f"stream.order: expected a name or a list of dataset names, got {name_or_list!r}") from None
    bad = [x for x in order if not isinstance(x, str) or not x.strip()]
    if not order or bad:
        raise OrderError(f"stream.order: expected a non-empty list of dataset names, got {order!r}")
    repeats = sorted({x for x in order if order.count(x) > 1})
    if repeats:
        raise OrderError(f"stream.order: {', '.join(repeats)} listed more than once")
    return order
