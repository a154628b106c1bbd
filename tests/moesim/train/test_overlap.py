"""Overlap of gradient reduction, weight gathers and tensor-parallel communication with compute: closed forms."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from hwmodels.roofline import RooflineCost
from hwmodels.specs import load_system
from moesim.cli import main
from moesim.train import memory as mem
from moesim.train.collectives import collective_time_s
from moesim.train.overlap import (GRAD_BUCKET_PARAMS, bucket_fractions, gather_before_compute_s,
                                  reduce_beside_compute)
from moesim.train.spec import Parallel, TrainSpec
from moesim.train.step import simulate_step
from moesim.train.timeline import gradient_slots
from tests.moesim.train.conftest import DENSE, dense_config

BIG = dict(hidden_size=2048, num_hidden_layers=4, num_attention_heads=16, intermediate_size=8192, vocab_size=32000)


def _run(cfg, spec, **flags):
    return simulate_step(cfg, load_system("dgx-h100"), dataclasses.replace(spec, **flags), RooflineCost(),
                         check_memory=False)


def test_stream_closed_forms():
    # reduction that fits under the compute: each bucket ends before the next is ready; only the last is exposed
    assert reduce_beside_compute([(0.0, 1.0)], [0.25, 0.5, 0.75, 1.0], [0.1] * 4) == pytest.approx((1.0, 1.1))
    # no compute: everything is exposed, one bucket after the other
    assert reduce_beside_compute([(2.0, 0.0)], [0.0, 0.0, 0.0], [0.3, 0.2, 0.5]) == pytest.approx((2.0, 3.0))
    # slowdown 2 while a bucket is in flight: bucket 0 (ready at 0.5) runs 0.5-0.75 and the compute does 0.125 of
    # work meanwhile, so it ends at 0.75 + 0.375 = 1.125; bucket 1 (ready at the end) ends at 1.375
    assert reduce_beside_compute([(0.0, 1.0)], [0.5, 1.0], [0.25, 0.25], 2.0) == pytest.approx((1.125, 1.375))
    # a bucket longer than the compute left: the next waits for it
    assert reduce_beside_compute([(0.0, 1.0)], [0.5, 1.0], [1.0, 0.1]) == pytest.approx((1.0, 1.6))


def test_bucket_sizes_follow_megatron_default():
    assert bucket_fractions(100e6, 8).tolist() == pytest.approx([0.4, 0.4, 0.2])  # 40M-parameter buckets
    assert len(bucket_fractions(100e6, 64)) == math.ceil(100e6 / 64e6)  # 1M x dp when larger
    assert bucket_fractions(0.0, 8).size == 0


def test_overlapped_reduction_exposes_only_the_last_bucket_when_the_rest_fit_under_backward():
    cfg = dense_config(**BIG)
    spec = TrainSpec(Parallel(dp=8, zero=0), seq_len=4096, micro_batch_size=1, global_batch_size=16)
    off, on = _run(cfg, spec), _run(cfg, spec, overlap_grad_reduce=True)
    system = load_system("dgx-h100")
    params = off.memory_bytes["weights"]["hbm"] / mem.WEIGHT_BYTES
    n = math.ceil(params / GRAD_BUCKET_PARAMS)
    last = params - GRAD_BUCKET_PARAMS * (n - 1)
    full_s = collective_time_s(system, "all_reduce", GRAD_BUCKET_PARAMS * mem.GRAD_BYTES, 8)
    last_s = collective_time_s(system, "all_reduce", last * mem.GRAD_BYTES, 8)
    slot = gradient_slots(on.timeline, 0)[0]
    assert n >= 3 and full_s <= (slot.end_at_s - slot.start_at_s) * GRAD_BUCKET_PARAMS / params  # precondition
    assert on.breakdown["grad_sync_s"] == pytest.approx(last_s, rel=1e-9)
    assert off.breakdown["grad_sync_s"] == pytest.approx(collective_time_s(system, "all_reduce",
                                                                           params * mem.GRAD_BYTES, 8), rel=1e-12)
    assert on.step_time_s == pytest.approx(off.step_time_s - off.breakdown["grad_sync_s"] + last_s, rel=1e-12)


def test_off_is_the_unoverlapped_step_exactly():
    cfg = dense_config(**BIG)
    spec = TrainSpec(Parallel(tp=2, dp=4, zero=1), seq_len=2048, micro_batch_size=1, global_batch_size=8)
    default = _run(cfg, spec)
    off = _run(cfg, spec, overlap_grad_reduce=False, overlap_param_gather=False, tp_comm_overlap=False)
    assert default.step_time_s == off.step_time_s and default.phases == off.phases
    system, params = load_system("dgx-h100"), default.memory_bytes["weights"]["hbm"] / mem.WEIGHT_BYTES
    sync = (collective_time_s(system, "reduce_scatter", params * mem.GRAD_BYTES, 4, 2)
            + collective_time_s(system, "all_gather", params * mem.WEIGHT_BYTES, 4, 2))
    b = default.breakdown
    assert b["grad_sync_s"] == pytest.approx(sync, rel=1e-12)
    assert default.step_time_s == pytest.approx(b["pipeline_s"] + sync + b["optimizer_s"], rel=1e-12)
    nbytes = 2048 * BIG["hidden_size"] * 2
    tp_comm = [p for p in default.phases if p["layer"] == 0 and p["phase"] == "tp_comm" and p["direction"] == "forward"]
    per_block = collective_time_s(system, "all_gather", nbytes, 2) + collective_time_s(system, "reduce_scatter", nbytes, 2)
    assert tp_comm[0]["time_s"] == pytest.approx(2 * spec.num_micro_batches * per_block, rel=1e-12)  # attention + FFN


def test_param_gather_moves_the_weight_all_gather_into_the_first_forwards():
    cfg = dense_config(**BIG)
    spec = TrainSpec(Parallel(dp=8, zero=1), seq_len=4096, micro_batch_size=1, global_batch_size=16)
    off, on = _run(cfg, spec), _run(cfg, spec, overlap_param_gather=True)
    system = load_system("dgx-h100")
    params = off.memory_bytes["weights"]["hbm"] / mem.WEIGHT_BYTES
    rs = collective_time_s(system, "reduce_scatter", params * mem.GRAD_BYTES, 8)
    assert on.breakdown["grad_sync_s"] == pytest.approx(rs, rel=1e-12)  # the all-gather left the end of the step
    fractions = bucket_fractions(params, 8)
    gathers = [collective_time_s(system, "all_gather", f * params * mem.WEIGHT_BYTES, 8) for f in fractions]
    (waited,) = [p["time_s"] for p in on.phases if p["phase"] == "param_gather"]
    fwd = [s for s in on.timeline.slots if s.what == "F"][0]
    assert waited == pytest.approx(gather_before_compute_s(gathers, fwd.end_at_s - fwd.start_at_s - waited, fractions))
    assert gathers[0] <= waited < sum(gathers)  # the first bucket waits; the others hide behind the forward
    assert on.step_time_s < off.step_time_s


def _gemm(m, n, k):
    return RooflineCost().gemm(load_system("dgx-h100").device, m, n, k, "bf16").time_s


def test_tp_overlap_exposes_the_hand_computed_chunked_remainder():
    cfg = dense_config(**BIG)
    spec = TrainSpec(Parallel(tp=2, dp=4), seq_len=2048, micro_batch_size=1, global_batch_size=4)
    on = _run(cfg, spec, tp_comm_overlap=True)
    system, t, h, tp = load_system("dgx-h100"), 2048, BIG["hidden_size"], 2
    ag = collective_time_s(system, "all_gather", t * h * 2, tp)
    rs = collective_time_s(system, "reduce_scatter", t * h * 2, tp)
    heads_d = h // tp  # heads / tp x head dim
    f = BIG["intermediate_size"] // tp
    fwd = bwd = 0.0
    for (n1, k1), (n2, k2) in ((( 3 * heads_d, h), (h, heads_d)), ((2 * f, h), (h, f))):
        g1, g1w, g2, g2d = _gemm(t, n1, k1), _gemm(k1, n1, t), _gemm(t, n2, k2), _gemm(t, k2, n2)
        g1c, g2c, g2dc = _gemm(t // 2, n1, k1), _gemm(t // 4, n2, k2), _gemm(t // 2, k2, n2)  # split GEMMs
        # ring exchange of 2 shards: the local shard's GEMM beside the other's transfer, then the second shard's;
        # 4-way pipelined reduce-scatter: 3 GEMM chunks beside the previous chunk's transfer, the last transfer alone
        fwd += max(g1c, ag) + g1c - g1 + g2c + 3 * max(g2c, rs / 4) + rs / 4 - g2
        bwd += max(g2dc, ag) + g2dc - g2d + max(rs, g1w) - g1w  # ring for the gradient, bulk RS beside wgrad
    got = {p["direction"]: p["time_s"] for p in on.phases if p["layer"] == 0 and p["phase"] == "tp_comm"}
    assert got["forward"] == pytest.approx(fwd, rel=1e-9) and got["backward_input"] == pytest.approx(bwd, rel=1e-9)
    assert got["forward"] < 2 * (ag + rs)
    assert on.step_time_s < _run(cfg, spec).step_time_s


def test_train_cli_overlap_flags(tmp_path):
    cfg = tmp_path / "dense.json"
    cfg.write_text(json.dumps({**DENSE, **BIG}))
    base = ["train", "--model", str(cfg), "--tp", "2", "--seq-len", "512", "--cost", "roofline", "--out", str(tmp_path / "o")]
    assert main(base + ["--overlap-grad-reduce", "--tp-comm-overlap", "--json", str(tmp_path / "a.json")]) == 0
    assert main(base + ["--no-overlap-grad-reduce", "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f"{x}.json").read_text()) for x in "ab")
    assert a["meta"]["overlap_grad_reduce"] and a["meta"]["tp_comm_overlap"] and not a["meta"]["overlap_param_gather"]
    assert not b["meta"]["overlap_grad_reduce"] and a["step_time_s"] < b["step_time_s"]
    assert np.isfinite(a["breakdown"]["grad_sync_s"])


@pytest.mark.parametrize("schedule, v", [("1f1b", 1), ("interleaved", 2), ("dualpipe", 1), ("dualpipe-bidir", 1)])
def test_every_schedule_overlaps_part_of_its_reduction(schedule, v):
    cfg = dense_config(**{**BIG, "num_hidden_layers": 8})
    spec = TrainSpec(Parallel(tp=2, pp=2, dp=2, zero=0, virtual_stages=v), seq_len=2048, micro_batch_size=1,
                     global_batch_size=16, schedule=schedule)
    off, on = _run(cfg, spec), _run(cfg, spec, overlap_grad_reduce=True)
    assert off.breakdown["pipeline_s"] == on.breakdown["pipeline_s"]  # the reduction does not move the pipeline
    assert 0 < on.breakdown["grad_sync_s"] < off.breakdown["grad_sync_s"]
    every = _run(cfg, dataclasses.replace(spec, parallel=dataclasses.replace(spec.parallel, zero=1)),
                 overlap_grad_reduce=True, overlap_param_gather=True, tp_comm_overlap=True)
    assert every.step_time_s < off.step_time_s and any(p["phase"] == "param_gather" for p in every.phases)


def test_compute_beside_communication_keeps_the_fp8_recipe():
    """The timer with SMs taken by an overlapped collective is the step's own timer with another cost model: same
    dtype and FP8 recipe, so under FP8 the GEMMs beside the TP collectives are timed with their cast kernels in
    both the plain and the slowed chunk."""
    from hwmodels.cost import default_cost_model
    from moesim.train.layers import tp_beside
    from moesim.train.ops import Timer

    device = load_system("dgx-h100").device
    cost = default_cost_model(device)
    with_casts = Timer(cost, device, "fp8", "tensorwise")
    without = Timer(cost, device, "fp8", "none")
    shapes, last = [(3 * 2048, 2048)], (2048, 2048)
    got, plain = tp_beside(with_casts, 4096, shapes, last, 4), tp_beside(without, 4096, shapes, last, 4)
    # (first GEMMs forward, their weight gradient, last GEMM forward, its input gradient): the casts belong to the
    # forward and input-gradient passes, none to the weight gradient
    for i, ((whole, chunk, slowed), (_, chunk0, slowed0)) in enumerate(zip(got, plain)):
        assert slowed >= chunk
        if i == 1:
            assert (chunk, slowed) == (chunk0, slowed0)
        else:
            assert chunk > chunk0  # the casts
            # the SMs taken slow the GEMMs by as much with casts as without: the casts are in both timers
            assert slowed - chunk == pytest.approx(slowed0 - chunk0, rel=1e-9, abs=1e-15)


def test_compute_slowdown_under_fp8_counts_the_same_kernels_slowed_and_not():
    """The slowdown of compute while NCCL holds its SMs compares the same kernels (GEMMs and FP8 casts) with and
    without the SMs: it is the same factor whatever the cast recipe adds, above 1 for the fitted GPU model."""
    from hwmodels.cost import default_cost_model
    from moesim.train.step import _compute_slowdown, _context

    system = load_system("dgx-h100")
    cfg = dense_config(**BIG)
    factors = {}
    for recipe in ("none", "tensorwise"):
        spec = TrainSpec(Parallel(tp=4, dp=2), seq_len=4096, micro_batch_size=1, global_batch_size=8, dtype="fp8",
                         fp8_recipe=recipe)
        ctx = _context(cfg, system, spec, default_cost_model(system.device), None, 0, None)
        factors[recipe] = _compute_slowdown(ctx, "nccl-ring")
    assert factors["none"] > 1.0 and factors["tensorwise"] > 1.0
    assert factors["tensorwise"] < factors["none"]  # memory-bound casts dilute the GEMMs' slowdown, never erase it
