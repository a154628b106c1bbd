"""Context parallelism (ring attention) and expert tensor parallelism in the training step: closed forms."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hwmodels.roofline import DTYPE_BYTES, RooflineCost
from hwmodels.specs import load_system
from moesim.cli import main
from moesim.train import memory as mem
from moesim.train.collectives import collective_time_s
from moesim.train.layers import Shape, attention_dims, block_ops, core_attention_kernels, cp_ring_ops, kv_chunk_bytes
from moesim.train.moe import etp_comm_s, moe_times
from moesim.train.ops import Timer
from moesim.train.spec import Parallel, TrainError, TrainSpec
from moesim.train.step import simulate_step
from tests.moesim.train.conftest import dense_config, flame_config
from workloads.catalog import swiglu_params
from workloads.hf_config import load_config

SYSTEM = load_system("dgx-h100")
COST = RooflineCost()
NON_ATTENTION_CORE = ("attention_core", "cp_comm")


def _ops(cfg, sh, layer=0):
    return block_ops(cfg, layer, sh, Timer(COST, SYSTEM.device, "bf16"), SYSTEM)


def _flops_by_phase(ops) -> dict:
    out = {}
    for o in ops:
        if o.kind == "compute":
            out[o.phase] = out.get(o.phase, 0.0) + o.flops
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_cp2_halves_the_attention_core_flops_per_rank(tp):
    cfg = load_config("mixtral-8x7b")
    one, two = (core_attention_kernels(cfg, Shape(2, 4096, tp, cp), 2) for cp in (1, 2))
    heads, _, d_qk, d_v, _ = attention_dims(cfg, tp)
    causal = 2.0 * 2 * heads * 4096 * 4096 * (d_qk + d_v) * 0.5
    assert one[0].flops == causal and two[0].flops == causal / 2
    assert two[1].flops == one[1].flops / 2  # backward too
    # as timed ops (roofline GEMM equivalents: the op's FLOPs are the GEMM's)
    f1, f2 = (_flops_by_phase(_ops(cfg, Shape(2, 4096, tp, cp))) for cp in (1, 2))
    assert f2["attention_core"] == pytest.approx(f1["attention_core"] / 2, rel=1e-12)


def test_cp2_halves_every_other_operator_per_rank():
    for cfg, layer in ((dense_config(), 0), (flame_config(), 0), (load_config("deepseek-v2"), 0)):  # dense FFN, MLA
        f1, f2 = (_flops_by_phase(_ops(cfg, Shape(1, 2048, 2, cp), layer)) for cp in (1, 2))
        others = set(f1) - set(NON_ATTENTION_CORE)
        assert {"attention", "norm"} <= others
        for phase in others:
            assert f2[phase] == pytest.approx(f1[phase] / 2, rel=1e-12), (cfg.name, phase)


def test_ring_kv_bytes_and_exposed_time_follow_the_formula():
    cfg = load_config("qwen3-235b-a22b")  # GQA: 4 kv heads
    b, s, tp, cp = 1, 16384, 4, 4
    sh = Shape(b, s, tp, cp)
    _, kv, d_qk, d_v, _ = attention_dims(cfg, tp)
    chunk = b * (s / cp) * kv * (d_qk + d_v) * 2
    assert kv_chunk_bytes(cfg, sh, 2) == chunk
    ring = [o for o in _ops(cfg, sh) if o.phase == "cp_comm"]
    fwd, bwd = sorted(ring, key=lambda o: o.direction != "forward")
    assert fwd.bytes == (cp - 1) * chunk and bwd.bytes == 2 * (cp - 1) * chunk
    assert fwd.kind == bwd.kind == "communication"
    # exposed part: (cp - 1) max(0, hop - core / cp); a zero-time core exposes every hop, a long one none
    hop = collective_time_s(SYSTEM, "send_recv", chunk, cp, tp)
    assert hop > 0
    exposed = cp_ring_ops(SYSTEM, 0, sh, chunk, 0.0, 0.0)
    assert exposed[0].time_s == pytest.approx((cp - 1) * hop, rel=1e-12)
    # backward: K/V alone, then K/V with dK/dV on cp - 2 hops, then dK/dV alone
    hop2 = collective_time_s(SYSTEM, "send_recv", 2 * chunk, cp, tp)
    assert exposed[1].time_s == pytest.approx(2 * hop + (cp - 2) * hop2, rel=1e-12)
    half = cp_ring_ops(SYSTEM, 0, sh, chunk, cp * hop / 2, cp * hop2)
    assert half[0].time_s == pytest.approx((cp - 1) * hop / 2, rel=1e-12) and half[1].time_s == 0.0
    assert cp_ring_ops(SYSTEM, 0, Shape(b, s, tp, 1), chunk, 0.0, 0.0) == []


def _spec(par, **kw):
    base = dict(seq_len=1024, micro_batch_size=1, global_batch_size=8 * par.dp, dispatch_dedup="none")
    return TrainSpec(par, **{**base, **kw})


def test_cp_halves_activations_and_joins_dp_for_gradients_and_zero():
    cfg = load_config("mixtral-8x7b").with_layers(2)
    r1 = simulate_step(cfg, SYSTEM, _spec(Parallel(tp=2, dp=4, ep=8)), COST, check_memory=False)
    r2 = simulate_step(cfg, SYSTEM, _spec(Parallel(tp=2, dp=2, ep=8, cp=2), global_batch_size=32), COST,
                       check_memory=False)
    m1, m2 = r1.memory_bytes, r2.memory_bytes
    assert m2["activations"]["hbm"] == pytest.approx(m1["activations"]["hbm"] / 2, rel=1e-12)
    # dense ZeRO-1 shards over dp x cp = 4 ranks in both, experts over tp x cp x dp / ep = 1
    assert m2["optimizer"]["hbm"] == pytest.approx(m1["optimizer"]["hbm"], rel=1e-12)
    assert r2.breakdown["grad_sync_s"] == pytest.approx(r1.breakdown["grad_sync_s"], rel=1e-12)
    assert r2.model_flops_per_step == pytest.approx(r1.model_flops_per_step, rel=1e-12)  # same tokens per step
    assert r2.meta["cp"] == 2 and r2.meta["dp"] == 2
    assert any(p["phase"] == "cp_comm" for p in r2.phases) and not any(p["phase"] == "cp_comm" for p in r1.phases)


def test_cp1_etp1_defaults_reproduce_the_layout_without_them():
    cfg = load_config("mixtral-8x7b").with_layers(2)
    for par, kw in ((dict(tp=2, dp=4, ep=8), {}), (dict(tp=1, pp=2, dp=4, ep=4, zero=3), dict(recompute="selective"))):
        a = simulate_step(cfg, SYSTEM, _spec(Parallel(**par), **kw), COST, check_memory=False).to_json()
        b = simulate_step(cfg, SYSTEM, _spec(Parallel(**par, cp=1, etp=1), **kw), COST, check_memory=False).to_json()
        assert json.dumps(a, default=float, sort_keys=True) == json.dumps(b, default=float, sort_keys=True)
        assert a["meta"]["cp"] == a["meta"]["etp"] == 1
        assert not any(p["phase"] == "cp_comm" for p in a["phases"])


def _moe(cfg, par):
    return moe_times(cfg, SYSTEM, _spec(par), COST, None)


def test_etp2_halves_expert_gemm_flops_per_choice_and_gathers_the_group_choices():
    cfg = load_config("mixtral-8x7b").with_layers(1)
    h, f = cfg.hidden_size, cfg.moe_intermediate_size
    one, two = _moe(cfg, Parallel(tp=2, dp=4, ep=4)), _moe(cfg, Parallel(tp=2, dp=4, ep=4, etp=2))
    x = one.expert_tokens_max[0, 0]
    assert two.expert_tokens_max[0, 0] == x  # the all-to-all delivers the same choices per device
    # roofline grouped FFN: 2 n (2 f) h + 2 n f h = 6 n f h FLOPs for n rows at width f
    assert one.expert_flops[0, 0] == pytest.approx(6 * x * f * h, rel=1e-12)
    assert two.expert_flops[0, 0] == pytest.approx(6 * (2 * x) * (f / 2) * h, rel=1e-12)
    per_choice_1 = one.expert_flops[0, 0] / x
    per_choice_2 = two.expert_flops[0, 0] / (2 * x)  # etp x the received choices after the all-gather
    assert per_choice_2 == pytest.approx(per_choice_1 / 2, rel=1e-12)
    # the ETP all-gather / reduce-scatter of the 2 x choices, folded into dispatch and combine (EP group in one node
    # either way: ep 4 x etp 2 = 8 ranks)
    ag, rs, nbytes = etp_comm_s(SYSTEM, x, h, "bf16", 2)
    assert nbytes == 2 * x * h * DTYPE_BYTES["bf16"]
    assert ag == collective_time_s(SYSTEM, "all_gather", nbytes, 2) > 0
    assert two.dispatch_s[0, 0] == pytest.approx(one.dispatch_s[0, 0] + ag, rel=1e-12)
    assert two.combine_s[0, 0] == pytest.approx(one.combine_s[0, 0] + rs, rel=1e-12)


def test_etp2_halves_expert_parameter_memory_per_rank():
    cfg = load_config("mixtral-8x7b").with_layers(2)
    p1, p2 = (mem.block_params(cfg, 0, 1, 4, etp) for etp in (1, 2))
    assert p1.expert == cfg.num_experts / 4 * swiglu_params(cfg.hidden_size, cfg.moe_intermediate_size)
    assert p2.expert == p1.expert / 2 and p2.dense == p1.dense
    r1 = simulate_step(cfg, SYSTEM, _spec(Parallel(tp=1, dp=8, ep=4, zero=0)), COST, check_memory=False)
    r2 = simulate_step(cfg, SYSTEM, _spec(Parallel(tp=1, dp=8, ep=4, etp=2, zero=0)), COST, check_memory=False)
    experts = 2 * p1.expert  # two MoE blocks
    for cat, per_param in (("weights", mem.WEIGHT_BYTES), ("gradients", mem.GRAD_BYTES),
                           ("optimizer", mem.ADAM_STATE_BYTES)):
        assert r1.memory_bytes[cat]["hbm"] - r2.memory_bytes[cat]["hbm"] == pytest.approx(experts / 2 * per_param)
    assert r2.meta["etp"] == 2


@pytest.mark.parametrize("make, flags", [
    (lambda: Parallel(tp=1, dp=4, ep=4, etp=2), "--ep 4 x --etp 2"),
    (lambda: Parallel(tp=2, dp=1, cp=3, ep=4), "--tp x --cp x --dp"),
    (lambda: Parallel(cp=0), "--cp"),
    (lambda: Parallel(etp=0), "--etp"),
    (lambda: TrainSpec(Parallel(cp=3, dp=1), seq_len=1000, micro_batch_size=1, global_batch_size=1), "--cp"),
    (lambda: TrainSpec(Parallel(dp=2, ep=1, etp=2), seq_len=64, micro_batch_size=1, global_batch_size=2,
                       expert_mode="fssdp"), "--etp 1"),
])
def test_bad_layouts_name_their_flags(make, flags):
    with pytest.raises(TrainError, match=flags.replace("+", r"\+")):
        make()


def test_bad_layouts_against_model_and_system_name_their_flags():
    mixtral = load_config("mixtral-8x7b").with_layers(1)
    with pytest.raises(TrainError, match="--etp 4 must divide the expert width"):
        simulate_step(flame_config(moe_intermediate_size=702), SYSTEM, _spec(Parallel(dp=8, ep=2, etp=4)), COST)
    with pytest.raises(TrainError, match="tp x cp x pp x dp = 2 x 2 x 1 x 4 = 16"):
        simulate_step(mixtral, SYSTEM, _spec(Parallel(tp=2, dp=4, cp=2)), COST)
    with pytest.raises(TrainError, match="--etp 2 need MoE blocks"):
        simulate_step(dense_config(), SYSTEM, _spec(Parallel(dp=8, etp=2), seq_len=64), COST)


def test_cli_takes_cp_and_etp(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "mixtral-8x7b", "--layers", "2", "--system", "dgx-h100", "--tp", "2", "--cp", "2",
                 "--ep", "4", "--etp", "2", "--seq-len", "1024", "--cost", "roofline", "--out", str(out)]) == 0
    doc = json.loads((out / "result.json").read_text())
    assert (doc["meta"]["cp"], doc["meta"]["etp"], doc["meta"]["dp"]) == (2, 2, 2)
    assert "cp 2 etp 2" in capsys.readouterr().out
    assert main(["train", "--model", "mixtral-8x7b", "--layers", "2", "--cp", "3", "--seq-len", "1024",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--cp" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert np.isfinite(doc["step_time_s"])
