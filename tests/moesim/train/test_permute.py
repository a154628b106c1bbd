"""MoE token permute/unpermute kernels (moesim.train.moe) in the training step, in closed form."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hwmodels.roofline import RooflineCost
from moesim.train.host import HostModel, moe_segment
from moesim.train.moe import moe_times, permute_kernel_bytes, step_options
from moesim.train.spec import Parallel, TrainSpec
from moesim.train.step import simulate_step
from tests.conftest import make_system
from tests.moesim.train.conftest import dense_config, flame_config

BW, LAUNCH = 1e11, 1e-6


def kernel_s(nbytes: float) -> float:
    """A memory-bound kernel on the toy device's roofline (no FLOPs)."""
    return LAUNCH + nbytes / BW


def test_permute_bytes_by_hand_bf16_and_fp8():
    tokens, top_k, hidden = 4096, 8, 7168
    rows = tokens * top_k
    bf16 = step_options(TrainSpec(Parallel(), 32, 1, 1))
    row = hidden * 2  # BF16 bytes of one routed row
    # each routed row read and written once, plus an int64 index (and an fp32 probability for the unpermute)
    assert permute_kernel_bytes(rows, hidden, bf16) == (2 * rows * row + 8 * rows, 2 * rows * row + 12 * rows,
                                                        2 * rows * row + 8 * rows, 2 * rows * row + 12 * rows)
    fp8 = step_options(TrainSpec(Parallel(), 32, 1, 1, dtype="fp8"))
    fp8_row = hidden + (hidden // 128) * 4  # FP8 values and one fp32 scale per 128 of them
    got = permute_kernel_bytes(rows, hidden, fp8)
    assert got[0] == 2 * rows * fp8_row + 8 * rows  # the permute before the FP8 dispatch
    assert got[1:] == (2 * rows * row + 12 * rows, 2 * rows * row + 8 * rows, 2 * rows * row + 12 * rows)


@pytest.mark.parametrize("dedup", ["none", "node"])
def test_moe_times_time_the_kernels_on_the_memory_path(dedup):
    cfg = flame_config(num_hidden_layers=3)
    spec = TrainSpec(Parallel(dp=2, ep=2), seq_len=64, micro_batch_size=1, global_batch_size=2, dispatch_dedup=dedup)
    mt = moe_times(cfg, make_system(2, hbm_bytes_per_s=BW, launch_s=LAUNCH), spec, RooflineCost(), None)
    options = step_options(spec)
    # sender side: the device's T x top_k choices; receiver side (de-duplicated dispatch): the busiest device's
    rows = mt.expert_tokens_max if dedup == "node" else np.full(mt.router_s.shape, 64.0 * cfg.num_experts_per_tok)
    for (g, j), r in np.ndenumerate(rows):
        p, u, pb, ub = permute_kernel_bytes(float(r), cfg.hidden_size, options)
        assert mt.permute_s[g, j] == pytest.approx(kernel_s(p), rel=1e-12)
        assert mt.unpermute_s[g, j] == pytest.approx(kernel_s(u), rel=1e-12)
        assert mt.permute_bwd_s[g, j] == pytest.approx(kernel_s(pb) + kernel_s(ub), rel=1e-12)
    off = moe_times(cfg, make_system(2, hbm_bytes_per_s=BW, launch_s=LAUNCH),
                    dataclasses.replace(spec, moe_permute=False), RooflineCost(), None)
    assert off.permute_s is None and np.array_equal(off.expert_s, mt.expert_s)


@pytest.mark.parametrize("recompute, forwards", [("none", 1), ("full", 2)])
def test_step_grows_by_the_summed_kernel_time_on_a_one_layer_moe_model(recompute, forwards):
    cfg = flame_config(num_hidden_layers=1, first_k_dense_replace=0)
    system, m = make_system(2, hbm_bytes_per_s=BW, launch_s=LAUNCH), 3
    spec = TrainSpec(Parallel(dp=2, ep=2), seq_len=64, micro_batch_size=1, global_batch_size=2 * m,
                     recompute=recompute, host_overhead="none")
    on, off = (simulate_step(cfg, system, dataclasses.replace(spec, moe_permute=x), RooflineCost()) for x in (True,
                                                                                                            False))
    mt = moe_times(cfg, system, spec, RooflineCost(), None)
    per_mb = [forwards * (mt.permute_s[i % mt.num_samples, 0] + mt.unpermute_s[i % mt.num_samples, 0])
              + mt.permute_bwd_s[i % mt.num_samples, 0] for i in range(m)]
    assert on.step_time_s - off.step_time_s == pytest.approx(sum(per_mb), rel=1e-9)
    rec = {p["direction"]: p["time_s"] for p in on.phases if p["phase"] == "permute"}
    assert rec["forward"] + rec["backward_input"] == pytest.approx(sum(per_mb) - (forwards - 1) * m
                                                                   * float(mt.permute_fwd_s[0, 0]), rel=1e-9)
    assert not any(p["phase"] == "permute" for p in off.phases)


def test_dense_models_are_unchanged():
    system = make_system(1)
    runs = [simulate_step(dense_config(), system, TrainSpec(Parallel(), 32, 1, 2, moe_permute=x), RooflineCost())
            for x in (True, False)]
    assert runs[0].step_time_s == runs[1].step_time_s


def test_host_segment_launches_one_kernel_each_around_the_all_to_alls():
    h = HostModel("eager").kernel_s
    args = (HostModel("eager"), [1e-6], 4e-6, 2e-6, 0.0, 4e-6, 5e-6, False, (0, 0.0))
    sender = moe_segment(*args, (7e-6, 8e-6, False))
    receiver = moe_segment(*args, (7e-6, 8e-6, True))
    # permute, dispatch, (casts), experts, combine, unpermute; receiver: dispatch, permute, ..., unpermute, combine
    assert [g[1] for g in sender[:6]] == [7e-6, 2e-6, 0.0, 4e-6, 5e-6, 8e-6]
    assert [g[1] for g in receiver[:6]] == [2e-6, 7e-6, 0.0, 4e-6, 8e-6, 5e-6]
    assert all(g[0] == 1 and g[2] == h for g in sender[:6] if g[1] in (7e-6, 8e-6))
    assert len(moe_segment(*args)) == len(sender) - 2  # no permute kernels: the segment as before
