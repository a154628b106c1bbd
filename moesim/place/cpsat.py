"""Placement models solved with OR-Tools CP-SAT, one small model per MoE layer.

Decision: ``x[e, d]`` = 1 when GPU d holds a copy of expert e (at most one copy per GPU). Replica
counts ``r[e]`` are fixed beforehand by :func:`moesim.place.baselines.replica_counts` (the greedy
apportionment that minimises the largest per-replica share; it is optimal for that sub-problem),
so the split rule "each replica serves 1/r of its expert's tokens" keeps the models linear.

- balance: minimise ``M`` s.t. ``sum_e load[e]/r[e] * x[e, d] <= M`` for every GPU, ``sum_d x[e, d] = r[e]``,
  ``sum_e x[e, d] <= slots_per_device``. Layers are independent: solved in parallel threads.
- traffic: minimise the inter-layer crossing cost (ExFlow/MoETuner affinity): tokens that chose e
  at layer l and f at layer l+1 pay ``cost(GPU of e, GPU of f)`` (0 same GPU, 1 across NVLink,
  ``cross_node_cost`` across nodes = NVLink/network bandwidth ratio), each side split evenly over
  replicas. Layers are coupled through their neighbours, so the model is solved by block
  coordinate descent: odd layers with even layers fixed (in parallel), then even layers with odd
  layers fixed (in parallel); each sub-problem is linear.
- joint: lexicographic with a tolerance: first the balance optimum ``M*`` per layer, then the
  traffic model under ``M <= (1 + balance_tolerance) * M*`` (M: the balance objective).

These are rows of :mod:`moesim.place.objectives` (``OBJECTIVES``: stages in order; ``STAGES``: build,
bound, evaluate); the code here builds the shared layer model and schedules the stages, by their
attributes, never by their names. A layer's solve takes one :class:`~moesim.place.objectives.LayerTask`.

Multi-node systems whose flat layer model exceeds ``HIER_MIN_DECISIONS`` (experts x GPUs) are solved
by the node-then-GPU decomposition of :mod:`moesim.place.hier` (DeepSeek-V3 scale on few cores).

All three accept a migration cap: at most ``max_moves`` new (expert, GPU) copies per layer that
the current placement does not have. Every solve is warm-started (AddHint) from the greedy packing
or the incumbent (for balance: greedy sharpened by swap local search, :mod:`moesim.place.local`),
honours its time limit, and reports the proven bound.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
from ortools.sat.python import cp_model

from moesim.place import hier
from moesim.place.baselines import greedy_assignment, replica_counts
from moesim.place.objectives import (OBJECTIVES, STAGES, TRAFFIC_SCALE, LayerData, LayerTask, Stage, balance_cuts,
                                     gpu_maxes, layer_data)
from moesim.place.problem import PlacementProblem, assignment_to_placement, placement_to_assignment
from moesim.placement import Placement, PlacementError

__all__ = ["HIER_MIN_DECISIONS", "OBJECTIVES", "TRAFFIC_SCALE", "LayerSolve", "SolveReport", "default_workers",
           "solve", "traffic_cost_matrix", "traffic_of"]

_STATUS = {cp_model.OPTIMAL: "optimal", cp_model.FEASIBLE: "feasible", cp_model.INFEASIBLE: "infeasible",
           cp_model.UNKNOWN: "unknown", cp_model.MODEL_INVALID: "invalid"}
HIER_MIN_DECISIONS = 4096  # experts x GPUs per layer above which multi-node problems are solved hierarchically
MIN_LIMIT_S = 0.05  # CP-SAT limit floor (seconds or deterministic units): it always gets a moment to improve the hint
MIN_LEFT_S = 0.05  # a layer whose stage deadline is closer than this keeps its warm start (status time-out)
MIN_HIER_LIMIT_S = 0.02  # the hierarchical models' floor (they split it further over node and GPU models)
NO_WALL_LIMIT_S = 1e9  # deterministic runs stop on deterministic time only, never on wall seconds
OBJECTIVE_TOL = 1e-9  # CP-SAT's solution replaces the warm start only when better by more than float noise
OPTIMAL_TOL = 1e-12  # hierarchical: an objective this close to the proven bound is reported optimal
BUILD_RESERVE = 0.9  # a stage's solves may use 90% of its budget: the rest is model building and bookkeeping
MIN_WORKERS_PER_SOLVE = 2  # CP-SAT needs >= 2 workers for its LNS portfolio (1 worker found nothing in 0.4 s)


@dataclass
class LayerSolve:
    """One CP-SAT solve: ``objective`` and ``bound`` in the model's units (tokens for balance,
    token-crossing cost for traffic); ``gap`` = (objective - bound) / objective."""

    layer: int
    stage: str
    status: str
    objective: float
    bound: float
    wall_s: float

    @property
    def gap(self) -> float:
        return 0.0 if self.objective <= 0 else max(0.0, (self.objective - self.bound) / self.objective)


@dataclass
class SolveReport:
    objective: str
    time_limit_s: float
    num_workers: int
    wall_s: float = 0.0
    solves: list[LayerSolve] = field(default_factory=list)

    def stage(self, name: str) -> list[LayerSolve]:
        return [s for s in self.solves if s.stage == name]

    def summary(self) -> dict:
        out = {"objective": self.objective, "time_limit_s": self.time_limit_s, "num_workers": self.num_workers,
               "wall_s": round(self.wall_s, 3)}
        for name in sorted({s.stage for s in self.solves}):
            ss = self.stage(name)
            # for traffic, keep the last sweep of each layer
            last = {s.layer: s for s in ss}
            obj = sum(s.objective for s in last.values())
            bound = sum(s.bound for s in last.values())
            out[name] = {"layers": len(last), "optimal_layers": sum(s.status == "optimal" for s in last.values()),
                         "objective_sum": obj, "bound_sum": bound,
                         "gap": 0.0 if obj <= 0 else max(0.0, (obj - bound) / obj),
                         "max_layer_gap": max(s.gap for s in last.values())}
        return out


Result = tuple[np.ndarray, LayerSolve, int]  # (assign [E, D] int8, report, scenario-summed max GPU load, scaled)


def _clamped(task: LayerTask, limit_s: float) -> float:
    """Wall-time runs never run past the stage's deadline; deterministic runs ignore it."""
    if task.deadline_at_s is None or task.deterministic:
        return limit_s
    return min(limit_s, task.deadline_at_s - time.perf_counter())


