"""Hierarchical (node, then GPU) CP-SAT placement: valid placements, a proven bound, no regression."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.place import PlacementProblem, replica_counts, solve
from moesim.place.baselines import device_load
from moesim.place.problem import placement_to_assignment
from tests.moesim.place.test_place_models import _brute_force_balance


def _problem(load, devices, per_node, spd, replicas=0, affinity=None, scenarios=None):
    load = np.atleast_2d(np.asarray(load, dtype=np.int64))
    return PlacementProblem(load=load, affinity=affinity, num_devices=devices, devices_per_node=per_node,
                            slots_per_device=spd, num_replicas=replicas, cross_node_cost=9.0, scenarios=scenarios)


@pytest.mark.parametrize("load,replicas", [([9, 7, 6, 5, 4, 2, 2, 1], 0), ([20, 9, 8, 4, 3, 3], 2)])
def test_hier_balance_bound_brackets_brute_force(load, replicas):
    # 4 GPUs in 2 nodes, 2 slots each: the reported bound <= the true optimum <= the reported objective
    p = _problem(load, 4, 2, 2, replicas)
    counts = replica_counts(p.load, replicas, 4)[0]
    optimum = _brute_force_balance(np.array(load), counts, 4, 2)
    placement, report = solve(p, "balance", time_limit_s=2.0, num_workers=2, hierarchical=True, deterministic=True)
    assign = placement_to_assignment(placement)[0]
    assert np.array_equal(assign.sum(axis=1), counts) and assign.sum(axis=0).max() <= 2
    got = device_load(p, assign[None])[0].max()
    (rep,) = report.stage("balance")
    assert rep.bound <= optimum + 1e-9 <= got + 1e-9
    assert rep.objective == pytest.approx(got)
    assert got == pytest.approx(optimum)  # tiny: the node then GPU models reach the optimum here


def test_hier_keeps_the_invariants_and_stays_close_to_the_flat_model():
    # both solves deterministic (2 workers, CP-SAT deterministic time, capped swap searches): the comparison
    # below is between two reproducible results, not between two races against the wall clock
    rng = np.random.default_rng(3)
    layers, experts, devices, per_node = 3, 32, 8, 4
    load = rng.gamma(0.7, 40.0, size=(layers, experts)).astype(np.int64) + 1
    aff = rng.integers(0, 20, size=(layers - 1, experts, experts))
    scen = rng.poisson(load[None].repeat(3, axis=0)).astype(np.int64)
    p = _problem(load, devices, per_node, 5, replicas=4, affinity=aff, scenarios=scen)
    flat_b, _ = solve(p, "balance", time_limit_s=1.5, num_workers=2, hierarchical=False, deterministic=True)
    for objective in ("balance", "joint"):
        placement, report = solve(p, objective, time_limit_s=1.5, num_workers=2, hierarchical=True,
                                  deterministic=True)
        a = placement_to_assignment(placement)
        assert a.max() <= 1 and a.sum(axis=2).min() >= 1 and a.sum(axis=1).max() <= 5
        assert np.array_equal(a.sum(axis=2), replica_counts(p.load, 4, devices))
        for s in report.solves:
            assert s.bound <= s.objective + 1e-9
        if objective == "balance":  # within 5% of the flat model's (nominal) max load on every layer
            hier_max = device_load(p, a).max(axis=1)
            flat_max = device_load(p, placement_to_assignment(flat_b)).max(axis=1)
            assert np.all(hier_max <= 1.05 * flat_max + 1e-9)
        else:  # hierarchical traffic solves the odd layers (even ones fixed): that covers every layer pair
            assert [s.layer for s in report.stage("traffic")] == list(range(1, layers, 2))
            assert {s.status for s in report.stage("traffic")} <= {"optimal", "feasible", "warm-start", "time-out"}


def test_hier_deterministic_solve_repeats():
    # deterministic hierarchical solves give the layer its whole deterministic limit (no wall-clock share)
    rng = np.random.default_rng(4)
    load = rng.gamma(0.7, 40.0, size=(2, 32)).astype(np.int64) + 1
    p = _problem(load, 8, 4, 5, replicas=4, affinity=rng.integers(0, 20, size=(1, 32, 32)))
    runs = [solve(p, "joint", time_limit_s=0.5, num_workers=2, hierarchical=True, deterministic=True)
            for _ in range(2)]
    assert np.array_equal(runs[0][0].slot_to_expert, runs[1][0].slot_to_expert)
    assert [(s.status, s.objective, s.bound) for s in runs[0][1].solves] == \
        [(s.status, s.objective, s.bound) for s in runs[1][1].solves]
