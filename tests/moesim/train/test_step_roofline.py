"""A dense one-layer model on one GPU equals its hand-computed roofline; MFU follows from it."""

from __future__ import annotations

import pytest

from hwmodels.roofline import RooflineCost
from moesim.train.spec import Parallel, TrainSpec
from moesim.train.step import simulate_step
from tests.conftest import make_system
from tests.moesim.train.conftest import dense_config

PEAK, BW, LAUNCH = 1e12, 1e11, 1e-6
E = 2  # bf16 bytes


def roof(flops, nbytes):
    return LAUNCH + max(flops / PEAK, nbytes / BW)


def gemm3(m, n, k):
    """Forward [m,k]x[k,n], input gradient [m,n]x[n,k], weight gradient [k,m]x[m,n]."""
    shapes = ((m, n, k), (m, k, n), (k, n, m))
    return sum(roof(2.0 * a * b * c, (a * c + c * b + a * b) * E) for a, b, c in shapes)


def hand_step_s(b, s, m):
    h, heads, d, f, v = 64, 4, 16, 96, 128
    t = b * s
    n = t * h
    per_mb = sum(gemm3(t, nn, kk) for nn, kk in ((3 * heads * d, h), (h, heads * d), (2 * f, h), (h, f), (v, h)))
    per_mb += 3 * (roof(4 * n, 2 * n * E) + roof(8 * n, 3 * n * E))  # two block norms + final norm
    # the attention core runs as fast as a GEMM of its FLOPs: [b heads s, 2d] x [2d, s/2]; backward 2.5 of those
    rows, cols = b * heads * s, s // 2
    per_mb += 3.5 * roof(2.0 * rows * cols * 2 * d, (rows * 2 * d + 2 * d * cols + rows * cols) * E)
    per_mb += roof(0, 2 * n * E) + roof(n, 3 * n * E)  # embedding gather, scatter-add
    logits = t * v
    per_mb += roof(5 * logits, logits * E) + roof(3 * logits, 2 * logits * E)
    params = (3 * h * h + h * h) + 2 * h + 3 * h * f + v * h + v * h + h
    optimizer = roof(12 * params, 28 * params)  # fp32 peak is PEAK / 2, but the Adam step is bytes-bound here
    return m * per_mb + optimizer, params


@pytest.mark.parametrize("b, s, m", [(2, 32, 2), (1, 128, 3)])
def test_dense_one_layer_one_gpu_equals_hand_roofline(b, s, m):
    system = make_system(1, peak_flops_per_s=PEAK, hbm_bytes_per_s=BW, launch_s=LAUNCH)
    spec = TrainSpec(Parallel(), seq_len=s, micro_batch_size=b, global_batch_size=b * m)
    r = simulate_step(dense_config(), system, spec, RooflineCost())
    expected, _ = hand_step_s(b, s, m)
    assert r.step_time_s == pytest.approx(expected, rel=1e-12)
    assert r.breakdown["bubble_fraction"] == pytest.approx(0.0, abs=1e-12)
    assert r.tokens_per_s == pytest.approx(b * s * m / expected)


def test_mfu_is_model_flops_over_peak_time():
    b, s, m = 2, 32, 2
    system = make_system(1, peak_flops_per_s=PEAK, hbm_bytes_per_s=BW, launch_s=LAUNCH)
    r = simulate_step(dense_config(), system, TrainSpec(Parallel(), s, b, b * m), RooflineCost())
    t, h, heads, d, f, v = b * s, 64, 4, 16, 96, 128
    fwd = 2.0 * t * (3 * heads * d * h + h * heads * d + 3 * f * h + v * h) + 2.0 * b * heads * s * s * 2 * d * 0.5
    assert r.model_flops_per_step == pytest.approx(3 * fwd * m)
    assert r.mfu == pytest.approx(3 * fwd * m / (r.step_time_s * PEAK))
    assert 0 < r.mfu < 1


def test_phase_records_carry_the_issue_fields_and_split_backward():
    system = make_system(1, peak_flops_per_s=PEAK, hbm_bytes_per_s=BW, launch_s=LAUNCH)
    r = simulate_step(dense_config(), system, TrainSpec(Parallel(), 32, 2, 4), RooflineCost())
    keys = {(p["phase"], p["direction"]) for p in r.phases}
    assert {("dense_ffn", "forward"), ("dense_ffn", "backward_input"), ("dense_ffn", "backward_weight"),
            ("attention", "forward"), ("optimizer", None)} <= keys
    assert all(set(p) == {"layer", "phase", "direction", "kind", "time_s"} for p in r.phases)
    ffn = {p["direction"]: p["time_s"] for p in r.phases if p["phase"] == "dense_ffn"}
    assert ffn["backward_input"] > 0 and ffn["backward_weight"] > 0
