"""The analytical engine against the DES: equal where nothing contends (micro_batches=1 or no overlap)."""

import numpy as np
import pytest

from hwmodels.specs import load_system
from moesim.analytic import ENGINES, estimate
from moesim.placement import contiguous
from moesim.sim import SimOptions, simulate
from hwmodels.topology import all_to_all_routing, all_to_all_routing_by_paths
from workloads.catalog import get_model
from workloads.importers import load_trace


@pytest.fixture(scope="module")
def trace():
    return load_trace("default")


@pytest.mark.parametrize("nodes,options", [
    (1, SimOptions()),
    (2, SimOptions()),
    (1, SimOptions(micro_batches=2, overlap_micro_batches=False)),
    (2, SimOptions(dtype="fp8", include_shared_experts=False)),
])
def test_analytic_matches_des_without_contention(trace, nodes, options):
    system = load_system("dgx-h100").with_nodes(nodes)
    model = get_model("flame-moe-290m")
    placement = contiguous(trace.meta.num_layers, trace.meta.num_experts, system.num_devices)
    des = simulate(system, model, placement, trace, options=options, seed=3)
    ana = estimate(system, model, placement, trace, options=options, seed=3)
    assert ana.total_time_s == pytest.approx(des.total_time_s, rel=1e-2)
    assert ana.total_time_s == pytest.approx(des.total_time_s, rel=1e-9)  # in fact exact up to rounding
    np.testing.assert_allclose(ana.layer_time_s, des.layer_time_s, rtol=1e-9)
    np.testing.assert_allclose(ana.layer_comm_s, des.layer_comm_s, rtol=1e-9)
    np.testing.assert_array_equal(ana.device_tokens, des.device_tokens)
    assert len(ana.ops) == len(des.ops)
    a = ana.ops.sort_values(["step", "micro_batch", "layer", "op", "device"]).reset_index(drop=True)
    d = des.ops.sort_values(["step", "micro_batch", "layer", "op", "device"]).reset_index(drop=True)
    np.testing.assert_allclose(a[["start_at_s", "end_at_s", "flops", "bytes"]].to_numpy(),
                               d[["start_at_s", "end_at_s", "flops", "bytes"]].to_numpy(), rtol=1e-9, atol=1e-15)


def test_analytic_is_upper_bound_with_overlap(trace):
    system = load_system("dgx-h100")
    model = get_model("flame-moe-290m")
    placement = contiguous(trace.meta.num_layers, trace.meta.num_experts, system.num_devices)
    options = SimOptions(micro_batches=2)
    des = simulate(system, model, placement, trace, options=options)
    ana = estimate(system, model, placement, trace, options=options)
    assert ana.total_time_s > des.total_time_s  # the DES overlaps micro-batches, the formula does not
    assert ana.meta["engine"] == "analytic" and set(ENGINES) == {"des", "analytic"}


def test_sparse_all_to_all_equals_dense():
    for nodes in (1, 3):
        system = load_system("dgx-h100").with_nodes(nodes)
        dense, sp = all_to_all_routing_by_paths(system), all_to_all_routing(system)
        assert dense.edge_names == sp.edge_names and dense.edge_kinds == sp.edge_kinds
        np.testing.assert_array_equal(dense.incidence, sp.incidence.toarray())
        np.testing.assert_array_equal(dense.pair_latency_s, sp.pair_latency_s)
        pair = np.random.default_rng(nodes).random((system.num_devices,) * 2) * 1e6
        assert sp.duration_s(pair) == pytest.approx(dense.duration_s(pair), rel=1e-12)


def test_estimate_rejects_mismatched_model(trace):
    system = load_system("dgx-h100")
    placement = contiguous(trace.meta.num_layers, trace.meta.num_experts, system.num_devices)
    with pytest.raises(ValueError, match="experts per layer"):
        estimate(system, get_model("mixtral-8x7b"), placement, trace)
