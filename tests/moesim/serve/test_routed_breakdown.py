"""Where an iteration's time goes under per-request routing: the engine records the parts as the cost computes them."""

import numpy as np
import pytest

from hwmodels.specs import load_system
from moebase.units import GB
from moesim.serve import offload
from moesim.serve.cost import BREAKDOWN_PARTS, BatchWork, IterationCost, ServeLayout, part_column, pool_system
from moesim.serve.engine import Replica, simulate
from moesim.serve.kv import KVBlocks
from moesim.serve.metrics import time_breakdown
from moesim.serve.routing import RequestRouting
from moesim.serve.scheduler import SchedulerConfig
from workloads import requests as rq
from workloads.hf_config import load_config
from workloads.importers import load_trace
from workloads.trace import TraceMeta, from_dense

CFG = load_config("olmoe-1b-7b")
T = 64  # tokens per rank


def _hot_cost(**kw):
    """Two GPUs (ep 2, dp 2); every token of the trace picks experts 0..7, all on GPU 0."""
    ids = np.broadcast_to(np.arange(8, dtype=np.int32), (4 * T, 1, 8)).copy()
    trace = from_dense(ids, None, TraceMeta("hand", 64, 8, 1, "hand"))
    return IterationCost(CFG, pool_system(load_system("dgx-h100"), 2), ServeLayout(tp=1, ep=2, dp=2), trace=trace,
                         request_routing=RequestRouting(trace), **kw)


def _work(rows):
    return BatchWork(tokens=T, sampled=T // 2, attention_pairs=float(T * 300), kv_tokens_read=float(T * 300),
                     routing_rows=rows)


@pytest.mark.parametrize("tbo", [False, True])
def test_the_parts_are_the_batchs_own_routing_and_add_up_to_the_rank_time(tbo):
    ic = _hot_cost(two_batch_overlap=tbo)
    w = _work(np.arange(2 * T))
    parts = ic.rank_parts_s(w)
    assert list(parts) == list(BREAKDOWN_PARTS)
    assert sum(parts.values()) == pytest.approx(ic.rank_s(w), rel=1e-12)
    static = ic.breakdown_s(w)  # the balanced replay the breakdown used to show
    if tbo:
        halves = ic.routed_halves(w.routing_rows)
        routed = [ic.routed_moe(h) for h in halves]  # experts with the token (un)permute kernels
        assert parts["experts"] == pytest.approx(sum(float((m.expert_s + m.permute_fwd_s)[0].sum()) for m in routed))
        assert parts["hidden by two-batch overlap"] < 0
    else:
        mt = ic.routed_moe(w.routing_rows)
        assert parts["experts"] == pytest.approx(float((mt.expert_s + mt.permute_fwd_s)[0].sum()), rel=1e-12)
        assert parts["dispatch"] == pytest.approx(float(mt.dispatch_s[0].sum()), rel=1e-12)
        assert parts["hidden by two-batch overlap"] == 0
        # 8 of the 64 experts hold every choice: far fewer expert weights read than the balanced replay's
        assert parts["experts"] < 0.5 * static["experts"]
        # the routing-free rest is the static cost's: embedding, attention side, attention core, LM head
        for k in ("embedding", "attention side", "attention core", "LM head"):
            assert parts[k] == pytest.approx(static[k], rel=1e-12)


def test_without_per_request_routing_the_parts_are_the_static_breakdown():
    ic = _hot_cost()
    w = _work(None)
    assert ic.rank_parts_s(w) == ic.breakdown_s(w)


def _run(ranks, tbo, cache_gb):
    system = load_system("dgx-h100")
    trace = load_trace("flame-moe-290m")
    cache = offload.build(CFG, system, trace, cache_gb * GB, "lru", 1, 8, "bf16") if cache_gb else None
    ic = IterationCost(CFG, system, ServeLayout(tp=1, ep=8, dp=8), trace=trace, two_batch_overlap=tbo,
                       request_routing=RequestRouting(trace), expert_cache=cache)
    req = rq.generate("poisson", 10, 1, rq.LENGTH_MODELS["azure-conv-2023"], np.random.default_rng(0))
    rep = Replica("colocated", ic, KVBlocks(ic.kv_capacity_blocks(16)), ranks=ranks)
    return ic, simulate(req, [rep], SchedulerConfig())


