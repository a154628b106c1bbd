"""Hierarchical (node, then GPU) CP-SAT models for multi-node systems at DeepSeek-V3 scale.

The flat model of :mod:`moesim.place.cpsat` has ``experts x GPUs`` booleans per layer (16,384 for 256
experts on 64 GPUs); on a 2-core machine with a 30 s limit over 58 layers CP-SAT gets ~0.3 s per
layer and never beats the warm start. Here one layer is solved in two smaller steps:

1. **node model**: ``y[e, n]`` integer copies of expert e on node n (``0..min(copies[e], GPUs per
   node)``), ``sum_n y[e, n] = copies[e]``, ``sum_e y[e, n] <= GPUs per node x slots per GPU``;
   ``experts x nodes`` variables (8x fewer). Balance minimises the (scenario-summed) largest node
   load; traffic minimises the inter-layer crossing cost at node level, where the expensive
   (inter-node network) term lives.
2. **GPU models**, one per node: the node's copies on its GPUs (one copy of an expert per GPU, slot
   capacity), minimising the largest GPU load (balance) or the crossing cost under the balance
   stage's per-scenario GPU loads (joint).

Bound: any GPU placement induces a node placement whose largest node load is at most
``GPUs per node x`` its largest GPU load, so ``node-model bound / GPUs per node`` is a proven lower
bound on the full layer's (scenario-averaged) max GPU load; it is reported with the usual cuts.
For traffic, the reported objective and bound are those of the node-level sub-problem (neighbour
layers fixed, node-level costs: the mean over a node's GPUs of the GPU-level cost).
"""

from __future__ import annotations

import time

import numpy as np
from ortools.sat.python import cp_model

from moesim.place.local import improve_layer
from moesim.place.objectives import average_cut, gpu_maxes, node_traffic

_OK = (cp_model.OPTIMAL, cp_model.FEASIBLE)
_STATUS = {cp_model.OPTIMAL: "optimal", cp_model.FEASIBLE: "feasible", cp_model.INFEASIBLE: "infeasible"}
# (the node model's share of a layer's limit is a column of moesim.place.objectives.STAGES)
GPU_SHARE_DETERMINISTIC = 1 - 0.7  # deterministic runs: the per-node GPU models share 30% of the layer limit
MIN_LIMIT_S = 0.01  # CP-SAT limit floor: below it a model is not worth building
MIN_GPU_MODEL_S = 0.02  # wall-time runs: below this per-node limit the LPT + swap packing is used instead
SUB_SWAP_S = 0.02  # wall-time budget of the swap search on a node's LPT packing
SUB_SWAP_CAP = 200  # swaps of that search (a node holds ~36 copies: a few swaps each)
PRESOLVE_ITERATIONS = 1  # a light presolve: the full one takes ~0.17 s of a ~0.3 s budget on the node model
PROBING_LEVEL = 0  # no probing, for the same reason