def _solve_layer(task: LayerTask) -> Result:
    """One layer's model (one stage, :data:`moesim.place.objectives.STAGES`)."""
    stage = STAGES[task.stage]
    task = replace(task, time_limit_s=_clamped(task, task.time_limit_s))
    limit0_s, t_swap = task.time_limit_s, time.perf_counter()
    if stage.sharpen is not None and task.problem.num_devices > 1:
        task = stage.sharpen(task)
    data = layer_data(task)
    if task.deadline_at_s is not None and not task.deterministic and \
            task.deadline_at_s - time.perf_counter() < MIN_LEFT_S:
        return _keep_hint(task, data, 0.0, "time-out")
    if task.hierarchical and not task.capped_moves:  # the swap search usually stops early: reuse its time
        left_s = limit0_s if task.deterministic else limit0_s - (time.perf_counter() - t_swap)
        return _solve_layer_hier(replace(task, time_limit_s=left_s), data)
    if task.capped_moves and _moves_needed(task) > task.max_moves:  # CP-SAT 9.15 aborts on this with interleave_search
        raise _infeasible(task)
    m, x, mxs = _flat_model(task, data)
    stage.build(m, x, mxs, data)
    unit = stage.unit(data)
    solver = _solver(task, _clamped(task, task.time_limit_s))  # model building took some of the time
    t0 = time.perf_counter()
    status = solver.Solve(m)
    wall_s = time.perf_counter() - t0
    # the cuts are a valid bound even when presolve did not finish
    bound = max(solver.BestObjectiveBound() / unit, stage.bound(data, task.problem.num_devices) / unit)
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return _better_of(task, data, solver, x, mxs, status, bound, wall_s)
    if status == cp_model.INFEASIBLE:
        raise _infeasible(task)
    return _keep_hint(task, data, wall_s, "warm-start", bound)


