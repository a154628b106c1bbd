"""Live KV spill to the tier behind HBM (``--kv-offload spill``): an exact event log worked by hand, the spill tier
chosen by the spec's tier order, invariants on random workloads, and ``none`` leaving results unchanged."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hwmodels.specs import load_system
from moesim.memory.tiers import MemoryHierarchy
from moesim.serve.engine import Replica, simulate
from moesim.serve.kv import KVBlocks, SpillTier, spill_tier
from moesim.serve.metrics import summarise, time_breakdown
from moesim.serve.scheduler import SchedulerConfig
from tests.moesim.serve.conftest import ConstCost, LinearCost
from workloads.requests import Requests


def _requests(arrival, prompt, output):
    return Requests(np.asarray(arrival, float), np.asarray(prompt, np.int64), np.asarray(output, np.int64))


def _tier(capacity_blocks, bytes_per_token=1000.0, bandwidth=1000.0, latency=0.0):
    return SpillTier("ddr", capacity_blocks, bytes_per_token, bandwidth, latency)


def test_spill_event_log_by_hand():
    """A (3 prompt, 3 output) and B (2, 3) at t=0, 6 HBM blocks of one token, 1 s of compute per iteration, a spill
    tier of 10 blocks behind a 1000 B/s channel, 1000 B of KV per token.
    it1: both prefill (5 blocks). it2: A's decode takes the last block; B lacks one: both count as used now, the
    youngest (B) spills its oldest block; B's decode reads it back: 2 tokens moved, 2 s > 1 s of compute.
    it3: A lacks one block: B (last used in it2) is the least recently used and spills one more; then B lacks one
    and spills its third (A's blocks are as recent, B is younger): 2 tokens out, B's 3 spilled tokens read, 5 s.
    Nobody is preempted or recomputes; both finish at 1 + 2 + 5 = 8 s."""
    cfg = SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=8, block_size=1, kv_offload="spill")
    rep = Replica("r", ConstCost(1.0), KVBlocks(6, 1), spill=_tier(10))
    res = simulate(_requests([0, 0], [3, 2], [3, 3]), [rep], cfg)
    it = res.iterations
    assert it["start_s"].tolist() == [0, 1, 3] and it["duration_s"].tolist() == [1, 2, 5]
    assert it["spill_out_tokens"].tolist() == [0, 1, 2] and it["spill_read_tokens"].tolist() == [0, 1, 3]
    assert it["kv_used_blocks"].tolist() == [5, 6, 6] and it["kv_spill_used_blocks"].tolist() == [0, 1, 3]
    assert it["spill_wait_s"].tolist() == [0, 1, 4]
    assert res.finished_at_s.tolist() == [8, 8] and res.preemptions.tolist() == [0, 0]
    assert res.evicted_tokens.sum() == 0 and it["tokens"].sum() == (3 + 3 - 1) + (2 + 3 - 1)
    assert res.replicas["r"]["spill_peak_blocks_per_rank"] == 3


def test_spill_moves_exactly_the_shortfall_from_the_lru_request():
    """Four requests A-D of 4-token prompts fill 16 HBM blocks of one token in the first plan. In the second, each
    decode lacks one block: A asks first; B, C and D (last used one plan ago) are less recently used than A (used
    now), and the youngest of them, D, gives its oldest block; so for B and C; when D asks every request counts as
    used now and D, the youngest, gives its last full block. Exactly the 4 blocks lacking move, all D's, in order."""
    from moesim.serve.scheduler import ReplicaState, plan

    cfg = SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=8, block_size=1, kv_offload="spill")
    st_ = ReplicaState(np.full(4, 4, dtype=np.int64), np.full(4, 2, dtype=np.int64))
    st_.spill = KVBlocks(100, 1)
    kv = KVBlocks(16, 1)
    st_.waiting.extend(range(4))
    p1 = plan(st_, kv, cfg)
    assert p1.tokens.tolist() == [4, 4, 4, 4] and kv.free_blocks == 0
    st_.computed[p1.ids] += p1.tokens
    st_.generated[p1.ids] += 1
    p2 = plan(st_, kv, cfg)
    assert p2.ids.tolist() == [0, 1, 2, 3] and p2.preempted == []
    assert st_.spilled.tolist() == [0, 0, 0, 4] and st_.held.tolist() == [5, 5, 5, 1]
    assert p2.spill_out_tokens == 4 and p2.spill_read_tokens == 4 and st_.spill.used_blocks == 4
    assert kv.used_blocks == 16