@pytest.mark.parametrize("ranks,tbo,cache_gb", [(8, False, 0), (1, False, 0), (8, True, 0), (8, False, 0.5)])
def test_recorded_breakdown_adds_up_to_the_busy_time(ranks, tbo, cache_gb):
    """Every iteration's recorded parts add up to its time; the breakdown is their sum over the run."""
    ic, res = _run(ranks, tbo, cache_gb)
    it = res.iterations
    cols = [part_column(k) for k in BREAKDOWN_PARTS]
    per_row = np.sum([it[c] for c in cols], axis=0)
    assert len(per_row) > 5 and np.allclose(per_row, it["duration_s"], rtol=1e-12, atol=0)
    b = time_breakdown(res, {"colocated": ic}, samples=3)["colocated"]
    assert b["parts_from"] == "recorded" and b["sampled_iterations"] == b["iterations"] == len(per_row)
    assert sum(b["parts_s"].values()) == pytest.approx(b["simulated_busy_s"], rel=1e-12)
    assert b["parts_s"]["experts"] > 0 and b["parts_s"]["dispatch"] > 0
    assert (b["parts_s"]["expert fetch stall"] > 0) == bool(cache_gb)
    assert (b["parts_s"]["hidden by two-batch overlap"] < 0) == tbo


def test_static_routing_records_no_parts():
    system = load_system("dgx-h100")
    ic = IterationCost(CFG, system, ServeLayout(tp=1, ep=8, dp=8), trace=load_trace("flame-moe-290m"))
    req = rq.generate("poisson", 10, 1, rq.LENGTH_MODELS["azure-conv-2023"], np.random.default_rng(0))
    res = simulate(req, [Replica("colocated", ic, KVBlocks(ic.kv_capacity_blocks(16)), ranks=8)], SchedulerConfig())
    assert not [c for c in res.iterations if c.startswith("part_")]
    b = time_breakdown(res, {"colocated": ic})["colocated"]
    assert "parts_from" not in b and sum(b["parts_s"].values()) == pytest.approx(b["simulated_busy_s"], rel=1e-3)


class _PartsCost:
    """Per-request routing stand-in: every rank's iteration is 0.25 s of experts and 0.75 s of dispatch."""

    def __init__(self, routing):
        self.request_routing = routing

    def rank_parts_s(self, w):
        return {"experts": 0.25, "dispatch": 0.75}

    def rank_s(self, w):
        return sum(self.rank_parts_s(w).values())

    iteration_s = rank_s

    def breakdown_s(self, w):
        raise AssertionError("the static rebuild must not run where the parts were recorded")


@pytest.mark.parametrize("ranks", [1, 2])
def test_recorded_parts_and_the_kv_spill_wait_add_up(ranks):
    """The spill log of tests/moesim/serve/test_kv_spill.py (1 s of compute per iteration, 2 and 5 s with the spill
    transfers): the recorded parts are the compute's, the logged spill wait the rest."""
    from moesim.serve.kv import SpillTier
    from workloads.requests import Requests

    ids = np.arange(80, dtype=np.int32).reshape(40, 1, 2) % 8
    rr = RequestRouting(from_dense(ids, None, TraceMeta("hand", 8, 2, 1, "hand")))
    cfg = SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=8, block_size=1, kv_offload="spill")
    # every rank gets one (3 prompt, 3 output) and one (2, 3) request: each runs the hand-worked log
    req = Requests(np.zeros(2 * ranks), np.repeat([3, 2], ranks), np.full(2 * ranks, 3))
    rep = Replica("r", _PartsCost(rr), KVBlocks(6, 1), ranks=ranks, spill=SpillTier("ddr", 10, 1000.0, 1000.0, 0.0))
    res = simulate(req, [rep], cfg)
    it = res.iterations
    assert it["duration_s"].tolist() == [1, 2, 5] and it["spill_wait_s"].tolist() == [0, 1, 4]
    n = 3
    assert it[part_column("experts")].tolist() == [0.25] * n and it[part_column("dispatch")].tolist() == [0.75] * n
    b = time_breakdown(res, {"r": rep.cost})["r"]
    assert b["parts_s"] == {"experts": 0.25 * n, "dispatch": 0.75 * n,
                            "KV spill wait": pytest.approx(float(it["spill_wait_s"].sum()))}
    assert sum(b["parts_s"].values()) == pytest.approx(b["simulated_busy_s"], rel=1e-12)


def test_report_says_the_parts_were_recorded():
    from moesim.report.serve import _breakdown_html

    b = {"iterations": 3, "sampled_iterations": 3, "parts_from": "recorded", "parts_s": {"experts": 1.0},
         "simulated_busy_s": 1.0}
    html = _breakdown_html({"iteration_time": {"<b>pool</b>": b}}, [{"pool": "x"}])
    assert "all 3 iterations as the engine timed them" in html and "&lt;b&gt;pool" in html and "scaled" not in html
