"""The simulator against closed forms, conservation laws and an exact event log."""

import numpy as np
import pytest

from hwmodels.cost import OpCost
from hwmodels.specs import load_system
from moesim.placement import Placement, contiguous
from moesim.sim import SimOptions, SimulationError, simulate
from tests.conftest import make_model, make_system
from workloads.catalog import get_model
from workloads.importers import load_trace
from workloads.trace import TraceMeta, from_dense


def test_one_gpu_one_expert_equals_roofline_by_hand():
    peak, bw, launch = 1e12, 1e11, 1e-6
    system = make_system(1, peak_flops_per_s=peak, hbm_bytes_per_s=bw, launch_s=launch)
    t_count, h, f = 1000, 64, 128
    model = make_model(num_experts=1, top_k=1, hidden=h, ffn=f)
    trace = from_dense(np.zeros((t_count, 1, 1), dtype=int), None,
                       TraceMeta(model="toy", num_experts=1, top_k=1, num_layers=1, source="test"))
    result = simulate(system, model, contiguous(1, 1, 1), trace)
    b = 2  # bf16 bytes
    # router: GEMM [T,h]x[h,1] + softmax/top-k over fp32 logits (read + write), two launches
    router_s = (launch + max(2 * t_count * h * 1 / peak, (t_count * h + h * 1 + t_count * 1) * b / bw)
                + launch + 2 * t_count * 1 * 4 / bw)
    # expert: gate+up [T,h]x[h,2f] and down [T,f]x[f,h], two launches
    up_s = max(2 * t_count * h * 2 * f / peak, (t_count * h + h * 2 * f + t_count * 2 * f) * b / bw)
    down_s = max(2 * t_count * f * h / peak, (t_count * f + f * h + t_count * h) * b / bw)
    expert_s = 2 * launch + up_s + down_s
    assert result.total_time_s == pytest.approx(router_s + expert_s, rel=1e-12)
    assert result.total_time_s == pytest.approx(3.38128e-6 + 5.1152e-5, rel=1e-9)  # the same numbers, evaluated
    assert result.link_bytes["bytes"].sum() == 0


class PerTokenCost:
    """A cost model with hand-checkable times: router 1 us/token; experts 2 us/token + 1 us per active expert."""

    name = "per-token"

    def gemm(self, device, m, n, k, dtype):
        return OpCost(m * 1e-6, 0.0, 0.0)

    def router(self, device, tokens, hidden_size, num_experts, dtype):
        return OpCost(tokens * 1e-6, 0.0, 0.0)

    def expert_ffn(self, device, tokens_per_expert, hidden_size, intermediate_size, dtype):
        n = np.asarray(tokens_per_expert)
        return OpCost(float((2e-6 * n + 1e-6 * (n > 0)).sum()), 0.0, 0.0)


def test_exact_event_log_of_a_two_gpu_case():
    # 4 tokens: tokens 0,1 start on dev0 and 2,3 on dev1; expert e lives on dev e.
    system = make_system(2, link_bytes_per_s=1e9, link_latency_s=0.5e-6)
    model = make_model(num_experts=2, top_k=1, hidden=500, ffn=8)  # 500 x 2 bytes = 1000 bytes per token
    ids = np.array([1, 0, 1, 1]).reshape(4, 1, 1)
    trace = from_dense(ids, None, TraceMeta(model="toy", num_experts=2, top_k=1, num_layers=1, source="test"))
    result = simulate(system, model, contiguous(1, 2, 2), trace, cost=PerTokenCost())
    log = sorted((r.op, r.device, round(r.start_at_s * 1e6, 9), round(r.end_at_s * 1e6, 9))
                 for r in result.ops.itertuples())
    # dispatch: 1 token dev0->dev1 = 1000 B at 1 GB/s = 1 us + 0.5 us latency; combine the reverse
    expected = sorted([
        ("router", 0, 0.0, 2.0), ("router", 1, 0.0, 2.0),
        ("dispatch", 0, 2.0, 3.5), ("dispatch", 1, 2.0, 3.5),
        ("expert_ffn", 0, 3.5, 6.5),   # 1 token of expert 0: 2 + 1 us
        ("expert_ffn", 1, 3.5, 10.5),  # 3 tokens of expert 1: 6 + 1 us
        ("combine", 0, 10.5, 12.0), ("combine", 1, 10.5, 12.0),
    ])
    assert log == expected
    assert result.total_time_s == pytest.approx(12e-6)
    assert result.device_tokens.tolist() == [[1, 3]]
    sent = result.ops[result.ops.op == "dispatch"].set_index("device")["bytes"].to_dict()
    assert sent == {0: 1000.0, 1: 0.0}


