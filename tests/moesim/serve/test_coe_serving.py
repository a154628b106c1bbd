"""Composition of Experts on the serving engine (moesim/serve/coe.py) and the SN40L study on it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hwmodels.specs import load_system
from moebase.units import DTYPE_BYTES
from moesim.serve.coe import CoEOptions, coe_node, nodes_to_hold, route_experts, serve_coe, serve_coe_replicas
from moesim.serve.cost import ServeError
from workloads.requests import Requests
from studies.sn40l_coe.run import expert_config

LLAMA2_7B_PARAMS = 6_738_415_616  # HF config of Llama-2-7B: 32 x 4096 hidden, 11008 FFN, 32000 vocab, untied
BF16_BYTES = DTYPE_BYTES["bf16"]


def _node(name: str, tp: int):
    return coe_node(expert_config(), load_system(name), tp=tp, kv_reserve_tokens=8 * 148)


_DGX_NODE = coe_node(expert_config(), load_system("dgx-h100"), tp=1, kv_reserve_tokens=8 * 148)


def _batch(n: int, prompt: int = 128, output: int = 20, at_s: float = 0.0) -> Requests:
    return Requests(np.full(n, at_s), np.full(n, prompt), np.full(n, output))


@pytest.mark.parametrize("name,tp", [("sn40l-node", 8), ("dgx-h100", 1), ("dgx-a100", 1)])
def test_one_switch_is_bytes_over_bandwidth_plus_latency(name, tp):
    system = load_system(name)
    node = _node(name, tp)
    norms = (2 * 32 + 1) * 4096  # RMSNorm weights (2 per layer + final), replicated on every tp device
    shard = ((LLAMA2_7B_PARAMS - norms) / tp + norms) * BF16_BYTES
    assert node.shard_bytes == pytest.approx(shard, rel=1e-12)
    tiers = {t.name: t for t in system.device.memory}
    hbm = tiers[system.device.main_memory.name]
    if node.store_tier == "host":  # GPU: host DDR -> PCIe -> HBM, the slowest of the three
        bw = min(system.host_link.bandwidth_bytes_per_s, system.host_memory.bandwidth_bytes_per_s,
                 hbm.bandwidth_bytes_per_s)
        lat = system.host_link.latency_s + system.host_memory.latency_s + hbm.latency_s
    else:  # SN40L: the socket's DDR port
        ddr = tiers[node.store_tier]
        bw, lat = ddr.bandwidth_bytes_per_s, ddr.latency_s + hbm.latency_s
    res = serve_coe(_batch(1), np.array([3]), node, CoEOptions(preload=False))
    assert res.switches == 1
    assert res.switch_wait_s == pytest.approx(shard / bw + lat, rel=1e-9)
    assert res.batches[0]["start_s"] == pytest.approx(shard / bw + lat, rel=1e-9)


def test_everything_resident_means_no_switching():
    node = _node("sn40l-node", 8)
    experts = np.arange(8) % 4  # 4 experts, all preloaded (36 HBM slots)
    res = serve_coe(_batch(8), experts, node, CoEOptions(preload=True, max_batch=2))
    assert res.switches == 0 and res.switch_wait_s == 0.0
    assert res.bytes_by_path == {}
    assert res.makespan_s == pytest.approx(res.compute_s, rel=1e-12)  # back-to-back batches, no idle


def test_overlap_hides_a_copy_shorter_than_compute():
    node = _node("sn40l-node", 8)
    req = _batch(2)
    experts = np.array([0, 1])
    serial = serve_coe(req, experts, node, CoEOptions(preload=False, overlap=False))
    over = serve_coe(req, experts, node, CoEOptions(preload=False, overlap=True))
    switch = node.switch_closed_form_s()
    assert serial.batches[1]["wait_s"] == pytest.approx(switch, rel=1e-9)
    assert serial.batches[0]["compute_s"] > switch  # so the prefetched copy ends before the compute
    assert over.batches[1]["wait_s"] == 0.0
    assert serial.makespan_s - over.makespan_s == pytest.approx(switch, rel=1e-9)


def test_concurrent_copies_share_the_channel():
    node = _node("dgx-h100", 1)  # 5 HBM slots: both prefetches get a free slot
    req = _batch(3, prompt=1, output=1)  # compute far shorter than a copy
    res = serve_coe(req, np.array([0, 1, 2]), node, CoEOptions(preload=False, overlap=True, prefetch=2))
    ch = node.hierarchy.channel(node.store_tier, node.hbm_tier)
    one = node.shard_bytes / ch.bandwidth_bytes_per_s + ch.latency_s
    assert res.batches[0]["start_s"] == pytest.approx(one, rel=1e-9)
    # copies 1 and 2 start together when batch 0 starts: latency, then each at half the bandwidth
    both = one + ch.latency_s + 2 * node.shard_bytes / ch.bandwidth_bytes_per_s
    assert res.batches[1]["start_s"] == pytest.approx(both, rel=1e-9)
    assert res.batches[2]["wait_s"] == 0.0  # already in HBM
    assert res.switches == 3


@pytest.mark.parametrize("seed", [0, 1])
def test_requests_conserved(seed):
    rng = np.random.default_rng(seed)
    n = 300
    req = Requests(np.cumsum(rng.exponential(0.05, n)), rng.integers(1, 300, n), rng.integers(1, 40, n))
    experts = route_experts(n, 20, rng)
    node = _node("dgx-h100", 1)
    parts = serve_coe_replicas(req, experts, node, 8, CoEOptions(max_batch=4))
    assert sum(len(p.requests) for p in parts) == n
    for p in parts:
        assert np.all(p.batch >= 0)
        assert sum(b["size"] for b in p.batches) == len(p.requests)
        assert np.bincount(p.batch, minlength=len(p.batches)).tolist() == [b["size"] for b in p.batches]
        assert np.all(np.isfinite(p.finished_at_s))
        assert np.all(p.first_token_at_s >= p.requests.arrival_s)
        assert np.all(p.finished_at_s >= p.first_token_at_s)
        assert all(b["size"] <= 4 for b in p.batches)
        for k, b in enumerate(p.batches):  # a batch holds one expert's requests
            assert set(p.experts[p.batch == k].tolist()) == {b["expert"]}


def test_bad_inputs_raise_one_line_errors():
    node = _node("dgx-h100", 1)
    with pytest.raises(ServeError, match="do not fit the host tier"):
        serve_coe(_batch(1), np.array([node.store_slots]), node)
    with pytest.raises(ServeError, match="expert ids"):
        serve_coe(_batch(2), np.array([0]), node)
    with pytest.raises(ServeError, match="--tp 16"):
        coe_node(expert_config(), load_system("dgx-h100"), tp=16, kv_reserve_tokens=0)
    with pytest.raises(ServeError, match="at least one expert"):
        nodes_to_hold(10, 0)
    assert nodes_to_hold(850, 40) == 22


def test_study_is_deterministic_for_a_seed_and_matches_the_closed_form():
    from studies.sn40l_coe.run import run

    a = run(seed=3, with_sweeps=False)
    b = run(seed=3, with_sweeps=False)
    assert a["comparisons"] == b["comparisons"] and a["stream"] == b["stream"]
    sn, h100 = _node("sn40l-node", 8), _node("dgx-h100", 1)
    c = {x["metric"]: x for x in a["comparisons"]}
    ratio = h100.switch_closed_form_s() / sn.switch_closed_form_s()
    assert c["switch_vs_h100"]["serving_engine"] == pytest.approx(ratio, rel=1e-9)
    assert c["footprint"]["serving_engine"] == nodes_to_hold(850, 5 * 8) / 1
    assert all(r["served"] == a["stream"]["requests"] for r in a["stream"]["rows"])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 40), experts=st.integers(1, 30), prefetch=st.integers(0, 6),
       max_batch=st.integers(1, 5), overlap=st.booleans())
def test_hbm_never_holds_more_than_its_slots_and_each_request_is_served_once(seed, n, experts, prefetch, max_batch,
                                                                           overlap):
    rng = np.random.default_rng(seed)
    req = Requests(np.cumsum(rng.exponential(0.02, n)), rng.integers(1, 64, n), rng.integers(1, 8, n))
    ex = rng.integers(0, experts, n)
    node = _DGX_NODE  # 5 HBM slots
    res = serve_coe(req, ex, node, CoEOptions(max_batch=max_batch, overlap=overlap, prefetch=prefetch))
    assert res.peak_hbm_models <= node.slots
    assert np.all(res.batch >= 0) and sum(b["size"] for b in res.batches) == n
    assert np.all(res.finished_at_s >= req.arrival_s)
    # every batch starts after its model's copy: wait >= 0, and batches never overlap in time
    starts = np.array([b["start_s"] for b in res.batches])
    ends = starts + np.array([b["compute_s"] for b in res.batches])
    assert np.all(starts[1:] >= ends[:-1] - 1e-12)
