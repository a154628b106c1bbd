"""Route latency of the all-to-all: a route is charged its slowest hop once (module docstring of topology)."""

import numpy as np
import pytest

from hwmodels.topology import all_to_all_routing, all_to_all_routing_by_paths, build_graph
from tests.conftest import make_system


@pytest.mark.parametrize("build", [all_to_all_routing, all_to_all_routing_by_paths])
def test_route_latency_is_the_slowest_hop_not_the_sum(build):
    system = make_system(4, num_nodes=2, link_latency_s=3e-6)  # scale-out latency: 2 x 3 us (conftest)
    a2a = build(system)
    graph = build_graph(system)
    hop_up = graph.edges["dev0", "switch0"]["latency_s"]
    hop_out = graph.edges["dev0", "net"]["latency_s"]
    assert (hop_up, hop_out) == (3e-6, 6e-6)
    lat = a2a.pair_latency_s
    assert lat[0, 1] == hop_up  # dev0 -> switch0 -> dev1: two hops of 3 us, charged 3 us once
    assert lat[0, 2] == hop_out  # dev0 -> net -> dev2
    assert np.all(np.diag(lat) == 0)
    # one all-to-all: bottleneck link time plus the largest latency among the pairs that exchange bytes
    pair = np.zeros((4, 4))
    pair[0, 1] = 1000.0
    assert a2a.duration_s(pair) == pytest.approx(1000.0 / system.scale_up.bandwidth_bytes_per_s + hop_up, rel=1e-12)
    pair[0, 2] = 1000.0
    assert a2a.duration_s(pair) == pytest.approx(1000.0 / system.scale_out.bandwidth_bytes_per_s + hop_out, rel=1e-12)