def test_spill_tier_follows_the_spec_tier_order():
    """GPU (HBM is the last device tier): host memory over the host link, shared by the node's devices; SN40L (SRAM,
    HBM, DDR): DDR over its port; both the hierarchy's channel between the KV's tier and the next one."""
    for name in ("dgx-h100", "sn40l-node"):
        system = load_system(name)
        h = MemoryHierarchy.from_system(system)
        t = spill_tier(system, 1000.0, 16)
        kv = system.device.main_memory.name
        order = [m.name for m in system.device.memory]
        expected = order[order.index(kv) + 1] if order.index(kv) + 1 < len(order) else "host"
        assert t.name == expected and t.kv_tier == kv
        ch = h.channel(kv, t.name)
        assert (t.bandwidth_bytes_per_s, t.latency_s) == (ch.bandwidth_bytes_per_s, ch.latency_s)
        share = system.devices_per_node if t.name == "host" else 1
        assert t.capacity_blocks == int(h.tier(t.name).capacity_bytes / share // 1000.0) // 16
    assert spill_tier(load_system("dgx-h100"), 1000.0, 16).name == "host"
    assert spill_tier(load_system("sn40l-node"), 1000.0, 16).name == "ddr"
    # the closed form: bytes / channel bandwidth + latency
    t = spill_tier(load_system("sn40l-node"), 2048.0, 16, limit_bytes=2048.0 * 160)
    assert t.capacity_blocks == 10
    assert t.transfer_s(100) == pytest.approx(100 * 2048.0 / t.bandwidth_bytes_per_s + t.latency_s)
    assert t.transfer_s(0) == 0.0


def test_iteration_time_is_max_of_compute_and_transfer_per_rank():
    """Two ranks of 5 HBM blocks in lock step, compute 0.5 s + 0.01 s per token, spill channel 1000 B/s + 0.05 s,
    1000 B per token. Rank 0 gets A and C (2-token prompts, 3 outputs), rank 1 B and D (1, 2). it1: prefills, rank 0
    slower (4 tokens: 0.54 s). it2: rank 0 spills C's oldest block and C reads it: 2 tokens, 2.05 s > 0.52 s of
    compute: the iteration takes 2.05 s (1.53 s of it waiting); rank 1's requests finish. it3: rank 0 as in the
    hand case above: 2 tokens out, 3 read: 5.05 s."""

    @dataclasses.dataclass(frozen=True)
    class RankCost(LinearCost):
        def rank_s(self, work):
            return self.iteration_s(work)

    cfg = SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=8, block_size=1, kv_offload="spill")
    rep = Replica("r", RankCost(0.5, 0.01), KVBlocks(5, 1), spill=_tier(100, latency=0.05), ranks=2)
    res = simulate(_requests([0, 0, 0, 0], [2, 1, 2, 1], [3, 2, 3, 2]), [rep], cfg)
    it = res.iterations
    assert res.rank.tolist() == [0, 1, 0, 1]
    assert it["duration_s"].tolist() == pytest.approx([0.54, 2 * 1000 / 1000 + 0.05, 5 * 1000 / 1000 + 0.05])
    assert it["spill_wait_s"].tolist() == pytest.approx([0.0, 2.05 - 0.52, 5.05 - 0.52])
    assert it["slowest_rank"].tolist() == [0, 0, 0]
    assert it["spill_out_tokens"].tolist() == [0, 1, 2] and it["spill_read_tokens"].tolist() == [0, 1, 3]
    assert res.finished_at_s.tolist() == pytest.approx([7.64, 2.59, 7.64, 2.59])


