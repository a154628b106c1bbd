"""The serving engine: an exact event log on a tiny preemption case, M/D/1 against its closed form, and
invariants on random workloads (KV within capacity, nobody lost or served twice, exact recomputation)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from moesim.serve.engine import Replica, simulate
from moesim.serve.kv import KVBlocks
from moesim.serve.metrics import summarise
from workloads.requests import Requests
from moesim.serve.scheduler import SchedulerConfig
from tests.moesim.serve.conftest import ConstCost, LinearCost


def _requests(arrival, prompt, output):
    return Requests(np.asarray(arrival, float), np.asarray(prompt, np.int64), np.asarray(output, np.int64))


def _colocated(req, cost, capacity_blocks, cfg):
    return simulate(req, [Replica("r", cost, KVBlocks(capacity_blocks, cfg.block_size))], cfg)


workloads = st.integers(1, 20).flatmap(lambda n: st.tuples(
    st.lists(st.floats(0, 5, allow_nan=False), min_size=n, max_size=n),
    st.lists(st.integers(1, 60), min_size=n, max_size=n),
    st.lists(st.integers(1, 30), min_size=n, max_size=n)))


def test_preemption_event_log_by_hand():
    """A (3 prompt, 3 output) and B (2, 3) at t=0, 6 KV blocks of one token, 1 s per iteration.
    it1: both prefill (5 blocks), both sample. it2: A's decode takes the last block (peak 6); B needs one
    more and, being the youngest, preempts itself (its 2 blocks freed: 4 in use while it2 runs). it3: A decodes
    and finishes; B cannot come back (needs 3 blocks, 1 free). it4: B re-prefills prompt + its 1 token (3 tokens).
    it5: B's last decode."""
    cfg = SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=8, block_size=1)
    res = _colocated(_requests([0, 0], [3, 2], [3, 3]), ConstCost(1.0), 6, cfg)
    it = res.iterations
    assert it["start_s"].tolist() == [0, 1, 2, 3, 4]
    assert it["tokens"].tolist() == [5, 1, 1, 3, 1]
    assert it["kv_used_blocks"].tolist() == [5, 4, 5, 3, 4]
    assert res.replicas["r"]["kv_peak_blocks_per_rank"] == 6
    assert it["preempted"].tolist() == [0, 1, 0, 0, 0]
    assert res.first_token_at_s.tolist() == [1, 1]
    assert res.finished_at_s.tolist() == [3, 5]
    assert res.preemptions.tolist() == [0, 1] and res.evicted_tokens.tolist() == [0, 2]
    # recomputation redid exactly the 2 evicted tokens: 9 tokens of work + 2
    assert it["tokens"].sum() == (3 + 3 - 1) + (2 + 3 - 1) + 2


def test_swap_preemption_by_hand():
    """The case above with preemption by swapping to 10 host blocks: in it2 B's 2 tokens of KV go to host; B
    comes back in it4 with them (3 blocks: 2 swapped in + its next token) and only decodes: no recomputation."""
    cfg = SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=8, block_size=1, preemption="swap")
    rep = Replica("r", ConstCost(1.0), KVBlocks(6, 1), host=KVBlocks(10, 1))
    res = simulate(_requests([0, 0], [3, 2], [3, 3]), [rep], cfg)
    it = res.iterations
    assert it["tokens"].tolist() == [5, 1, 1, 1, 1]
    assert it["swap_out_tokens"].tolist() == [0, 2, 0, 0, 0] and it["swap_in_tokens"].tolist() == [0, 0, 0, 2, 0]
    assert it["kv_used_blocks"].tolist() == [5, 4, 5, 3, 4]
    assert res.finished_at_s.tolist() == [3, 5]
    assert res.evicted_tokens.tolist() == [0, 0] and res.swapped_tokens.tolist() == [0, 2]
    assert res.replicas["r"]["host_peak_blocks_per_rank"] == 2


@settings(max_examples=100, deadline=None)
@given(workloads, st.integers(1, 40), st.integers(0, 40), st.integers(1, 64))
def test_swap_invariants(w, capacity, host_blocks, budget):
    """Swap when the host has room, else recompute: work = every token once + the recomputed KV only; every
    swapped-out token comes back; KV within both capacities."""
    req = _requests(sorted(w[0]), w[1], w[2])
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=4, block_size=4, preemption="swap")
    host = KVBlocks(host_blocks, 4) if host_blocks else None
    res = simulate(req, [Replica("r", LinearCost(0.01, 0.001), KVBlocks(capacity, 4), host=host)], cfg)
    it = res.iterations
    served = ~res.rejected
    assert np.all(it["kv_used_blocks"] <= capacity) and res.replicas["r"]["host_peak_blocks_per_rank"] <= host_blocks
    assert np.array_equal(res.generated[served], req.output_tokens[served])
    assert it["tokens"].sum() == (req.prompt_tokens + req.output_tokens - 1)[served].sum() + res.evicted_tokens.sum()
    assert it["swap_out_tokens"].sum() == it["swap_in_tokens"].sum() == res.swapped_tokens.sum()
    if host is None:
        assert res.swapped_tokens.sum() == 0


