"""Group-limited synthetic routing: the fitted generator keeps each token's experts in at most ``topk_group`` of the
model's ``n_group`` expert groups (DeepSeek-V2/V3), and its loads still follow the trace it was fitted to."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moesim.train.routing import group_limited_balanced, synthetic_trace
from moesim.train.spec import Parallel, TrainError, TrainSpec
from tests.moesim.train.conftest import flame_config
from workloads import stats, synth
from workloads.hf_config import load_config
from workloads.importers import load_trace


@pytest.fixture(scope="module")
def source():
    return load_trace("default")  # FLAME-MoE-290M: 8 MoE layers, 64 experts, top-6


def _spec(samples=4):
    return TrainSpec(Parallel(dp=8, ep=8), seq_len=1024, micro_batch_size=1, global_batch_size=32,
                     routing="synthetic", routing_samples=samples)


def _spans(trace, n_group: int) -> np.ndarray:
    """Groups each (step, token, layer)'s experts span, from the trace's columns."""
    c = trace.columns
    order = np.lexsort((c["rank"], c["layer"], c["token"], c["step"]))
    experts = c["expert"][order].reshape(-1, trace.meta.top_k)
    keys = np.stack([c[k][order] for k in ("step", "token", "layer")], axis=1).reshape(-1, trace.meta.top_k, 3)
    assert (keys == keys[:, :1]).all()  # each row is one token-layer's choices
    return synth.groups_spanned(experts, trace.meta.num_experts, n_group)


def test_deepseek_v3_synthetic_tokens_stay_in_topk_group_groups(source):
    cfg = load_config("deepseek-v3").with_layers(5)  # blocks 3 and 4 are MoE: 256 experts, 8 groups, at most 4
    assert (cfg.n_group, cfg.topk_group) == (8, 4)
    trace = synthetic_trace(cfg, _spec(samples=1), source, seed=0)
    spans = _spans(trace, cfg.n_group)
    assert trace.meta.num_experts == 256 and spans.max() <= cfg.topk_group
    # the limit binds: without it the same generator puts tokens in more groups
    free = synthetic_trace(dataclasses.replace(cfg, n_group=1, topk_group=1), _spec(samples=1), source, seed=0)
    assert _spans(free, cfg.n_group).max() > cfg.topk_group


def test_group_limited_synthetic_loads_follow_the_fitted_trace(source):
    # FLAME's 64 experts in 8 groups of 8, at most 3 groups per token (a hypothetical limit on a real trace's shape,
    # so that the loads can be compared with the trace expert by expert)
    cfg = flame_config(n_group=8, topk_group=3)
    trace = synthetic_trace(cfg, _spec(), source, seed=0)
    assert _spans(trace, 8).max() <= 3
    real = stats.expert_load(source)
    tvd = np.array([stats.tvd(a, b) for a, b in zip(stats.expert_load(trace), real)])
    seq = source.columns["sequence"]
    halves = [stats.expert_load(source.select(seq % 2 == r)) for r in (0, 1)]
    floor = np.mean([stats.tvd(a, b) for a, b in zip(*halves)])
    print(f"group-limited synthetic load TVD from FLAME: {tvd.mean():.4f} (mean of 8 layers, 4 x 8192 tokens); "
          f"the trace's split-half noise {floor:.4f}")
    assert tvd.mean() <= floor, (tvd, floor)


def test_group_limit_is_checked_in_one_place():
    for call in (lambda: synth.check_group_limit(64, 6, 5, 2), lambda: synth.check_group_limit(64, 6, 8, 9)):
        with pytest.raises(ValueError, match="n_group"):
            call()
    with pytest.raises(ValueError, match="distinct experts"):
        synth.check_group_limit(16, 8, 8, 2)
    with pytest.raises(TrainError, match="n_group"):  # balanced routing raises the same check as a TrainError
        group_limited_balanced(10, 64, 6, 5, 2, np.random.default_rng(0))


def test_group_limited_top_k_picks_the_best_groups_and_plain_top_k_without_a_limit():
    score = np.array([[9.0, 1.0, 8.0, 7.0, 0.0, 6.0]])  # groups of 2: best scores 9, 8, 6
    np.testing.assert_array_equal(synth.group_limited_top_k(score, 3, 3, 2), [[0, 2, 3]])
    np.testing.assert_array_equal(synth.group_limited_top_k(score, 3), [[0, 2, 3]])
    np.testing.assert_array_equal(synth.group_limited_top_k(score, 4, 3, 2), [[0, 2, 3, 1]])
    np.testing.assert_array_equal(synth.group_limited_top_k(score, 4), [[0, 2, 3, 5]])
