"""SRAM as the top KV tier (``--kv-sram-gib``): the SRAM blocks never above their capacity and moved down exactly when
SRAM is full, an event log worked by hand, the tier chosen by the spec's tier order, attention reading SRAM-resident
KV at the SRAM's bandwidth, and ``--kv-sram-gib 0`` leaving a run's outputs unchanged."""

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hwmodels.roofline import RooflineCost
from hwmodels.specs import load_system
from moebase.units import GiB
from moesim.memory.tiers import MemoryHierarchy
from moesim.serve.cost import IterationCost, ServeLayout
from moesim.serve.engine import Replica, simulate
from moesim.serve.kv import KVBlocks, SramBlocks, SramTier, sram_tier
from moesim.serve.scheduler import SchedulerConfig
from moesim.train.ops import kernel_cost
from tests.moesim.serve.conftest import ConstCost, LinearCost
from workloads.hf_config import load_config
from workloads.requests import Requests


def _requests(arrival, prompt, output):
    return Requests(np.asarray(arrival, float), np.asarray(prompt, np.int64), np.asarray(output, np.int64))


def test_blocks_move_down_exactly_when_sram_is_full():
    """Three SRAM blocks: request 0's 2 blocks enter (room: nothing moves); request 1's 2 blocks: one over, 0's oldest
    moves down; 0's third block: the oldest resident (0's second) moves; a write of 5 blocks keeps its last 3 (the
    first 2 go straight to HBM) and moves the 3 resident ones down."""
    s = SramBlocks(3)
    assert s.write([0, 0]) == 0 and list(s.order) == [0, 0]
    assert s.write([1, 1]) == 1 and list(s.order) == [0, 1, 1]
    assert s.write([0]) == 1 and list(s.order) == [1, 1, 0]
    assert s.write([2, 2, 2, 3, 3]) == 3 and list(s.order) == [2, 3, 3] and s.count == {2: 1, 3: 2}
    s.release([3, 7])
    assert list(s.order) == [2] and s.count == {2: 1} and s.peak_blocks == 3
    # request 2 has 10 tokens in blocks of 4 (3 blocks, the last holding 2): only its newest block is in SRAM
    assert s.tokens(2, 10, 4) == 2 and s.tokens(3, 10, 4) == 0


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.lists(st.one_of(st.lists(st.integers(0, 4), max_size=9).map(lambda x: ("w", x)),
                                             st.lists(st.integers(0, 4), max_size=3).map(lambda x: ("r", x))),
                                   max_size=30))
def test_sram_never_exceeds_capacity_and_moves_only_when_full(cap, ops):
    """Against a plain list model: resident blocks <= capacity; a write moves down exactly
    max(0, resident + min(new, capacity) - capacity) blocks, the oldest; each request's SRAM blocks are its newest."""
    s, model, written = SramBlocks(cap), [], {}
    for kind, ids in ops:
        if kind == "r":
            s.release(ids)
            model = [r for r in model if r not in set(ids)]
            continue
        before = len(model)
        moved = s.write(sorted(ids))
        kept = sorted(ids)[-cap:] if ids else []
        assert moved == max(0, before + len(kept) - cap)
        model = (model + kept)[-cap:] if kept else model
        assert list(s.order) == model and s.used_blocks <= cap and s.peak_blocks <= cap
        assert s.count == {r: model.count(r) for r in set(model)}
        for r in ids:
            written[r] = written.get(r, 0) + 1
        for r, c in s.count.items():  # a request's SRAM blocks are a suffix: at most the blocks it has written
            assert c <= written[r]


def _sram(capacity_blocks, bytes_per_token=1000.0, bandwidth=1000.0):
    return SramTier("sram", capacity_blocks, bytes_per_token, 1e15, bandwidth, 0.0)


