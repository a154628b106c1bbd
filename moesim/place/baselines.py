"""Baseline placers and the shared pieces of the models (replica counts, device load).

A placer is a plain function ``(problem, rng) -> Placement`` named in :data:`BASELINES`.

Split rule (used by every model here and matching the simulator's replica routing): an expert
with r replicas sends each replica 1/r of its tokens. ``round-robin`` routing (token % r) does
exactly that; ``local-first`` does it in expectation when tokens are spread evenly over GPUs.
"""

from __future__ import annotations

import heapq
from typing import Callable

import numpy as np

from moesim.place.problem import PlacementProblem, assignment_to_placement
from moesim.placement import Placement


def replica_counts(load: np.ndarray, num_replicas: int, max_replicas: int) -> np.ndarray:
    """Replicas per expert [layers, experts] (>= 1, <= max_replicas) that minimise the largest
    per-replica share ``load / count`` of each layer: give each extra replica, one at a time, to the
    expert whose share is largest (greedy is optimal for this min-max apportionment)."""
    load = np.asarray(load, dtype=float)
    count = np.ones(load.shape, dtype=np.int64)
    for layer in range(load.shape[0]):
        heap = [(-load[layer, e], e) for e in range(load.shape[1])]
        heapq.heapify(heap)
        given = 0
        while given < num_replicas and heap:
            _, e = heapq.heappop(heap)
            if count[layer, e] >= max_replicas:
                continue
            count[layer, e] += 1
            given += 1
            heapq.heappush(heap, (-load[layer, e] / count[layer, e], e))
    return count


def device_load(problem: PlacementProblem, assign: np.ndarray) -> np.ndarray:
    """Tokens computed by each GPU [layers, devices] under the even split rule, for assign [L, E, D]."""
    count = assign.sum(axis=2)
    share = problem.load / np.maximum(count, 1)
    return np.einsum("le,led->ld", share, assign.astype(float))


def greedy_assignment(problem: PlacementProblem, counts: np.ndarray | None = None) -> np.ndarray:
    """EPLB-spirited greedy packing (own implementation): replica counts by :func:`replica_counts`,
    then replicas in decreasing share order each go to the least-loaded GPU that has a free slot and
    no copy of that expert yet. Returns assign [layers, experts, devices] int8."""
    p = problem
    if counts is None:
        counts = replica_counts(p.load, p.num_replicas, p.num_devices)
    assign = np.zeros((p.num_layers, p.num_experts, p.num_devices), dtype=np.int8)
    for layer in range(p.num_layers):
        share = p.load[layer] / counts[layer]
        items = [(share[e], e) for e in range(p.num_experts) for _ in range(counts[layer, e])]
        items.sort(key=lambda t: (-t[0], t[1]))
        dev_load = np.zeros(p.num_devices)
        free = np.full(p.num_devices, p.slots_per_device)
        for s, e in items:
            ok = (free > 0) & (assign[layer, e] == 0)
            d = int(np.flatnonzero(ok)[np.argmin(dev_load[ok])])
            assign[layer, e, d] = 1
            dev_load[d] += s
            free[d] -= 1
    return assign


def greedy(problem: PlacementProblem, rng: np.random.Generator) -> Placement:
    return assignment_to_placement(greedy_assignment(problem), problem, "greedy")


def contiguous(problem: PlacementProblem, rng: np.random.Generator) -> Placement:
    """Experts in order fill GPU 0's slots, then GPU 1's, ... as evenly as the counts allow; no replicas."""
    p = problem
    assign = np.zeros((p.num_layers, p.num_experts, p.num_devices), dtype=np.int8)
    dev = (np.arange(p.num_experts) * p.num_devices) // p.num_experts
    assign[:, np.arange(p.num_experts), dev] = 1
    return assignment_to_placement(assign, p, "contiguous")


def round_robin(problem: PlacementProblem, rng: np.random.Generator) -> Placement:
    """Expert e on GPU e % D; no replicas."""
    p = problem
    assign = np.zeros((p.num_layers, p.num_experts, p.num_devices), dtype=np.int8)
    assign[:, np.arange(p.num_experts), np.arange(p.num_experts) % p.num_devices] = 1
    return assignment_to_placement(assign, p, "round-robin")


def random_placement(problem: PlacementProblem, rng: np.random.Generator) -> Placement:
    """A seeded random permutation of experts over GPUs (balanced counts) per layer; no replicas."""
    p = problem
    assign = np.zeros((p.num_layers, p.num_experts, p.num_devices), dtype=np.int8)
    dev = np.arange(p.num_experts) % p.num_devices
    for layer in range(p.num_layers):
        assign[layer, rng.permutation(p.num_experts), dev] = 1
    return assignment_to_placement(assign, p, "random")


Placer = Callable[[PlacementProblem, np.random.Generator], Placement]

BASELINES: dict[str, Placer] = {
    "contiguous": contiguous,
    "round-robin": round_robin,
    "random": random_placement,
    "greedy": greedy,
}
