"""Hypothesis invariants of the simulator on random small systems and traces (STYLE.md's list).

- tokens are conserved: every trace row is dispatched, computed and combined once; every token of
  every step passes the router of every layer;
- the simulated time is at least the roofline bound of every device (its FLOPs over its peak,
  counted from the trace by hand) and of every link (its bytes over its bandwidth);
- without overlap (``micro_batches=1`` or ``overlap_micro_batches=False``) the analytic engine
  equals the DES.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hwmodels.roofline import DTYPE_BYTES
from moesim.analytic import estimate
from moesim.placement import contiguous
from moesim.sim import SimOptions, simulate
from tests.conftest import make_model, make_system
from workloads.trace import TraceMeta, from_dense

PROPERTY_SETTINGS = settings(max_examples=30, deadline=None)


@dataclass(frozen=True)
class Case:
    system: object
    model: object
    trace: object
    options: SimOptions
    dst_device: np.ndarray  # [rows] device computing each trace row (contiguous placement, by hand)
    src_device: np.ndarray  # [rows] device holding each row's token (contiguous shards, by hand)


def _expert_choices(rng: np.random.Generator, tokens: int, layers: int, experts: int, k: int) -> np.ndarray:
    """[tokens, layers, k] distinct experts per (token, layer)."""
    return np.argsort(rng.random((tokens, layers, experts)), axis=2)[:, :, :k]


@st.composite
def cases(draw, overlap: bool = True) -> Case:
    nodes = draw(st.integers(1, 2))
    per_node = draw(st.sampled_from([1, 2, 4]))
    devices = nodes * per_node
    experts = draw(st.integers(1, 9))
    k = draw(st.integers(1, min(3, experts)))
    layers, steps = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    tokens_per_step = [draw(st.integers(1, 24)) for _ in range(steps)]
    hidden, ffn = draw(st.sampled_from([8, 32, 96])), draw(st.sampled_from([8, 48, 128]))
    system = make_system(devices, num_nodes=nodes,
                         peak_flops_per_s=draw(st.sampled_from([1e9, 1e11, 1e13])),
                         hbm_bytes_per_s=draw(st.sampled_from([1e9, 1e11])),
                         launch_s=draw(st.sampled_from([0.0, 1e-6])),
                         link_bytes_per_s=draw(st.sampled_from([1e8, 1e10])),
                         link_latency_s=draw(st.sampled_from([0.0, 1e-6])))
    model = make_model(num_experts=experts, top_k=k, hidden=hidden, ffn=ffn, layers=layers,
                       shared=draw(st.integers(0, 1)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_total = sum(tokens_per_step)
    ids = _expert_choices(rng, n_total, layers, experts, k)
    step = np.repeat(np.arange(steps), tokens_per_step)
    token = np.concatenate([np.arange(n) for n in tokens_per_step])
    trace = from_dense(ids, rng.random(ids.shape).astype(np.float32),
                       TraceMeta(model="toy", num_experts=experts, top_k=k, num_layers=layers, source="hypothesis"),
                       step=step, token=token)
    micro_batches = draw(st.integers(1, 3))
    options = SimOptions(micro_batches=micro_batches, overlap_micro_batches=overlap and draw(st.booleans()),
                         include_shared_experts=draw(st.booleans()))
    # by hand: contiguous placement puts expert e on device e // ceil(E / D); tokens of a step of n
    # tokens are cut into D contiguous shards, token t on device floor(t * D / n)
    c = trace.columns
    n_of_row = np.asarray(tokens_per_step)[c["step"]]
    return Case(system, model, trace, options, dst_device=c["expert"] // -(-experts // devices),
                src_device=c["token"] * devices // n_of_row)


def _run(case: Case, engine=simulate):
    placement = contiguous(case.trace.meta.num_layers, case.model.num_experts, case.system.num_devices)
    return engine(case.system, case.model, placement, case.trace, options=case.options, seed=0)


@PROPERTY_SETTINGS
@given(cases())
def test_tokens_are_conserved(case):
    result = _run(case)
    tok, rows = result.tokens, np.bincount(case.trace.columns["layer"], minlength=case.trace.meta.num_layers)
    assert tok["trace_rows"].tolist() == rows.tolist()
    for column in ("dispatched", "computed", "combined"):
        assert tok[column].tolist() == rows.tolist(), column
    # every choice is computed on the device that holds its expert
    expected = np.zeros_like(result.device_tokens)
    np.add.at(expected, (case.trace.columns["layer"], case.dst_device), 1)
    np.testing.assert_array_equal(result.device_tokens, expected)
    # every token of every step passes every layer's router: router FLOPs = tokens x layers x 2 h E
    router_flops = result.ops.loc[result.ops.op == "router", "flops"].sum()
    m = case.model
    assert router_flops == pytest.approx(case.trace.num_tokens * case.trace.meta.num_layers
                                         * 2 * m.hidden_size * m.num_experts, rel=1e-12)


@PROPERTY_SETTINGS
@given(cases())
def test_simulated_time_at_least_every_roofline_bound(case):
    result = _run(case)
    m, system, c = case.model, case.system, case.trace.columns
    d_count = system.num_devices
    peak = system.device.peak(case.options.dtype)
    # FLOPs each device must compute, counted from the trace: 6 h f per choice it serves (SwiGLU),
    # 2 h E per token it routes, per layer; 6 h f_shared per token when shared experts run
    flops = np.bincount(case.dst_device, minlength=d_count) * 6.0 * m.hidden_size * m.moe_intermediate_size
    first_rows = c["rank"] == 0
    routed = np.bincount(case.src_device[first_rows], minlength=d_count) * 1.0  # (token, layer) pairs per device
    flops += routed * 2.0 * m.hidden_size * m.num_experts
    if case.options.include_shared_experts and m.num_shared_experts:
        flops += routed * 6.0 * m.hidden_size * m.shared_expert_intermediate_size
    assert result.total_time_s >= (flops / peak).max() * (1 - 1e-12)
    # every link carries its bytes at most at its bandwidth
    bandwidth = {system.scale_up.kind: system.scale_up.bandwidth_bytes_per_s,
                 system.scale_out.kind: system.scale_out.bandwidth_bytes_per_s}
    links = result.link_bytes
    if len(links):
        link_s = links["bytes"] / links["kind"].map(bandwidth)
        # a link's bytes are split over the groups' all-to-alls, each one at least its share
        assert result.total_time_s >= link_s.max() * (1 - 1e-12)
    # the bytes that cross links are the choices whose token and expert sit on different devices
    crossing = int((case.src_device != case.dst_device).sum())
    act_bytes = m.hidden_size * DTYPE_BYTES[case.options.dtype]
    sent = result.ops.loc[result.ops.op == "dispatch", "bytes"].sum()
    assert sent == pytest.approx(crossing * act_bytes, rel=1e-12)


@PROPERTY_SETTINGS
@given(cases(overlap=False))
def test_analytic_equals_des_without_overlap(case):
    des, ana = _run(case, simulate), _run(case, estimate)
    assert ana.total_time_s == pytest.approx(des.total_time_s, rel=1e-9, abs=1e-18)
    np.testing.assert_allclose(ana.layer_time_s, des.layer_time_s, rtol=1e-9, atol=1e-18)
    np.testing.assert_array_equal(ana.device_tokens, des.device_tokens)
    key = ["step", "micro_batch", "layer", "op", "device"]
    a = ana.ops.sort_values(key).reset_index(drop=True)
    d = des.ops.sort_values(key).reset_index(drop=True)
    assert a[key].equals(d[key])
    np.testing.assert_allclose(a[["start_at_s", "end_at_s", "flops", "bytes"]].to_numpy(),
                               d[["start_at_s", "end_at_s", "flops", "bytes"]].to_numpy(), rtol=1e-9, atol=1e-15)