def test_sram_event_log_by_hand():
    """A and B (2 prompt, 3 output tokens) at t=0, blocks of one token, 3 SRAM blocks, 1 s of compute, 1000 B of KV
    per token moving down at 1000 B/s. it1: 4 new blocks, the last 3 enter (A's first goes to HBM directly), none
    moves; attention reads A's newest and both of B's from SRAM (3). it2: A and B each start a block: the 2 oldest
    (A's 2nd, B's 1st) move down: 2 tokens, 2 s > 1 s of compute; SRAM holds B's 2nd and both 3rd blocks: 3 read.
    it3: the same (B's 2nd, A's 3rd move), both finish, their SRAM blocks are freed."""
    cfg = SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=8, block_size=1)
    rep = Replica("r", ConstCost(1.0), KVBlocks(16, 1), sram=_sram(3))
    res = simulate(_requests([0, 0], [2, 2], [3, 3]), [rep], cfg)
    it = res.iterations
    assert it["kv_sram_used_blocks"].tolist() == [3, 3, 3] and it["sram_out_tokens"].tolist() == [0, 2, 2]
    assert it["kv_tokens_read_sram"].tolist() == [3, 3, 3] and it["kv_tokens_read"].tolist() == [4, 6, 8]
    assert it["duration_s"].tolist() == [1, 2, 2] and it["spill_wait_s"].tolist() == [0, 1, 1]
    assert res.finished_at_s.tolist() == [5, 5] and all(not p.sram.used_blocks for p in rep.parts)
    assert res.replicas["r"]["sram_peak_blocks_per_rank"] == 3


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 8), st.integers(1, 3),
       st.lists(st.tuples(st.floats(0, 5), st.integers(1, 40), st.integers(1, 30)), min_size=1, max_size=15))
def test_engine_sram_never_above_capacity(block, cap, ranks, rows):
    """Random workloads on 1-3 ranks: every row's SRAM blocks <= capacity x ranks, each rank's peak <= capacity,
    SRAM reads never above all KV read, and every request served as without SRAM."""
    arrival, prompt, output = (np.array(x) for x in zip(*sorted(rows)))
    cfg = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4, block_size=block)
    base = simulate(_requests(arrival, prompt, output), [Replica("r", LinearCost(0.01, 0.001), KVBlocks(40, block),
                                                                 ranks=ranks)], cfg)
    rep = Replica("r", LinearCost(0.01, 0.001), KVBlocks(40, block), ranks=ranks, sram=_sram(cap, 1.0, 1e12))
    res = simulate(_requests(arrival, prompt, output), [rep], cfg)
    it = res.iterations
    assert (it["kv_sram_used_blocks"] <= cap * ranks).all() and res.replicas["r"]["sram_peak_blocks_per_rank"] <= cap
    assert (it["kv_tokens_read_sram"] <= it["kv_tokens_read"]).all()
    assert np.array_equal(res.rejected, base.rejected) and np.array_equal(res.generated, base.generated)


