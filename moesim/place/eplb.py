"""EPLB-style hierarchical placement: experts packed onto nodes, replicated inside each node, then packed
onto the node's GPUs (own implementation of the policy DeepSeek describes for its Expert Parallelism Load
Balancer; the flat variant is :func:`moesim.place.baselines.greedy`).

Per layer, with loads ``w[e]`` (tokens), ``N`` nodes of ``G`` GPUs and ``R`` redundant slots:

1. **nodes**: experts in decreasing load go to the least-loaded node that holds fewer than ``ceil(E / N)``
   experts (balanced packing: every node gets the same number of logical experts, up to one);
2. **replicas inside a node**: node n gets ``R // N`` redundant slots (one more for the ``R % N`` busiest
   nodes; never more than its free slots, leftovers go to nodes with room, busiest first) and shares them
   out by :func:`moesim.place.baselines.replica_counts` among its own experts (at most ``G`` copies each);
3. **GPUs**: the node's copies (share ``w[e] / copies[e]`` each) in decreasing share go to the node's
   least-loaded GPU with a free slot and no copy of that expert yet.

Every copy of an expert stays on one node, so a token's traffic to one expert never crosses to more than
one node; the price is that a hot expert can only be split ``G`` ways. A plain placer
``(problem, rng) -> Placement`` (deterministic: ``rng`` is unused).
"""

from __future__ import annotations

import numpy as np

from moesim.place.baselines import replica_counts
from moesim.place.problem import PlacementProblem, assignment_to_placement
from moesim.placement import Placement


def pack_nodes(load: np.ndarray, num_nodes: int, per_node: int) -> np.ndarray:
    """Node of each expert [E]: decreasing load, each to the least-loaded node with fewer than ``per_node``."""
    node_of = np.empty(len(load), dtype=np.int64)
    node_load = np.zeros(num_nodes)
    held = np.zeros(num_nodes, dtype=np.int64)
    for e in np.lexsort((np.arange(len(load)), -load)):
        ok = np.flatnonzero(held < per_node)
        n = int(ok[np.argmin(node_load[ok])])
        node_of[e] = n
        node_load[n] += load[e]
        held[n] += 1
    return node_of


def node_replicas(node_load: np.ndarray, num_replicas: int, room: np.ndarray) -> np.ndarray:
    """Redundant slots per node [N]: equal shares, the remainder to the busiest nodes, capped by ``room``."""
    n_count = len(node_load)
    busiest = np.lexsort((np.arange(n_count), -node_load))
    out = np.full(n_count, num_replicas // n_count, dtype=np.int64)
    out[busiest[:num_replicas % n_count]] += 1
    out = np.minimum(out, room)
    left = num_replicas - int(out.sum())
    for n in busiest:  # spill what a full node could not take
        take = min(left, int(room[n] - out[n]))
        out[n] += take
        left -= take
    return out


def _pack_gpus(share: np.ndarray, counts: np.ndarray, num_gpus: int, slots: int) -> np.ndarray:
    """[E_n, G] 0/1: copies in decreasing share to the least-loaded GPU with room and no copy yet."""
    assign = np.zeros((len(share), num_gpus), dtype=np.int8)
    gpu_load = np.zeros(num_gpus)
    free = np.full(num_gpus, slots)
    items = sorted(((share[e], e) for e in range(len(share)) for _ in range(int(counts[e]))), key=lambda t: (-t[0], t[1]))
    for s, e in items:
        ok = np.flatnonzero((free > 0) & (assign[e] == 0))
        g = int(ok[np.argmin(gpu_load[ok])])
        assign[e, g] = 1
        gpu_load[g] += s
        free[g] -= 1
    return assign


def eplb_assignment(problem: PlacementProblem) -> np.ndarray:
    """assign [layers, experts, devices] int8 of the hierarchical policy (module docstring)."""
    p = problem
    g_count = p.devices_per_node
    n_count = p.num_devices // g_count
    node_slots = g_count * p.slots_per_device
    per_node = min(-(-p.num_experts // n_count), node_slots)
    assign = np.zeros((p.num_layers, p.num_experts, p.num_devices), dtype=np.int8)
    for layer in range(p.num_layers):
        w = p.load[layer].astype(float)
        node_of = pack_nodes(w, n_count, per_node)
        held = np.bincount(node_of, minlength=n_count)
        reps = node_replicas(np.bincount(node_of, weights=w, minlength=n_count), p.num_replicas, node_slots - held)
        for n in range(n_count):
            ex = np.flatnonzero(node_of == n)
            counts = replica_counts(w[ex][None, :], int(reps[n]), g_count)[0]
            sub = _pack_gpus(w[ex] / counts, counts, g_count, p.slots_per_device)
            assign[layer, ex[:, None], n * g_count + np.arange(g_count)[None, :]] = sub
    return assign


def eplb_hierarchical(problem: PlacementProblem, rng: np.random.Generator) -> Placement:
    return assignment_to_placement(eplb_assignment(problem), problem, "eplb-hier")
