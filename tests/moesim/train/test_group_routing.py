"""Group-limited balanced routing (DeepSeek-V2/V3's n_group / topk_group) and the de-duplicated all-to-all in
the training step."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from hwmodels.roofline import RooflineCost
from hwmodels.specs import load_system
from moesim.sim import DISPATCH_DEDUP
from moesim.train import spec as train_spec
from moesim.train.moe import NODE_DEDUP_KERNELS, dispatch_dedup_of, moe_times
from moesim.train.routing import balanced_trace, group_limited_balanced
from moesim.train.spec import Parallel, TrainError, TrainSpec
from workloads.hf_config import load_config


@pytest.mark.parametrize("tokens,experts,k,groups,limit", [
    (1024, 256, 8, 8, 4),  # DeepSeek-V3: cycles close, loads exactly equal
    (960, 160, 6, 8, 3),   # DeepSeek-V2
    (777, 64, 6, 8, 4),    # top-k not a multiple of the group limit, cycles do not close
    (999, 60, 7, 6, 4),
    (500, 64, 6, 1, 1),    # no group limit
])
def test_every_token_within_its_group_limit_and_loads_balanced(tokens, experts, k, groups, limit):
    e = group_limited_balanced(tokens, experts, k, groups, limit, np.random.default_rng(7))
    assert e.shape == (tokens, k) and e.min() >= 0 and e.max() < experts
    assert all(len(set(row)) == k for row in e.tolist())  # distinct experts per token
    spans = np.array([len(set(row)) for row in (e // (experts // groups)).tolist()])
    assert spans.max() <= limit
    load = np.bincount(e.ravel(), minlength=experts)
    assert load.sum() == tokens * k
    per_group = load.reshape(groups, -1)
    assert (per_group.max(axis=1) - per_group.min(axis=1)).max() <= 1  # within a group: equal up to one
    group_load = per_group.sum(axis=1)
    if k % min(limit, k) == 0:  # an even split over the groups: equal up to one slot's picks
        assert group_load.max() - group_load.min() <= k // min(limit, k)
    else:  # uneven split (extra picks rotate over a token's groups): nearly equal
        assert group_load.max() <= 1.01 * group_load.mean()


def test_deepseek_v3_balanced_loads_are_exactly_equal_and_seeded():
    e = group_limited_balanced(1024, 256, 8, 8, 4, np.random.default_rng(1))
    np.testing.assert_array_equal(np.bincount(e.ravel(), minlength=256), np.full(256, 1024 * 8 // 256))
    again = group_limited_balanced(1024, 256, 8, 8, 4, np.random.default_rng(1))
    other = group_limited_balanced(1024, 256, 8, 8, 4, np.random.default_rng(2))
    np.testing.assert_array_equal(e, again)
    assert not np.array_equal(e, other)


def test_group_limit_errors_name_the_fields():
    with pytest.raises(TrainError, match="n_group"):
        group_limited_balanced(10, 64, 6, 5, 2, np.random.default_rng(0))
    with pytest.raises(TrainError, match="distinct experts"):
        group_limited_balanced(10, 16, 8, 8, 2, np.random.default_rng(0))  # 4 picks per group of 2


def test_balanced_trace_has_the_models_shape():
    cfg = load_config("deepseek-v3")
    t = balanced_trace(cfg, 512, 2, seed=3)
    assert t.meta.num_experts == 256 and t.meta.top_k == 8 and t.num_tokens == 512
    e = t.columns["expert"].reshape(2, 512, 8)
    assert max(len(set(row)) for row in (e[1] // 32).tolist()) <= 4


def test_dedup_is_decided_by_the_comm_kernel():
    assert all(dispatch_dedup_of(k) == "node" for k in NODE_DEDUP_KERNELS)
    assert dispatch_dedup_of("deepep-low-latency") == "none" and dispatch_dedup_of("none") == "none"
    assert dispatch_dedup_of("deepep-normal-v1", "gpu") == "gpu"
    assert train_spec.DISPATCH_DEDUP == ("auto", *DISPATCH_DEDUP)
    with pytest.raises(TrainError, match="--dispatch-dedup"):
        TrainSpec(Parallel(dp=8, ep=8), seq_len=256, micro_batch_size=1, global_batch_size=8, dispatch_dedup="rack")


def test_deepseek_v3_ep64_node_dedup_sends_less_than_per_expert_copies():
    cfg = load_config("deepseek-v3").with_layers(4)
    system = load_system("hgx-h800").with_nodes(8)
    base = dict(seq_len=512, micro_batch_size=1, global_batch_size=64, dtype="fp8")
    times = {m: moe_times(cfg, system, TrainSpec(Parallel(dp=64, ep=64), dispatch_dedup=m, **base), RooflineCost(),
                          None) for m in ("none", "gpu", "node")}
    sent = {m: t.dispatch_sent_bytes.max() for m, t in times.items()}
    # top-8 over at most 4 nodes: 'none' sends 8 copies per token, 'gpu' <= 8; 'node' <= 4 over IB (the
    # bottleneck) but adds the NVLink forwards, so it sends more bytes in all and takes less time
    assert sent["gpu"] < sent["none"] and sent["node"] > sent["gpu"]
    dispatch = {m: t.dispatch_s.max() for m, t in times.items()}
    assert dispatch["node"] < dispatch["gpu"] < dispatch["none"]
    # de-duplication changes what moves, not what is computed: same expert tokens, balanced
    for t in times.values():
        np.testing.assert_allclose(t.expert_tokens_max, times["none"].expert_tokens_max)
        assert np.all(t.imbalance == 1.0)
    assert dataclasses.replace(TrainSpec(Parallel(dp=64, ep=64), **base)).dispatch_dedup == "auto"


@pytest.mark.parametrize("experts,k,groups,limit", [(256, 8, 8, 4), (60, 7, 6, 4), (160, 6, 8, 3)])
def test_group_sets_vary_and_group_loads_are_exact_per_block(experts, k, groups, limit):
    """Tokens' group sets are not a fixed few (one global cycle of 8 groups in windows of 4 gave DeepSeek-V3's tokens
    only two complementary sets, so some nodes received every token); every group gets exactly k picks per block
    of n_group tokens, whether or not the limit divides k."""
    tokens = groups * 512
    e = group_limited_balanced(tokens, experts, k, groups, limit, np.random.default_rng(3))
    sets = {tuple(sorted(set(row))) for row in (e // (experts // groups)).tolist()}
    assert len(sets) >= min(math.comb(groups, limit), 4 * groups)  # all possible sets, or many
    group_load = np.bincount(e.ravel() // (experts // groups), minlength=groups)
    np.testing.assert_array_equal(group_load, np.full(groups, tokens * k // groups))