def test_conservation_and_link_bytes_on_the_real_trace():
    system = load_system("dgx-h100")
    model = get_model("flame-moe-290m")
    trace = load_trace("default")
    result = simulate(system, model, contiguous(8, 64, 8), trace, options=SimOptions(micro_batches=3))
    tok = result.tokens
    assert (tok["dispatched"] == tok["trace_rows"]).all()
    assert (tok["computed"] == tok["trace_rows"]).all()
    assert (tok["combined"] == tok["trace_rows"]).all()
    assert result.device_tokens.sum() == len(trace)
    # bytes the trace implies: a choice crosses a link when its expert's device differs from the token's device
    src = trace.columns["token"] * 8 // 2048
    dst = trace.columns["expert"] // 8
    crossing = int((src != dst).sum())
    per_token_bytes = model.hidden_size * 2
    lb = result.link_bytes
    tx = lb[lb.link.str.startswith("dev")]["bytes"].sum()
    rx = lb[lb.link.str.startswith("switch")]["bytes"].sum()
    assert tx == pytest.approx(2 * crossing * per_token_bytes)  # dispatch + combine
    assert rx == pytest.approx(tx)
    sent = result.ops[result.ops.op == "dispatch"]["bytes"].sum()
    assert sent == pytest.approx(crossing * per_token_bytes)


