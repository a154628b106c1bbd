"""Studies: spec validation, executors agree, resume, Dask LocalCluster, report figures."""

import html
import json

import numpy as np
import pandas as pd
import pytest

from moesim.cli import main as cli_main
from moesim.study.runner import run_study
from moesim.study.spec import load_study

SMALL = """
[study]
description = "test"
seed = 1
[base]
tokens = 512
hbm_capacity_bytes = 2e8
[grid]
nodes = [1, 2]
placement = ["contiguous", "round-robin"]
micro_batches = [1, 2]
"""
OUTPUTS = ["total_time_s", "throughput_tokens_per_s", "usd_per_million_tokens", "imbalance_mean", "comm_fraction",
           "scale_out_bytes", "drill_device_tokens", "drill_timeline", "hbm_hit_rate", "memory_stall_s",
           "sram_hit_fraction", "hbm_fetch_bytes_per_step"]


def make(tmp_path, text, name="s"):
    d = tmp_path / name
    d.mkdir()
    (d / "study.toml").write_text(text)
    return d


def test_grid_expands_and_names_varied(tmp_path):
    s = load_study(make(tmp_path, SMALL))
    assert len(s.configs) == 8 and s.varied == ("nodes", "placement", "micro_batches")
    assert all(c["tokens"] == 512 for c in s.configs)


