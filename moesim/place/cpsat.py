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

Multi-node systems whose flat layer model exceeds ``HIER_MIN_DECISIONS`` (experts x GPUs) are solved
by the node-then-GPU decomposition of :mod:`moesim.place.hier` (DeepSeek-V3 scale on few cores).

All three accept a migration cap: at most ``max_moves`` new (expert, GPU) copies per layer that
the current placement does not have. Every solve is warm-started (AddHint) from the greedy packing
or the incumbent (for balance: greedy sharpened by swap local search, :mod:`moesim.place.local`),
honours its time limit, and reports the proven bound.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from ortools.sat.python import cp_model

from moesim.place.baselines import greedy_assignment, replica_counts
from moesim.place import hier
from moesim.place.local import improve_layer
from moesim.place.problem import PlacementProblem, assignment_to_placement
from moesim.placement import Placement, PlacementError

OBJECTIVES = ("balance", "traffic", "joint")
_STATUS = {cp_model.OPTIMAL: "optimal", cp_model.FEASIBLE: "feasible", cp_model.INFEASIBLE: "infeasible",
           cp_model.UNKNOWN: "unknown", cp_model.MODEL_INVALID: "invalid"}
TRAFFIC_SCALE = 10  # traffic costs are rounded to 1/10 of a token-NVLink crossing
HIER_MIN_DECISIONS = 4096  # experts x GPUs per layer above which multi-node problems are solved hierarchically


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


def _share_scale(counts: np.ndarray) -> int:
    """Integer scale for per-replica shares ``load * scale / count`` (exact when lcm(counts) <= 720)."""
    lcm = math.lcm(*[int(c) for c in np.unique(counts)])
    return lcm if lcm <= 720 else 720


