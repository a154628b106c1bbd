"""``--offload optimizer``: Adam's states leave HBM for host memory; the transfers and the update go on the step."""

from __future__ import annotations

import pytest

from hwmodels.roofline import RooflineCost
from hwmodels.specs import load_system
from moesim.train.memory import ADAM_STATE_BYTES
from moesim.train.spec import Parallel, TrainError, TrainSpec
from moesim.train.step import ADAM_BYTES_PER_PARAM, simulate_step
from workloads.hf_config import load_config


def _run(offload, **kw):
    spec = TrainSpec(Parallel(tp=8), seq_len=4096, micro_batch_size=1, global_batch_size=1, offload=offload)
    return simulate_step(load_config("llama-3.1-8b"), load_system("dgx-h100"), spec, RooflineCost(), **kw)


def test_offloaded_optimizer_moves_its_states_and_costs_the_transfers():
    base, off = _run("none"), _run("optimizer")
    system = load_system("dgx-h100")
    n = base.memory_bytes["optimizer"]["hbm"] / ADAM_STATE_BYTES  # local parameters (ZeRO over dp = 1)
    link, host, hbm = system.host_link, system.host_memory, system.device.main_memory
    bw = min(link.bandwidth_bytes_per_s, host.bandwidth_bytes_per_s, hbm.bandwidth_bytes_per_s)
    lat = link.latency_s + host.latency_s + hbm.latency_s
    expected = (n * 2 / bw + lat) + n * ADAM_BYTES_PER_PARAM / (host.bandwidth_bytes_per_s / 8) + (n * 2 / bw + lat)
    assert off.breakdown["optimizer_s"] == pytest.approx(expected, rel=1e-9)
    assert off.memory_bytes["optimizer"] == {"host": pytest.approx(n * ADAM_STATE_BYTES)}
    assert off.memory_bytes["total"]["hbm"] == pytest.approx(base.memory_bytes["total"]["hbm"] - n * ADAM_STATE_BYTES)
    assert off.memory_bytes["capacity"]["host"] == pytest.approx(host.capacity_bytes / 8)
    rest = base.step_time_s - base.breakdown["optimizer_s"]
    assert off.step_time_s - off.breakdown["optimizer_s"] == pytest.approx(rest)


def test_offload_is_checked():
    with pytest.raises(TrainError, match="--offload must be one of none, optimizer, weights"):
        _run("disk")


def test_offloaded_weights_stream_each_layer_and_leave_a_double_buffer():
    from moesim.train.memory import WEIGHT_BYTES, block_params

    opt, off = _run("optimizer"), _run("weights")
    system, cfg = load_system("dgx-h100"), load_config("llama-3.1-8b")
    link, host, hbm = system.host_link, system.host_memory, system.device.main_memory
    bw = min(link.bandwidth_bytes_per_s, host.bandwidth_bytes_per_s, hbm.bandwidth_bytes_per_s)
    pc = block_params(cfg, 0, 8, 1)
    layer_bytes = (pc.dense + pc.expert) * WEIGHT_BYTES
    fetch = layer_bytes / bw + link.latency_s + host.latency_s + hbm.latency_s
    rec = [p for p in off.phases if p["phase"] == "weight_fetch" and p["layer"] == 0]
    assert {p["direction"] for p in rec} == {"forward", "backward_input"}
    assert all(p["time_s"] == pytest.approx(fetch) for p in rec)  # one micro-batch
    assert off.memory_bytes["weights"] == {"host": pytest.approx(opt.memory_bytes["weights"]["hbm"])}
    head = (128256 / 8 * 4096 + 4096) * WEIGHT_BYTES  # the largest layer: LM head's vocabulary shard + final norm
    assert off.memory_bytes["weight_buffers"]["hbm"] == pytest.approx(2 * head)
    assert off.step_time_s >= opt.step_time_s  # fetches overlap compute: only their excess is added
