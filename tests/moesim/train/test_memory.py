"""Memory per device: ZeRO stages equal the textbook formula; recomputation trades activations for time;
a layout that does not fit names the shortfall."""

from __future__ import annotations

import pytest

from hwmodels.roofline import RooflineCost
from moesim.train.memory import zero_bytes
from moesim.train.spec import Parallel, TrainError, TrainSpec
from moesim.train.step import simulate_step
from tests.conftest import make_system
from tests.moesim.train.conftest import dense_config


@pytest.mark.parametrize("n", [1, 4, 64])
def test_zero_stage_bytes_match_the_zero_paper(n):
    psi = 7.5e9
    total = {z: sum(zero_bytes(psi, z, n).values()) for z in range(4)}
    assert total[0] == pytest.approx((2 + 2 + 12) * psi)
    assert total[1] == pytest.approx((2 + 2 + 12 / n) * psi)
    assert total[2] == pytest.approx((2 + (2 + 12) / n) * psi)
    assert total[3] == pytest.approx((2 + 2 + 12) * psi / n)


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_step_memory_of_a_dense_model_follows_zero(zero):
    dp = 4
    h, f, v = 64, 96, 128
    psi = (3 * h * h + h * h) + 2 * h + 3 * h * f + v * h + v * h + h  # one block, embedding, head, final norm
    r = simulate_step(dense_config(), make_system(dp), TrainSpec(Parallel(dp=dp, zero=zero), 32, 1, 4), RooflineCost())
    mem = r.memory_bytes
    expected = zero_bytes(psi, zero, dp)
    for cat in ("weights", "gradients", "optimizer"):
        assert mem[cat]["hbm"] == pytest.approx(expected[cat])
    assert r.breakdown["grad_sync_s"] > 0 if zero < 3 else r.breakdown["grad_sync_s"] == 0


def test_recomputation_trades_activation_bytes_for_backward_time():
    system = make_system(1)
    res = {rc: simulate_step(dense_config(num_hidden_layers=4), system,
                             TrainSpec(Parallel(), 256, 2, 4, recompute=rc), RooflineCost())
           for rc in ("none", "selective", "full")}
    act = {k: r.memory_bytes["activations"]["hbm"] for k, r in res.items()}
    assert act["full"] < act["selective"] < act["none"]
    assert res["none"].step_time_s < res["selective"].step_time_s < res["full"].step_time_s
    assert res["full"].mfu < res["none"].mfu  # recomputation is not model FLOPs


def test_a_model_too_big_for_hbm_names_the_shortfall():
    cfg = dense_config(hidden_size=8192, num_hidden_layers=40, num_attention_heads=64, intermediate_size=28672)
    with pytest.raises(TrainError, match=r"does not fit in HBM: .* short by [0-9.]+ GB .*largest: optimizer"):
        simulate_step(cfg, make_system(1), TrainSpec(Parallel(), 128, 1, 1), RooflineCost())


def test_zero3_gathers_hide_behind_compute_unless_the_link_is_slow():
    spec = {z: TrainSpec(Parallel(dp=4, zero=z), 256, 2, 16) for z in (1, 3)}
    fast = make_system(4, link_bytes_per_s=1e15, link_latency_s=0.0)
    r1, r3 = (simulate_step(dense_config(num_hidden_layers=2), fast, spec[z], RooflineCost()) for z in (1, 3))
    assert r3.breakdown["pipeline_s"] == pytest.approx(r1.breakdown["pipeline_s"], rel=1e-6)
    assert r3.breakdown["grad_sync_s"] == 0 < r1.breakdown["grad_sync_s"]
    slow = make_system(4, link_bytes_per_s=1e6)
    s1, s3 = (simulate_step(dense_config(num_hidden_layers=2), slow, spec[z], RooflineCost()) for z in (1, 3))
    assert s3.breakdown["pipeline_s"] > s1.breakdown["pipeline_s"]
    assert any(p["phase"] == "zero3_comm" for p in s3.phases)


def test_interleaved_first_stage_holds_more_activations_than_1f1b():
    cfg = dense_config(num_hidden_layers=8)
    system = make_system(4)
    one = simulate_step(cfg, system, TrainSpec(Parallel(pp=4), 256, 1, 8), RooflineCost())
    inter = simulate_step(cfg, system, TrainSpec(Parallel(pp=4, virtual_stages=2), 256, 1, 8, schedule="interleaved"),
                          RooflineCost())
    # Megatron: stage 0 keeps p micro-batches of its layers under 1F1B, p (1 + (p - 1) / (p v)) interleaved
    assert list(one.timeline.max_live) == [4, 3, 2, 1]
    assert inter.timeline.max_live[0] / 2 == pytest.approx(4 * (1 + 3 / 8))
    assert inter.breakdown["bubble_fraction"] < one.breakdown["bubble_fraction"]


def test_expert_gradients_sync_over_expert_data_parallel_replicas():
    from tests.moesim.train.conftest import flame_config
    from hwmodels.specs import load_system
    cfg, system = flame_config(), load_system("dgx-h100")
    r_ep8 = simulate_step(cfg, system, TrainSpec(Parallel(dp=8, ep=8), 256, 1, 8), RooflineCost())
    r_ep4 = simulate_step(cfg, system, TrainSpec(Parallel(dp=8, ep=4), 256, 1, 8), RooflineCost())
    # ep 8: every expert has one replica (no expert all-reduce); ep 4: two replicas, and twice the experts per GPU
    assert r_ep4.breakdown["grad_sync_s"] > r_ep8.breakdown["grad_sync_s"]
    assert r_ep4.memory_bytes["weights"]["hbm"] > r_ep8.memory_bytes["weights"]["hbm"]


def test_tensor_parallel_adds_sequence_parallel_collectives_and_shards_weights():
    cfg = dense_config(num_hidden_layers=2, num_attention_heads=8)
    r1 = simulate_step(cfg, make_system(2), TrainSpec(Parallel(dp=2), 256, 1, 2), RooflineCost())
    r2 = simulate_step(cfg, make_system(2), TrainSpec(Parallel(tp=2), 256, 1, 1), RooflineCost())
    assert not any(p["phase"] == "tp_comm" for p in r1.phases)
    assert any(p["phase"] == "tp_comm" and p["time_s"] > 0 for p in r2.phases)
    assert r2.memory_bytes["weights"]["hbm"] < r1.memory_bytes["weights"]["hbm"]


def test_communication_buffers_are_the_all_to_all_pair_or_the_gather_plus_pipeline_buffers():
    from hwmodels.roofline import RooflineCost
    from hwmodels.specs import load_system
    from moesim.train.spec import Parallel, TrainSpec
    from moesim.train.step import simulate_step
    from tests.moesim.train.conftest import flame_config

    cfg = flame_config()
    h, t = cfg.hidden_size, 1024
    spec = TrainSpec(Parallel(pp=2, dp=4, ep=4), seq_len=t, micro_batch_size=1, global_batch_size=8, dtype="fp8")
    r = simulate_step(cfg, load_system("dgx-h100"), spec, RooflineCost(), check_memory=False)
    x = t * cfg.num_experts_per_tok  # balanced: the busiest device receives its own share of choices
    dispatch = x * (h * 1 + h // 128 * 4)  # fp8 values and one fp32 scale per 128
    combine = x * h * 2  # bf16
    pipeline = 2 * t * h * 2  # send and receive of the bf16 activation
    assert all(s["comm_buffers"] == dispatch + combine + pipeline for s in r.memory_per_stage)
