"""Placement objectives as a table: one row per stage of a layer model, one tuple of stages per objective.

A **stage** is one CP-SAT model of one MoE layer (:class:`Stage`, rows of :data:`STAGES`): how it builds
its objective on the layer's variables, a lower bound that holds without solving, and how it scores an
assignment (flat GPU level, and node level for the hierarchical models of :mod:`moesim.place.hier`).
An **objective** (:data:`OBJECTIVES`) is a sequence of stages: ``joint`` is ``balance`` then ``traffic``
under the balance optimum (times ``1 + tolerance``). Adding an objective is one row here (see
``docs/architecture.md``, "Where do I add a placement objective or method").

Every per-layer solve takes one :class:`LayerTask` (the layer's counts, warm start, limits, caps) and
works on its integer :class:`LayerData` (per-copy loads scaled to integers, integer traffic costs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
from ortools.sat.python import cp_model

from moesim.place.local import improve_layer
from moesim.place.problem import PlacementProblem

TRAFFIC_SCALE = 10  # traffic costs are rounded to 1/10 of a token-NVLink crossing: integers for CP-SAT, fine enough
SHARE_SCALE_MAX = 720  # per-copy shares are exact for replica counts whose lcm <= 720 (any mix of 1..6 copies)
SWAP_SHARE = 0.25  # share of a balance layer's time for the swap local search on the warm start (it usually stops early)
SWAP_CAP_DETERMINISTIC = 5000  # swaps of that search in deterministic runs (a count, not seconds, so runs repeat)
BOUND_TOL = 1e-9  # float slack when rounding a node-model bound up to an integer GPU load


@dataclass(frozen=True, eq=False)
class LayerTask:
    """One stage of one layer, everything its solve needs.

    counts [E] copies per expert; hint [E, D] 0/1 warm start (feasible for counts and slots);
    traffic_cost [E, D] float cost of a copy of e on GPU d (coupled stages), else None;
    max_load: cap on the (scenario-summed) max GPU load in scaled units, or None; current [E, D] 0/1
    and max_moves: migration cap (at most max_moves copies that current lacks), or None;
    time_limit_s: this layer's limit (CP-SAT deterministic time when ``deterministic``);
    deadline_at_s: ``time.perf_counter()`` instant the stage must end by (wall-time runs only);
    hierarchical: solve by the node-then-GPU models of :mod:`moesim.place.hier`."""

    problem: PlacementProblem
    layer: int
    counts: np.ndarray
    hint: np.ndarray
    stage: str
    time_limit_s: float
    num_workers: int
    seed: int
    traffic_cost: np.ndarray | None = None
    max_load: int | None = None
    current: np.ndarray | None = None
    max_moves: int | None = None
    deterministic: bool = False
    deadline_at_s: float | None = None
    hierarchical: bool = False

    @property
    def capped_moves(self) -> bool:
        return self.current is not None and self.max_moves is not None

    def loads(self) -> list[np.ndarray]:
        """[E] expert loads of this layer: the nominal load, then each bootstrap scenario's."""
        p = self.problem
        return [p.load[self.layer]] + ([sc[self.layer] for sc in p.scenarios] if p.scenarios is not None else [])


@dataclass(frozen=True, eq=False)
class LayerData:
    """The integer model data of a :class:`LayerTask`.

    ws: per-scenario (nominal first) per-copy loads, each [E] int64, in tokens x ``scale``;
    traffic [E, D] int64 crossing cost in units of 1/:data:`TRAFFIC_SCALE` crossing, or None."""

    ws: list[np.ndarray]
    scale: int
    traffic: np.ndarray | None


def share_scale(counts: np.ndarray) -> int:
    """Integer scale for per-replica shares ``load * scale / count`` (exact when lcm(counts) <= 720)."""
    lcm = math.lcm(*[int(c) for c in np.unique(counts)])
    return lcm if lcm <= SHARE_SCALE_MAX else SHARE_SCALE_MAX


def layer_data(task: LayerTask) -> LayerData:
    scale = share_scale(task.counts)
    ws = [np.rint(ld.astype(float) * scale / task.counts).astype(np.int64) for ld in task.loads()]
    tc = None if task.traffic_cost is None else np.rint(task.traffic_cost * TRAFFIC_SCALE).astype(np.int64)
    return LayerData(ws=ws, scale=scale, traffic=tc)


# --------------------------------------------------------------------------- the balance lower bound


