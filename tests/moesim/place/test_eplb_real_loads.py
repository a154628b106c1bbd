"""EPLB-style hierarchical placement (moesim.place.eplb) and placements of expanded load tables."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.place import get_method, min_slots_per_device, problem_from_trace
from moesim.place.baselines import device_load
from moesim.place.eplb import eplb_assignment, node_replicas, pack_nodes
from moesim.place.problem import PlacementProblem, placement_to_assignment
from workloads import load_table as lt
from workloads.importers import find_shared_traces
from workloads.stats import max_over_mean

SHARED = find_shared_traces(Path(__file__).resolve().parents[3])
TABLE = None if SHARED is None else SHARED / "deepseek-v3-expert-loads" / "prefill_in4096.json.gz"

HAND = np.array([[0, 0, 0, 0], [4, 2, 1, 1], [2, 2, 2, 2]])  # block 0 dense; 4 tokens x top-2 in blocks 1, 2


def _placed_load(trace, method: str, gpus: int, per_node: int, replicas: int) -> np.ndarray:
    prob = problem_from_trace(trace, gpus, per_node, num_replicas=replicas, with_affinity=False)
    placement = get_method(method).placer(prob, np.random.default_rng(0))
    return device_load(prob, placement_to_assignment(placement))


@pytest.mark.parametrize("method, gpus, per_node, replicas, want", [
    # greedy, 2 GPUs x 2 slots: layer 1 loads 4, 2, 1, 1 -> e0 to GPU0 (4), e1 to GPU1 (2), e2 to GPU1 (3),
    # e3 to GPU0 (GPU1 is full) -> [5, 3]; layer 2: 2, 2, 2, 2 alternate -> [4, 4]
    ("greedy", 2, 2, 0, [[5, 3], [4, 4]]),
    # EPLB-style, 2 nodes of 1 GPU: node packing is the same LPT with 2 experts per node -> the same loads
    ("eplb-hier", 2, 1, 0, [[5, 3], [4, 4]]),
    # 2 redundant slots, one node of 2 GPUs (3 slots each): replica counts give e0 and e1 a second copy
    # (shares 2, 1, 1, 1 in layer 1); copies e0, e0, e1, e1, e2, e3 alternate GPUs -> [4, 4] in both layers
    ("eplb-hier", 2, 2, 2, [[4, 4], [4, 4]]),
    ("greedy", 2, 2, 2, [[4, 4], [4, 4]]),
    # 2 nodes of 1 GPU: a copy cannot leave its node and a node has one GPU, so replicas cannot help EPLB-style
    ("eplb-hier", 2, 1, 2, [[5, 3], [4, 4]]),
])
def test_hand_table_expands_and_places(method, gpus, per_node, replicas, want):
    table = lt.load_table_from_counts(HAND, top_k=2)
    for seed in (0, 1):
        trace = lt.expand(table, seed=seed)
        np.testing.assert_array_equal(trace.expert_load(), HAND[1:])
        np.testing.assert_allclose(_placed_load(trace, method, gpus, per_node, replicas), want)


def test_node_packing_and_replica_shares_by_hand():
    # loads 9, 7, 3, 1 over 2 nodes of at most 2 experts: 9 -> n0, 7 -> n1, 3 -> n1 (7 < 9), 1 -> n0 (n1 is full)
    np.testing.assert_array_equal(pack_nodes(np.array([9.0, 7.0, 3.0, 1.0]), 2, 2), [0, 1, 1, 0])
    # 5 replicas over 3 nodes: 1 each, the 2 left over to the busiest two (nodes 1, 2) -> [1, 2, 2]; node 2 has
    # room for 1 only, so its second goes to the busiest node with room, node 1 -> [1, 3, 1]
    np.testing.assert_array_equal(node_replicas(np.array([5.0, 9.0, 7.0]), 5, np.array([9, 9, 1])), [1, 3, 1])


@st.composite
def problems(draw):
    per_node = draw(st.sampled_from([1, 2, 4]))
    nodes = draw(st.integers(1, 4))
    gpus = per_node * nodes
    experts = draw(st.integers(gpus, 3 * gpus + 3))
    replicas = draw(st.integers(0, min(2 * gpus, experts * (gpus - 1))))  # at most one copy per GPU
    load = np.array(draw(st.lists(st.lists(st.integers(0, 1000), min_size=experts, max_size=experts),
                                  min_size=1, max_size=3)), dtype=np.int64)
    return PlacementProblem(load=load, affinity=None, num_devices=gpus, devices_per_node=per_node,
                            slots_per_device=min_slots_per_device(experts, gpus, replicas), num_replicas=replicas)


@settings(max_examples=80, deadline=None)
@given(problems())
def test_eplb_placement_is_valid(prob):
    a = eplb_assignment(prob)
    assert a.max() <= 1  # at most one copy of an expert per GPU
    assert (a.sum(axis=2) >= 1).all()  # every expert placed
    assert (a.sum(axis=1) <= prob.slots_per_device).all()  # slot capacity
    assert (a.sum(axis=(1, 2)) <= prob.num_experts + prob.num_replicas).all()
    nodes = a.reshape(prob.num_layers, prob.num_experts, -1, prob.devices_per_node).sum(axis=3)
    assert ((nodes > 0).sum(axis=2) == 1).all()  # all copies of an expert on one node
    np.testing.assert_allclose(device_load(prob, a).sum(axis=1), prob.load.sum(axis=1))  # tokens conserved


@pytest.mark.skipif(TABLE is None or not TABLE.exists(), reason="shared DeepSeek-V3 load tables are absent "
                                                                 "(read from ../shared at run time)")
def test_real_loads_place_with_replicas():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # prefill_in4096 is a consistent table: no warning
        table = lt.read_load_table(TABLE)
    trace = lt.expand(table, 256, seed=0)
    np.testing.assert_array_equal(trace.expert_load(), lt.scaled_counts(table, 256))
    mm = {}
    for method, replicas in (("contiguous", 0), ("greedy", 0), ("greedy", 32), ("eplb-hier", 32)):
        load = _placed_load(trace, method, 64, 8, replicas)
        np.testing.assert_allclose(load.sum(axis=1), 256 * 8)
        mm[method, replicas] = max_over_mean(load).mean()
    # the table's hottest expert alone takes up to 0.43 of a layer's tokens (13x the mean of 256 experts):
    # without replicas no placement gets under that expert's share of a GPU; with 32 replicas greedy does
    hot = trace.expert_load().max(axis=1) / (256 * 8 / 64)  # hottest expert's tokens / mean tokens per GPU
    assert mm["greedy", 0] >= hot.mean() - 1e-9
    assert mm["greedy", 32] < mm["greedy", 0] < mm["contiguous", 0]
