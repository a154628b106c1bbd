"""Memory design sweeps: the machine price model and the Pareto front of cost vs tokens/s.

A sweep is an ordinary study with ``engine = "memory"`` (``studies/memory_sweep/``, evaluated by
:mod:`moesim.study.memory` through :func:`moesim.memory.evaluator.evaluate`); ``moesim memory sweep``
writes and runs one. This module keeps what such a study needs that is no replay: the price of a
memory hierarchy and the Pareto front. Values in, values out.

The machine cost is a linear model of the tiers' capacity and bandwidth with the per-unit prices in
:data:`TIER_PRICES` (assumptions, stated with their reason; override per call). It ranks designs;
it is not a quote.
"""

from __future__ import annotations

import numpy as np

from moebase.units import GB
from moesim.memory.tiers import MemoryError_, MemoryHierarchy

TIER_PRICES = {
    # USD per GB of capacity and per GB/s of bandwidth. Assumptions for ranking designs, not quotes:
    "sram": {"usd_per_gb": 5000.0, "usd_per_gb_per_s": 0.0,
             "source": "assumption: ~5 USD per MB of on-die SRAM at 5 nm (area-dominated); bandwidth comes with it"},
    "hbm": {"usd_per_gb": 15.0, "usd_per_gb_per_s": 1.0,
            "source": "assumption: HBM3 ~15 USD/GB; ~1 USD per GB/s for stacks, PHYs and interposer"},
    "ddr": {"usd_per_gb": 3.0, "usd_per_gb_per_s": 2.0,
            "source": "assumption: DDR5 RDIMM ~3 USD/GB; ~2 USD per GB/s for channels/controllers"},
    "host": {"usd_per_gb": 3.0, "usd_per_gb_per_s": 2.0, "source": "assumption: as DDR"},
}


def machine_cost_usd(h: MemoryHierarchy, prices: dict | None = None, tiers: tuple[str, ...] | None = None) -> float:
    """Linear cost of the tiers: capacity [GB] x usd_per_gb + bandwidth [GB/s] x usd_per_gb_per_s."""
    prices = {**TIER_PRICES, **(prices or {})}
    total = 0.0
    for name in tiers or tuple(h.tiers):
        t = h.tiers[name]
        p = prices.get(name)
        if p is None:
            raise MemoryError_(f"no price for tier {name!r}; give prices[{name!r}] = {{usd_per_gb, usd_per_gb_per_s}}")
        total += t.capacity_bytes / GB * p["usd_per_gb"] + t.bandwidth_bytes_per_s / GB * p["usd_per_gb_per_s"]
    return total


def pareto_front(cost, value) -> np.ndarray:
    """Mask [n]: True for the points on the Pareto front of low ``cost`` and high ``value``. The one place of
    this rule (study and memory reports, ``moesim memory sweep`` call it).

    A point is dominated when another has ``cost <=`` and ``value >=`` with at least one strict; the front
    is every point that is not. Ties: points with identical (cost, value) do not dominate each other, so
    all copies of a non-dominated point are kept. O(n log n): sort by cost, then within each group of equal
    cost keep the points at the group's highest value if it beats every strictly cheaper point.
    NaN or different lengths raise ValueError (a NaN point could neither be ranked nor be dropped silently).
    """
    cost, value = np.asarray(cost, dtype=float).ravel(), np.asarray(value, dtype=float).ravel()
    if cost.shape != value.shape:
        raise ValueError(f"pareto_front: cost has {cost.size} points but value has {value.size}")
    for name, arr in (("cost", cost), ("value", value)):
        if np.isnan(arr).any():
            raise ValueError(f"pareto_front: {name} is NaN at index {int(np.flatnonzero(np.isnan(arr))[0])}")
    mask = np.zeros(cost.size, dtype=bool)
    if cost.size == 0:
        return mask
    order = np.argsort(cost, kind="stable")
    c, v = cost[order], value[order]
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])  # first index of each group of equal cost
    group_best = np.maximum.reduceat(v, starts)
    cheaper_best = np.r_[-np.inf, np.maximum.accumulate(group_best)[:-1]]  # best value at lower cost
    group = np.repeat(np.arange(starts.size), np.diff(np.r_[starts, c.size]))
    beats_cheaper = (v > cheaper_best[group]) | (group == 0)  # the cheapest group has nothing cheaper
    mask[order] = (v == group_best[group]) & beats_cheaper
    return mask