def average_cut(total: int, num_bins: int) -> int:
    """ceil(total / num_bins): the largest bin load is at least the average (integer loads)."""
    return -(-int(total) // num_bins)


def balance_cuts(w: np.ndarray, num_bins: int) -> tuple[int, int]:
    """(average-load cut, largest-share cut) on the largest bin load of per-copy loads w [E] (one copy each)."""
    return average_cut(int(w.sum()), num_bins), int(w.max(initial=0))


def balance_bound(ws: list[np.ndarray], num_bins: int) -> int:
    """Lower bound on the scenario-summed largest GPU load (integer units); valid without solving."""
    return sum(max(balance_cuts(w, num_bins)) for w in ws)


def gpu_maxes(ws: list[np.ndarray], assign: np.ndarray) -> np.ndarray:
    """[S] largest GPU load per scenario (integer units) of assign [E, D]."""
    return np.array([int((w[:, None] * assign).sum(axis=0).max()) for w in ws], dtype=np.int64)


def node_traffic(traffic: np.ndarray, devices_per_node: int) -> np.ndarray:
    """[E, N] node-level cost of a copy: the mean of the node's GPUs' costs, rounded (traffic [E, D] int)."""
    e_count = traffic.shape[0]
    n_count = traffic.shape[1] // devices_per_node
    return np.rint(traffic.reshape(e_count, n_count, devices_per_node).mean(axis=2)).astype(np.int64)


# --------------------------------------------------------------------------- balance


def _sharpen_balance(task: LayerTask) -> LayerTask:
    """Swap local search on the warm start (same objective); keeps the migration cap; the rest of the time to CP-SAT."""
    shares = np.stack([ld / task.counts for ld in task.loads()])
    hint = improve_layer(np.asarray(task.hint, dtype=np.int8), shares, task.problem.slots_per_device,
                         np.inf if task.deterministic else SWAP_SHARE * task.time_limit_s,
                         max_swaps=SWAP_CAP_DETERMINISTIC if task.deterministic else None)
    cur = task.current
    if task.capped_moves and int((hint * (1 - cur)).sum()) > task.max_moves:
        hint = np.asarray(cur, dtype=np.int8) if np.all(cur.sum(axis=1) == task.counts) else hint
    return replace(task, hint=hint, time_limit_s=task.time_limit_s * (1 - SWAP_SHARE))


def _build_balance(m: cp_model.CpModel, x: list[list], mxs: list, data: LayerData) -> None:
    m.Minimize(cp_model.LinearExpr.sum(mxs))


def _balance_value(data: LayerData, assign: np.ndarray) -> int:
    return int(gpu_maxes(data.ws, assign).sum())


def _balance_node_bound(data: LayerData, node_bound: float, num_devices: int, devices_per_node: int) -> float:
    node = math.ceil(node_bound / devices_per_node - BOUND_TOL) if math.isfinite(node_bound) else 0
    return max(balance_bound(data.ws, num_devices), node)


# --------------------------------------------------------------------------- traffic


def _build_traffic(m: cp_model.CpModel, x: list[list], mxs: list, data: LayerData) -> None:
    tc = data.traffic
    ei, di = np.nonzero(tc)
    m.Minimize(cp_model.LinearExpr.weighted_sum([x[e][d] for e, d in zip(ei, di)], [int(c) for c in tc[ei, di]]))


def _traffic_value(data: LayerData, assign: np.ndarray) -> int:
    return int((data.traffic * assign).sum())


def _traffic_node_value(data: LayerData, assign: np.ndarray, devices_per_node: int) -> float:
    e_count, n_count = assign.shape[0], assign.shape[1] // devices_per_node
    per_node = assign.reshape(e_count, n_count, devices_per_node).sum(axis=2)
    return float((node_traffic(data.traffic, devices_per_node) * per_node).sum())


def _traffic_node_bound(data: LayerData, node_bound: float, num_devices: int, devices_per_node: int) -> float:
    return max(0.0, node_bound) if math.isfinite(node_bound) else 0.0


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Stage:
    """One layer model. Objective values are integers in model units; divide by ``unit(data)`` to report.

    build(model, x, mxs, data): set the objective on x[e][d] (copy of e on GPU d) and mxs (per-scenario
    max GPU load variables); bound(data, num_devices): a lower bound valid without solving;
    evaluate(data, assign [E, D]): the objective of an assignment; node_value / node_bound: what the
    hierarchical models report (node-level objective; bound from the node model's bound)."""

    name: str
    summary: str
    coupled: bool  # layers coupled through their neighbours: block coordinate descent, needs problem.affinity
    time_units: int  # share of the solve's time budget per wave of layers
    caps_later: bool  # later stages keep this stage's max GPU load within (1 + balance_tolerance)
    node_share: float  # hierarchical: share of a layer's limit for the node model (the GPU models are small)
    unit: Callable[[LayerData], int]
    build: Callable[[cp_model.CpModel, list, list, LayerData], None]
    bound: Callable[[LayerData, int], int]
    evaluate: Callable[[LayerData, np.ndarray], int]
    node_value: Callable[[LayerData, np.ndarray, int], float]
    node_bound: Callable[[LayerData, float, int, int], float]
    sharpen: Callable[[LayerTask], LayerTask] | None = None  # improve the warm start before CP-SAT


STAGES: dict[str, Stage] = {
    "balance": Stage(
        name="balance", summary="smallest (scenario-averaged) largest GPU load, in tokens",
        coupled=False,
        time_units=2,  # the stage that pays in simulated time gets twice a traffic half-sweep's time
        caps_later=True,
        node_share=0.7,  # the per-node GPU models are small: most of the time goes to the node model
        unit=lambda data: data.scale * len(data.ws),  # mean over nominal + scenarios, in tokens
        build=_build_balance,
        bound=lambda data, num_devices: balance_bound(data.ws, num_devices),
        evaluate=_balance_value,
        node_value=lambda data, assign, dpn: _balance_value(data, assign),
        node_bound=_balance_node_bound,
        sharpen=_sharpen_balance),
    "traffic": Stage(
        name="traffic", summary="smallest inter-layer crossing cost (ExFlow/MoETuner affinity), neighbours fixed",
        coupled=True,
        time_units=1,
        caps_later=False,
        node_share=0.85,  # within a node only NVLink crossings (cost 1 vs 9 across nodes) are left to optimise
        unit=lambda data: TRAFFIC_SCALE,
        build=_build_traffic,
        bound=lambda data, num_devices: 0,  # costs are >= 0
        evaluate=_traffic_value,
        node_value=_traffic_node_value,
        node_bound=_traffic_node_bound),
}

#: objective name -> its stages, solved in order
OBJECTIVES: dict[str, tuple[Stage, ...]] = {
    "balance": (STAGES["balance"],),
    "traffic": (STAGES["traffic"],),
    "joint": (STAGES["balance"], STAGES["traffic"]),
}
