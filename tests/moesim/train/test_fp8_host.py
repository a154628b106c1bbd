"""FP8 quantization kernels and host launch/synchronisation overhead in the training step, in closed form."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from hwmodels.roofline import RooflineCost
from moesim.cli import main
from moesim.serve.cost import IterationCost, ServeLayout
from moesim.train import step as step_mod
from moesim.train.fp8 import expert_cast_bytes, linear_cast_bytes
from moesim.train.host import HOST_LAUNCH, HostModel, exposed_host_s, moe_segment
from moesim.train.ops import BACKWARD_INPUT, FORWARD, PER_STEP, Timer
from moesim.train.spec import Parallel, TrainError, TrainSpec
from moesim.train.step import simulate_step
from tests.conftest import make_system
from tests.moesim.train.conftest import dense_config, flame_config

PEAK, BW, LAUNCH = 1e12, 1e11, 1e-6


def fp8_system(n: int = 1):
    system = make_system(n, peak_flops_per_s=PEAK, hbm_bytes_per_s=BW, launch_s=LAUNCH)
    peaks = {**system.device.peak_flops_per_s, "fp8": 2 * PEAK}
    return dataclasses.replace(system, device=dataclasses.replace(system.device, peak_flops_per_s=peaks))


def cast_s(nbytes: float) -> float:
    """A memory-bound cast kernel on the toy device's roofline (no FLOPs)."""
    return LAUNCH + nbytes / BW


# ---------------------------------------------------------------------------------------------- FP8 casts

@pytest.mark.parametrize("recipe, per_element", [("delayed", 4), ("tensorwise", 6)])
def test_per_tensor_cast_bytes_are_read_bf16_write_two_fp8_copies(recipe, per_element):
    m, n, k = 256, 384, 512
    fwd, bwd, weight = linear_cast_bytes(m, n, k, recipe)
    assert (fwd, bwd, weight) == (per_element * m * k, per_element * m * n, per_element * k * n)