def bin_model(ws: list[np.ndarray], copies: np.ndarray, num_bins: int, bin_slots: int, per_bin_max: int,
              hint: np.ndarray | None, *, cost: np.ndarray | None = None, load_caps: list[int] | None = None,
              time_limit_s: float, num_workers: int, seed: int,
              deterministic: bool) -> tuple[np.ndarray | None, str, float, float]:
    """Place ``copies[e]`` copies of each expert in ``num_bins`` bins of ``bin_slots`` slots, at most
    ``min(copies[e], per_bin_max)`` per bin (1 when bins are GPUs, GPUs per node when bins are nodes).

    ws: per-scenario integer per-copy weights, each [E]. cost [E, B] int or None: None minimises the
    sum over scenarios of the largest bin load; else minimises ``sum cost * y`` subject to
    ``load_caps[s]`` (scenario s's largest bin load, or None for no cap). hint [E, B] or None.
    Returns (y [E, B] int64 or None, status name, objective, bound) in the model's integer units."""
    e_count = len(copies)
    m = cp_model.CpModel()
    lin = cp_model.LinearExpr
    ub = np.minimum(copies, per_bin_max)
    y = [[(m.NewBoolVar("") if ub[e] <= 1 else m.NewIntVar(0, int(ub[e]), "")) for _ in range(num_bins)]
         for e in range(e_count)]
    for e in range(e_count):
        m.Add(lin.sum(y[e]) == int(copies[e]))
    cols = [[y[e][b] for e in range(e_count)] for b in range(num_bins)]
    for b in range(num_bins):
        m.Add(lin.sum(cols[b]) <= bin_slots)
    mxs = _bin_loads(m, cols, ws, copies, ub, num_bins, hint, cost, load_caps)
    if cost is None:
        m.Minimize(lin.sum(mxs))
    else:
        ei, bi = np.nonzero(cost)
        m.Minimize(lin.weighted_sum([y[e][b] for e, b in zip(ei, bi)], [int(c) for c in cost[ei, bi]]))
    if hint is not None:
        for e in range(e_count):
            for b in range(num_bins):
                m.AddHint(y[e][b], int(min(hint[e, b], ub[e])))
    solver = _solver(time_limit_s, num_workers, seed, deterministic)
    status = solver.Solve(m)
    name = _STATUS.get(status, "unknown")
    if status not in _OK:
        return None, name, float("inf"), solver.BestObjectiveBound() if status != cp_model.INFEASIBLE else 0.0
    out = np.array([[solver.Value(y[e][b]) for b in range(num_bins)] for e in range(e_count)], dtype=np.int64)
    return out, name, solver.ObjectiveValue(), solver.BestObjectiveBound()


def _bin_loads(m: cp_model.CpModel, cols: list[list], ws: list[np.ndarray], copies: np.ndarray, ub: np.ndarray,
               num_bins: int, hint: np.ndarray | None, cost: np.ndarray | None,
               load_caps: list[int] | None) -> list:
    """Per-scenario bin-load constraints of :func:`bin_model`; returns the max-load variables (balance only)."""
    lin = cp_model.LinearExpr
    mxs = []
    for s_i, w in enumerate(ws):
        nz = np.flatnonzero(w)
        coeffs = [int(c) for c in w[nz]]
        total = int((w * copies).sum())
        if cost is None:
            mx = m.NewIntVar(0, total, "")
            m.Add(mx >= average_cut(total, num_bins))
            if hint is not None:
                m.AddHint(mx, int((w[:, None] * np.minimum(hint, ub[:, None])).sum(axis=0).max()))
            mxs.append(mx)
        elif load_caps is None or load_caps[s_i] is None:
            continue
        else:
            mx = int(load_caps[s_i])
        for b in range(num_bins):
            m.Add(lin.weighted_sum([cols[b][e] for e in nz], coeffs) <= mx)
    return mxs


def _solver(time_limit_s: float, num_workers: int, seed: int, deterministic: bool) -> cp_model.CpSolver:
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = max(1, int(num_workers))
    solver.parameters.random_seed = int(seed)
    solver.parameters.max_presolve_iterations = PRESOLVE_ITERATIONS
    solver.parameters.cp_model_probing_level = PROBING_LEVEL
    if deterministic:
        solver.parameters.max_deterministic_time = max(MIN_LIMIT_S, float(time_limit_s))
        solver.parameters.interleave_search = True
    else:
        solver.parameters.max_time_in_seconds = max(MIN_LIMIT_S, float(time_limit_s))
    return solver


def _lpt(wsum: np.ndarray, copies: np.ndarray, num_bins: int, slots: int) -> np.ndarray | None:
    """Greedy packing of copies (largest summed weight first) on bins, one copy of an expert per bin."""
    out = np.zeros((len(copies), num_bins), dtype=np.int8)
    load = np.zeros(num_bins)
    free = np.full(num_bins, slots)
    for e in np.argsort(-wsum, kind="stable"):
        for _ in range(int(copies[e])):
            ok = (free > 0) & (out[e] == 0)
            if not ok.any():
                return None
            b = int(np.flatnonzero(ok)[np.argmin(load[ok])])
            out[e, b] = 1
            load[b] += wsum[e]
            free[b] -= 1
    return out


