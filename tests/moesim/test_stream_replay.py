"""A trace replayed step by step (moesim.stream) gives the Result of the in-memory replay, both engines."""

import json

import numpy as np
import pandas as pd
import pytest

from hwmodels.specs import load_system
from moesim.analytic import ENGINES
from moesim.cli import main
from moesim.placement import Placement, contiguous
from moesim.sim import SimOptions, SimulationError
from moesim import stream as stream_mod
from moesim.stream import replay_steps
from workloads import trace_stream
from workloads.catalog import get_model
from workloads.importers import load_trace
from workloads.trace import from_dense, read_parquet, write_parquet
from workloads.trace_stream import TraceStream, split_steps, write_stream

STEP_TOKENS = 512


@pytest.fixture(scope="module")
def trace():
    """The embedded FLAME trace (2,048 tokens x 8 layers x top-6) cut into 4 steps of 512 tokens."""
    base = load_trace("default")
    e, w = base.dense()
    n = e.shape[0]
    return from_dense(e, w, base.meta, step=(np.arange(n) // STEP_TOKENS).astype(np.int32),
                      token=np.arange(n) % STEP_TOKENS)


def replicated(num_layers: int, num_experts: int, num_devices: int) -> Placement:
    """Experts 0..E-1 contiguous on the devices, plus a second replica of experts 0..D-1 (so the
    'random' replica routing draws from the RNG)."""
    per = num_experts // num_devices + 1
    slots = np.full((num_devices, per), -1)
    slots[:, :per - 1] = np.arange(num_experts).reshape(num_devices, per - 1)
    slots[:, per - 1] = (np.arange(num_devices) + 1) % num_devices * (per - 1)  # expert of the next device
    return Placement.from_slot_to_expert(np.tile(slots.ravel(), (num_layers, 1)), num_experts, per)


def assert_same(streamed, whole, exact: bool):
    check = np.testing.assert_array_equal if exact else (lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12))
    check(streamed.total_time_s, whole.total_time_s)
    for name in ("layer_time_s", "layer_compute_s", "layer_comm_s"):  # summed per step: equal to rounding
        np.testing.assert_allclose(getattr(streamed, name), getattr(whole, name), rtol=1e-12)
    np.testing.assert_array_equal(streamed.device_tokens, whole.device_tokens)
    pd.testing.assert_frame_equal(streamed.link_bytes, whole.link_bytes, check_exact=True)
    pd.testing.assert_frame_equal(streamed.tokens, whole.tokens, check_exact=True)
    assert streamed.meta == whole.meta
    if exact:  # DES: the same rows in the same order
        pd.testing.assert_frame_equal(streamed.ops, whole.ops, check_exact=True)
    else:  # analytic: operator blocks per chunk, so the same rows in another order
        key = ["step", "micro_batch", "layer", "op", "device"]
        s, w = (r.ops.sort_values(key).reset_index(drop=True) for r in (streamed, whole))
        pd.testing.assert_frame_equal(s, w, check_exact=False, rtol=1e-12)


@pytest.mark.parametrize("engine", ["des", "analytic"])
@pytest.mark.parametrize("options,routing", [
    (SimOptions(), "contiguous"),
    (SimOptions(micro_batches=2), "contiguous"),
    (SimOptions(micro_batches=3, overlap_micro_batches=False, replica_routing="random"), "replicated"),
])
def test_streamed_equals_in_memory(trace, engine, options, routing, monkeypatch):
    monkeypatch.setattr(stream_mod, "BLOCK_ROWS", 700)  # operator rows merged into blocks across steps
    system = load_system("dgx-h100")
    model = get_model("flame-moe-290m")
    m = trace.meta
    placement = (contiguous if routing == "contiguous" else replicated)(m.num_layers, m.num_experts, system.num_devices)
    whole = ENGINES[engine](system, model, placement, trace, options=options, seed=5)
    streamed = replay_steps(system, model, placement, split_steps(trace), engine=engine, options=options, seed=5)
    assert whole.total_time_s > 0 and len(np.unique(whole.ops["step"])) == 4
    assert_same(streamed, whole, exact=engine == "des")


def test_random_replicas_depend_on_seed(trace):
    """The replica test above is not vacuous: the RNG moves tokens, so a different seed differs."""
    system = load_system("dgx-h100")
    model = get_model("flame-moe-290m")
    placement = replicated(trace.meta.num_layers, trace.meta.num_experts, system.num_devices)
    options = SimOptions(replica_routing="random")
    a = replay_steps(system, model, placement, split_steps(trace), options=options, seed=1)
    b = replay_steps(system, model, placement, split_steps(trace), options=options, seed=2)
    assert not np.array_equal(a.device_tokens, b.device_tokens)