def test_disaggregated_transfer_by_hand():
    """Prefill pool samples the first token at t=1; 4 tokens x 1000 B over 1 MB/s + 0.5 s arrive at 1.504;
    two decode iterations of 1 s on the decode pool. A one-token output ends on the prefill pool."""
    cfg = SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=8, block_size=4)
    reps = [Replica("p", ConstCost(1.0), KVBlocks(10, 4), role="prefill"),
            Replica("d", ConstCost(1.0), KVBlocks(10, 4), role="decode")]
    res = simulate(_requests([0, 0], [4, 2], [3, 1]), reps, cfg, transfer=(1000.0, 1e6, 0.5))
    assert res.first_token_at_s.tolist() == [1, 1]
    assert res.finished_at_s[0] == pytest.approx(1.504 + 2.0) and res.finished_at_s[1] == 1
    assert res.transfer_s[0] == pytest.approx(0.504) and np.isnan(res.transfer_s[1])
    it = res.iterations
    assert it["replica"].tolist() == ["p", "d", "d"]
    assert it["tokens"].tolist() == [6, 1, 1]


def test_ranks_by_hand():
    """Two ranks of 6 one-token blocks, lock step at 1 s + 0.1 s per token of the busiest rank. A (3 prompt,
    2 output) and B (4, 1) at t=0 go to ranks 0 and 1. C (4, 3) and D (8, 1) arrive at 0.5, during it1, and
    join at 1.4: C to rank 1 (B finished, rank 1 empty; rank 0 holds A); D needs 8 blocks, more than one rank
    holds though the two together would: rejected. it1 [0, 1.4]: A 3 + B 4; it2 [1.4, 2.8]: A's decode +
    C's prefill of 4; it3 [2.8, 3.9] and it4 [3.9, 5.0]: C's decodes."""
    cfg = SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=8, block_size=1)
    rep = Replica("r", LinearCost(1.0, 0.1), KVBlocks(6, 1), ranks=2)
    res = simulate(_requests([0, 0, 0.5, 0.5], [3, 4, 4, 8], [2, 1, 3, 1]), [rep], cfg)
    assert res.rank.tolist() == [0, 1, 1, -1] and res.rejected.tolist() == [False, False, False, True]
    it = res.iterations
    assert it["start_s"] == pytest.approx([0, 1.4, 2.8, 3.9])
    assert it["tokens"].tolist() == [7, 5, 1, 1]
    assert it["kv_rank_used_max_blocks"].tolist() == [4, 4, 5, 6] and it["kv_capacity_blocks"].tolist() == [12] * 4
    assert res.finished_at_s[:3] == pytest.approx([2.8, 1.4, 5.0])


def test_md1_mean_wait_matches_closed_form():
    """One server, batch size 1, one iteration of D seconds per request, Poisson arrivals at rate lambda:
    M/D/1, mean wait in queue rho / (2 mu (1 - rho)). 99 % confidence interval from 25 batch means after a
    warm-up of 1000 requests."""
    lam, d, n = 0.6, 1.0, 30_000
    rng = np.random.default_rng(7)
    arrival = np.cumsum(rng.exponential(1 / lam, n))
    cfg = SchedulerConfig(max_num_batched_tokens=1, max_num_seqs=1, block_size=1)
    res = _colocated(_requests(arrival, np.ones(n), np.ones(n)), ConstCost(d), 4, cfg)
    wait = (res.scheduled_at_s - arrival)[1000:]
    assert np.all(res.finished_at_s - res.scheduled_at_s == pytest.approx(d))
    rho, mu = lam * d, 1 / d
    expected = rho / (2 * mu * (1 - rho))
    means = np.array([b.mean() for b in np.array_split(wait, 25)])
    half = stats.t.ppf(0.995, len(means) - 1) * means.std(ddof=1) / np.sqrt(len(means))
    assert abs(means.mean() - expected) <= half, (means.mean(), expected, half)


@settings(max_examples=150, deadline=None)
@given(workloads, st.sampled_from([1, 4, 16]), st.integers(1, 40), st.integers(1, 64), st.integers(1, 8),
       st.booleans(), st.integers(1, 3))
