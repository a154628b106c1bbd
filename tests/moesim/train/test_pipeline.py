"""Pipeline schedules: closed-form bubbles on uniform stages; the DualPipe-style overlap hides communication."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.train.pipeline import run_schedule, stage_order
from moesim.train.spec import Parallel, TrainError, TrainSpec


@pytest.mark.parametrize("p, m", [(2, 1), (2, 8), (4, 4), (4, 16), (8, 3)])
def test_1f1b_bubble_is_p_minus_1_over_m_plus_p_minus_1(p, m):
    f, b = 1.5, 3.25
    tl = run_schedule("1f1b", np.full((p, m), f), np.full((p, m), b), 0.0, p)
    assert tl.makespan_s == pytest.approx((m + p - 1) * (f + b))
    assert tl.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
    assert list(tl.max_live) == [min(p - s, m) for s in range(p)]


@pytest.mark.parametrize("p, m, v", [(2, 4, 2), (4, 8, 2), (4, 4, 3), (8, 16, 4)])
def test_interleaved_bubble_shrinks_by_the_virtual_stages(p, m, v):
    f, b = 1.0, 2.0
    tl = run_schedule("interleaved", np.full((v * p, m), f / v), np.full((v * p, m), b / v), 0.0, p, v)
    assert tl.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1))


def test_p2p_delays_only_the_critical_path():
    p, m, f, b, c = 4, 8, 1.0, 2.0, 0.1
    tl = run_schedule("1f1b", np.full((p, m), f), np.full((p, m), b), c, p)
    base = (m + p - 1) * (f + b)
    # the first micro-batch crosses p - 1 boundaries each way; no op waits more than one p2p per dependency
    assert base + 2 * (p - 1) * c - 1e-9 <= tl.makespan_s <= base + 2 * (m + p - 1) * c + 1e-9
    assert list(tl.busy_s) == pytest.approx([m * (f + b)] * p)


def test_dualpipe_overlap_hides_communication_of_paired_chunks():
    p, m = 4, 8
    f, b, fc, bc = 1.0, 2.0, 0.4, 0.8
    plain = run_schedule("1f1b", np.full((p, m), f), np.full((p, m), b), 0.0, p)
    dual = run_schedule("dualpipe", np.full((p, m), f), np.full((p, m), b), 0.0, p, 1,
                        np.full((p, m), fc), np.full((p, m), bc))
    assert dual.makespan_s < plain.makespan_s
    # a steady-state pair costs max(compute, communication) = (f - fc) + (b - bc) here, not f + b
    pair = max(f - fc + b - bc, fc + bc)
    fb = [s for s in dual.slots if s.what == "FB"]
    assert fb and all(s.end_at_s - s.start_at_s == pytest.approx(pair - f) for s in fb)
    no_comm = run_schedule("dualpipe", np.full((p, m), f), np.full((p, m), b), 0.0, p, 1,
                           np.zeros((p, m)), np.zeros((p, m)))
    assert no_comm.makespan_s == pytest.approx(plain.makespan_s)


def test_every_stage_runs_every_micro_batch_once_each_way():
    for sched, v in (("1f1b", 1), ("interleaved", 2), ("dualpipe", 1)):
        for s in range(4):
            order = stage_order(sched, s, 4, 8, v)
            assert sorted(o for o in order if o[0] == "F") == sorted(("F", c, i) for c in range(v) for i in range(8))
            assert sorted(o for o in order if o[0] == "B") == sorted(("B", c, i) for c in range(v) for i in range(8))


def test_bad_layouts_fail_with_the_flag_named():
    with pytest.raises(TrainError, match="--ep"):
        Parallel(tp=1, dp=2, ep=3)
    with pytest.raises(TrainError, match="--global-batch-size"):
        TrainSpec(Parallel(dp=4), seq_len=128, micro_batch_size=2, global_batch_size=6)
    with pytest.raises(TrainError, match="interleaved"):
        TrainSpec(Parallel(pp=4, virtual_stages=2), 128, 1, 6, schedule="interleaved")


@pytest.mark.parametrize("sched, p, m, v, seed", [("1f1b", 4, 6, 1, 0), ("1f1b", 3, 2, 1, 1), ("interleaved", 4, 8, 2, 2),
                                                  ("interleaved", 2, 6, 3, 3), ("dualpipe", 4, 8, 1, 4)])
def test_random_stage_times_respect_dependencies_and_never_overlap_on_a_stage(sched, p, m, v, seed):
    rng = np.random.default_rng(seed)
    fwd, bwd = rng.uniform(0.5, 2.0, (v * p, m)), rng.uniform(1.0, 4.0, (v * p, m))
    comm_f, comm_b = fwd * rng.uniform(0, 0.6, fwd.shape), bwd * rng.uniform(0, 0.6, bwd.shape)
    p2p = 0.05
    tl = run_schedule(sched, fwd, bwd, p2p, p, v, comm_f, comm_b)
    end = {}
    for st in range(p):
        slots = sorted((s for s in tl.slots if s.stage == st), key=lambda s: s.start_at_s)
        assert all(a.end_at_s <= b.start_at_s + 1e-12 for a, b in zip(slots, slots[1:]))
        for s in slots:
            end[("F" if s.what == "F" else "B", s.chunk, st, s.micro_batch)] = (s.start_at_s, s.end_at_s)
    for (what, c, st, i), (start, _) in end.items():
        q = c * p + st
        if what == "F" and q > 0:
            prev = end[("F", (q - 1) // p, (q - 1) % p, i)]
            assert start >= prev[1] + p2p - 1e-9
        if what == "B":
            nxt = end[("B", (q + 1) // p, (q + 1) % p, i)] if q < v * p - 1 else end[("F", c, st, i)]
            assert start >= nxt[1] + (p2p if q < v * p - 1 else 0.0) - 1e-9
    assert tl.makespan_s >= tl.busy_s.max() - 1e-9
    assert len(tl.slots) == 2 * v * p * m


def test_stage_layouts_even_or_with_fixed_first_and_last_chunks():
    assert [len(c) for c in Parallel(pp=16).chunks(61)] == [4] * 13 + [3] * 3
    # Llama 3 405B: one block fewer on the first and the last stage (126 = 7 + 14 x 8 + 7)
    chunks = Parallel(pp=16, first_stage_layers=7, last_stage_layers=7).chunks(126)
    assert [len(c) for c in chunks] == [7] + [8] * 14 + [7]
    assert [i for c in chunks for i in c] == list(range(126))
    with pytest.raises(TrainError, match="cannot fill"):
        Parallel(pp=4, first_stage_layers=3, last_stage_layers=3).chunks(7)