def solve_layer(ws: list[np.ndarray], counts: np.ndarray, hint: np.ndarray, devices_per_node: int,
                slots_per_device: int, *, node_share: float, time_limit_s: float, num_workers: int, seed: int,
                deterministic: bool, traffic_cost: np.ndarray | None = None,
                gpu_caps: np.ndarray | None = None) -> tuple[np.ndarray, str, float, float]:
    """One layer, node model then per-node GPU models.

    ws: per-scenario integer per-copy loads, each [E]; counts [E] copies; hint [E, D] 0/1 (feasible);
    traffic_cost [E, D] integer (traffic stages; None: minimise the largest load); gpu_caps [S]
    per-scenario max GPU load allowed (joint) or None; node_share: share of ``time_limit_s`` for the
    node model. Returns (assign [E, D] int8, status, node objective, node bound); the caller
    compares the assignment with the hint on the full objective and keeps the better one.
    Node-model objective/bound are in integer units (balance: sum over scenarios of max node load)."""
    t_end = time.perf_counter() + time_limit_s
    e_count, d_count = hint.shape
    n_count = d_count // devices_per_node
    node_hint = hint.reshape(e_count, n_count, devices_per_node).sum(axis=2)
    node_slots = devices_per_node * slots_per_device
    node_cost = None
    node_caps = None
    if traffic_cost is not None:
        node_cost = node_traffic(traffic_cost, devices_per_node)
        if gpu_caps is not None:  # node loads may not exceed the hint's largest node load (per scenario)
            node_caps = [int((w[:, None] * node_hint).sum(axis=0).max()) for w in ws]
    kw = dict(num_workers=num_workers, seed=seed, deterministic=deterministic)
    y, status, obj, bound = bin_model(ws, counts, n_count, node_slots, devices_per_node, node_hint, cost=node_cost,
                                      load_caps=node_caps, time_limit_s=node_share * time_limit_s, **kw)
    if y is None:
        return hint.copy(), status, obj, bound
    out = np.zeros_like(hint, dtype=np.int8)
    wsum = np.sum(ws, axis=0)
    caps = None if gpu_caps is None else [int(c) for c in gpu_caps]
    for n in range(n_count):
        sl = slice(n * devices_per_node, (n + 1) * devices_per_node)
        ex = np.flatnonzero(y[:, n])
        sub_ws = [w[ex] for w in ws]
        sub_hint = hint[ex, sl] if np.array_equal(y[:, n], node_hint[:, n]) else \
            _packed_hint(sub_ws, wsum[ex], y[ex, n], devices_per_node, slots_per_device, deterministic)
        left = t_end - time.perf_counter()
        limit = (GPU_SHARE_DETERMINISTIC * time_limit_s if deterministic else max(MIN_LIMIT_S, left)) / (n_count - n)
        sub_cost = None if node_cost is None else traffic_cost[ex, sl]
        a = None
        if limit >= MIN_GPU_MODEL_S or deterministic:  # else: the LPT + swap packing below
            a, _, _, _ = bin_model(sub_ws, y[ex, n], devices_per_node, slots_per_device, 1, sub_hint, cost=sub_cost,
                                   load_caps=caps, time_limit_s=limit, **kw)
        if a is None:
            hint_ok = sub_hint is not None and (caps is None or np.all(gpu_maxes(sub_ws, sub_hint) <= caps))
            if not hint_ok:
                return hint.copy(), "warm-start", obj, bound
            a = sub_hint
        out[ex, sl] = a
    return out, status, obj, bound


def _packed_hint(sub_ws: list[np.ndarray], wsum: np.ndarray, copies: np.ndarray, devices_per_node: int,
                 slots_per_device: int, deterministic: bool) -> np.ndarray | None:
    """Warm start of a node whose contents changed: LPT packing sharpened by the swap search (None: no packing)."""
    sub_hint = _lpt(wsum, copies, devices_per_node, slots_per_device)
    if sub_hint is not None:
        sub_hint = improve_layer(sub_hint, np.stack(sub_ws).astype(float), slots_per_device,
                                 np.inf if deterministic else SUB_SWAP_S, max_swaps=SUB_SWAP_CAP)
    return sub_hint
