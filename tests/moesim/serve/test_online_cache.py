"""The expert cache on per-request routing: caches fed by each iteration's own rows, carrying their state."""

import json

import numpy as np
import pytest

from hwmodels.specs import load_system
from moesim.cli import main
from moesim.memory.cache import plan
from moesim.serve.cost import BatchWork, IterationCost, ServeLayout, pool_system
from moesim.serve.engine import Replica, simulate
from moesim.serve.kv import KVBlocks
from moesim.serve.offload import OnlineCache, _join, build
from moesim.serve.routing import RequestRouting
from moesim.serve.scheduler import SchedulerConfig
from workloads.hf_config import load_config
from workloads.requests import Requests
from workloads.trace import TraceMeta, from_dense

CFG = load_config("olmoe-1b-7b")


def _routing(tokens=400, layers=2, k=2, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.stack([[rng.choice(16, k, replace=False) for _ in range(layers)] for _ in range(tokens)]).astype(np.int32)
    return ids, from_dense(ids, None, TraceMeta("hand", 64, k, layers, "hand"))


def _online(trace, ids, experts, ep=1, policy="lru"):
    from hwmodels.roofline import DTYPE_BYTES
    from workloads.catalog import swiglu_params
    expert_bytes = swiglu_params(CFG.hidden_size, CFG.moe_intermediate_size) * DTYPE_BYTES["bf16"]
    cache = build(CFG, pool_system(load_system("dgx-h100"), max(ep, 2)), trace, experts * expert_bytes, policy, 1,
                  ep, "bf16")
    return OnlineCache(cache, ids)


def test_accesses_are_the_distinct_experts_of_the_rows_in_every_model_layer():
    ids, trace = _routing()
    oc = _online(trace, ids, 20)
    rows = np.array([3, 7, 7, 100, 250])
    s = oc.stream(rows)
    want = sum(len(set(ids[rows, j % 2].ravel())) for j in range(len(CFG.moe_layers)))
    assert len(s) == want and s.num_layers == len(CFG.moe_layers)
    for j in range(len(CFG.moe_layers)):  # tokens per access: the rows' choices of that expert
        got = dict(zip(s.keys[s.group == j] - j * 64, s.tokens[s.group == j]))
        assert got == dict(zip(*np.unique(ids[rows, j % 2].ravel(), return_counts=True)))


def test_lru_carried_between_iterations_is_one_lru_over_the_whole_run():
    ids, trace = _routing()
    oc = _online(trace, ids, 20)
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 400, size=n) for n in (40, 3, 5, 1, 8, 2, 30, 4)]
    streams = [oc.stream(b) for b in batches]
    assert len(np.unique(streams[0].keys)) >= 20  # the warm start fills the cache from the first iteration alone
    got = [oc.step(0, s, 0.0)["hits"] for s in streams]
    whole = plan(_join(streams), 20, "lru", warm=True)
    ends = np.cumsum([len(s) for s in streams])
    assert got == [float(whole.hit[e - len(s):e].sum()) for s, e in zip(streams, ends)]
    assert 0 < sum(got) < sum(len(s) for s in streams)


def test_each_gpu_of_the_ep_group_caches_its_own_experts_once_per_iteration():
    ids, trace = _routing()
    one, two = _online(trace, ids, 6), _online(trace, ids, 6, ep=2)
    rows = np.arange(0, 60)
    stall = two.stall_s(0, rows[:30], rows, 0.0)
    assert two.stall_s(1, rows[30:], rows, 0.0) == stall and len(two.log) == 1  # every rank shares the step
    assert two.log[0]["accesses"] == len(one.stream(rows))  # GPU 0's experts 0..31 and GPU 1's 32..63 partition it
    fresh = _online(trace, ids, 6, ep=2)  # the same first step, GPU by GPU: the group waits for the slowest
    assert stall == max(fresh.step(d, fresh.stream(rows, d), 0.0)["stall_s"] for d in range(2))


