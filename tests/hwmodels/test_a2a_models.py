"""The simulator's all-to-all models chosen through the cost model: spec bottleneck link vs NCCL-fitted."""

from dataclasses import replace

import numpy as np
import pytest

from hwmodels.collectives import (FABRIC_SYSTEMS, NCCL_FIT_FILE, AllReduceParams, BottleneckLinkAllToAll,
                                  FittedAllToAll, ProtocolParams, all_to_all_time_s, fitted_all_to_all,
                                  read_collective_fits, scale_to_link)
from hwmodels.cost import (GpuFittedCost, RooflineCost, collective_model, default_cost_model, describe_cost,
                           overlapped_cost)
from hwmodels.gpu_cost import FIT_DIR
from hwmodels.specs import load_system
from hwmodels.topology import all_to_all_routing


def _h100_fit() -> AllReduceParams:
    doc = read_collective_fits(FIT_DIR / NCCL_FIT_FILE)["h100_dgx"]["intra-node"]["all_reduce"]
    return AllReduceParams(*(ProtocolParams(**{k: doc[p][k] for k in ("latency_s", "hop_s", "bus_bandwidth_bytes_per_s")})
                             for p in ("ll", "simple")))


def test_uniform_all_to_all_equals_the_fitted_closed_form_carried_to_h800():
    system, ref = load_system("hgx-h800"), load_system(FABRIC_SYSTEMS["h100_dgx"])
    model = collective_model(default_cost_model(system.device), system)
    assert isinstance(model, FittedAllToAll)
    n, per_pair_bytes = system.num_devices, 3.5e6
    pair = np.full((n, n), per_pair_bytes)
    carried = scale_to_link(_h100_fit(), ref.scale_up.bandwidth_bytes_per_s, system.scale_up.bandwidth_bytes_per_s)
    expected = float(all_to_all_time_s(n * per_pair_bytes, n, carried))  # each GPU's buffer holds n pair blocks
    assert model.duration_s(all_to_all_routing(system), pair) == pytest.approx(expected, rel=1e-12)


def test_small_uniform_all_to_all_takes_the_ll_protocol_like_the_closed_form():
    system = load_system("dgx-h100")
    model, fit = fitted_all_to_all(system, FIT_DIR), _h100_fit()
    n, per_pair_bytes = 2, 4096.0
    pair = np.zeros((8, 8))
    pair[:n, :n] = per_pair_bytes
    expected = float(all_to_all_time_s(n * per_pair_bytes, n, fit))
    ll = fit.ll.latency_s + fit.ll.hop_s + (n * per_pair_bytes) / 2 / fit.ll.bus_bandwidth_bytes_per_s
    assert expected == pytest.approx(ll, rel=1e-12)  # 2 GPUs, 8 KB each: LL's start-up beats Simple's
    assert model.duration_s(all_to_all_routing(system), pair) == pytest.approx(expected, rel=1e-12)


def test_fitted_all_to_all_charges_the_busiest_link_at_the_fitted_efficiency():
    system = load_system("dgx-h100")
    model = fitted_all_to_all(system, FIT_DIR)
    p = _h100_fit().simple
    pair = np.zeros((8, 8))
    pair[0, 1:4] = 1e6  # dev0 sends 3 MB, devices 1-3 receive 1 MB each: dev0's up-link is the bottleneck
    eff = p.bus_bandwidth_bytes_per_s / system.scale_up.bandwidth_bytes_per_s
    expected = p.latency_s + 3 * p.hop_s + 3e6 / (system.scale_up.bandwidth_bytes_per_s * eff)  # 4 participants
    assert model.duration_s(all_to_all_routing(system), pair) == pytest.approx(expected, rel=1e-12)
    assert model.duration_s(all_to_all_routing(system), np.eye(8) * 1e6) == 0.0  # device-local only


def test_scale_out_links_run_at_spec_bandwidth_with_the_fitted_start_up():
    system = load_system("dgx-h100").with_nodes(2)
    model = fitted_all_to_all(system, FIT_DIR)
    p = _h100_fit().simple
    pair = np.zeros((16, 16))
    pair[0, 8] = 5e6  # across nodes: dev0 -> net -> dev8
    expected = max(p.latency_s + p.hop_s, system.scale_out.latency_s) + 5e6 / system.scale_out.bandwidth_bytes_per_s
    assert model.duration_s(all_to_all_routing(system), pair) == pytest.approx(expected, rel=1e-12)


def test_roofline_keeps_the_spec_bottleneck_link_model():
    system = load_system("hgx-h800")
    routing = all_to_all_routing(system)
    pair = np.random.default_rng(0).random((8, 8)) * 1e6
    model = collective_model(RooflineCost(), system)
    assert isinstance(model, BottleneckLinkAllToAll)
    assert model.duration_s(routing, pair) == routing.duration_s(pair)
    assert collective_model(GpuFittedCost(), system).duration_s(routing, pair) > routing.duration_s(pair)


def test_fabric_is_chosen_by_gpu_fit_and_link_kind_not_by_name():
    h800 = load_system("hgx-h800")
    assert fitted_all_to_all(replace(h800, scale_up=replace(h800.scale_up, kind="pcie")), FIT_DIR) is None
    assert fitted_all_to_all(replace(h800, device=replace(h800.device, gpu_fit=None)), FIT_DIR) is None
    a100 = fitted_all_to_all(load_system("dgx-a100"), FIT_DIR)
    assert a100 is not None and a100.fabric.startswith("a100_dgx")
    assert "all-to-all: nccl-fitted (h100_dgx" in describe_cost(GpuFittedCost(), h800.device, "bf16", system=h800)
    assert "all-to-all: bottleneck-link" in describe_cost(RooflineCost(), h800.device, "bf16", system=h800)


def test_comm_kernel_sms_slow_the_fitted_gemms_only():
    device = load_system("hgx-h800").device
    tpe = np.full(32, 512)
    fitted = GpuFittedCost()
    base = fitted.expert_ffn(device, tpe, 7168, 2048, "bf16").time_s
    assert overlapped_cost(fitted, 24).expert_ffn(device, tpe, 7168, 2048, "bf16").time_s > base
    assert overlapped_cost(fitted, 0) is fitted
    roof = RooflineCost()
    assert overlapped_cost(roof, 24) is roof


def test_bad_collective_fit_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / NCCL_FIT_FILE
    bad.write_text("[h100_dgx.intra-node.all_reduce.simple]\nlatency_s = 'x'\n")
    with pytest.raises(ValueError, match="not valid TOML|latency_s"):
        fitted_all_to_all(load_system("hgx-h800"), tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        read_collective_fits(tmp_path / "missing.toml")
