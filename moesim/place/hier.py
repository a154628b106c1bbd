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

_OK = (cp_model.OPTIMAL, cp_model.FEASIBLE)
NODE_SHARE = 0.7  # share of a layer's time limit for the node model (the per-node GPU models are small)
NODE_SHARE_TRAFFIC = 0.85  # traffic: within a node only NVLink crossings (cost 1 vs 9) are left to optimise


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
    mxs = []
    for s_i, w in enumerate(ws):
        nz = np.flatnonzero(w)
        coeffs = [int(c) for c in w[nz]]
        total = int((w * copies).sum())
        if cost is None:
            mx = m.NewIntVar(0, total, "")
            m.Add(mx >= -(-total // num_bins))
            if hint is not None:
                m.AddHint(mx, int((w[:, None] * np.minimum(hint, ub[:, None])).sum(axis=0).max()))
            mxs.append(mx)
        elif load_caps is None or load_caps[s_i] is None:
            continue
        else:
            mx = int(load_caps[s_i])
        for b in range(num_bins):
            m.Add(lin.weighted_sum([cols[b][e] for e in nz], coeffs) <= mx)
    if cost is None:
        m.Minimize(lin.sum(mxs))
    else:
        ei, bi = np.nonzero(cost)
        m.Minimize(lin.weighted_sum([y[e][b] for e, b in zip(ei, bi)], [int(c) for c in cost[ei, bi]]))
    if hint is not None:
        for e in range(e_count):
            for b in range(num_bins):
                m.AddHint(y[e][b], int(min(hint[e, b], ub[e])))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = max(1, int(num_workers))
    solver.parameters.random_seed = int(seed)
    # a light presolve: the full one takes ~0.17 s of a ~0.3 s budget on the 2,048-variable node model
    solver.parameters.max_presolve_iterations = 1
    solver.parameters.cp_model_probing_level = 0
    if deterministic:
        solver.parameters.max_deterministic_time = max(0.01, float(time_limit_s))
        solver.parameters.interleave_search = True
    else:
        solver.parameters.max_time_in_seconds = max(0.01, float(time_limit_s))
    status = solver.Solve(m)
    name = {cp_model.OPTIMAL: "optimal", cp_model.FEASIBLE: "feasible",
            cp_model.INFEASIBLE: "infeasible"}.get(status, "unknown")
    if status not in _OK:
        return None, name, float("inf"), solver.BestObjectiveBound() if status != cp_model.INFEASIBLE else 0.0
    out = np.array([[solver.Value(y[e][b]) for b in range(num_bins)] for e in range(e_count)], dtype=np.int64)
    return out, name, solver.ObjectiveValue(), solver.BestObjectiveBound()


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


def gpu_maxes(ws: list[np.ndarray], assign: np.ndarray) -> np.ndarray:
    """[S] largest GPU load per scenario (integer units) of assign [E, D]."""
    return np.array([int((w[:, None] * assign).sum(axis=0).max()) for w in ws], dtype=np.int64)


def solve_layer(ws: list[np.ndarray], counts: np.ndarray, hint: np.ndarray, devices_per_node: int,
                slots_per_device: int, *, stage: str, time_limit_s: float, num_workers: int, seed: int,
                deterministic: bool, traffic_cost: np.ndarray | None = None,
                gpu_caps: np.ndarray | None = None) -> tuple[np.ndarray, str, float, float]:
    """One layer, node model then per-node GPU models.

    ws: per-scenario integer per-copy loads, each [E]; counts [E] copies; hint [E, D] 0/1 (feasible);
    traffic_cost [E, D] integer (traffic stage); gpu_caps [S] per-scenario max GPU load allowed
    (joint) or None. Returns (assign [E, D] int8, status, node objective, node bound); the caller
    compares the assignment with the hint on the full objective and keeps the better one.
    Node-model objective/bound are in integer units (balance: sum over scenarios of max node load)."""
    t_end = time.perf_counter() + time_limit_s
    e_count, d_count = hint.shape
    n_count = d_count // devices_per_node
    node_hint = hint.reshape(e_count, n_count, devices_per_node).sum(axis=2)
    node_slots = devices_per_node * slots_per_device
    node_cost = None
    node_caps = None
    if stage != "balance":
        node_cost = np.rint(traffic_cost.reshape(e_count, n_count, devices_per_node).mean(axis=2)).astype(np.int64)
        if gpu_caps is not None:  # node loads may not exceed the hint's largest node load (per scenario)
            node_caps = [int((w[:, None] * node_hint).sum(axis=0).max()) for w in ws]
    kw = dict(num_workers=num_workers, seed=seed, deterministic=deterministic)
    node_limit_s = (NODE_SHARE if stage == "balance" else NODE_SHARE_TRAFFIC) * time_limit_s
    y, status, obj, bound = bin_model(ws, counts, n_count, node_slots, devices_per_node, node_hint, cost=node_cost,
                                      load_caps=node_caps, time_limit_s=node_limit_s, **kw)
    if y is None:
        return hint.copy(), status, obj, bound
    out = np.zeros_like(hint, dtype=np.int8)
    wsum = np.sum(ws, axis=0)
    for n in range(n_count):
        sl = slice(n * devices_per_node, (n + 1) * devices_per_node)
        ex = np.flatnonzero(y[:, n])
        sub_ws = [w[ex] for w in ws]
        if np.array_equal(y[:, n], node_hint[:, n]):
            sub_hint = hint[ex, sl]
        else:
            sub_hint = _lpt(wsum[ex], y[ex, n], devices_per_node, slots_per_device)
            if sub_hint is not None:
                sub_hint = improve_layer(sub_hint, np.stack(sub_ws).astype(float), slots_per_device,
                                         np.inf if deterministic else 0.02, max_swaps=200)
        left = t_end - time.perf_counter()
        limit = ((1 - NODE_SHARE) * time_limit_s if deterministic else max(0.01, left)) / (n_count - n)
        sub_cost = None if node_cost is None else traffic_cost[ex, sl]
        caps = None if gpu_caps is None else [int(c) for c in gpu_caps]
        a = None
        if limit >= 0.02 or deterministic:  # else: the LPT + swap packing below
            a, _, _, _ = bin_model(sub_ws, y[ex, n], devices_per_node, slots_per_device, 1, sub_hint, cost=sub_cost,
                                   load_caps=caps, time_limit_s=limit, **kw)
        if a is None:
            hint_ok = sub_hint is not None and (caps is None or np.all(gpu_maxes(sub_ws, sub_hint) <= caps))
            if not hint_ok:
                return hint.copy(), "warm-start", obj, bound
            a = sub_hint
        out[ex, sl] = a
    return out, status, obj, bound
