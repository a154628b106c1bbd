"""Collectives of the step: NCCL-fitted inside a node where the system has data, else the spec ring."""

from __future__ import annotations

import dataclasses

import pytest

from hwmodels.collectives import NCCL_FIT_FILE, all_reduce_time_s, read_collective_fits
from hwmodels.gpu_cost import FIT_DIR
from hwmodels.specs import load_system
from moesim.train.collectives import collective_time_s, describe_collectives, fitted_collectives, ring_time_s

MB = 64e6


def _simple(doc, key="simple"):
    return {k: float(v) for k, v in doc["h100_dgx"]["intra-node"]["all_reduce"][key].items()}


def test_all_reduce_inside_a_dgx_h100_is_the_fitted_nccl_model():
    doc = read_collective_fits(FIT_DIR / NCCL_FIT_FILE)
    system = load_system("dgx-h100")
    p = fitted_collectives(system).all_reduce
    assert p.simple.bus_bandwidth_bytes_per_s == pytest.approx(_simple(doc)["bus_bandwidth_bytes_per_s"])
    assert collective_time_s(system, "all_reduce", MB, 8) == pytest.approx(float(all_reduce_time_s(MB, 8, p)))
    s = _simple(doc)  # 64 MB is Simple-protocol territory: latency + 7 hops + 7/8 of the bytes at the bus bandwidth
    expected = s["latency_s"] + 7 * s["hop_s"] + 7 / 8 * MB / s["bus_bandwidth_bytes_per_s"]
    assert collective_time_s(system, "reduce_scatter", MB, 8) == pytest.approx(expected)
    assert "NCCL-fitted" in describe_collectives(system)


def test_across_nodes_and_without_a_fit_the_spec_ring_applies():
    system = load_system("dgx-h100").with_nodes(2)
    link = system.scale_out
    ring = 2 * 15 / 16 * MB / link.bandwidth_bytes_per_s + 2 * 15 * link.latency_s
    assert collective_time_s(system, "all_reduce", MB, 16) == pytest.approx(ring)
    bare = dataclasses.replace(system, device=dataclasses.replace(system.device, gpu_fit=None))
    assert fitted_collectives(bare) is None and "no NCCL fit" in describe_collectives(bare)
    assert collective_time_s(bare, "all_reduce", MB, 8) == pytest.approx(ring_time_s(bare, "all_reduce", MB, 8))


def test_the_fit_carries_to_another_link_speed_by_its_efficiency():
    h100, h800 = load_system("dgx-h100"), load_system("hgx-h800")
    ratio = h800.scale_up.bandwidth_bytes_per_s / h100.scale_up.bandwidth_bytes_per_s
    assert fitted_collectives(h800).all_reduce.simple.bus_bandwidth_bytes_per_s == pytest.approx(
        fitted_collectives(h100).all_reduce.simple.bus_bandwidth_bytes_per_s * ratio)
