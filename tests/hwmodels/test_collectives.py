"""Collective models fitted to measurements, DeepEP payload sizing and comm-kernel SM counts."""

from pathlib import Path

import numpy as np
import pytest

from hwmodels.collectives import (COMM_KERNEL_SMS, AllReduceParams, ProtocolParams, a2a_payload_bytes,
                                  all_reduce_time_s, all_to_all_time_s, fit_all_reduce, fit_send_recv,
                                  ring_time_s, scale_to_link, send_recv_time_s)

SHARED_GPU_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gpu-timings"


def test_all_reduce_closed_form_and_protocol_switch():
    p = AllReduceParams(ProtocolParams(5e-6, 1e-6, 50e9), ProtocolParams(20e-6, 0.5e-6, 300e9))
    size, n = 64 * 2**20, 8
    simple = 20e-6 + 14 * 0.5e-6 + 2 * 7 / 8 * size / 300e9
    assert float(all_reduce_time_s(size, n, p)) == pytest.approx(simple)
    assert float(all_reduce_time_s(2048, n, p)) == pytest.approx(5e-6 + 14e-6 + 2 * 7 / 8 * 2048 / 50e9)
    assert float(all_reduce_time_s(size, 1, p)) == 0.0
    assert float(all_to_all_time_s(size, n, p)) == pytest.approx(20e-6 + 7 * 0.5e-6 + 7 / 8 * size / 300e9)
    assert float(all_to_all_time_s(2048, n, p)) == pytest.approx(5e-6 + 7e-6 + 7 / 8 * 2048 / 50e9)  # LL


def test_ring_time_on_spec_links_counts_steps_per_collective():
    bw, lat = 100e9, 2e-6
    nbytes, n = 8e9, 4
    # all-reduce: 2 (n - 1) = 6 steps of nbytes / n each; all-gather and reduce-scatter: n - 1 = 3 steps
    assert ring_time_s("all_reduce", nbytes, n, bw, lat) == pytest.approx(6 / 4 * nbytes / bw + 6 * lat)
    assert ring_time_s("all_gather", nbytes, n, bw, lat) == pytest.approx(3 / 4 * nbytes / bw + 3 * lat)
    assert ring_time_s("reduce_scatter", nbytes, n, bw, lat) == ring_time_s("all_gather", nbytes, n, bw, lat)
    assert ring_time_s("send_recv", nbytes, n, bw, lat) == pytest.approx(nbytes / bw + lat)
    assert ring_time_s("all_reduce", nbytes, 1, bw, lat) == 0.0


def test_fit_recovers_synthetic_all_reduce_parameters():
    true = AllReduceParams(ProtocolParams(4e-6, 2e-6, 60e9), ProtocolParams(25e-6, 0.3e-6, 350e9))
    sizes = np.geomspace(2048, 64 * 2**20, 40)
    s, n = np.meshgrid(sizes, [2, 4, 8])
    t = all_reduce_time_s(s.ravel(), n.ravel(), true)
    fitted, mape = fit_all_reduce(s.ravel(), n.ravel(), t)
    assert mape < 0.1
    assert fitted.simple.bus_bandwidth_bytes_per_s == pytest.approx(350e9, rel=0.01)
    assert fitted.ll.latency_s + 2 * fitted.ll.hop_s == pytest.approx(4e-6 + 2 * 2e-6, rel=0.05)


def test_send_recv_fit_is_exact_on_a_line():
    s = np.geomspace(2048, 2**26, 30)
    p, mape = fit_send_recv(s, send_recv_time_s(s, ProtocolParams(8e-6, 0.0, 200e9)))
    assert mape < 1e-6 and p.bus_bandwidth_bytes_per_s == pytest.approx(200e9, rel=1e-6)


def test_scale_to_link_keeps_efficiency_and_latency():
    p = AllReduceParams(ProtocolParams(4e-6, 2e-6, 60e9), ProtocolParams(25e-6, 0.3e-6, 360e9))
    q = scale_to_link(p, 450e9, 200e9)
    assert q.simple.bus_bandwidth_bytes_per_s == pytest.approx(160e9)
    assert q.simple.latency_s == p.simple.latency_s


def test_payload_bytes_per_direction_dtype():
    assert a2a_payload_bytes(128, 7168, "bf16") == 128 * 7168 * 2
    assert a2a_payload_bytes(128, 7168, "fp8") == 128 * (7168 + 7168 // 128 * 4)


def test_comm_kernel_sms_have_sources():
    assert COMM_KERNEL_SMS["deepep-normal-v1"][0] == 24
    for sms, source in COMM_KERNEL_SMS.values():
        assert sms >= 0 and ("github.com" in source or "arXiv" in source or "DeepEP" in source)


@pytest.mark.skipif(not SHARED_GPU_DATA.is_dir(), reason=f"shared GPU timing data not found at {SHARED_GPU_DATA}")
def test_vidur_h100_all_reduce_held_out_sizes_and_deepep():
    from hwmodels.collective_fit import collective_report, deepep_checks
    from hwmodels.gpu_fit import published

    rep = collective_report(SHARED_GPU_DATA)["h100_dgx intra-node"]
    rows = rep["all_reduce_rows"].set_index("set")
    assert rows.loc["held-out sizes (every 3rd)", "mape_pct"] < 15.0
    dee = deepep_checks(rep["all_reduce"], published())
    assert len(dee) == 20 and dee["error_pct"].abs().mean() < 25.0
