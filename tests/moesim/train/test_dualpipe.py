"""DualPipe's bidirectional schedule: the published bubble and activation count on uniform stages."""

from __future__ import annotations

import numpy as np
import pytest

from hwmodels.roofline import RooflineCost
from hwmodels.specs import load_system
from moesim.train.dualpipe import rank_order, run_dualpipe
from moesim.train.pipeline import run_schedule
from moesim.train.spec import Parallel, TrainError, TrainSpec
from moesim.train.step import simulate_step
from tests.moesim.train.conftest import dense_config


def _uniform(p, m, f, b, w, fm, bm):
    full = lambda x: np.full((p, m), x)  # noqa: E731
    return run_dualpipe(full(f), full(b), 0.0, p, full(fm), full(bm), full(w))


@pytest.mark.parametrize("p", [2, 4, 6, 8, 16])
@pytest.mark.parametrize("extra", [0, 2, 20])
@pytest.mark.parametrize("seed", [0, 1])
def test_bubble_is_the_published_formula_on_uniform_stages(p, extra, seed):
    # DualPipe README / DeepSeek-V3 report table 2: bubble (PP/2 - 1)(F&B + B - 3W), B a full backward, W its
    # weight part, F&B an overlapped forward-backward pair. It is exact for the most idle rank when the
    # input-gradient part of B takes as long as F (the reference figure's unit cells) and the pair is not
    # shorter than a full backward (the overlap hides at most a forward's worth).
    rng = np.random.default_rng(seed)
    f = rng.uniform(0.5, 2.0)
    w = rng.uniform(0.0, 1.0) * f
    b = f + w
    fm, bm = rng.uniform(0, 0.3) * f, rng.uniform(0, 0.3) * b
    fb = max(f - fm + b - bm, fm + bm)
    assert fb >= b
    m = 2 * p + extra
    tl = _uniform(p, m, f, b, w, fm, bm)
    idle = tl.makespan_s - tl.busy_s
    assert idle.max() == pytest.approx((p / 2 - 1) * (fb + b - 3 * w), rel=1e-12, abs=1e-12)
    assert list(tl.max_live) == [p + 1] * p  # published activation per device: PP + 1 micro-batches
    assert tl.busy_s == pytest.approx(tl.busy_s[::-1])  # symmetric ranks


def test_the_formula_does_not_hold_when_the_input_gradient_is_not_a_forward():
    # the same schedule with B = 2 F + W: the measured bubble is not the formula (the condition above matters)
    p, m, f, w = 8, 32, 1.0, 0.5
    tl = _uniform(p, m, f, 2 * f + w, w, 0.0, 0.0)
    formula = (p / 2 - 1) * ((f + 2 * f + w) + (2 * f + w) - 3 * w)
    assert abs((tl.makespan_s - tl.busy_s).max() - formula) > 0.1


@pytest.mark.parametrize("p,m", [(4, 8), (4, 10), (8, 20)])
def test_every_chunk_runs_every_micro_batch_once_in_dependency_order(p, m):
    rng = np.random.default_rng(p * m)
    fwd, bwd = rng.uniform(0.5, 2, (p, m)), rng.uniform(1, 3, (p, m))
    wgt, fc, bc = bwd * rng.uniform(0, 0.4, (p, m)), fwd * 0.2, bwd * 0.2
    tl = run_dualpipe(fwd, bwd, 0.05, p, fc, bc, wgt)
    seen = {}
    for s in tl.slots:
        assert (s.what, s.chunk, s.micro_batch) not in seen
        seen[(s.what, s.chunk, s.micro_batch)] = s
    for r in range(p):  # rank r runs chunk r for the first half of the micro-batches, chunk p-1-r for the rest
        ops = rank_order(r, p, m)
        fwds = [op for op in ops if op[0] == "F"] + [("F", *op[1]) for op in ops if op[0] == "FB"]
        assert sorted((d, j) for _, d, j in fwds) == [(d, j) for d in (0, 1) for j in range(m // 2)]
        slots = sorted((s for s in tl.slots if s.stage == r), key=lambda s: s.start_at_s)
        assert all(a.end_at_s <= b.start_at_s + 1e-12 for a, b in zip(slots, slots[1:]))
    # every (chunk, micro-batch) has one backward (alone, or in a pair, which the slot names by its backward)
    backs = sorted((s.chunk, s.micro_batch) for s in tl.slots if s.what in ("B", "FB"))
    direction = [(r if i < m // 2 else p - 1 - r, i) for r in range(p) for i in range(m)]
    assert backs == sorted(direction)
    assert tl.busy_s.sum() <= fwd.sum() + bwd.sum() + 1e-9  # pairs only save time


def test_bidirectional_beats_one_direction_on_the_same_work():
    p, m, f, b = 8, 32, 1.0, 2.0
    one = run_schedule("1f1b", np.full((p, m), f), np.full((p, m), b), 0.0, p)
    two = run_schedule("dualpipe-bidir", np.full((p, m), f), np.full((p, m), b), 0.0, p)
    assert two.busy_s.sum() == pytest.approx(one.busy_s.sum())
    assert two.makespan_s < one.makespan_s and two.bubble_fraction < one.bubble_fraction


def test_step_runs_the_bidirectional_schedule_and_checks_its_micro_batches():
    cfg, system, cost = dense_config(num_hidden_layers=4), load_system("dgx-h100"), RooflineCost()
    spec = TrainSpec(Parallel(pp=4, dp=2), seq_len=256, micro_batch_size=1, global_batch_size=16,
                     schedule="dualpipe-bidir")
    r = simulate_step(cfg, system, spec, cost, check_memory=False)
    one = simulate_step(cfg, system, TrainSpec(Parallel(pp=4, dp=2), seq_len=256, micro_batch_size=1,
                                               global_batch_size=16, schedule="1f1b"), cost, check_memory=False)
    assert r.breakdown["bubble_fraction"] < one.breakdown["bubble_fraction"]
    assert {s.what for s in r.timeline.slots} >= {"F", "B", "W"}
    with pytest.raises(TrainError, match="micro-batches >= 2 x pp = 8"):
        TrainSpec(Parallel(pp=4, dp=2), seq_len=256, micro_batch_size=1, global_batch_size=8,
                  schedule="dualpipe-bidir")
