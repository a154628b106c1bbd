"""Honest evaluation of placements: replay held-out tokens through :func:`moesim.sim.simulate`.

Fit on the first part of a trace (``Trace.split_tokens``), evaluate on the rest. Metrics per
placement (all on the held-out trace):

- ``max_mean_load``: per-layer max/mean of tokens computed per GPU, averaged over layers (1 = even);
  ``worst_max_mean_load``: the worst layer.
- ``cross_gpu_bytes`` / ``cross_node_bytes``: bytes the simulator moved over NVLink / the inter-node
  network (dispatch + combine; the simulator's dataflow returns every token to its home GPU).
- ``affinity_cross_gpu_tokens`` / ``affinity_cross_node_tokens``: ExFlow dataflow -- token pairs
  (expert at layer l, expert at layer l+1) whose GPUs differ / whose nodes differ, even split over
  replicas. This is what the traffic objective minimises; sim.py does not replay that dataflow.
- ``layer_time_s``: simulated MoE-layer time (mean over layers), ``total_time_s``: makespan.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from moesim.place.problem import PlacementProblem, placement_to_assignment
from moesim.placement import Placement
from moesim.sim import SimOptions, simulate


def affinity_crossings(problem: PlacementProblem, placement: Placement) -> tuple[float, float]:
    """(cross-GPU, cross-node) token pairs between consecutive layers under ``problem.affinity``."""
    if problem.affinity is None or problem.num_layers < 2:
        return 0.0, 0.0
    assign = placement_to_assignment(placement).astype(float)
    frac = assign / assign.sum(axis=2, keepdims=True)  # [L, E, D]
    d = np.arange(problem.num_devices)
    diff_gpu = (d[:, None] != d[None, :]).astype(float)
    node = problem.node_of(d)
    diff_node = (node[:, None] != node[None, :]).astype(float)
    gpu = node_x = 0.0
    for layer in range(problem.num_layers - 1):
        a, b, aff = frac[layer], frac[layer + 1], problem.affinity[layer].astype(float)
        flow = a.T @ aff @ b  # [D, D] tokens from GPU to GPU
        gpu += float((flow * diff_gpu).sum())
        node_x += float((flow * diff_node).sum())
    return gpu, node_x


def evaluate(placement: Placement, trace, system, model, heldout_problem: PlacementProblem | None = None, *,
             options: SimOptions = SimOptions(), seed: int = 0, cost=None,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Replay ``trace`` (the held-out part, tokens renumbered per step by ``Trace.renumber_tokens``) with
    ``placement`` under ``cost`` (None: the simulator's roofline); returns the metrics above as a dict."""
    res = simulate(system, model, placement, trace.renumber_tokens(), cost=cost, options=options, seed=seed,
                   progress=progress)
    kinds = res.link_bytes.groupby("kind")["bytes"].sum().to_dict() if len(res.link_bytes) else {}
    up_kind = system.scale_up.kind
    out_kind = system.scale_out.kind if system.scale_out is not None else None
    cross_gpu = float(sum(v for k, v in kinds.items() if k == up_kind))
    cross_node = float(kinds.get(out_kind, 0.0)) if out_kind else 0.0
    # an inter-node transfer is counted on the sender's and receiver's NIC edges: halve to get bytes moved
    row = {
        "placement": placement.name,
        "max_mean_load": float(res.imbalance.mean()),
        "worst_max_mean_load": float(res.imbalance.max()),
        "cross_gpu_bytes": cross_gpu / 2.0,
        "cross_node_bytes": cross_node / 2.0,
        "layer_time_s": float(res.layer_time_s.mean()),
        "total_time_s": float(res.total_time_s),
        "replicas": int(placement.replica_count.sum() - placement.num_layers * placement.num_experts)
        // placement.num_layers,  # per layer
    }
    if heldout_problem is not None:
        g, n = affinity_crossings(heldout_problem, placement)
        row["affinity_cross_gpu_tokens"] = g
        row["affinity_cross_node_tokens"] = n
    return row