workloads = st.integers(1, 16).flatmap(lambda n: st.tuples(
    st.lists(st.floats(0, 5, allow_nan=False), min_size=n, max_size=n),
    st.lists(st.integers(1, 50), min_size=n, max_size=n),
    st.lists(st.integers(1, 25), min_size=n, max_size=n)))


@settings(max_examples=120, deadline=None)
@given(workloads, st.sampled_from([1, 4]), st.integers(1, 30), st.integers(1, 40), st.integers(1, 64),
       st.integers(1, 3))
def test_spill_invariants(w, block, capacity, spill_capacity, budget, ranks):
    """KV within HBM and spill capacities, nobody lost or served twice with exactly its output; recomputation only
    of evicted KV; every spilled block counted once in the log and per request; all blocks freed at the end."""
    req = _requests(sorted(w[0]), w[1], w[2])
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=4, block_size=block, kv_offload="spill")
    rep = Replica("r", LinearCost(0.01, 0.001), KVBlocks(capacity, block), spill=_tier(spill_capacity), ranks=ranks)
    res = simulate(req, [rep], cfg)
    it, info = res.iterations, res.replicas["r"]
    assert np.all(it["kv_rank_used_max_blocks"] <= capacity) and info["kv_peak_blocks_per_rank"] <= capacity
    assert info["spill_peak_blocks_per_rank"] <= spill_capacity
    assert np.all(it["kv_spill_used_blocks"] <= ranks * spill_capacity)
    need = -(-(req.prompt_tokens + req.output_tokens - 1) // block)
    assert np.array_equal(res.rejected, need > capacity)
    served = ~res.rejected
    assert np.all(~np.isnan(res.finished_at_s[served])) and np.array_equal(res.generated[served],
                                                                             req.output_tokens[served])
    assert it["tokens"].sum() == (req.prompt_tokens + req.output_tokens - 1)[served].sum() + res.evicted_tokens.sum()
    # spilled blocks are full blocks of computed KV, each counted once
    assert np.all(it["spill_out_tokens"] % block == 0) and np.all(it["spill_wait_s"] >= 0)
    # every spill-tier block was freed by the end (finish or preemption)
    m = summarise(res, num_devices=ranks, num_nodes=1, slo_ttft_s=1.0, slo_tpot_s=1.0)
    off = m["kv"]["r"]["offload"]
    assert off["spilled_tokens"] == int(it["spill_out_tokens"].sum())
    assert off["bytes_by_path_per_device"]["hbm->ddr"] == pytest.approx(off["spilled_tokens"] * 1000.0 / ranks)


def test_none_leaves_results_unchanged():
    """``--kv-offload none`` (the default) with a spill tier attached runs exactly as without one."""
    rng = np.random.default_rng(3)
    n = 40
    req = _requests(np.sort(rng.uniform(0, 2, n)), rng.integers(1, 60, n), rng.integers(1, 30, n))
    cfg = SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=8, block_size=4)
    a = simulate(req, [Replica("r", LinearCost(0.01, 0.001), KVBlocks(20, 4), ranks=2)], cfg)
    b = simulate(req, [Replica("r", LinearCost(0.01, 0.001), KVBlocks(20, 4), ranks=2, spill=_tier(50))], cfg)
    assert a.preemptions.sum() > 0  # the case does run out of HBM
    for k in a.iterations:
        assert np.array_equal(a.iterations[k], b.iterations[k]), k
    assert np.array_equal(a.finished_at_s, b.finished_at_s, equal_nan=True) and a.replicas == b.replicas
    assert np.all(b.iterations["spill_out_tokens"] == 0)
    # and spill does change it: fewer preemptions, same outputs
    c = simulate(req, [Replica("r", LinearCost(0.01, 0.001), KVBlocks(20, 4), ranks=2, spill=_tier(50, bandwidth=1e6))],
                 dataclasses.replace(cfg, kv_offload="spill"))
    assert c.preemptions.sum() < a.preemptions.sum() and np.array_equal(c.generated, a.generated)


