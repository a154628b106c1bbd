"""The ``memory`` study engine (expert offloading on one device; what ``moesim memory sweep`` runs),
its tier overrides, the Pareto front and the memory report."""

import pytest

from hwmodels.specs import load_system
from moesim.memory.evaluator import with_tier_values
from moesim.memory.sweep import pareto_front
from moesim.memory.tiers import MemoryHierarchy
from moesim.study.evaluate import evaluate
from moesim.study.runner import run_study
from moesim.study.spec import MEMORY_PARAMETERS, load_study
from tests.moesim.study.test_study import make

SWEEP = """
[study]
engine = "memory"
[base]
tokens = 8
[grid]
cache_policy = ["lru", "pregate"]
hbm_capacity_bytes = [0.5e9, 2e9, 4e9]
"""


def test_memory_study_evaluate_and_pareto(tmp_path):
    small = evaluate({**MEMORY_PARAMETERS, "hbm_capacity_bytes": 0.3e9, "tokens": 8}, "memory", 0)
    big = evaluate({**MEMORY_PARAMETERS, "hbm_capacity_bytes": 4e9, "tokens": 8}, "memory", 0)
    for r in (small, big):
        assert r["tokens_per_s"] > 0 and 0 <= r["hit_rate"] <= 1 and r["cost_usd"] > 0
    assert big["cache_experts"] > small["cache_experts"]
    assert big["hit_rate"] >= small["hit_rate"]
    assert big["cost_usd"] - small["cost_usd"] == pytest.approx(3.7 * 15.0, rel=1e-9)  # HBM USD/GB x GB
    assert small["bytes_ddr_to_hbm"] == small["fetches"] * small["expert_bytes"]
    assert small["backing_tier"] == "ddr" and small["hbm_capacity_bytes_used"] == 0.3e9
    h = MemoryHierarchy.from_system(load_system("sn40l-node"))
    with pytest.raises(ValueError, match="hbm_bandwidth_bytes_per_s: must be > 0"):
        with_tier_values(h, {"hbm_bandwidth_bytes_per_s": 0})
    with pytest.raises(ValueError, match="unknown config key"):
        with_tier_values(h, {"hbm_size": 1})
    with pytest.raises(ValueError, match="unknown key 'hbm_size'"):
        load_study(make(tmp_path, SWEEP.replace("tokens = 8", "hbm_size = 1"), "bad"))
    mask = pareto_front([1, 2, 3, 2], [10, 20, 15, 5])
    assert mask.tolist() == [True, True, False, False]
    assert len(load_study(make(tmp_path, SWEEP)).configs) == 6  # the grid: 2 policies x 3 capacities


def test_role_overrides_apply_to_the_tier_playing_it():
    h = MemoryHierarchy.from_system(load_system("sn40l-node"))
    roles = {"cache": "hbm", "backing": h.backing_tier("hbm")}
    o = with_tier_values(h, {"backing_bandwidth_bytes_per_s": 7e9, "cache_capacity_bytes": 3e9}, roles)
    assert o.tier("ddr").bandwidth_bytes_per_s == 7e9 and o.tier("hbm").capacity_bytes == 3e9
    assert o.tier("hbm").bandwidth_bytes_per_s == h.tier("hbm").bandwidth_bytes_per_s  # others unchanged


def test_memory_study_runs_and_reports(tmp_path):
    from moesim.report.study import write_study_report

    study = load_study(make(tmp_path, SWEEP))
    assert study.engine == "memory" and study.varied == ("cache_policy", "hbm_capacity_bytes")
    rows = run_study(study, executor="serial")
    assert (rows["status"] == "ok").all() and len(rows) == 6
    by = rows.set_index(["cache_policy", "hbm_capacity_bytes"])
    for policy in ("lru", "pregate"):  # more HBM caches more experts and never hits less
        r = by.loc[policy].sort_index()
        assert r["cache_experts"].is_monotonic_increasing and r["hit_rate"].is_monotonic_increasing
    html = write_study_report(study).read_text()
    assert "Pareto front" in html and "pregate" in html
