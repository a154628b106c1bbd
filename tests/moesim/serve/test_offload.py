"""Routed experts cached in HBM during serving: hits, fetch bytes and stalls from moesim.memory.cache."""

import json

import pytest

from hwmodels.specs import load_system
from moebase.units import GB
from moesim.cli import main
from moesim.serve import offload
from moesim.serve.cost import BatchWork, IterationCost, ServeLayout
from workloads.hf_config import load_config
from workloads.importers import load_trace

CFG, SYSTEM = load_config("olmoe-1b-7b"), load_system("dgx-h100")


def _cost(cache_gb, policy="lru"):
    cache = offload.build(CFG, SYSTEM, load_trace("flame-moe-290m"), cache_gb * GB, policy, 1, 1, "bf16")
    return IterationCost(CFG, SYSTEM, ServeLayout(tp=1, ep=1, dp=8), expert_cache=cache)


def test_a_cache_holding_every_expert_never_fetches():
    ic = _cost(100.0)
    b = ic.expert_cache.per_batch(64, ic.non_expert_s_per_layer(64))
    assert b["hits"] == pytest.approx(b["accesses"]) and b["accesses"] > 0
    assert b["stall_s"] == 0 and not any(b["bytes_by_path"].values())
    assert ic.expert_stall_s(64) == 0


def test_misses_move_whole_experts_over_the_backing_link_and_stall():
    ic = _cost(1.0)
    c = ic.expert_cache
    b = c.per_batch(64, ic.non_expert_s_per_layer(64))
    misses = b["accesses"] - b["hits"]
    assert misses > 0
    assert sum(b["bytes_by_path"].values()) == pytest.approx(misses * c.expert_bytes)
    assert set(b["bytes_by_path"]) == {f"{c.backing_tier}->hbm"}
    w = BatchWork(tokens=64, sampled=64, attention_pairs=64 * 500.0, kv_tokens_read=64 * 500.0)
    assert ic.rank_s(w) == pytest.approx(IterationCost(CFG, SYSTEM, ServeLayout(tp=1, ep=1, dp=8)).rank_s(w)
                                         + b["stall_s"])


def test_belady_hits_at_least_as_often_as_lru():
    lru, belady = _cost(1.0, "lru"), _cost(1.0, "belady")
    a = lru.expert_cache.per_batch(32, 0.0)
    b = belady.expert_cache.per_batch(32, 0.0)
    assert b["hits"] >= a["hits"]


def test_only_the_cached_experts_take_hbm():
    full = IterationCost(CFG, SYSTEM, ServeLayout(tp=1, ep=1, dp=8))
    cached = _cost(1.0)
    routed = cached.expert_cache.capacity_experts * cached.expert_cache.expert_bytes
    assert cached.weight_bytes_per_device < full.weight_bytes_per_device
    assert cached.kv_capacity_tokens_per_device > full.kv_capacity_tokens_per_device
    assert routed <= 1.0 * GB


def test_cli_expert_cache_metrics_and_errors(tmp_path, capsys):
    base = ["serve", "--model", "olmoe-1b-7b", "--rate", "5", "--duration-s", "0.5", "--no-report",
            "--expert-cache-gb", "2"]
    assert main([*base, "--out", str(tmp_path / "a")]) != 0
    assert "--trace" in capsys.readouterr().err
    assert main([*base, "--trace", "flame-moe-290m", "--ep", "4", "--tp", "2", "--out", str(tmp_path / "b")]) != 0
    assert "--tp 1" in capsys.readouterr().err
    assert main([*base, "--trace", "flame-moe-290m", "--cache-policy", "nope", "--out", str(tmp_path / "c")]) != 0
    assert "--cache-policy" in capsys.readouterr().err
    assert main([*base, "--trace", "flame-moe-290m", "--cache-policy", "lfu", "--out", str(tmp_path / "d")]) == 0
    m = json.loads((tmp_path / "d" / "metrics.json").read_text())
    ec = m["expert_cache"]["colocated"]
    assert ec["policy"] == "lfu" and 0 <= ec["hit_rate"] <= 1
    # every iteration's stall against the breakdown's estimate from up to 200 iterations (ratio-scaled)
    assert ec["stall_s"] == pytest.approx(m["iteration_time"]["colocated"]["parts_s"]["expert fetch stall"], rel=0.02)
    assert ec["stall_s"] > 0 and ec["bytes_by_path_per_device"]["host->hbm"] > 0
    from moesim.report.serve import write_serve_report
    page = write_serve_report(tmp_path / "d").read_text()
    assert "Expert cache (routed experts in HBM, per device)" in page and "host-&gt;hbm (GB)" in page
