"""The one memory evaluator: tiers chosen from the spec's attributes, expert shape by hand, evaluate ==
plan + timed replay, and a cache policy added by one dict entry."""

import numpy as np
import pytest

from hwmodels.specs import load_system
from moesim.memory import cache
from moesim.memory.cache import ExpertShape, access_stream, plan, replay_timed, stream_from_keys
from moesim.memory.evaluator import evaluate, offload_setup
from moesim.memory.tiers import MemoryHierarchy
from workloads.catalog import get_model
from workloads.importers import load_trace


def test_tiers_come_from_the_spec_attributes():
    sn = MemoryHierarchy.from_system(load_system("sn40l-node"))  # device tiers sram, hbm, ddr (fastest first)
    gpu = MemoryHierarchy.from_system(load_system("dgx-h100"))  # device tier hbm only
    assert sn.backing_tier("hbm") == "ddr" and sn.backing_tier("ddr") == "host" and sn.stream_tier("hbm") == "sram"
    assert gpu.backing_tier("hbm") == "host" and gpu.stream_tier("hbm") is None
    only = MemoryHierarchy.from_system(load_system("dgx-h100"), include_host=False)
    with pytest.raises(ValueError, match="no slower tier"):
        only.backing_tier("hbm")


def test_expert_shape_by_hand():
    m = get_model("olmoe-1b-7b")  # hidden 2048, expert FFN 1024, SwiGLU: gate, up, down
    e = ExpertShape.of(m, 2)
    assert e.weight_bytes == 3 * 2048 * 1024 * 2
    assert e.flops_per_token == 2 * 3 * 2048 * 1024
    setup = offload_setup(load_system("sn40l-node"), m)
    assert (setup.cache_tier, setup.backing_tier, setup.stream_tier) == ("hbm", "ddr", "sram")
    assert setup.expert == e and setup.experts_in(10 * e.weight_bytes - 1) == 9


def test_evaluate_is_plan_then_timed_replay():
    model, system = get_model("olmoe-1b-7b"), load_system("sn40l-node")
    setup = offload_setup(system, model)
    s = access_stream(load_trace("default"), 1, 16)
    for policy in ("lru", "pregate"):
        got = evaluate(setup, s, policy, capacity_experts=40, seed=3, accuracy=0.5)
        p = plan(s, 40, policy, rng=np.random.default_rng(3), accuracy=0.5)
        want = replay_timed(s, p, setup.hierarchy, setup.expert, peak_flops_per_s=system.device.peak("bf16"),
                            cache_tier="hbm", backing_tier="ddr", stream_tier="sram")
        assert got == want, policy


class MostRecent(cache.LRU):
    """MRU: evict the most recently used resident expert."""

    def victim(self, resident, protect, i):
        for k in reversed(self.order):
            if k in resident and k not in protect:
                return k
        raise ValueError("all protected")


def test_a_cache_policy_is_one_dict_entry(monkeypatch):
    monkeypatch.setitem(cache.CACHE_POLICIES, "mru", MostRecent)
    s = stream_from_keys([0, 1, 2, 0, 1, 2])
    # 0m 1m 2m(-1, most recent unprotected) 0h 1m(-0) 2h
    assert plan(s, 2, "mru").hit.tolist() == [False, False, False, True, False, True]
    assert cache.plan_exact(s, 3, "mru", seed=0).fetches == 3  # demand policy holding every key: first use only