def _moves_needed(task: LayerTask) -> int:
    """New copies any placement with these counts needs (an expert keeps at most its current copies)."""
    return int(np.maximum(task.counts - task.current.sum(axis=1), 0).sum())


def _infeasible(task: LayerTask) -> PlacementError:
    return PlacementError(f"layer {task.layer} ({task.stage}): infeasible: "
                          + ("the migration cap is too small for these replica counts" if task.max_moves is not None
                             else "no placement satisfies the constraints"))


def _flat_model(task: LayerTask, data: LayerData) -> tuple[cp_model.CpModel, list[list], list]:
    """x[e][d] copy of e on GPU d; copies and slot constraints; per-scenario max GPU load variables with the
    balance cuts; the load cap, the migration cap and the warm start. The objective is the stage's."""
    p = task.problem
    e_count, d_count, spd = p.num_experts, p.num_devices, p.slots_per_device
    m = cp_model.CpModel()
    x = [[m.NewBoolVar(f"x{e}_{d}") for d in range(d_count)] for e in range(e_count)]
    lin = cp_model.LinearExpr
    cols = [[x[e][d] for e in range(e_count)] for d in range(d_count)]
    for e in range(e_count):
        m.Add(lin.sum(x[e]) == int(task.counts[e]))
    for d in range(d_count):
        m.Add(lin.sum(cols[d]) <= spd)
    mxs = []
    for s_i, w in enumerate(data.ws):  # max GPU load of the nominal load and of each scenario
        mx = m.NewIntVar(0, int(w.sum()), f"max_load{s_i}")
        nz = np.flatnonzero(w)
        coeffs = [int(c) for c in w[nz]]
        for d in range(d_count):
            m.Add(lin.weighted_sum([cols[d][e] for e in nz], coeffs) <= mx)
        average, largest = balance_cuts(w, d_count)
        m.Add(mx >= average)
        m.Add(mx >= largest)
        mxs.append(mx)
    if task.max_load is not None:
        m.Add(lin.sum(mxs) <= int(task.max_load))
    if task.capped_moves:
        m.Add(lin.sum([x[e][d] for e, d in zip(*np.nonzero(task.current == 0))]) <= int(task.max_moves))
    for e in range(e_count):
        for d in range(d_count):
            m.AddHint(x[e][d], bool(task.hint[e, d]))
    return m, x, mxs


def _solver(task: LayerTask, limit_s: float) -> cp_model.CpSolver:
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(MIN_LIMIT_S, float(limit_s))
    solver.parameters.num_workers = max(1, int(task.num_workers))
    solver.parameters.random_seed = int(task.seed)
    if task.deterministic:  # reproducible: deterministic time instead of wall time, interleaved workers
        solver.parameters.max_time_in_seconds = NO_WALL_LIMIT_S
        solver.parameters.max_deterministic_time = max(MIN_LIMIT_S, float(limit_s))
        solver.parameters.interleave_search = True
    return solver


def _better_of(task: LayerTask, data: LayerData, solver: cp_model.CpSolver, x: list[list], mxs: list, status: int,
               bound: float, wall_s: float) -> Result:
    """CP-SAT may return a solution worse than the hint when stopped early: keep the better one."""
    p = task.problem
    unit = STAGES[task.stage].unit(data)
    assign = np.array([[solver.Value(x[e][d]) for d in range(p.num_devices)] for e in range(p.num_experts)],
                      dtype=np.int8)
    rep = LayerSolve(layer=task.layer, stage=task.stage, status=_STATUS[status],
                     objective=solver.ObjectiveValue() / unit,
                     bound=min(bound, solver.ObjectiveValue() / unit), wall_s=wall_s)
    try:
        kept = _keep_hint(task, data, wall_s, "warm-start", bound)
    except PlacementError:
        kept = None
    if kept is not None and kept[1].objective < rep.objective - OBJECTIVE_TOL:
        return kept
    return assign, rep, int(sum(solver.Value(v) for v in mxs))