def test_sram_tier_is_the_tier_above_hbm_by_order():
    """SN40L: the first tier of the spec (above HBM, the KV's tier), its bandwidth, the SRAM-HBM channel; refused
    above the SRAM per device and on a GPU (HBM is its first tier)."""
    sn = load_system("sn40l-node")
    h = MemoryHierarchy.from_system(sn)
    t = sram_tier(sn, 1000.0, 16, 0.25 * GiB)
    first = sn.device.memory[0]
    assert t.name == first.name and h.order.index(t.name) < h.order.index(sn.device.main_memory.name)
    assert t.read_bandwidth_bytes_per_s == first.bandwidth_bytes_per_s
    assert t.bandwidth_bytes_per_s == h.channel(first.name, "hbm").bandwidth_bytes_per_s
    assert t.capacity_blocks == int(0.25 * GiB // 1000) // 16
    with pytest.raises(ValueError, match="--kv-sram-gib .* exceeds"):
        sram_tier(sn, 1000.0, 16, first.capacity_bytes + 1)
    with pytest.raises(ValueError, match="no memory tier above"):
        sram_tier(load_system("dgx-h100"), 1000.0, 16, 0.1 * GiB)


def test_attention_reads_sram_kv_at_sram_bandwidth():
    """Mixtral decode on one SN40L socket, roofline cost: with every KV token in SRAM the kernel's KV-read time is
    KV bytes / SRAM bandwidth (the rest, Q and O, at HBM bandwidth); half in SRAM: half at each."""
    system = load_system("sn40l-node")
    ic = IterationCost(load_config("mixtral-8x7b"), system, ServeLayout(tp=1, ep=8, dp=8), cost=RooflineCost(),
                       memory_fraction=0.5)
    hbm_bw, sram_bw = system.device.main_memory.bandwidth_bytes_per_s, system.device.memory[0].bandwidth_bytes_per_s
    b, ctx = 16, 4000.0
    kv = b * (ctx + 1)
    kv_bytes = kv * ic.kv_bytes_per_token_layer
    qo_bytes = ic.attention_kernel(b * ctx, 0.0, b).bytes
    all_sram = ic.attention_kernel(b * ctx, kv, b, kv)
    assert (all_sram.bytes - qo_bytes) / hbm_bw == pytest.approx(kv_bytes / sram_bw, rel=1e-12)
    half = ic.attention_kernel(b * ctx, kv, b, kv / 2)
    assert (half.bytes - qo_bytes) / hbm_bw == pytest.approx(kv_bytes / 2 / sram_bw + kv_bytes / 2 / hbm_bw, rel=1e-12)
    roof = kernel_cost(ic.cost, system.device, dataclasses.replace(all_sram, gemm_shape=None), "bf16").time_s
    assert ic.attention_s(b * ctx, kv, b, kv) >= 32 * roof * (1 - 1e-12)
    assert ic.attention_s(b * ctx, kv, b, kv) < ic.attention_s(b * ctx, kv, b)


_BASE = ["serve", "--model", "mixtral-8x7b", "--system", "sn40l-node", "--ep", "8", "--rate", "20", "--duration-s",
         "1", "--memory-fraction", "0.225", "--no-report"]


def test_cli_zero_sram_leaves_outputs_unchanged_and_sram_reports(tmp_path):
    """``--kv-sram-gib 0`` writes the same metrics.json and iterations.csv as no flag (no SRAM columns); 0.25 GiB
    adds the SRAM metrics, never above its capacity."""
    from moesim.cli import main

    assert main([*_BASE, "--out", str(tmp_path / "a")]) == 0
    assert main([*_BASE, "--kv-sram-gib", "0", "--out", str(tmp_path / "b")]) == 0
    assert main([*_BASE, "--kv-sram-gib", "0.25", "--out", str(tmp_path / "c")]) == 0
    a, b = (json.loads((tmp_path / x / "metrics.json").read_text()) for x in "ab")
    a.pop("config"), b.pop("config")
    assert a == b and "sram_tier" not in a["kv"]["colocated"]
    assert (tmp_path / "a" / "iterations.csv").read_text() == (tmp_path / "b" / "iterations.csv").read_text()
    kv = json.loads((tmp_path / "c" / "metrics.json").read_text())["kv"]["colocated"]
    assert kv["sram_tier"] == "sram" and 0 < kv["sram_peak_blocks_per_rank"] <= kv["sram_capacity_blocks_per_rank"]
    assert max(kv["sram_over_time"]["used_tokens"]) <= kv["sram_capacity_tokens_per_rank"] * kv["ranks"]
    assert kv["sram_read_tokens"] > 0


@pytest.mark.parametrize("system, gib, message", [("sn40l-node", "0.6", "exceeds"),
                                                   ("dgx-h100", "0.1", "no memory tier above")])
def test_cli_bad_sram_options_are_one_line(tmp_path, capsys, system, gib, message):
    from moesim.cli import main

    assert main(["serve", "--model", "mixtral-8x7b", "--system", system, "--ep", "8", "--rate", "1", "--duration-s",
                 "1", "--kv-sram-gib", gib, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "--kv-sram-gib" in err, err