def test_invariants_on_random_workloads(w, block, capacity, budget, max_seqs, chunked, ranks):
    arrival, prompt, output = sorted(w[0]), w[1], w[2]
    req = _requests(arrival, prompt, output)
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, block_size=block,
                          chunked_prefill=chunked)
    res = simulate(req, [Replica("r", LinearCost(0.01, 0.001), KVBlocks(capacity, block), ranks=ranks)], cfg)
    it = res.iterations
    # KV never exceeds any rank's capacity (logged after each iteration's allocation) nor its peak
    assert np.all(it["kv_rank_used_max_blocks"] <= capacity) and res.replicas["r"]["kv_peak_blocks_per_rank"] <= capacity
    assert np.all(it["tokens"] <= ranks * budget) or not chunked
    need = -(-(req.prompt_tokens + req.output_tokens - 1) // block)
    # rejected exactly when a request can never fit; every other request finished once, with its length
    assert np.array_equal(res.rejected, need > capacity)
    served = ~res.rejected
    assert np.all(~np.isnan(res.finished_at_s[served])) and np.all(np.isnan(res.finished_at_s[~served]))
    assert np.array_equal(res.generated[served], req.output_tokens[served])
    assert it["sampled"].sum() == req.output_tokens[served].sum()
    # work = every token once (the last output token is never fed back) + exactly the evicted KV again
    assert it["tokens"].sum() == (req.prompt_tokens + req.output_tokens - 1)[served].sum() + res.evicted_tokens.sum()
    # causality
    ok = served
    assert np.all(res.scheduled_at_s[ok] >= req.arrival_s[ok])
    assert np.all(res.first_token_at_s[ok] > res.scheduled_at_s[ok])
    assert np.all(res.finished_at_s[ok] >= res.first_token_at_s[ok])


def test_no_chunking_runs_a_long_prompt_alone():
    cfg = SchedulerConfig(max_num_batched_tokens=4, max_num_seqs=8, block_size=1, chunked_prefill=False)
    res = _colocated(_requests([0, 0], [10, 2], [1, 1]), ConstCost(1.0), 100, cfg)
    assert res.iterations["tokens"].tolist() == [10, 2]


def test_chunked_prefill_splits_by_budget_and_decodes_go_first():
    cfg = SchedulerConfig(max_num_batched_tokens=4, max_num_seqs=8, block_size=1)
    res = _colocated(_requests([0, 0], [2, 9], [3, 1]), ConstCost(1.0), 100, cfg)
    # it1: A's 2 + B's first 2; it2: A decode + B 3; it3: A decode (finishes) + B 3; it4: B's last 1
    assert res.iterations["tokens"].tolist() == [4, 4, 4, 1]
    assert res.iterations["decode_tokens"].tolist() == [0, 1, 1, 0]
    assert res.finished_at_s.tolist() == [3, 4]


def test_metrics_names_and_values():
    cfg = SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=8, block_size=1)
    res = _colocated(_requests([0, 0], [3, 2], [3, 3]), ConstCost(1.0), 6, cfg)
    m = summarise(res, num_devices=8, num_nodes=1, slo_ttft_s=1.0, slo_tpot_s=1.5)
    assert m["latency_s"]["ttft"]["mean"] == 1.0
    assert m["latency_s"]["tpot"]["p50"] == pytest.approx((1.0 + 2.0) / 2)  # A (3-1)/2 = 1, B (5-1)/2 = 2
    assert m["throughput"]["duration_s"] == 5.0
    assert m["throughput"]["output_tokens_per_s"] == pytest.approx(6 / 5)
    assert m["throughput"]["output_tokens_per_s_per_device"] == pytest.approx(6 / 5 / 8)
    assert m["goodput"]["fraction"] == 0.5  # B's TPOT of 2 s misses the 1.5 s SLO
    assert m["preemption"] == {"count": 1, "requests": 1, "evicted_tokens": 2, "swapped_tokens": 0}
    assert m["kv"]["r"]["peak_blocks_per_rank"] == 6 and m["kv"]["r"]["peak_fraction"] == 1.0
    assert set(m) == {"schema", "requests", "latency_s", "throughput", "goodput", "kv", "preemption", "iterations"}


@settings(max_examples=80, deadline=None)
@given(workloads, st.integers(2, 40), st.integers(2, 40), st.integers(1, 64))
def test_disaggregated_invariants(w, cap_p, cap_d, budget):
    arrival, prompt, output = sorted(w[0]), w[1], w[2]
    req = _requests(arrival, prompt, output)
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=4, block_size=4)
    reps = [Replica("p", LinearCost(0.01, 0.001), KVBlocks(cap_p, 4), role="prefill"),
            Replica("d", LinearCost(0.005, 0.001), KVBlocks(cap_d, 4), role="decode")]
    res = simulate(req, reps, cfg, transfer=(100.0, 1e6, 1e-3))
    it = res.iterations
    for name, cap in (("p", cap_p), ("d", cap_d)):
        assert np.all(it["kv_used_blocks"][it["replica"] == name] <= cap)
        assert res.replicas[name]["kv_peak_blocks_per_rank"] <= cap
    served = ~res.rejected
    blocks_p = -(-req.prompt_tokens // 4)
    blocks_d = -(-(req.prompt_tokens + req.output_tokens - 1) // 4)
    must_reject = (blocks_p > cap_p) | ((req.output_tokens > 1) & (blocks_d > cap_d))
    assert np.array_equal(res.rejected, must_reject)
    assert np.all(~np.isnan(res.finished_at_s[served]))
    assert np.array_equal(res.generated[served], req.output_tokens[served])
    assert it["sampled"].sum() == req.output_tokens[served].sum()
    # the decode pool never runs before the request's KV arrived
    moved = served & (req.output_tokens > 1)
    assert np.all(res.finished_at_s[moved] >= res.first_token_at_s[moved] + res.transfer_s[moved])