def test_blockwise_cast_bytes_follow_deepseek_tiles_and_blocks():
    m, n, k = 256, 384, 512  # multiples of 128: m k / 128 tile scales, (k / 128) (n / 128) weight blocks
    fwd, bwd, weight = linear_cast_bytes(m, n, k, "blockwise")
    tiles_x = m * k + 4 * m * k / 128
    tiles_dy = m * n + 4 * m * n / 128
    assert fwd == 2 * m * k + tiles_x  # read BF16 X, write 1x128 tiles
    assert bwd == 2 * tiles_x + 2 * m * n + 2 * tiles_dy  # requantize X transposed; dY into both tile layouts
    assert weight == 2 * k * n + 2 * (k * n + 4 * (k // 128) * (n // 128))
    assert linear_cast_bytes(m, n, k, "none") == (0.0, 0.0, 0.0)


def test_expert_casts_quantize_the_first_input_before_the_dispatch():
    t, c, h, f, e = 100, 800, 256, 128, 4
    fwd, bwd, weight = expert_cast_bytes(t, c, h, f, e, "delayed")
    assert fwd == 4 * t * h + 4 * c * f  # fc1 input on T tokens, fc2 input on the c routed rows
    assert bwd == 2 * c * h + 4 * c * 2 * f + 4 * c * h  # transpose the received rows; dY of fc1 and fc2
    assert weight == e * 4 * (h * 2 * f + f * h)


def test_timer_adds_cast_kernels_on_the_memory_path_only_for_fp8_linears():
    system = fp8_system()
    m, n, k = 64, 96, 128
    timer = Timer(RooflineCost(), system.device, "fp8", "delayed")
    casts = [o for o in timer.linear(0, "dense_ffn", m, n, k) if o.phase == "fp8_cast"]
    assert [(o.direction, o.bytes) for o in casts] == [(FORWARD, 4 * m * k), (BACKWARD_INPUT, 4 * m * n),
                                                       (PER_STEP, 4 * k * n)]
    assert [o.time_s for o in casts] == pytest.approx([cast_s(o.bytes) for o in casts], rel=1e-12)
    assert not [o for o in timer.linear(0, "lm_head", m, n, k, precise=True) if o.phase == "fp8_cast"]
    bf16 = Timer(RooflineCost(), system.device, "bf16", "delayed")
    assert not [o for o in bf16.linear(0, "dense_ffn", m, n, k) if o.phase == "fp8_cast"]


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise"])
def test_dense_step_grows_by_the_hand_counted_casts(recipe):
    b, s, m = 2, 64, 3
    t, h, heads, d, f = b * s, 64, 4, 16, 96
    system = fp8_system()
    run = lambda r: simulate_step(dense_config(), system, TrainSpec(Parallel(), s, b, b * m, dtype="fp8",  # noqa: E731
                                                                      fp8_recipe=r), RooflineCost())
    base, casted = run("none"), run(recipe)
    per_mb = weights = 0.0
    for n, k in ((3 * heads * d, h), (h, heads * d), (2 * f, h), (h, f)):  # every FP8 linear; the LM head is BF16
        fwd, bwd, w = linear_cast_bytes(t, n, k, recipe)
        per_mb += cast_s(fwd) + cast_s(bwd)
        weights += cast_s(w)
    assert casted.step_time_s - base.step_time_s == pytest.approx(m * per_mb + weights, rel=1e-9)
    assert casted.breakdown["fp8_weight_cast_s"] == pytest.approx(weights, rel=1e-12)
    recorded = sum(p["time_s"] for p in casted.phases if p["phase"] == "fp8_cast")
    assert recorded == pytest.approx(m * per_mb + weights, rel=1e-12)


# ---------------------------------------------------------------------------------------------- host overhead

def brute_force_exposure_s(kernels: list[tuple[float, float]]) -> float:
    """In-order host and GPU: kernel p (host launch seconds, GPU seconds) is launched after the launches before it
    and starts when launched and the GPU is free."""
    host = end = 0.0
    for launch_s, g in kernels:
        host += launch_s
        end = max(end, host) + g
    return end - sum(g for _, g in kernels)


def test_two_group_segment_exposure_by_hand():
    us = 1e-6
    # one 10 us kernel, then three of 1 us each: launches at 5, 10, 15, 20 us; the last starts at 20 not 12 us
    assert exposed_host_s([(1, 10 * us, 5 * us), (3, 3 * us, 5 * us)]) == pytest.approx(8 * us)
    assert brute_force_exposure_s([(5 * us, 10 * us)] + [(5 * us, us)] * 3) == pytest.approx(8 * us)
    # long kernels hide every launch but the first
    assert exposed_host_s([(1, 100 * us, 5 * us), (2, 200 * us, 5 * us)]) == pytest.approx(5 * us)
    # a graph launch of 4 us after one 2 us kernel launched in 3 us: the graph's work starts at 7 us, not 5 us
    assert exposed_host_s([(1, 2 * us, 3 * us), (1, 50 * us, 4 * us)]) == pytest.approx(5 * us)


def test_exposure_formula_equals_an_in_order_simulation():
    rng = np.random.default_rng(0)
    for _ in range(200):
        groups = [(int(rng.integers(1, 5)), float(rng.uniform(0, 40e-6)), float(rng.uniform(1e-6, 10e-6)))
                  for _ in range(int(rng.integers(1, 6)))]
        kernels = [(h, t / k) for k, t, h in groups for _ in range(k)]
        assert exposed_host_s(groups) == pytest.approx(brute_force_exposure_s(kernels), rel=1e-9, abs=1e-15)


def test_modes_launch_the_segment_as_documented():
    h, hg = HOST_LAUNCH["eager"].seconds, HOST_LAUNCH["cuda-graphs"].seconds
    block, extra = [1e-6, 2e-6, 3e-6], (2, 1e-6)
    eager = moe_segment(HostModel("eager"), block, 4e-6, 2e-6, 3e-6, 4e-6, 5e-6, True, extra)
    # dispatch + shared, casts, experts, combine, three block kernels, router: every kernel one launch of h
    assert [(k, h_) for k, _, h_ in eager] == [(4, h), (2, h), (3, h), (1, h), (1, h), (1, h), (1, h), (1, h), (1, h)]
    graphs = moe_segment(HostModel("cuda-graphs"), block, 4e-6, 2e-6, 3e-6, 4e-6, 5e-6, True, extra)
    # the dispatch, casts, experts and combine stay eager; the block and the router are one graph launch each
    assert [(k, h_) for k, _, h_ in graphs] == [(4, h), (2, h), (3, h), (1, h), (1, hg), (1, hg)]
    assert graphs[-2][1] == pytest.approx(sum(block)) and graphs[-1][1] == pytest.approx(4e-6)
    assert HostModel("none").exposure_s(eager) == 0.0
    assert HostModel("eager").exposure_s(eager) == exposed_host_s(eager) > 0


def moe_run(host: str, recompute: str = "none", m: int = 2):
    cfg = flame_config(num_hidden_layers=3)  # one dense first layer, two MoE layers
    spec = TrainSpec(Parallel(dp=2, ep=2), seq_len=64, micro_batch_size=1, global_batch_size=2 * m,
                     recompute=recompute, host_overhead=host)
    return simulate_step(cfg, make_system(2), spec, RooflineCost())


@pytest.mark.parametrize("host", ["eager", "cuda-graphs"])
@pytest.mark.parametrize("recompute, syncs", [("none", 1), ("full", 2)])
def test_each_moe_layer_forward_waits_its_segment_exposure(host, recompute, syncs):
    m, moe_layers = 2, 2
    base, run = moe_run("none", recompute, m), moe_run(host, recompute, m)
    waited = [p["time_s"] for p in run.phases if p["phase"] == "host_sync"]
    assert len(waited) == moe_layers  # one record per MoE layer, summed over the micro-batches
    assert run.step_time_s - base.step_time_s == pytest.approx(syncs * sum(waited), rel=1e-9)
    h = HOST_LAUNCH["eager"].seconds  # the first launch after each sync is an eager dispatch kernel
    assert all(w >= m * h * (1 - 1e-12) for w in waited)


def test_dense_models_have_no_sync_and_no_exposure():
    system = make_system(1)
    dense = [simulate_step(dense_config(), system, TrainSpec(Parallel(), 32, 1, 2, host_overhead=h), RooflineCost())
             for h in ("none", "eager", "cuda-graphs")]
    assert dense[0].step_time_s == dense[1].step_time_s == dense[2].step_time_s


def test_none_reproduces_the_step_without_overheads(monkeypatch):
    cfg = flame_config(num_hidden_layers=3)
    spec = TrainSpec(Parallel(dp=2, ep=2), seq_len=64, micro_batch_size=1, global_batch_size=4, dtype="fp8",
                     fp8_recipe="none", host_overhead="none")
    system = fp8_system(2)
    with_terms_off = simulate_step(cfg, system, spec, RooflineCost())
    monkeypatch.setattr(step_mod, "moe_overheads", lambda *a, **k: None)  # the step as it was before these terms
    without = simulate_step(cfg, system, spec, RooflineCost())
    assert with_terms_off.step_time_s == without.step_time_s
    assert with_terms_off.breakdown["pipeline_s"] == without.breakdown["pipeline_s"]


def test_bad_recipe_and_host_mode_name_their_flags():
    with pytest.raises(TrainError, match="--fp8-recipe"):
        TrainSpec(Parallel(), 32, 1, 1, fp8_recipe="mxfp4")
    with pytest.raises(TrainError, match="--host-overhead"):
        TrainSpec(Parallel(), 32, 1, 1, host_overhead="graphs")


def test_cli_flags_reach_the_step_and_bad_values_fail_in_one_line(tmp_path, capsys):
    common = ["train", "--model", "mixtral-8x7b", "--nodes", "1", "--ep", "8", "--global-batch-size", "8",
              "--seq-len", "256", "--layers", "2", "--cost", "roofline", "--dtype", "fp8"]
    steps = {}
    for host in ("none", "cuda-graphs"):
        assert main(common + ["--host-overhead", host, "--fp8-recipe", "blockwise", "--out", str(tmp_path / host),
                              "--json", str(tmp_path / f"{host}.json")]) == 0
        doc = json.loads((tmp_path / f"{host}.json").read_text())
        assert (doc["meta"]["host_overhead"], doc["meta"]["fp8_recipe"]) == (host, "blockwise")
        steps[host] = doc["step_time_s"]
    assert steps["cuda-graphs"] > steps["none"]
    assert main(common + ["--host-overhead", "graphs", "--out", str(tmp_path / "bad")]) != 0
    err = capsys.readouterr().err
    assert "--host-overhead must be one of eager, cuda-graphs, none" in err and "Traceback" not in err


@pytest.mark.parametrize("host", ["eager", "cuda-graphs"])
def test_serving_adds_one_launch_per_moe_layer_when_every_kernel_outlasts_a_launch(host):
    cfg = flame_config(num_hidden_layers=3)  # layer 0 dense, layers 1-2 MoE
    system = make_system(2, launch_s=5e-6, link_latency_s=5e-6)  # every GPU kernel >= 5 us > one 3.25 us launch
    parts = [IterationCost(cfg, system, ServeLayout(ep=2, dp=2), cost=RooflineCost(), host_overhead=h).layer_parts(64)
             for h in ("none", host)]
    added = parts[1].pre_s - parts[0].pre_s
    # after each sync the first kernel (the eager dispatch) waits one launch; every later launch is hidden
    assert added == pytest.approx([0.0, HOST_LAUNCH["eager"].seconds, HOST_LAUNCH["eager"].seconds], abs=1e-15)