def test_cross_node_traffic_uses_the_scale_out_network():
    system = load_system("dgx-h100").with_nodes(2)
    model = get_model("flame-moe-290m")
    trace = load_trace("default")
    result = simulate(system, model, contiguous(8, 64, 16), trace)
    by_kind = result.link_bytes.groupby("kind")["bytes"].sum()
    src = trace.columns["token"] * 16 // 2048
    dst = trace.columns["expert"] // 4
    cross_node = int(((src // 8) != (dst // 8)).sum())
    assert by_kind["infiniband"] == pytest.approx(2 * 2 * cross_node * model.hidden_size * 2)  # 2 hops x 2 passes


def test_simulated_time_at_least_the_roofline_bound():
    system = load_system("dgx-h100")
    model = get_model("flame-moe-290m")
    trace = load_trace("default")
    result = simulate(system, model, contiguous(8, 64, 8), trace, options=SimOptions(micro_batches=2))
    ffn = result.ops[result.ops.op == "expert_ffn"]
    per_device_flops = ffn.groupby("device")["flops"].sum().max()
    assert result.total_time_s >= per_device_flops / system.device.peak("bf16")
    # micro-batch overlap never makes the step slower than running them back to back
    serial = simulate(system, model, contiguous(8, 64, 8), trace,
                      options=SimOptions(micro_batches=2, overlap_micro_batches=False))
    assert result.total_time_s <= serial.total_time_s + 1e-15


def test_replicas_split_a_hot_expert():
    system = make_system(2)
    model = make_model(num_experts=2, top_k=1, hidden=64, ffn=64)
    ids = np.zeros((8, 1, 1), dtype=int)  # every token picks expert 0
    trace = from_dense(ids, None, TraceMeta(model="toy", num_experts=2, top_k=1, num_layers=1, source="test"))
    one = simulate(system, model, contiguous(1, 2, 2), trace)
    assert one.device_tokens.tolist() == [[8, 0]]
    replicated = Placement.from_slot_to_expert(np.array([[0, 1, 0, -1]]), 2, slots_per_device=2)
    two = simulate(system, model, replicated, trace)
    assert two.device_tokens.tolist() == [[4, 4]]  # local-first: each device serves its own tokens
    assert two.link_bytes["bytes"].sum() == 0


def test_model_and_trace_disagreeing_is_a_clear_error():
    trace = load_trace("default")
    with pytest.raises(SimulationError, match="64 experts .* 'mixtral-8x7b' has 8"):
        simulate(load_system("dgx-h100"), get_model("mixtral-8x7b"), contiguous(8, 64, 8), trace)
    with pytest.raises(ValueError, match="spans 4 devices, the system has 8"):
        simulate(load_system("dgx-h100"), get_model("flame-moe-290m"), contiguous(8, 64, 4), trace)
    with pytest.raises(SimulationError, match="micro_batches"):
        SimOptions(micro_batches=0)


def test_variable_k_trace_replays_with_every_token_routed():
    """A capacity-dropping what-if has tokens with fewer (even zero) choices; the router still sees them all."""
    from workloads.routing_policies import capacity, synthetic_logits

    logits = synthetic_logits(num_tokens=64, num_layers=2, num_experts=8, seed=3, num_steps=2)
    trace = capacity(logits, k=2, capacity_factor=0.5)
    assert len(trace) < 64 * 2 * 2 * 2  # some choices were dropped
    system = make_system(4)
    model = make_model(num_experts=8, top_k=2, hidden=32, ffn=32, layers=2)
    result = simulate(system, model, contiguous(2, 8, 4), trace, options=SimOptions(micro_batches=2))
    router = result.ops[result.ops.op == "router"]
    per_group = router.groupby(["step", "micro_batch", "layer"]).size()
    assert (per_group == 4).all()
    assert (result.tokens["computed"] == result.tokens["trace_rows"]).all()
    # every token of each step passes the router of each layer: 64 tokens x 2 steps x 2 layers
    flops_per_token = 2 * 32 * 8  # router GEMM [1, 32] x [32, 8]
    assert router["flops"].sum() == pytest.approx(64 * 2 * 2 * flops_per_token)


def _busy_s(result, op):
    ops = result.ops[result.ops.op == op]
    return float((ops["end_at_s"] - ops["start_at_s"]).sum())


def test_dispatch_and_combine_dtypes_size_each_direction():
    system, model, trace = load_system("dgx-h100"), get_model("flame-moe-290m"), load_trace("default")
    src = trace.columns["token"] * 8 // 2048
    crossing = int((src != trace.columns["expert"] // 8).sum())
    h = model.hidden_size
    result = simulate(system, model, contiguous(8, 64, 8), trace,
                      options=SimOptions(dispatch_dtype="fp8", combine_dtype="bf16"))
    fp8_row_bytes = h * 1 + -(-h // 128) * 4  # fp8 values + one fp32 scale per 128 values
    assert result.ops[result.ops.op == "dispatch"]["bytes"].sum() == pytest.approx(crossing * fp8_row_bytes)
    assert result.ops[result.ops.op == "combine"]["bytes"].sum() == pytest.approx(crossing * h * 2)
    assert result.link_bytes["bytes"].sum() == pytest.approx(2 * crossing * (fp8_row_bytes + 2 * h))  # 2 hops each
    assert result.meta["dispatch_dtype"] == "fp8" and result.meta["combine_dtype"] == "bf16"
    same = simulate(system, model, contiguous(8, 64, 8), trace)  # default: the model dtype both ways
    assert _busy_s(result, "dispatch") < _busy_s(same, "dispatch")
    assert _busy_s(result, "combine") == pytest.approx(_busy_s(same, "combine"), rel=1e-12)
    with pytest.raises(SimulationError, match="dispatch_dtype"):
        SimOptions(dispatch_dtype="int3")
    with pytest.raises(SimulationError, match="comm_kernel"):
        SimOptions(comm_kernel="nccl-magic")


def _uniform_trace(model, num_tokens, seed=0):
    e, k = model.num_experts, model.num_experts_per_tok
    ids = np.argsort(np.random.default_rng(seed).random((num_tokens, e)), axis=1)[:, :k].reshape(num_tokens, 1, k)
    return from_dense(ids, None, TraceMeta(model=model.name, num_experts=e, top_k=k, num_layers=1, source="uniform"))


def test_fitted_collectives_and_comm_sms_keep_both_engines_equal_without_overlap():
    from hwmodels.cost import GpuFittedCost
    from moesim.analytic import estimate

    system, model = load_system("hgx-h800"), get_model("deepseek-v3")
    trace, place = _uniform_trace(model, 8 * 2048), contiguous(1, 256, 8)
    assert model.num_shared_experts > 0  # the shared FFN runs beside the dispatch: it gets the SMs left over
    cost = GpuFittedCost()
    for opts in (SimOptions(micro_batches=1), SimOptions(micro_batches=2, overlap_micro_batches=False)):
        des = simulate(system, model, place, trace, cost=cost, options=opts)
        ana = estimate(system, model, place, trace, cost=cost, options=opts)
        assert des.total_time_s == pytest.approx(ana.total_time_s, rel=1e-12)
        assert des.meta["all_to_all_model"] == "nccl-fitted"
    free = simulate(system, model, place, trace, cost=cost,
                    options=SimOptions(micro_batches=2, overlap_micro_batches=False, comm_kernel="none"))
    # 1024 tokens per micro-batch and GPU: 8 x 32 tiles of the shared gate+up GEMM need more waves on 108 SMs
    assert _busy_s(des, "shared_ffn") > _busy_s(free, "shared_ffn")
    assert _busy_s(des, "expert_ffn") == pytest.approx(_busy_s(free, "expert_ffn"), rel=1e-12)  # never beside comm


def test_overlapping_micro_batches_lend_sms_to_the_all_to_all():
    from hwmodels.cost import GpuFittedCost, RooflineCost

    system, model = load_system("hgx-h800"), get_model("deepseek-v3")
    trace, place = _uniform_trace(model, 8 * 4096), contiguous(1, 256, 8)
    opts = dict(micro_batches=2, include_shared_experts=False)
    runs = {k: simulate(system, model, place, trace, cost=GpuFittedCost(),
                        options=SimOptions(comm_kernel=k, **opts)) for k in ("none", "deepep-normal-v1")}
    # with overlap some router / expert GEMMs start while the other micro-batch's all-to-all is in flight
    assert _busy_s(runs["deepep-normal-v1"], "expert_ffn") + _busy_s(runs["deepep-normal-v1"], "router") > \
        _busy_s(runs["none"], "expert_ffn") + _busy_s(runs["none"], "router")
    roof = [simulate(system, model, place, trace, cost=RooflineCost(),
                     options=SimOptions(comm_kernel=k, **opts)).total_time_s for k in ("none", "deepep-normal-v1")]
    assert roof[0] == roof[1]  # the roofline has no SMs: unchanged