def _solve_layer_hier(task: LayerTask, data: LayerData) -> Result:
    """:func:`_solve_layer` by the node-then-GPU decomposition of :mod:`moesim.place.hier`."""
    stage = STAGES[task.stage]
    p = task.problem
    dpn, spd, ws = p.devices_per_node, p.slots_per_device, data.ws
    hint = np.asarray(task.hint, dtype=np.int8)
    limit_s = _clamped(task, task.time_limit_s)
    t0 = time.perf_counter()
    gpu_caps = None
    if data.traffic is not None and task.max_load is not None:  # per-scenario caps: the hint's maxima, scaled
        hint_mx = gpu_maxes(ws, hint)
        gpu_caps = np.floor(hint_mx * (int(task.max_load) / max(int(hint_mx.sum()), 1))).astype(np.int64)
    assign, status, node_obj, node_bound = hier.solve_layer(
        ws, task.counts, hint, dpn, spd, node_share=stage.node_share, time_limit_s=max(MIN_HIER_LIMIT_S, limit_s),
        num_workers=task.num_workers, seed=task.seed, deterministic=task.deterministic, traffic_cost=data.traffic,
        gpu_caps=gpu_caps)
    wall_s = time.perf_counter() - t0
    ok = np.all(assign.sum(axis=1) == task.counts) and np.all(assign.sum(axis=0) <= spd) and assign.max() <= 1
    if task.max_load is not None:
        ok = ok and int(gpu_maxes(ws, assign).sum()) <= int(task.max_load)
    unit = stage.unit(data)
    better = ok and stage.evaluate(data, assign) < stage.evaluate(data, hint)
    chosen = assign if better else hint
    obj = stage.node_value(data, chosen, dpn) / unit
    bound = stage.node_bound(data, node_bound, p.num_devices, dpn) / unit
    status = ("optimal" if obj <= bound + OPTIMAL_TOL else "feasible") if better else "warm-start"
    rep = LayerSolve(layer=task.layer, stage=task.stage, status=status, objective=obj, bound=min(bound, obj),
                     wall_s=wall_s)
    return chosen.copy(), rep, int(gpu_maxes(ws, chosen).sum())


def _keep_hint(task: LayerTask, data: LayerData, wall_s: float, status: str, bound: float | None = None) -> Result:
    """No (better) CP-SAT solution in time: keep the warm start when it satisfies every constraint."""
    stage = STAGES[task.stage]
    hint = np.asarray(task.hint, dtype=np.int8)
    hint_mx = int(gpu_maxes(data.ws, hint).sum())
    ok = (np.all(hint.sum(axis=1) == task.counts) and np.all(hint.sum(axis=0) <= task.problem.slots_per_device)
          and (task.max_load is None or hint_mx <= task.max_load)
          and (not task.capped_moves or int((hint * (1 - task.current)).sum()) <= task.max_moves))
    if not ok:
        why = "the migration cap is too small for these replica counts" if task.max_moves is not None else \
            "no feasible placement"
        raise PlacementError(f"layer {task.layer} ({task.stage}): CP-SAT found no solution within the time limit "
                             f"and the warm start violates a constraint ({why}); raise --time-limit")
    unit = stage.unit(data)
    obj = stage.evaluate(data, hint) / unit
    lb = stage.bound(data, hint.shape[1]) / unit
    bound = lb if bound is None else max(bound, lb)
    return hint.copy(), LayerSolve(layer=task.layer, stage=task.stage, status=status, objective=obj,
                                   bound=min(bound, obj), wall_s=wall_s), hint_mx