@pytest.mark.parametrize("text,match", [
    ("[grid]\nnodez = [1]\n", "unknown key 'nodez'"),
    ("[grid]\nnodes = []\n", "grid.nodes' is an empty list"),
    ("[study]\nseed = 0\n", "no configurations"),
    ("[grid]\n", r"\[grid\] is empty"),
    ("[study]\nengin = 'des'\n[grid]\nnodes=[1]\n", "unknown key 'study.engin'"),
    ("[base]\nnodes = 0\n[grid]\ndtype=['bf16']\n", "'nodes' must be a positive integer"),
    ("[extra]\n", "unknown key 'extra'"),
    ("[grid]\ncost = ['roofline', 'fast']\n", "key 'cost': unknown cost model 'fast'"),
    ("[base]\ncost = 'calibrated'\n[grid]\nnodes = [1]\n", "key 'cost': unknown cost model 'calibrated'"),
])
def test_bad_study_files(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        load_study(make(tmp_path, text))


def test_cli_bad_study_is_one_line_error(tmp_path, capsys):
    d = make(tmp_path, "[grid]\nbogus = [1]\n")
    assert cli_main(["study", "run", str(d)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'bogus'" in err and "Traceback" not in err


def test_executors_agree_and_resume(tmp_path):
    a = load_study(make(tmp_path, SMALL, "a"))
    first = run_study(a, executor="serial", limit=3)
    assert len(first) == 3 and a.results_path.exists()
    kept = first.set_index("config_id")["eval_wall_s"]
    full = run_study(a, executor="serial")
    assert len(full) == 8
    # finished configurations were not recomputed: their rows (incl. wall time) are unchanged
    assert (full.set_index("config_id").loc[kept.index, "eval_wall_s"] == kept).all()
    assert len(run_study(a, executor="serial")) == 8  # nothing left to do
    b = load_study(make(tmp_path, SMALL, "b"))
    pool = run_study(b, executor="process", workers=2)
    c = load_study(make(tmp_path, SMALL, "c"))
    dask = run_study(c, executor="dask", dask="local", workers=2)
    for other in (pool, dask):
        assert list(other["config_id"]) == list(full["config_id"])
        pd.testing.assert_frame_equal(other[OUTPUTS], full[OUTPUTS])
    # outputs respond to inputs: two nodes move bytes over InfiniBand, one node does not
    assert (full.loc[full["nodes"] == 1, "scale_out_bytes"] == 0).all()
    assert (full.loc[full["nodes"] == 2, "scale_out_bytes"] > 0).all()
    assert len(json.loads(full["drill_device_tokens"][0])) == 8  # layers of the FLAME trace
    # 200 MB of HBM: one node (277 MB of experts per GPU) replays a real cache, two nodes (138 MB) fit
    one, two = full[full["nodes"] == 1], full[full["nodes"] == 2]
    assert (~one["hbm_fits"]).all() and (one["memory_stall_s"] > 0).all() and (one["hbm_hit_rate"] < 1).all()
    assert two["hbm_fits"].all() and (two["memory_stall_s"] == 0).all() and (two["hbm_hit_rate"] == 1).all()


def test_unreachable_dask_scheduler(tmp_path):
    s = load_study(make(tmp_path, "[base]\ntokens = 256\n[grid]\nnodes = [1]\n"))
    with pytest.raises(ValueError, match="cannot reach the Dask scheduler at 'tcp://127.0.0.1:1'"):
        run_study(s, executor="dask", dask="tcp://127.0.0.1:1")
    with pytest.warns(UserWarning, match="unreachable"):
        rows = run_study(s, executor="dask", dask="tcp://127.0.0.1:1", fallback_local=True, workers=1)
    assert len(rows) == 1


def test_report_has_expected_figures(tmp_path):
    from moesim.report.study import build_figures, write_study_report

    s = load_study(make(tmp_path, SMALL))
    rows = run_study(s, executor="serial")
    figs = build_figures(rows, list(s.varied), drill=5)
    assert [len(f.data) for _, f in figs] == [2, 1, 5, 5]
    out = write_study_report(s, drill=5)
    text = out.read_text()
    assert text.count('class="plotly-graph-div"') == 4 and "moesim-render-status" in text
    assert (rows["cost_model"] == "gpu-fitted").all()  # cost = "default" on dgx-h100, which has a shipped fit
    assert html.escape(rows["cost_description"].iloc[0]) in text  # which cost model ran, and its provenance
    try:
        import kaleido  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="kaleido"):
            write_study_report(s, tmp_path / "r.html", drill=2, png_dir=tmp_path / "png")
        return
    # kaleido is in the dev extra and Chromium is installed by `make test`: static PNGs for papers
    write_study_report(s, tmp_path / "r.html", drill=2, png_dir=tmp_path / "png")
    pngs = sorted((tmp_path / "png").glob("fig-*.png"))
    assert len(pngs) == 4
    for png in pngs:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


MEMORY = """
[study]
seed = 0
[base]
model = "deepseek-v3"
traffic = "flame-remapped"
tokens = 512
nodes = 2
placement = "greedy"
memory_steps = 3
sram_capacity_bytes = 1e9
[grid]
hbm_capacity_bytes = [5e7, 30e9, 60e9, 90e9]
cache_policy = ["lru", "belady"]
"""


def test_memory_outputs_come_from_the_cache_simulator(tmp_path):
    from hwmodels.specs import load_system
    from moesim.memory.tiers import MemoryHierarchy
    from workloads.catalog import get_model

    rows = run_study(load_study(make(tmp_path, MEMORY)), executor="serial")
    assert len(rows) == 8
    expert_bytes = get_model("deepseek-v3").expert_weight_bytes(2)
    fetch_s = MemoryHierarchy.from_system(load_system("dgx-h100")).transfer_time_s(expert_bytes, "host", "hbm")
    by = rows.set_index(["cache_policy", "hbm_capacity_bytes"])
    for hbm in (5e7, 30e9, 60e9, 90e9):
        # Belady (furthest next use) never hits less than LRU on the same stream and placement
        assert by.loc[("belady", hbm), "hbm_hit_rate"] >= by.loc[("lru", hbm), "hbm_hit_rate"]
        assert by.loc[("belady", hbm), "memory_stall_s"] <= by.loc[("lru", hbm), "memory_stall_s"] + 1e-12
    assert by.loc[("belady", 60e9), "hbm_hit_rate"] > by.loc[("lru", 60e9), "hbm_hit_rate"]  # LRU thrashes here
    for policy in ("lru", "belady"):
        r = by.loc[policy].sort_index()
        # more HBM never lowers the hit rate (both are stack algorithms) and never adds stall
        assert (r["hbm_hit_rate"].diff().dropna() >= 0).all()
        assert (r["memory_stall_s"].diff().dropna() <= 1e-12).all()
        assert r.loc[5e7, "hbm_hit_rate"] == 0 and r.loc[5e7, "hbm_cache_experts"] == 0  # 50 MB < one 88 MB expert
        assert r.loc[90e9, "hbm_fits"] and r.loc[90e9, "hbm_hit_rate"] == 1 and r.loc[90e9, "memory_stall_s"] == 0
    cached = rows[rows["hbm_cache_experts"] > 0]
    # demand caching (no prefetch): the bottleneck GPU waits for each miss alone on PCIe, so the simulated
    # stall is misses x (bytes / bandwidth + latency)
    misses = cached["hbm_fetch_bytes_per_step"] / expert_bytes
    assert (misses > 0).any()
    np.testing.assert_allclose(cached["memory_stall_s"], misses * fetch_s, rtol=1e-9)
    # the stall is part of the step time
    np.testing.assert_allclose(rows["step_time_s"], rows["total_time_s"] + rows["memory_stall_s"], rtol=1e-12)
    assert (rows.loc[rows["cache_policy"] == "belady", "sram_hit_fraction"] > 0).all()


def test_bad_cache_parameters(tmp_path):
    # a configuration that cannot be evaluated is a failed row carrying its error (the study goes on)
    s = load_study(make(tmp_path, "[base]\ntokens = 256\ncache_policy = 'fifo'\n[grid]\nnodes = [1]\n"))
    rows = run_study(s, executor="serial")
    assert rows["status"].tolist() == ["failed"]
    assert rows["error"][0].startswith("ValueError: cache_policy 'fifo' is unknown")
    s = load_study(make(tmp_path, "[base]\ntokens = 256\nmemory_steps = 1\n[grid]\nnodes = [1]\n", "b"))
    rows = run_study(s, executor="serial")
    assert rows["status"].tolist() == ["failed"] and "memory_steps must be >= 2" in rows["error"][0]


def test_sub_stream_helpers_match_the_full_replay():
    from moesim.memory.cache import first_use_plan, from_group, plan, select_accesses, stream_from_keys

    rng = np.random.default_rng(3)
    keys = rng.integers(0, 12, size=200)
    s = stream_from_keys(keys, group=np.arange(200) // 4, num_experts=12)
    for policy in ("lru", "lfu", "belady"):  # a cache holding every key misses on first use only
        assert (first_use_plan(s, 12, policy).hit == plan(s, 12, policy).hit).all()
    with pytest.raises(ValueError, match="capacity >= 12"):
        first_use_plan(s, 5, "lru")
    even = select_accesses(s, keys % 2 == 0)
    assert len(even) == int((keys % 2 == 0).sum()) and (even.keys % 2 == 0).all() and even.num_groups == 50
    p = plan(s, 4, "lru")
    sub, sub_plan = from_group(s, p, 10)
    assert len(sub) == 200 - 40 and sub.num_groups == 40 and sub.group[0] == 0
    assert (sub_plan.hit == p.hit[40:]).all() and sub_plan.fetches == int((~p.hit[40:]).sum())