def test_the_engine_gives_each_rank_its_own_rows():
    ids, trace = _routing()
    rr = RequestRouting(trace, seed=2)

    class Recording:
        request_routing, seen = rr, []

        def rank_s(self, w):
            self.seen.append((w.rank, w.rank_rows, w.routing_rows, w.tokens))
            return 0.01

    req = Requests(np.zeros(4), np.array([5, 3, 4, 6]), np.array([3, 4, 2, 2]), source="hand")
    cost = Recording()
    simulate(req, [Replica("r", cost, KVBlocks(100, 4), ranks=2)], SchedulerConfig(max_num_batched_tokens=8))
    assert cost.seen
    for i in range(0, len(cost.seen), 2):
        (r0, a, rows, n0), (r1, b, rows1, n1) = cost.seen[i], cost.seen[i + 1]
        assert (r0, r1) == (0, 1) and rows is rows1 and len(a) == n0 and len(b) == n1
        assert np.array_equal(np.concatenate([a, b]), rows)


def test_iteration_cost_charges_the_online_stall(tmp_path):
    ids, trace = _routing()
    rr = RequestRouting(trace)
    oc = _online(trace, ids, 8)
    ic = IterationCost(CFG, pool_system(load_system("dgx-h100"), 2), ServeLayout(tp=1, ep=1, dp=2), trace=trace,
                       expert_cache=oc.cache, request_routing=rr)
    rows = np.arange(16)
    w = BatchWork(tokens=8, sampled=8, attention_pairs=8.0, kv_tokens_read=8.0, routing_rows=rows, rank=1,
                  rank_rows=rows[8:])
    t = ic.rank_s(w)
    log = ic.online_cache.log[-1]
    assert log["who"] == 1 and log["accesses"] == len(oc.stream(rows[8:])) and log["stall_s"] > 0
    import dataclasses
    no_stall = t - log["stall_s"]
    assert ic.rank_s(dataclasses.replace(w, rank=0, rank_rows=rows[:0])) == pytest.approx(no_stall, rel=1e-12)


def test_cli_expert_cache_on_request_routing(tmp_path, capsys):
    arrivals = tmp_path / "a.csv"
    arrivals.write_text("arrival_s,prompt_tokens,output_tokens\n0.0,16,4\n0.0,8,3\n0.001,12,5\n")
    base = ["serve", "--model", "olmoe-1b-7b", "--system", "dgx-h100", "--trace", "flame-moe-290m",
            "--request-routing", "--expert-cache-gb", "0.5", "--arrivals", str(arrivals), "--no-report"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    c = m["expert_cache"]["colocated"]
    assert c["routing"] == "per-request rows (online)" and 0 < c["hit_rate"] < 1 and c["stall_s"] > 0
    assert m["requests"]["finished"] == 3
    assert main([*base, "--cache-policy", "belady", "--out", str(tmp_path / "b")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "belady" in err[0]


def test_the_trace_replay_runs_through_the_models_layers_like_the_online_cache():
    """A 2-layer trace on OLMoE's 16 MoE layers: one batch of all the trace's tokens has the online cache's accesses
    (each model layer its own experts) and, from the same warm start, its hits and stall."""
    from moesim.memory.cache import access_stream
    from moesim.serve.offload import model_layers

    ids, trace = _routing(layers=2)
    s = model_layers(access_stream(trace, batch_tokens=400), len(CFG.moe_layers))
    assert s.num_layers == len(CFG.moe_layers) and len(np.unique(s.keys)) == len(s)
    assert np.array_equal(s.keys % 64, np.tile(access_stream(trace, batch_tokens=400).keys % 64, 8))
    for ep in (1, 2):
        oc = _online(trace, ids, 12, ep=ep)
        got = oc.cache.per_batch(400 // ep, 1e-4)
        rows = np.arange(400)
        oc.stall_s(0, rows, rows, 1e-4)
        want = oc.log[-1]
        assert got["accesses"] == want["accesses"] == len(oc.stream(rows))
        assert got["hits"] == want["hits"] and 0 < got["hits"] < got["accesses"]
        assert got["stall_s"] == pytest.approx(want["stall_s"], rel=1e-12) and got["stall_s"] > 0