def traffic_cost_matrix(problem: PlacementProblem, layer: int, assign: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[E, D] cost of putting a copy of layer ``layer``'s expert e on GPU d, given the placements
    ``assign`` [L, E, D] of the neighbouring layers and replica ``counts`` [L, E] (even split)."""
    p = problem
    cost_dd = p.device_cost()
    out = np.zeros((p.num_experts, p.num_devices))
    if p.affinity is None:
        raise PlacementError("the traffic and joint objectives need the inter-layer affinity (problem.affinity)")
    if layer + 1 < p.num_layers:  # tokens of (e at l) then (f at l+1)
        nxt = assign[layer + 1] / counts[layer + 1][:, None]  # [F, D'] fraction of f's tokens on D'
        c_next = nxt @ cost_dd.T  # [F, D]: cost from GPU d to f's copies
        out += p.affinity[layer].astype(float) @ c_next
    if layer > 0:
        prv = assign[layer - 1] / counts[layer - 1][:, None]  # [E', D']
        out += p.affinity[layer - 1].T.astype(float) @ (prv @ cost_dd)
    return out / counts[layer][:, None]


def traffic_of(problem: PlacementProblem, assign: np.ndarray) -> float:
    """Total inter-layer crossing cost of assign [L, E, D] (the traffic objective, even split)."""
    p = problem
    counts = assign.sum(axis=2)
    total = 0.0
    for layer in range(p.num_layers - 1):
        a = assign[layer] / counts[layer][:, None]
        b = assign[layer + 1] / counts[layer + 1][:, None]
        total += float(np.einsum("ef,ed,dk,fk->", p.affinity[layer].astype(float), a, p.device_cost(), b))
    return total


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


@dataclass(frozen=True)
class _Plan:
    """How a solve spreads its time and cores: ``parallel`` layers at once, ``workers`` CP-SAT threads each;
    coupled stages sweep the layers of ``parities`` (odd first) ``sweeps`` times; ``unit_s`` per time unit."""

    parallel: int
    workers: int
    parities: tuple[int, ...]
    sweeps: int
    unit_s: float
    num_solves: int

    def waves(self, stage: Stage, num_layers: int) -> list[list[int]]:
        """The layers solved together, wave after wave: all layers at once, or odd/even half-sweeps."""
        if not stage.coupled:
            return [list(range(num_layers))]
        halves = [[l for l in range(num_layers) if l % 2 == parity] for parity in self.parities]
        return [layers for _ in range(self.sweeps) for layers in halves if layers]


def _plan(p: PlacementProblem, stages: tuple[Stage, ...], time_limit_s: float, workers: int, sweeps: int,
          hierarchical: bool) -> _Plan:
    parallel = max(1, min(workers // MIN_WORKERS_PER_SOLVE, p.num_layers))
    # hierarchical: one half-sweep (odd layers, even layers fixed) per sweep; it already covers every pair
    # (l, l+1) of consecutive layers, and the node models need the time (about 0.3 s each on 2 cores)
    parities = (1,) if hierarchical and p.num_layers > 1 else (1, 0)
    units = sum(s.time_units * (len(parities) * sweeps if s.coupled else 1) for s in stages)
    n_coupled = sweeps * sum(1 for l in range(p.num_layers) if l % 2 in parities)
    return _Plan(parallel=parallel, workers=max(MIN_WORKERS_PER_SOLVE, workers // parallel), parities=parities,
                 sweeps=sweeps, unit_s=time_limit_s / units,
                 num_solves=sum(n_coupled if s.coupled else p.num_layers for s in stages))


def _check(problem: PlacementProblem, objective: str, time_limit_s: float, max_moves: int | None) -> tuple[Stage, ...]:
    if objective not in OBJECTIVES:
        raise PlacementError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    if time_limit_s <= 0:
        raise PlacementError(f"time limit must be > 0 s, got {time_limit_s}")
    if max_moves is not None and max_moves < 0:
        raise PlacementError(f"max_moves must be >= 0, got {max_moves}")
    stages = OBJECTIVES[objective]
    if problem.affinity is None and any(s.coupled for s in stages):
        raise PlacementError("the traffic and joint objectives need the inter-layer affinity (problem.affinity)")
    return stages


def solve(problem: PlacementProblem, objective: str, *, time_limit_s: float = 30.0, num_workers: int | None = None,
          current: Placement | None = None, max_moves: int | None = None, balance_tolerance: float = 0.0,
          sweeps: int = 1, seed: int = 0, deterministic: bool = False, hierarchical: bool | None = None,
          progress: Callable[[int, int], None] | None = None) -> tuple[Placement, SolveReport]:
    """Solve ``objective`` (a key of :data:`OBJECTIVES`) within about ``time_limit_s`` seconds of wall
    time on ``num_workers`` threads (default: all cores). Returns the placement and a report.

    ``deterministic``: reproducible runs (CP-SAT deterministic time units instead of wall seconds,
    interleaved search, a swap cap in the local search); the wall time may then differ from the limit.

    ``hierarchical``: solve each layer as a node model then one GPU model per node
    (:mod:`moesim.place.hier`); default (None): when the system has several nodes and a layer's flat
    model would exceed :data:`HIER_MIN_DECISIONS` experts x GPUs. Not used with a migration cap."""
    stages = _check(problem, objective, time_limit_s, max_moves)
    p = problem
    workers = num_workers or default_workers()
    t_start = time.perf_counter()
    report = SolveReport(objective=objective, time_limit_s=time_limit_s, num_workers=workers)
    counts = replica_counts(p.load, p.num_replicas, p.num_devices)
    assign = greedy_assignment(p, counts)  # the warm start, then each stage's result
    cur = None
    if current is not None:
        current.check_fits(p.num_layers, p.num_experts, p.num_devices)
        cur = placement_to_assignment(current)
    if hierarchical is None:
        hierarchical = (p.num_devices > p.devices_per_node and p.num_experts * p.num_devices > HIER_MIN_DECISIONS)
    plan = _plan(p, stages, time_limit_s, workers, sweeps, hierarchical)
    max_load = np.zeros(p.num_layers, dtype=np.int64)
    cap = None
    for stage in stages:
        def task(layer: int, limit_s: float, deadline_at_s: float, stage: Stage = stage) -> LayerTask:
            return LayerTask(problem=p, layer=layer, counts=counts[layer], hint=assign[layer].copy(), stage=stage.name,
                             time_limit_s=limit_s, num_workers=plan.workers, seed=seed,
                             traffic_cost=traffic_cost_matrix(p, layer, assign, counts) if stage.coupled else None,
                             max_load=None if cap is None else cap[layer],
                             current=None if cur is None else cur[layer], max_moves=max_moves,
                             deterministic=deterministic, deadline_at_s=deadline_at_s, hierarchical=hierarchical)

        for layers in plan.waves(stage, p.num_layers):
            for layer, (a, rep, mx) in _run_wave(layers, stage.time_units * plan.unit_s, plan.parallel, task):
                assign[layer] = a
                max_load[layer] = mx
                report.solves.append(rep)
                if progress is not None:
                    progress(len(report.solves), plan.num_solves)
        if stage.caps_later:
            cap = np.floor(max_load * (1.0 + balance_tolerance)).astype(np.int64)
    report.wall_s = time.perf_counter() - t_start
    return assignment_to_placement(assign, p, objective), report


def _run_wave(layers: list[int], budget_s: float, parallel: int, task: Callable[[int, float, float], LayerTask]):
    """Solve ``layers`` ``parallel`` at a time within ``budget_s``; yields (layer, result) in layer order."""
    waves = -(-len(layers) // parallel)
    limit_s = budget_s * BUILD_RESERVE / max(waves, 1)
    deadline_at_s = time.perf_counter() + budget_s * BUILD_RESERVE
    with ThreadPoolExecutor(max_workers=parallel) as ex:
        yield from zip(layers, ex.map(lambda l: _solve_layer(task(l, limit_s, deadline_at_s)), layers))
