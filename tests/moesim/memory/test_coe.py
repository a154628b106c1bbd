"""Composition of Experts: switch cost from tier bandwidths, schedulers, bad input, the SN40L study.
(The memory-sweep evaluation and Pareto front are tested in tests/moesim/study/test_memory_study.py.)"""

import numpy as np
import pytest

from hwmodels.specs import load_system
from moesim.memory.coe import (Deployment, ExpertModel, Request, make_requests, serve, two_step_route, zipf_route,
                               SCHEDULERS)

LLAMA = ExpertModel.llama2_7b()


def test_switch_cost_is_shard_bytes_over_bandwidth_plus_latency():
    sn = Deployment.from_system(load_system("sn40l-node"), tp=8)
    h = sn.hierarchy
    lat = h.tier("ddr").latency_s + h.tier("hbm").latency_s
    assert sn.switch_s(LLAMA) == LLAMA.weight_bytes / 8 / 100e9 + lat
    a100 = Deployment.from_system(load_system("dgx-a100"), tp=1)
    ha = a100.hierarchy
    lat = ha.host_link_latency_s + ha.tier("host").latency_s + ha.tier("hbm").latency_s
    assert a100.switch_s(LLAMA) == LLAMA.weight_bytes / 32e9 + lat
    assert a100.store_tier == "host" and sn.store_tier == "ddr"


def test_switching_with_everything_resident_costs_zero():
    dep = Deployment.from_system(load_system("sn40l-node"), tp=8)
    n = dep.slots(LLAMA)
    assert n == 40  # 8 x 64 GiB / 13.48 GB
    models = [ExpertModel.llama2_7b(f"e{i}") for i in range(n)]
    reqs = make_requests(200, n, np.random.default_rng(1), rate_per_s=50)
    for s in SCHEDULERS:
        r = serve(reqs, models, dep, scheduler=s)
        assert r.switches == 0 and r.switch_s == 0.0, s
        assert len(r.latency_s) == 200 and (r.latency_s > 0).all()


def test_cpsat_batches_interleaved_requests_to_cut_switches():
    dep = Deployment.from_system(load_system("dgx-h100"), tp=1, hbm_reserve_fraction=0.8)  # one model fits
    assert dep.slots(LLAMA) == 1
    models = [ExpertModel.llama2_7b("a"), ExpertModel.llama2_7b("b")]
    reqs = [Request(i, 0.0, i % 2, i % 2, 16, 4) for i in range(6)]  # a b a b a b, all at t = 0
    fifo = serve(reqs, models, dep, scheduler="fifo", max_batch=1, preload=False, latency_bound_s=100)
    lru = serve(reqs, models, dep, scheduler="lru", max_batch=1, preload=False, latency_bound_s=100)
    cp = serve(reqs, models, dep, scheduler="cpsat", max_batch=1, preload=False, latency_bound_s=100)
    assert fifo.switches == lru.switches == 6
    assert cp.switches == 2
    sw = dep.switch_s(models[0])
    assert cp.switch_s == pytest.approx(2 * sw) and fifo.switch_s == pytest.approx(6 * sw)
    assert cp.service_s == pytest.approx(fifo.service_s)


def test_zipf_route_favours_a_few_categories_and_is_what_requests_use():
    cats, experts = zipf_route(2000, 4, np.random.default_rng(3), zipf_s=1.5, num_categories=10)
    share = np.sort(np.bincount(cats, minlength=10))[::-1] / len(cats)
    assert share[0] > 0.3 and share[-1] < 0.05  # Zipf(1.5) over 10: 0.50 for the top category, 0.016 for the last
    assert experts.tolist() == (cats % 4).tolist()  # default table: category c -> expert c mod 4
    reqs = make_requests(50, 4, np.random.default_rng(3), num_categories=10, zipf_s=1.5)
    c, e = zipf_route(50, 4, np.random.default_rng(3), num_categories=10, zipf_s=1.5)
    assert [r.category for r in reqs] == c.tolist() and [r.expert for r in reqs] == e.tolist()


def test_two_step_routing_and_unknown_experts():
    assert two_step_route(np.array([0, 2, 1]), np.array([5, 6, 7]), 8).tolist() == [5, 7, 6]
    with pytest.raises(ValueError, match="unknown category 3"):
        two_step_route(np.array([3]), np.array([0, 1, 2]), 3)
    with pytest.raises(ValueError, match="unknown expert 9"):
        two_step_route(np.array([0]), np.array([9]), 3)
    dep = Deployment.from_system(load_system("sn40l-node"))
    with pytest.raises(ValueError, match="request 0 asks for unknown expert 4"):
        serve([Request(0, 0.0, 0, 4, 8, 8)], [LLAMA], dep)


