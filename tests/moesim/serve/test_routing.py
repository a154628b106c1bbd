"""EPLB-style replicas in the serving iteration cost, and per-request routing from a trace."""

import numpy as np
import pytest

from hwmodels.specs import load_system
from moesim.serve import exflow
from moesim.serve.cost import BatchWork, IterationCost, ServeError, ServeLayout, pool_system
from moesim.serve.engine import Replica, simulate
from moesim.serve.kv import KVBlocks
from moesim.serve.routing import RequestRouting
from moesim.serve.scheduler import SchedulerConfig
from workloads.hf_config import load_config
from workloads.requests import Requests
from workloads.trace import TraceMeta, from_dense

T = 64  # tokens per rank


def _hot_trace(tokens: int, experts: int = 64, k: int = 8):
    """Every token picks experts 0..k-1 (all on GPU 0 of the contiguous placement over 2 GPUs)."""
    ids = np.broadcast_to(np.arange(k, dtype=np.int32), (tokens, 1, k)).copy()
    return from_dense(ids, None, TraceMeta("hand", experts, k, 1, "hand"))


def _cost(trace, placement=None, **kw):
    return IterationCost(load_config("olmoe-1b-7b"), pool_system(load_system("dgx-h100"), 2),
                         ServeLayout(tp=1, ep=2, dp=2), trace=trace, placement=placement, **kw)


def test_a_replica_halves_the_hottest_gpu_and_the_iteration_time_follows():
    trace = _hot_trace(2 * T)  # 2 GPUs x T tokens: one window, no scaling
    placed = exflow.place(trace, "greedy", 2, 2, num_replicas=8)
    assert (placed.replica_count[0, :8] == 2).all()  # each hot expert has a copy on each GPU
    plain_ic, placed_ic = _cost(trace), _cost(trace, placed)
    plain, rep = plain_ic._moe_times(T), placed_ic._moe_times(T)
    # by hand: GPU 0 computes all 2T x 8 choices; with a copy of each hot expert on GPU 1, local-first halves it
    assert plain.expert_tokens_max.max() == 2 * T * 8
    assert rep.expert_tokens_max.max() == T * 8
    w = BatchWork(tokens=T, sampled=T, attention_pairs=float(T * 100), kv_tokens_read=float(T * 100))
    pa, pb = plain_ic.layer_parts(T), placed_ic.layer_parts(T)
    moe_diff = sum(float(np.sum(np.maximum(p.dispatch_s, p.shared_s) + p.expert_s + p.combine_s)) * s
                   for p, s in ((pa, 1), (pb, -1)))
    assert np.all(pb.expert_s[1:] < pa.expert_s[1:])  # every MoE layer's routed experts run faster
    assert plain_ic.rank_s(w) - placed_ic.rank_s(w) == pytest.approx(moe_diff, rel=1e-9)
    assert placed_ic.rank_s(w) < plain_ic.rank_s(w)


def test_routed_iteration_on_the_static_window_is_the_static_iteration():
    trace = _hot_trace(2 * T)
    placed = exflow.place(trace, "greedy", 2, 2, num_replicas=8)
    ic = _cost(trace, placed, request_routing=RequestRouting(trace))
    # the static replay's window is the whole 2T-token step; routing those rows per request gives the same time
    assert ic.routed_linear_s(T, np.arange(2 * T)) == pytest.approx(_cost(trace, placed).linear_exact_s(T), rel=1e-12)


def _routing_trace(tokens=40, layers=2, experts=8, k=2, seed=3):
    rng = np.random.default_rng(seed)
    ids = np.stack([[rng.choice(experts, k, replace=False) for _ in range(layers)] for _ in range(tokens)])
    return ids.astype(np.int32), from_dense(ids.astype(np.int32), None, TraceMeta("hand", experts, k, layers, "r"))


def test_request_rows_are_consecutive_from_a_seeded_start_and_loads_are_their_bincount():
    ids, trace = _routing_trace()
    rr = RequestRouting(trace, seed=5)
    rr.bind(3)
    assert np.array_equal(rr.starts, np.random.default_rng(5).integers(0, 40, size=3))
    rows = rr.rows(np.array([2, 0]), np.array([10, 0]), np.array([3, 2]))
    want = np.concatenate([(rr.starts[2] + np.arange(10, 13)) % 40, (rr.starts[0] + np.arange(2)) % 40])
    assert np.array_equal(rows, want)
    loads = rr.loads(rows)
    for layer in range(2):
        assert np.array_equal(loads[layer], np.bincount(ids[rows, layer].ravel(), minlength=8))