def test_spill_time_breakdown_adds_up():
    """The breakdown's spill wait is the logged wait; the parts share the rest of the busy time."""
    cfg = SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=8, block_size=1, kv_offload="spill")
    res = simulate(_requests([0, 0], [3, 2], [3, 3]), [Replica("r", ConstCost(1.0), KVBlocks(6, 1), spill=_tier(10))],
                   cfg)

    class Parts:
        def breakdown_s(self, w):
            return {"all": 1.0}

    b = time_breakdown(res, {"r": Parts()})["r"]
    assert b["parts_s"]["KV spill wait"] == 5.0 and b["parts_s"]["all"] == pytest.approx(3.0)
    assert sum(b["parts_s"].values()) == pytest.approx(b["simulated_busy_s"])


def test_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match="--kv-offload must be one of"):
        SchedulerConfig(kv_offload="evict")
    with pytest.raises(ValueError, match="does not combine with --preemption swap"):
        SchedulerConfig(kv_offload="spill", preemption="swap")
    with pytest.raises(ValueError, match="needs the tier KV spills to"):
        simulate(_requests([0], [2], [2]), [Replica("r", ConstCost(1.0), KVBlocks(6, 1))],
                 SchedulerConfig(kv_offload="spill"))


def test_cli_spill_run_writes_the_offload_metrics_and_report(tmp_path):
    """48 requests of 500 + 2,500 tokens on 8 ranks of OLMoE with 5 % of HBM: recompute preempts; spill preempts
    nothing, moves KV to host memory (the tier behind HBM on a GPU) and the report shows it."""
    import json

    from moesim.cli import main

    arr = tmp_path / "a.csv"
    arr.write_text("arrival_s,prompt_tokens,output_tokens\n" + "".join(f"{i * 0.001},500,2500\n" for i in range(48)))
    base = ["serve", "--model", "olmoe-1b-7b", "--system", "dgx-h100", "--ep", "8", "--arrivals", str(arr),
            "--memory-fraction", "0.05"]
    assert main([*base, "--out", str(tmp_path / "none"), "--no-report"]) == 0
    assert main([*base, "--kv-offload", "spill", "--out", str(tmp_path / "spill")]) == 0
    none = json.loads((tmp_path / "none" / "metrics.json").read_text())
    m = json.loads((tmp_path / "spill" / "metrics.json").read_text())
    assert none["preemption"]["count"] > 0 and "offload" not in none["kv"]["colocated"]
    assert m["preemption"]["count"] == 0 and m["requests"]["finished"] == 48
    off = m["kv"]["colocated"]["offload"]
    assert off["spill_tier"] == "host" and off["spilled_tokens"] > 0 and off["read_tokens"] > 0
    assert set(off["bytes_by_path_per_device"]) == {"hbm->host", "host->hbm"}
    assert m["config"]["scheduler"]["kv_offload"] == "spill"
    assert m["iteration_time"]["colocated"]["parts_s"]["KV spill wait"] == pytest.approx(off["wait_s"])
    page = (tmp_path / "spill" / "report.html").read_text()
    assert "KV spilled to host" in page and "Live KV spill" in page


@pytest.mark.parametrize("extra, message", [
    (["--kv-offload", "evict"], "--kv-offload must be one of none, spill"),
    (["--kv-offload", "spill", "--preemption", "swap"], "does not combine with --preemption swap"),
])
def test_cli_bad_spill_options_are_one_line(tmp_path, capsys, extra, message):
    from moesim.cli import main

    assert main(["serve", "--model", "olmoe-1b-7b", "--ep", "8", "--rate", "1", "--duration-s", "1",
                 "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