def test_model_larger_than_every_tier_is_a_clear_error():
    huge = ExpertModel.dense("huge", 2e13)  # 40 TB of weights
    dep = Deployment.from_system(load_system("dgx-h100"), tp=1)
    with pytest.raises(ValueError, match="larger than every memory tier"):
        dep.slots(huge)
    with pytest.raises(ValueError, match="larger than every memory tier"):
        serve([Request(0, 0.0, 0, 0, 8, 8)], [huge], dep)
    with pytest.raises(ValueError, match="unknown scheduler"):
        serve([], [LLAMA], dep, scheduler="random")


def test_service_time_roofline_by_hand():
    dep = Deployment.from_system(load_system("dgx-h100"), tp=1)
    hbm = 3.35e12
    step = max(2 * LLAMA.num_params * 8 / 989.4e12, LLAMA.weight_bytes / hbm)
    assert dep.decode_step_s(LLAMA, 8) == pytest.approx(step, rel=1e-12)
    assert dep.allreduce_s(LLAMA, 8) == 0.0  # tp = 1
    sn = Deployment.from_system(load_system("sn40l-node"), tp=8)
    one = 2 * 7 / 8 * 8 * 4096 * 2 / 100e9 + 2 * 7 * 3e-6  # ring all-reduce over the peer links
    assert sn.allreduce_s(LLAMA, 8) == pytest.approx(32 * 2 * one, rel=1e-12)


def test_sn40l_study_reports_closed_form_ratios():
    from studies.sn40l_coe.spec_model import PAPER, run
    res = run()
    sn = Deployment.from_system(load_system("sn40l-node"), tp=8)
    h100 = Deployment.from_system(load_system("dgx-h100"), tp=1)
    c = {x["metric"]: x for x in res["comparisons"]}
    ratio = h100.switch_s(LLAMA) / sn.switch_s(LLAMA)
    assert c["switch speedup vs DGX H100"]["simulated"] == pytest.approx(ratio, rel=1e-12)
    assert c["switch speedup vs DGX H100"]["paper"] == PAPER["switch_speedup_vs_dgx_h100"]
    assert res["footprint_nodes"]["sn40l_node"] == 1  # 850 x 13.48 GB < 8 x 1.5 TiB of DDR
    assert res["footprint_nodes"]["dgx_h100_tp1"] == -(-850 // 40)  # 5 whole models per 80 GB GPU


def test_cli_commands(tmp_path, capsys):
    from moesim.cli import main
    assert main(["coe", "--experts", "4", "--requests", "12", "--schedulers", "fifo,cpsat"]) == 0
    assert "cpsat" in capsys.readouterr().out
    assert main(["memory", "cache", "--max-tokens", "4", "--policies", "lru,belady"]) == 0
    assert "belady" in capsys.readouterr().out
    assert main(["memory", "sweep", "--max-tokens", "4", "--hbm-gb", "0.5,2", "--backing-gbps", "100",
                 "--policies", "lru", "--out", str(tmp_path / "sw")]) == 0
    html = (tmp_path / "sw" / "report.html").read_text()
    assert "Pareto front" in html and "plotly" in html.lower()
    assert main(["memory", "cache", "--policies", "mru"]) == 2
    assert "unknown cache policy 'mru'" in capsys.readouterr().err


def test_a_scheduler_is_one_plain_function_in_the_dict(monkeypatch):
    from moesim.memory import coe

    seen = []

    def newest(state: coe.ServeState) -> int:
        """Serve the model of the latest arrival first (a toy policy: one function, one dict entry)."""
        seen.append(len(state.pending))
        return state.pending[-1].expert

    monkeypatch.setitem(coe.SCHEDULERS, "newest", newest)
    dep = Deployment.from_system(load_system("dgx-h100"), tp=1, hbm_reserve_fraction=0.8)  # one model fits
    models = [ExpertModel.llama2_7b("a"), ExpertModel.llama2_7b("b")]
    reqs = [Request(0, 0.0, 0, 0, 16, 4), Request(1, 0.0, 1, 1, 16, 4), Request(2, 0.0, 0, 0, 16, 4)]
    r = serve(reqs, models, dep, scheduler="newest", max_batch=4, preload=False, latency_bound_s=100)
    assert seen == [3, 1]  # a a b pending: newest serves model a (both a's), then b
    assert [entry[1] for entry in r.log] == [0, 1] and r.switches == 2
    assert r.switch_s == pytest.approx(2 * dep.switch_s(models[0]))


def test_store_tier_is_the_tier_behind_main_memory():
    sn = Deployment.from_system(load_system("sn40l-node"), tp=8)
    gpu = Deployment.from_system(load_system("dgx-h100"), tp=1)
    assert (sn.hbm_tier, sn.store_tier) == ("hbm", "ddr") and (gpu.hbm_tier, gpu.store_tier) == ("hbm", "host")