def test_sparse_trace_is_refused():
    _, trace = _routing_trace()
    cols = {k: v[:-1] for k, v in trace.columns.items()}
    with pytest.raises(ValueError, match="not dense"):
        RequestRouting(type(trace)(columns=cols, meta=trace.meta))


class _RecordingCost:
    """Constant-time cost that records each iteration's routing rows."""

    def __init__(self, routing):
        self.request_routing, self.seen = routing, []

    def iteration_s(self, w):
        self.seen.append(w.routing_rows)
        return 0.01


def test_engine_loads_per_iteration_are_the_bincount_of_the_batchs_rows():
    ids, trace = _routing_trace(tokens=40)
    rr = RequestRouting(trace, seed=1)
    req = Requests(np.array([0.0, 0.0, 0.015]), np.array([5, 3, 4]), np.array([3, 4, 2]), source="hand")
    cost = _RecordingCost(rr)
    res = simulate(req, [Replica("r", cost, KVBlocks(100, 4))], SchedulerConfig(max_num_batched_tokens=6))
    assert len(cost.seen) == len(res.iterations["tokens"]) > 2
    for rows, n in zip(cost.seen, res.iterations["tokens"]):
        assert len(rows) == n
        got = rr.loads(rows)
        assert np.array_equal(got, np.stack([np.bincount(ids[rows, l].ravel(), minlength=8) for l in range(2)]))
    # every request's positions 0 .. prompt + output - 2 were routed exactly once, from its start row
    allrows = np.concatenate(cost.seen)
    total = req.prompt_tokens + req.output_tokens - 1
    want = np.concatenate([(rr.starts[r] + np.arange(total[r])) % 40 for r in range(3)])
    assert np.array_equal(np.sort(allrows), np.sort(want))


def test_iteration_time_follows_the_batchs_routing():
    hot = _hot_trace(2 * T)
    # the same number of experts, split over the 2 GPUs: 0..3 on GPU 0, 32..35 on GPU 1
    ids = np.broadcast_to(np.r_[0:4, 32:36].astype(np.int32), (2 * T, 1, 8)).copy()
    both = from_dense(np.concatenate([hot.columns["expert"].reshape(2 * T, 1, 8), ids]), None,
                      TraceMeta("hand", 64, 8, 1, "mix"))
    rr = RequestRouting(both)
    ic = _cost(both, request_routing=rr)
    w = BatchWork(tokens=T, sampled=T, attention_pairs=float(T), kv_tokens_read=float(T))
    t_hot = ic.rank_s(_with(w, np.arange(2 * T)))
    t_even = ic.rank_s(_with(w, np.arange(2 * T, 4 * T)))
    assert ic.routed_moe(np.arange(2 * T, 4 * T)).expert_tokens_max.max() == T * 8
    assert t_hot > t_even
    tbo = _cost(both, request_routing=rr, two_batch_overlap=True)  # each micro-batch replays its own rows
    assert tbo.rank_s(_with(w, np.arange(2 * T))) > tbo.rank_s(_with(w, np.arange(2 * T, 4 * T)))


def _with(w, rows):
    import dataclasses
    return dataclasses.replace(w, routing_rows=rows)


def test_cli_replicas_and_request_routing(tmp_path, capsys):
    import json

    from moesim.cli import main
    base = ["serve", "--model", "olmoe-1b-7b", "--system", "dgx-h100", "--ep", "8", "--rate", "4",
            "--duration-s", "0.5", "--no-report"]
    assert main([*base, "--redundant-slots", "8", "--out", str(tmp_path / "a")]) != 0
    assert "--placement" in capsys.readouterr().err
    assert main([*base, "--request-routing", "--out", str(tmp_path / "b")]) != 0
    assert "--trace" in capsys.readouterr().err
    assert main([*base, "--trace", "flame-moe-290m", "--placement", "greedy", "--redundant-slots", "8",
                 "--request-routing", "--out", str(tmp_path / "c")]) == 0
    m = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert m["config"]["redundant_slots"] == 8 and m["config"]["request_routing"] == "trace"
    assert m["requests"]["finished"] == m["requests"]["total"] > 0


def test_several_ep_groups_route_one_groups_share_of_the_batch():
    trace = _hot_trace(4 * T)
    ic = IterationCost(load_config("olmoe-1b-7b"), pool_system(load_system("dgx-h100"), 4),
                       ServeLayout(tp=1, ep=2, dp=4), trace=trace, request_routing=RequestRouting(trace))
    # 4 ranks x T tokens, two EP groups of 2 GPUs: each group's hot GPU computes its 2T tokens x 8 choices
    assert ic.routed_moe(np.arange(4 * T)).expert_tokens_max.max() == 2 * T * 8
