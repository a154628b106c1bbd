"""The MoE part of the step is the MoE-layer simulator's: same trace, same cost path, same times."""

from __future__ import annotations

import numpy as np
import pytest

from hwmodels.roofline import RooflineCost
from hwmodels.specs import load_system
from moesim.analytic import estimate
from moesim.placement import contiguous
from moesim.sim import SimOptions
from moesim.train.moe import moe_times
from moesim.train.spec import Parallel, TrainSpec
from moesim.train.step import simulate_step
from tests.moesim.train.conftest import flame_config
from workloads.importers import load_trace


@pytest.fixture(scope="module")
def trace():
    return load_trace("default")  # FLAME-MoE-290M: 2048 tokens, 8 MoE layers, 64 experts, top-6


def _spec(routing, **kw):
    # 8 devices x 256 tokens = the trace's 2048 tokens: one sample replays the whole trace step unscaled
    return TrainSpec(Parallel(dp=8, ep=8), seq_len=256, micro_batch_size=1, global_batch_size=8, routing=routing,
                     routing_samples=1, **kw)


def test_moe_forward_equals_the_layer_simulator_on_the_same_trace(trace):
    system, cost, cfg = load_system("dgx-h100"), RooflineCost(), flame_config()
    mt = moe_times(cfg, system, _spec("trace"), cost, trace)
    ref = estimate(system, cfg.to_moe_model(), contiguous(8, 64, 8), trace, cost=cost,
                   options=SimOptions(micro_batches=1, dispatch_dedup="node"))  # the step's DeepEP-like kernel
    ours = mt.router_s[0] + np.maximum(mt.dispatch_s[0], mt.shared_s[0]) + mt.expert_s[0] + mt.combine_s[0]
    np.testing.assert_allclose(ours, ref.layer_time_s, rtol=1e-12)
    np.testing.assert_array_equal(mt.expert_tokens_max[0], ref.device_tokens.max(axis=1))


def test_balanced_routing_conserves_choices_and_is_balanced(trace):
    cfg = flame_config()
    mt = moe_times(cfg, load_system("dgx-h100"), _spec("balanced"), RooflineCost(), None)
    assert np.all(mt.expert_tokens_max == 256 * 6) and np.all(mt.imbalance == 1.0)
    real = moe_times(cfg, load_system("dgx-h100"), _spec("trace"), RooflineCost(), trace)
    assert np.all(real.imbalance > 1.0)
    assert np.all(real.expert_s >= mt.expert_s * (1 - 1e-9))


def test_trace_routing_in_the_step_costs_more_than_balanced(trace):
    system, cfg = load_system("dgx-h100"), flame_config()
    bal = simulate_step(cfg, system, _spec("balanced"), RooflineCost())
    real = simulate_step(cfg, system, _spec("trace"), RooflineCost(), trace=trace)
    assert real.breakdown["moe_imbalance_mean"] > 1.0
    assert real.step_time_s > bal.step_time_s
    phases = {(p["layer"], p["phase"], p["direction"]) for p in real.phases}
    assert {(1, "dispatch", "forward"), (1, "combine", "backward_input"), (1, "expert_ffn", "backward_weight"),
            (1, "shared_ffn", "forward"), (0, "dense_ffn", "forward")} <= phases


def test_samples_scale_to_the_micro_batch_tokens(trace):
    spec = TrainSpec(Parallel(dp=8, ep=8), seq_len=1024, micro_batch_size=1, global_batch_size=16, routing="trace",
                     routing_samples=3)
    mt = moe_times(flame_config(), load_system("dgx-h100"), spec, RooflineCost(), trace)
    assert mt.num_samples == 3 and mt.tokens_per_device == 1024
    # 256 trace tokens per device scaled 4x: every device computes about 1024 x 6 choices on average
    assert mt.expert_tokens_max.min() >= 1024 * 6


def _lpt_with_replicas(load: np.ndarray, devices: int, slots: int) -> "Placement":
    """Hottest experts get a second slot; slots go to the least-loaded device with room (longest first)."""
    from moesim.placement import Placement
    layers, experts = load.shape
    s2e = np.full((layers, devices * slots), -1, dtype=np.int32)
    for layer in range(layers):
        extra = devices * slots - experts
        count = np.ones(experts, int)
        count[np.argsort(-load[layer])[:extra]] += 1
        items = sorted(((load[layer, e] / count[e], e) for e in range(experts) for _ in range(count[e])), reverse=True)
        dev_load, used = np.zeros(devices), np.zeros(devices, int)
        for w, e in items:
            ok = [d for d in range(devices) if used[d] < slots and e not in s2e[layer, d * slots:d * slots + used[d]]]
            d = min(ok, key=lambda d: dev_load[d])
            s2e[layer, d * slots + used[d]] = e
            used[d] += 1
            dev_load[d] += w
    return Placement.from_slot_to_expert(s2e, experts, slots, name="lpt-replicas")


def test_a_placement_with_replicas_balances_the_trace(trace):
    system, cost, cfg = load_system("dgx-h100"), RooflineCost(), flame_config()
    spec = _spec("trace")
    plain = moe_times(cfg, system, spec, cost, trace)
    placed = moe_times(cfg, system, spec, cost, trace, placement=_lpt_with_replicas(trace.expert_load(), 8, 10))
    assert placed.imbalance.mean() < plain.imbalance.mean()
    assert placed.expert_tokens_max.max() < plain.expert_tokens_max.max()
    with pytest.raises(Exception, match="placement spans"):
        moe_times(cfg, system, spec, cost, trace, placement=contiguous(8, 64, 4))


def test_a_trace_with_balanced_routing_is_an_error_not_ignored(trace):
    with pytest.raises(Exception, match="routing is 'balanced'"):
        simulate_step(flame_config(), load_system("dgx-h100"), _spec("balanced"), RooflineCost(), trace=trace)