def test_replay_from_file_equals_in_memory(trace, tmp_path):
    system = load_system("dgx-h100").with_nodes(2)
    model = get_model("flame-moe-290m")
    placement = contiguous(trace.meta.num_layers, trace.meta.num_experts, system.num_devices)
    path = write_stream(trace, tmp_path / "t.parquet")
    stream = TraceStream(path)
    streamed = replay_steps(system, model, placement, stream.steps(), engine="analytic")
    whole = ENGINES["analytic"](system, model, placement, read_parquet(path))
    assert_same(streamed, whole, exact=False)
    assert stream.num_tokens == trace.num_tokens == 2048 and stream.num_steps == 4
    np.testing.assert_array_equal(stream.expert_load(), trace.expert_load())


@pytest.mark.parametrize("engine", ["des", "analytic"])
def test_without_ops_the_figures_are_the_same(trace, engine):
    system = load_system("dgx-h100")
    model = get_model("flame-moe-290m")
    placement = contiguous(trace.meta.num_layers, trace.meta.num_experts, system.num_devices)
    options = SimOptions(micro_batches=2)
    whole = ENGINES[engine](system, model, placement, trace, options=options)
    lean = replay_steps(system, model, placement, split_steps(trace), engine=engine, options=options, keep_ops=False)
    assert len(lean.ops) == 0 and list(lean.ops.columns) == list(whole.ops.columns)
    for name in ("layer_time_s", "layer_compute_s", "layer_comm_s"):
        np.testing.assert_allclose(getattr(lean, name), getattr(whole, name), rtol=1e-12)
    assert lean.total_time_s == pytest.approx(whole.total_time_s, rel=1e-12) and lean.meta == whole.meta
    np.testing.assert_array_equal(lean.device_tokens, whole.device_tokens)
    pd.testing.assert_frame_equal(lean.link_bytes, whole.link_bytes, check_exact=True)


def test_progress_counts_every_group(trace):
    system = load_system("dgx-h100")
    model = get_model("flame-moe-290m")
    placement = contiguous(trace.meta.num_layers, trace.meta.num_experts, system.num_devices)
    seen = []
    replay_steps(system, model, placement, split_steps(trace), options=SimOptions(micro_batches=2),
                 progress=lambda done, total: seen.append(done))
    assert seen[-1] == 4 * 2 * trace.meta.num_layers and seen == sorted(seen)
    totals = []
    replay_steps(system, model, placement, split_steps(trace), options=SimOptions(micro_batches=2),
                 progress=lambda done, total: totals.append(total), expected_steps=4)
    assert set(totals) == {4 * 2 * trace.meta.num_layers}  # known from the start


def test_no_steps_and_unknown_engine_are_errors(trace):
    system = load_system("dgx-h100")
    model = get_model("flame-moe-290m")
    placement = contiguous(trace.meta.num_layers, trace.meta.num_experts, system.num_devices)
    with pytest.raises(SimulationError, match="no steps"):
        replay_steps(system, model, placement, iter(()))
    with pytest.raises(SimulationError, match="unknown engine 'fast'"):
        replay_steps(system, model, placement, split_steps(trace), engine="fast")


def test_cli_streams_large_parquet_and_matches_in_memory_run(trace, tmp_path, monkeypatch, capsys):
    path = write_parquet(trace, tmp_path / "t.parquet")
    common = ["simulate", "--trace", str(path), "--micro-batches", "2", "--model", "flame-moe-290m"]
    assert main([*common, "--out", str(tmp_path / "mem")]) == 0
    monkeypatch.setattr(trace_stream, "STREAM_MIN_FILE_BYTES", 0)  # every .parquet trace now streams
    assert trace_stream.open_if_large(str(path)) is not None
    assert main([*common, "--out", str(tmp_path / "stream")]) == 0
    capsys.readouterr()
    mem = json.loads((tmp_path / "mem" / "summary.json").read_text())
    streamed = json.loads((tmp_path / "stream" / "summary.json").read_text())
    assert streamed == mem  # the same figures, checksum of the trace copy and warnings
    assert read_parquet(tmp_path / "stream" / "trace.parquet").expert_load().sum() == len(trace)


def test_cli_reports_a_damaged_streamed_trace_in_one_line(trace, tmp_path, monkeypatch, capsys):
    path = write_stream(trace, tmp_path / "t.parquet")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    monkeypatch.setattr(trace_stream, "STREAM_MIN_FILE_BYTES", 0)
    assert main(["simulate", "--trace", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moesim simulate: error: ") and "t.parquet: not a readable Parquet file" in err
    assert "\n" not in err and "Traceback" not in err
