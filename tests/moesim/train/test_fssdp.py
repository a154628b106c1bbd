"""FSSDP (Hecate's fully sharded sparse data parallel): bytes moved, placement balance, and the step."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hwmodels.roofline import RooflineCost
from hwmodels.specs import load_system
from moesim.train.fssdp import expert_params, fssdp_comm, lpt_placement
from moesim.train.memory import GRAD_BYTES, WEIGHT_BYTES
from moesim.train.spec import Parallel, TrainError, TrainSpec
from moesim.train.step import simulate_step
from tests.moesim.train.conftest import flame_config
from workloads.importers import load_trace
from workloads.trace import Trace


@pytest.fixture(scope="module")
def trace():
    return load_trace("default")  # FLAME-MoE-290M: 2048 tokens, 8 MoE layers, 64 experts, top-6


def _spec(mode, routing="trace", gbs=8):
    # 8 devices x 256 tokens = the trace's 2048 tokens: one sample replays the whole trace step unscaled
    return TrainSpec(Parallel(dp=8, ep=8), seq_len=256, micro_batch_size=1, global_batch_size=gbs, routing=routing,
                     routing_samples=1, expert_mode=mode)


def _sparse(trace: Trace) -> Trace:
    """The trace with every choice of an expert id divisible by 3 dropped: fewer experts touched."""
    keep = trace.columns["expert"] % 3 != 0
    return Trace(columns={k: v[keep] for k, v in trace.columns.items()}, meta=trace.meta)


def test_fssdp_bytes_equal_the_experts_the_trace_touches(trace):
    cfg, sparse = flame_config(), _sparse(trace)
    r = simulate_step(cfg, load_system("dgx-h100"), _spec("fssdp"), RooflineCost(), trace=sparse)
    c = sparse.columns
    touched = sum(np.unique(c["expert"][c["layer"] == layer]).size for layer in range(8))  # 8 MoE blocks, 8 layers
    assert touched < 8 * 64  # the dropped experts are not touched
    for layer in range(8):  # precondition: no expert exceeds a device's fair share, so no extra copies
        load = np.bincount(c["expert"][c["layer"] == layer], minlength=64)
        assert load.max() <= load.sum() / 8
    n, pe = 8, 3 * cfg.hidden_size * cfg.moe_intermediate_size
    expected = touched * pe * (WEIGHT_BYTES + GRAD_BYTES) * (n - 1) / n
    assert r.breakdown["fssdp_bytes_per_step"] == pytest.approx(expected, rel=1e-12)
    assert expert_params(cfg) == pe


def test_a_hot_expert_is_materialised_in_copies_that_split_its_load():
    load = np.array([[12, 2, 1, 1, 0, 0, 0, 0]])  # total 16 over 4 devices: fair share 4, expert 0 needs 3 copies
    p = lpt_placement(load, 4)
    assert p.replica_count[0, 0] == 3 and np.all(p.replica_count[0, 1:] == 1)
    assert len(set(p.expert_devices(0)[0, :3])) == 3  # copies on distinct devices
    comm = fssdp_comm(load_system("dgx-h100"), flame_config(), load, p, 4, WEIGHT_BYTES, GRAD_BYTES)
    assert comm.touched[0] == 4 and comm.copies[0] == 6
    assert comm.gather_bytes[0] == 6 * expert_params(flame_config()) * WEIGHT_BYTES * 3 / 4


def test_lpt_placement_materialises_each_touched_expert_once_and_balances():
    load = np.array([[9, 0, 5, 4, 0, 3, 1, 2]])
    p = lpt_placement(load, 2)
    assert np.all(p.replica_count == 1)
    dev = p.expert_devices(0)[:, 0]
    per_device = np.bincount(dev, weights=load[0], minlength=2)
    assert sorted(per_device) == [12, 12]  # LPT: 9 | 5, 4 -> 9+3 | 5+4+2+1 = 12 | 12
    comm = fssdp_comm(load_system("dgx-h100"), flame_config(), load, p, 2, WEIGHT_BYTES, GRAD_BYTES)
    assert comm.touched[0] == 6
    pe = expert_params(flame_config())
    assert comm.gather_bytes[0] == 6 * pe * WEIGHT_BYTES / 2 and comm.reduce_scatter_bytes[0] == 6 * pe * GRAD_BYTES / 2
    link = load_system("dgx-h100").scale_up
    busiest = comm.materialised_max[0] * pe * WEIGHT_BYTES / 2
    assert comm.gather_s[0] == pytest.approx(busiest / link.bandwidth_bytes_per_s + link.latency_s)


def test_fssdp_balances_the_real_trace_that_expert_parallel_does_not(trace):
    system, cost, cfg = load_system("dgx-h100"), RooflineCost(), flame_config()
    ep = simulate_step(cfg, system, _spec("ep"), cost, trace=trace)
    fs = simulate_step(cfg, system, _spec("fssdp"), cost, trace=trace)
    assert fs.breakdown["moe_imbalance_mean"] < ep.breakdown["moe_imbalance_mean"]
    assert fs.breakdown["fssdp_comm_s"] > 0 and ep.breakdown["fssdp_comm_s"] == 0
    assert fs.step_time_s == pytest.approx(fs.breakdown["pipeline_s"] + fs.breakdown["grad_sync_s"]
                                           + fs.breakdown["optimizer_s"] + fs.breakdown["fssdp_comm_s"])
    assert fs.memory_bytes["fssdp_buffers"]["hbm"] > 0
    phases = {(p["phase"], p["direction"]) for p in fs.phases}
    assert {("fssdp_gather", "forward"), ("fssdp_reduce_scatter", "backward_weight")} <= phases


def test_fssdp_gathers_once_per_step_not_per_micro_batch(trace):
    system, cost, cfg = load_system("dgx-h100"), RooflineCost(), flame_config()
    one = simulate_step(cfg, system, _spec("fssdp", gbs=8), cost, trace=trace)
    four = simulate_step(cfg, system, _spec("fssdp", gbs=32), cost, trace=trace)
    assert four.breakdown["fssdp_comm_s"] == pytest.approx(one.breakdown["fssdp_comm_s"])


def test_fssdp_options_are_checked(trace):
    with pytest.raises(TrainError, match="--expert-mode"):
        _spec("zero-ep")
    from moesim.placement import contiguous
    with pytest.raises(TrainError, match="exclude each other"):
        simulate_step(flame_config(), load_system("dgx-h100"), _spec("fssdp"), RooflineCost(), trace=trace,
                      placement=contiguous(8, 64, 8))


def test_a_first_sample_plan_is_the_placement_of_that_samples_loads(trace):
    from moesim.train.fssdp import placement_from_trace
    from moesim.train.moe import moe_times, sample_trace

    system, cost, cfg = load_system("dgx-h100"), RooflineCost(), flame_config()
    spec = TrainSpec(Parallel(dp=8, ep=8), seq_len=128, micro_batch_size=1, global_batch_size=32, routing="trace",
                     routing_samples=4, expert_mode="fssdp", fssdp_plan="first-sample")
    mt = moe_times(cfg, system, spec, cost, trace, placement=placement_from_trace(8, "first-sample"))
    sampled, _ = sample_trace(trace, 8, 128, 4, 8)
    first = lpt_placement(sampled.select(sampled.columns["step"] == 0).expert_load(), 8)
    np.testing.assert_array_equal(mt.placement.slot_to_expert, first.slot_to_expert)
    one = dataclasses.replace(spec, routing_samples=1)  # one sample: the first sample is the whole step
    a = simulate_step(cfg, system, one, cost, trace=trace)
    b = simulate_step(cfg, system, dataclasses.replace(one, fssdp_plan="oracle"), cost, trace=trace)
    assert a.step_time_s == b.step_time_s and a.meta["fssdp_plan"] == "first-sample"