def _solve_layer(problem: PlacementProblem, layer: int, counts: np.ndarray, hint: np.ndarray, stage: str,
                 time_limit_s: float, num_workers: int, seed: int, traffic_cost: np.ndarray | None = None,
                 max_load: int | None = None, current: np.ndarray | None = None,
                 max_moves: int | None = None, deterministic: bool = False,
                 deadline_at_s: float | None = None, hierarchical: bool = False) -> tuple[np.ndarray, LayerSolve, int]:
    """One layer's model. counts [E], hint/current [E, D] 0/1, traffic_cost [E, D] (cost of a copy of
    e on GPU d, float). Returns (assign [E, D] int8, report, best max-load in scaled units)."""
    e_count, d_count, spd = problem.num_experts, problem.num_devices, problem.slots_per_device
    if deadline_at_s is not None and not deterministic:  # never run past the stage's deadline
        time_limit_s = min(time_limit_s, deadline_at_s - time.perf_counter())
    loads = [problem.load[layer]]
    if problem.scenarios is not None:
        loads += [sc[layer] for sc in problem.scenarios]
    limit0_s, t_swap = time_limit_s, time.perf_counter()
    if stage == "balance" and d_count > 1:  # sharpen the greedy warm start with swap local search
        shares = np.stack([ld / counts for ld in loads])
        hint = improve_layer(np.asarray(hint, dtype=np.int8), shares, spd,
                             np.inf if deterministic else 0.25 * time_limit_s,
                             max_swaps=5000 if deterministic else None)
        if current is not None and max_moves is not None and int((hint * (1 - current)).sum()) > max_moves:
            hint = np.asarray(current, dtype=np.int8) if np.all(current.sum(axis=1) == counts) else hint
        time_limit_s *= 0.75
    scale = _share_scale(counts)
    ws = [np.rint(ld.astype(float) * scale / counts).astype(np.int64) for ld in loads]
    if deadline_at_s is not None and not deterministic and deadline_at_s - time.perf_counter() < 0.05:
        return _keep_hint(layer, stage, hint, ws, scale, counts, spd, traffic_cost, max_load, current, max_moves,
                          0.0, "time-out")
    if hierarchical and (current is None or max_moves is None):  # the swap search usually stops early: reuse its time
        return _solve_layer_hier(problem, layer, counts, hint, stage, ws, scale,
                                 limit0_s - (time.perf_counter() - t_swap), num_workers, seed,
                                 traffic_cost, max_load, deterministic, deadline_at_s)
    m = cp_model.CpModel()
    x = [[m.NewBoolVar(f"x{e}_{d}") for d in range(d_count)] for e in range(e_count)]
    lin = cp_model.LinearExpr
    cols = [[x[e][d] for e in range(e_count)] for d in range(d_count)]
    for e in range(e_count):
        m.Add(lin.sum(x[e]) == int(counts[e]))
    for d in range(d_count):
        m.Add(lin.sum(cols[d]) <= spd)
    mxs = []
    for s_i, w in enumerate(ws):  # max GPU load of the nominal load and of each scenario
        mx = m.NewIntVar(0, int(w.sum()), f"max_load{s_i}")
        nz = np.flatnonzero(w)
        coeffs = [int(c) for c in w[nz]]
        for d in range(d_count):
            m.Add(lin.weighted_sum([cols[d][e] for e in nz], coeffs) <= mx)
        m.Add(mx >= -(-int(w.sum()) // d_count))  # average-load cut
        m.Add(mx >= int(w.max(initial=0)))
        mxs.append(mx)
    total_mx = lin.sum(mxs)
    if max_load is not None:
        m.Add(total_mx <= int(max_load))
    if current is not None and max_moves is not None:
        m.Add(lin.sum([x[e][d] for e, d in zip(*np.nonzero(current == 0))]) <= int(max_moves))
    for e in range(e_count):
        for d in range(d_count):
            m.AddHint(x[e][d], bool(hint[e, d]))
    if stage == "balance":
        m.Minimize(total_mx)
        unit = scale * len(ws)  # objective: mean over nominal + scenarios of the max GPU load, in tokens
    else:
        tc = np.rint(traffic_cost * TRAFFIC_SCALE).astype(np.int64)
        ei, di = np.nonzero(tc)
        m.Minimize(lin.weighted_sum([x[e][d] for e, d in zip(ei, di)], [int(c) for c in tc[ei, di]]))
        unit = TRAFFIC_SCALE
    solver = cp_model.CpSolver()
    if deadline_at_s is not None and not deterministic:  # model building took some of the time
        time_limit_s = min(time_limit_s, deadline_at_s - time.perf_counter())
    solver.parameters.max_time_in_seconds = max(0.05, float(time_limit_s))
    solver.parameters.num_workers = max(1, int(num_workers))
    solver.parameters.random_seed = int(seed)
    if deterministic:  # reproducible: deterministic time instead of wall time, interleaved workers
        solver.parameters.max_time_in_seconds = 1e9
        solver.parameters.max_deterministic_time = max(0.05, float(time_limit_s))
        solver.parameters.interleave_search = True
    t0 = time.perf_counter()
    status = solver.Solve(m)
    wall_s = time.perf_counter() - t0
    bound = solver.BestObjectiveBound() / unit
    if stage == "balance":  # the cuts above are a valid bound even when presolve did not finish
        bound = max(bound, sum(max(-(-int(w.sum()) // d_count), int(w.max(initial=0))) for w in ws) / unit)
    else:
        bound = max(bound, 0.0)
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        assign = np.array([[solver.Value(x[e][d]) for d in range(d_count)] for e in range(e_count)], dtype=np.int8)
        rep = LayerSolve(layer=layer, stage=stage, status=_STATUS[status], objective=solver.ObjectiveValue() / unit,
                         bound=min(bound, solver.ObjectiveValue() / unit), wall_s=wall_s)
        try:  # CP-SAT may return a solution worse than the hint when stopped early: keep the better one
            kept = _keep_hint(layer, stage, hint, ws, scale, counts, spd, traffic_cost, max_load, current, max_moves,
                              wall_s, "warm-start", bound)
        except PlacementError:
            kept = None
        if kept is not None and kept[1].objective < rep.objective - 1e-9:
            return kept
        return assign, rep, int(sum(solver.Value(v) for v in mxs))
    if status == cp_model.INFEASIBLE:
        raise PlacementError(f"layer {layer} ({stage}): infeasible: "
                             + ("the migration cap is too small for these replica counts" if max_moves is not None
                                else "no placement satisfies the constraints"))
    return _keep_hint(layer, stage, hint, ws, scale, counts, spd, traffic_cost, max_load, current, max_moves, wall_s,
                      "warm-start", bound)


def _solve_layer_hier(problem, layer, counts, hint, stage, ws, scale, time_limit_s, num_workers, seed, traffic_cost,
                      max_load, deterministic, deadline_at_s):
    """:func:`_solve_layer` by the node-then-GPU decomposition of :mod:`moesim.place.hier`."""
    dpn, spd = problem.devices_per_node, problem.slots_per_device
    hint = np.asarray(hint, dtype=np.int8)
    if deadline_at_s is not None and not deterministic:
        time_limit_s = min(time_limit_s, deadline_at_s - time.perf_counter())
    t0 = time.perf_counter()
    tc = gpu_caps = None
    if stage != "balance":
        tc = np.rint(traffic_cost * TRAFFIC_SCALE).astype(np.int64)
        if max_load is not None:  # per-scenario caps: the hint's maxima, scaled to the total cap
            hint_mx = hier.gpu_maxes(ws, hint)
            gpu_caps = np.floor(hint_mx * (int(max_load) / max(int(hint_mx.sum()), 1))).astype(np.int64)
    assign, status, node_obj, node_bound = hier.solve_layer(
        ws, counts, hint, dpn, spd, stage=stage, time_limit_s=max(0.02, time_limit_s), num_workers=num_workers,
        seed=seed, deterministic=deterministic, traffic_cost=tc, gpu_caps=gpu_caps)
    wall_s = time.perf_counter() - t0
    ok = np.all(assign.sum(axis=1) == counts) and np.all(assign.sum(axis=0) <= spd) and assign.max() <= 1
    mx_new, mx_hint = hier.gpu_maxes(ws, assign), hier.gpu_maxes(ws, hint)
    if max_load is not None:
        ok = ok and int(mx_new.sum()) <= int(max_load)
    n_count = hint.shape[1] // dpn
    if stage == "balance":
        unit = scale * len(ws)
        better = ok and mx_new.sum() < mx_hint.sum()
        cut = sum(max(-(-int(w.sum()) // hint.shape[1]), int(w.max(initial=0))) for w in ws)
        bound = max(cut, math.ceil(node_bound / dpn - 1e-9) if math.isfinite(node_bound) else 0) / unit
        chosen = assign if better else hint
        obj = int(hier.gpu_maxes(ws, chosen).sum()) / unit
    else:
        unit = TRAFFIC_SCALE
        better = ok and int((tc * assign).sum()) < int((tc * hint).sum())
        chosen = assign if better else hint
        node_cost = np.rint(tc.reshape(len(counts), n_count, dpn).mean(axis=2)).astype(np.int64)
        obj = float((node_cost * chosen.reshape(len(counts), n_count, dpn).sum(axis=2)).sum()) / unit
        bound = max(0.0, node_bound / unit) if math.isfinite(node_bound) else 0.0
    status = ("optimal" if obj <= bound + 1e-12 else "feasible") if better else "warm-start"
    rep = LayerSolve(layer=layer, stage=stage, status=status, objective=obj,
                     bound=min(bound, obj), wall_s=wall_s)
    return chosen.copy(), rep, int(hier.gpu_maxes(ws, chosen).sum())


def _keep_hint(layer, stage, hint, ws, scale, counts, spd, traffic_cost, max_load, current, max_moves, wall_s,
               status, bound=None):
    """No CP-SAT solution in time: keep the warm start when it satisfies every constraint."""
    hint = np.asarray(hint, dtype=np.int8)
    hint_mx = int(sum((w[:, None] * hint).sum(axis=0).max() for w in ws))
    ok = (np.all(hint.sum(axis=1) == counts) and np.all(hint.sum(axis=0) <= spd)
          and (max_load is None or hint_mx <= max_load)
          and (current is None or max_moves is None or int((hint * (1 - current)).sum()) <= max_moves))
    if not ok:
        why = "the migration cap is too small for these replica counts" if max_moves is not None else \
            "no feasible placement"
        raise PlacementError(f"layer {layer} ({stage}): CP-SAT found no solution within the time limit and the "
                             f"warm start violates a constraint ({why}); raise --time-limit")
    d_count = hint.shape[1]
    if stage == "balance":
        unit = scale * len(ws)
        obj = hint_mx / unit
        lb = sum(max(-(-int(w.sum()) // d_count), int(w.max(initial=0))) for w in ws) / unit
    else:
        unit = TRAFFIC_SCALE
        obj = float((np.rint(traffic_cost * TRAFFIC_SCALE) * hint).sum()) / unit
        lb = 0.0
    bound = lb if bound is None else max(bound, lb)
    return hint.copy(), LayerSolve(layer=layer, stage=stage, status=status, objective=obj, bound=min(bound, obj),
                                   wall_s=wall_s), hint_mx


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


def solve(problem: PlacementProblem, objective: str, *, time_limit_s: float = 30.0, num_workers: int | None = None,
          current: Placement | None = None, max_moves: int | None = None, balance_tolerance: float = 0.0,
          sweeps: int = 1, seed: int = 0, deterministic: bool = False, hierarchical: bool | None = None,
          progress: Callable[[int, int], None] | None = None) -> tuple[Placement, SolveReport]:
    """Solve ``objective`` (balance | traffic | joint) within about ``time_limit_s`` seconds of wall
    time on ``num_workers`` threads (default: all cores). Returns the placement and a report.

    ``deterministic``: reproducible runs (CP-SAT deterministic time units instead of wall seconds,
    interleaved search, a swap cap in the local search); the wall time may then differ from the limit.

    ``hierarchical``: solve each layer as a node model then one GPU model per node
    (:mod:`moesim.place.hier`); default (None): when the system has several nodes and a layer's flat
    model would exceed :data:`HIER_MIN_DECISIONS` experts x GPUs. Not used with a migration cap."""
    if objective not in OBJECTIVES:
        raise PlacementError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    if time_limit_s <= 0:
        raise PlacementError(f"time limit must be > 0 s, got {time_limit_s}")
    if max_moves is not None and max_moves < 0:
        raise PlacementError(f"max_moves must be >= 0, got {max_moves}")
    p = problem
    workers = num_workers or default_workers()
    t_start = time.perf_counter()
    report = SolveReport(objective=objective, time_limit_s=time_limit_s, num_workers=workers)
    counts = replica_counts(p.load, p.num_replicas, p.num_devices)
    hint = greedy_assignment(p, counts)
    cur = None
    if current is not None:
        current.check_fits(p.num_layers, p.num_experts, p.num_devices)
        from moesim.place.problem import placement_to_assignment
        cur = placement_to_assignment(current)
    # CP-SAT needs >= 2 workers for its LNS portfolio; run the remaining cores' worth of layers in parallel
    parallel = max(1, min(workers // 2, p.num_layers))
    per_solve_workers = max(2, workers // parallel)
    if hierarchical is None:
        hierarchical = (p.num_devices > p.devices_per_node and p.num_experts * p.num_devices > HIER_MIN_DECISIONS)
    stages = {"balance": ["balance"], "traffic": ["traffic"], "joint": ["balance", "traffic"]}[objective]
    # time budget: balance gets 2 units (it is the stage that pays in simulated time), each traffic half-sweep 1
    # hierarchical: one half-sweep (odd layers, even layers fixed) per sweep; it already covers every pair
    # (l, l+1) of consecutive layers, and the node models need the time (about 0.3 s each on 2 cores)
    parities = (1,) if hierarchical and p.num_layers > 1 else (1, 0)
    units = sum(2 if s == "balance" else len(parities) * sweeps for s in stages)
    safety = 0.9  # leave time for model building and bookkeeping
    total = [0]
    n_traffic = sweeps * sum(1 for l in range(p.num_layers) if l % 2 in parities)
    n_total = sum(p.num_layers if s == "balance" else n_traffic for s in stages)

    def run_wave(layers: list[int], stage: str, budget_s: float, fn) -> None:
        waves = -(-len(layers) // parallel)
        limit = budget_s * safety / max(waves, 1)
        deadline = time.perf_counter() + budget_s * safety
        with ThreadPoolExecutor(max_workers=parallel) as ex:
            for layer, (a, rep, mx) in zip(layers, ex.map(lambda l: fn(l, limit, deadline), layers)):
                fn.result(layer, a, rep, mx)
                report.solves.append(rep)
                total[0] += 1
                if progress is not None:
                    progress(total[0], n_total)

    assign = hint.copy()
    max_load = np.zeros(p.num_layers, dtype=np.int64)
    unit_s = time_limit_s / units
    if "balance" in stages:
        class Bal:
            @staticmethod
            def __call__(layer, limit, deadline):
                return _solve_layer(p, layer, counts[layer], hint[layer], "balance", limit, per_solve_workers, seed,
                                    current=None if cur is None else cur[layer], max_moves=max_moves,
                                    deterministic=deterministic, deadline_at_s=deadline, hierarchical=hierarchical)

            @staticmethod
            def result(layer, a, rep, mx):
                assign[layer] = a
                max_load[layer] = mx
        run_wave(list(range(p.num_layers)), "balance", 2 * unit_s, Bal())
    if "traffic" in stages:
        if p.affinity is None:
            raise PlacementError("the traffic and joint objectives need the inter-layer affinity (problem.affinity)")
        cap = None
        if objective == "joint":
            cap = np.floor(max_load * (1.0 + balance_tolerance)).astype(np.int64)

        class Tra:
            @staticmethod
            def __call__(layer, limit, deadline):
                tc = traffic_cost_matrix(p, layer, assign, counts)
                return _solve_layer(p, layer, counts[layer], assign[layer], "traffic", limit, per_solve_workers,
                                    seed, traffic_cost=tc, max_load=None if cap is None else cap[layer],
                                    current=None if cur is None else cur[layer], max_moves=max_moves,
                                    deterministic=deterministic, deadline_at_s=deadline, hierarchical=hierarchical)

            @staticmethod
            def result(layer, a, rep, mx):
                assign[layer] = a

        for _ in range(sweeps):
            for parity in parities:
                layers = [l for l in range(p.num_layers) if l % 2 == parity]
                if layers:
                    run_wave(layers, "traffic", unit_s, Tra())
    report.wall_s = time.perf_counter() - t_start
    return assignment_to_placement(assign, p, objective), report


def _cpsat_balance(problem: PlacementProblem, rng: np.random.Generator) -> Placement:
    """The CP-SAT balance model as a plain placer (for studies): 10 s per problem, deterministic."""
    placement, _ = solve(problem, "balance", time_limit_s=10.0, seed=int(rng.integers(2**31 - 1)), deterministic=True)
    return placement


# optimising placers with the baselines' signature ``(problem, rng) -> Placement``
PLACERS: dict[str, Callable[[PlacementProblem, np.random.Generator], Placement]] = {"cpsat-balance": _cpsat_balance}
