"""Expert cache policies: hand-computed cases, capacity invariant, Belady optimality (property), timing."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hwmodels.specs import load_system
from moesim.memory.cache import (CACHE_POLICIES, ExpertShape, access_stream, plan, replay_timed,
                                 stream_from_keys)
from moesim.memory.tiers import MemoryHierarchy
from workloads.importers import load_trace

DEMAND = ("lru", "lfu", "belady")


def _params(policy, seed=0):
    return {"rng": np.random.default_rng(seed), "accuracy": 0.7} if policy == "pregate" else {}


def test_lru_and_belady_by_hand():
    s = stream_from_keys([0, 1, 2, 0, 3, 0, 1])
    lru = plan(s, 2, "lru")
    # 0m 1m 2m(-0) 0m(-1) 3m(-2) 0h 1m(-3)
    assert lru.hit.tolist() == [False, False, False, False, False, True, False]
    assert lru.fetches == 6
    bel = plan(s, 2, "belady")
    # 0m 1m 2m(-1: next use 6 > 3) 0h 3m(-2: never again) 0h 1m
    assert bel.hit.tolist() == [False, False, False, True, False, True, False]
    assert bel.fetches == 5


def test_lfu_by_hand():
    s = stream_from_keys([0, 0, 1, 2, 0, 1])
    lfu = plan(s, 2, "lfu")
    # 0m 0h 1m 2m(-1: count 1 < 2) 0h 1m(-2: count 1 ties, 2 less recent than... 2 used at 3, evict 2)
    assert lfu.hit.tolist() == [False, True, False, False, True, False]


keys_st = st.lists(st.integers(0, 9), min_size=1, max_size=120)


@settings(max_examples=200, deadline=None)
@given(keys=keys_st, capacity=st.integers(1, 8), seed=st.integers(0, 100))
def test_belady_is_never_beaten_and_capacity_is_never_exceeded(keys, capacity, seed):
    s = stream_from_keys(keys, group=np.arange(len(keys)) // 3, num_experts=10)
    # prefetching policies look at groups (batch, layer): give the stream 2 "layers" per batch
    s = type(s)(keys=s.keys, group=s.group, tokens=s.tokens,
                group_batch=np.arange(s.num_groups) // 2, group_layer=np.arange(s.num_groups) % 2,
                num_experts=10, num_layers=2, num_tokens=len(keys))
    plans = {p: plan(s, capacity, p, **_params(p, seed)) for p in CACHE_POLICIES}
    best = plans["belady"]
    for name, p in plans.items():
        assert p.max_resident <= capacity, name
        assert best.fetches <= p.fetches, name  # no policy, prefetching or not, loads fewer experts
        if name in DEMAND:
            assert best.hits >= p.hits, name
            assert p.fetches == len(keys) - p.hits  # demand paging: one fetch per miss


def test_belady_upper_bound_on_real_traces():
    for name, tokens in (("default", 64), ("switch", None)):
        t = load_trace(name)
        s = access_stream(t, batch_tokens=1, max_tokens=tokens)
        cap = max(1, len(np.unique(s.keys)) // 4)
        plans = {p: plan(s, cap, p, **_params(p)) for p in CACHE_POLICIES}
        for p, pl in plans.items():
            assert pl.max_resident <= cap
            assert plans["belady"].fetches <= pl.fetches, (name, p)
        assert plans["belady"].hit_rate >= max(plans["lru"].hit_rate, plans["lfu"].hit_rate)


def test_perfect_pregating_hides_misses_after_the_first_layer():
    t = load_trace("default")
    s = access_stream(t, batch_tokens=1, max_tokens=8)
    cap = 64  # enough for two layers' experts of one token (6 + 6) and more
    pg = plan(s, cap, "pregate", lookahead=1, accuracy=1.0)
    first_layer = s.group_layer[s.group] == 0
    assert pg.hit[~first_layer].all()  # every later layer was prefetched one layer ahead
    assert pg.useful_prefetches == pg.prefetches  # accuracy 1: nothing wasted


def test_access_stream_counts_tokens_per_expert():
    t = load_trace("default")
    s = access_stream(t, batch_tokens=4, max_tokens=8)
    assert s.num_tokens == 8 and s.num_groups == 2 * t.meta.num_layers
    assert s.tokens.sum() == 8 * t.meta.num_layers * t.meta.top_k  # every (token, layer, rank) choice counted
    assert np.all(np.diff(s.group) >= 0)


def test_timed_replay_stall_is_the_transfer_time_when_nothing_overlaps():
    h = MemoryHierarchy.from_system(load_system("sn40l-node"))
    e = ExpertShape(weight_bytes=1e9, flops_per_token=1e9)
    s = stream_from_keys([0, 1, 0])
    p = plan(s, 2, "lru")
    r = replay_timed(s, p, h, e, peak_flops_per_s=1e15, stream_tier=None)
    t_fetch = h.transfer_time_s(1e9, "ddr", "hbm")
    t_compute = max(1e9 / 1e15, 1e9 / h.tier("hbm").bandwidth_bytes_per_s)
    assert r.stall_s == pytest.approx(2 * t_fetch, rel=1e-12)
    assert r.total_time_s == pytest.approx(2 * t_fetch + 3 * t_compute, rel=1e-12)
    assert r.bytes_by_path == {"ddr->hbm": 2e9}
    warm = replay_timed(s, plan(s, 2, "lru", warm=True), h, e, peak_flops_per_s=1e15, stream_tier=None)
    assert warm.stall_s == 0.0 and warm.fetches == 0


def test_bad_cache_input():
    s = stream_from_keys([0, 1])
    with pytest.raises(ValueError, match="unknown cache policy 'mru'"):
        plan(s, 1, "mru")
    with pytest.raises(ValueError, match="capacity"):
        plan(s, 0, "lru")
    with pytest.raises(ValueError, match="accuracy"):
        plan(s, 1, "pregate", accuracy=1.5)
    h = MemoryHierarchy.from_system(load_system("dgx-h100"))
    with pytest.raises(ValueError, match="larger than every memory tier"):
        replay_timed(s, plan(s, 1, "lru"), h, ExpertShape(5e12, 1.0), peak_flops_per_s=1e15, backing_tier="host")
