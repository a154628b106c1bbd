"""Trace statistics against closed forms on hand-built traces, and the known FLAME numbers."""

from __future__ import annotations

import numpy as np
import pytest

from workloads import stats
from workloads.trace import TraceMeta, from_dense

META = TraceMeta(model="hand", num_experts=4, top_k=2, num_layers=2, source="hand-built")
# 4 tokens x 2 layers x top-2
IDS = np.array([[[0, 1], [2, 3]],
                [[0, 1], [2, 0]],
                [[0, 2], [3, 1]],
                [[3, 1], [3, 2]]])
T = from_dense(IDS, None, META, extra={"sequence": np.zeros(4, np.int32)})


def test_load_imbalance_entropy_gini():
    load = stats.expert_load(T)
    np.testing.assert_array_equal(load, [[3, 3, 1, 1], [1, 1, 3, 3]])
    np.testing.assert_allclose(stats.imbalance(T), [1.5, 1.5])
    p = np.array([3, 3, 1, 1]) / 8
    np.testing.assert_allclose(stats.load_entropy(T), [-(p * np.log2(p)).sum()] * 2)
    # gini of [1,1,3,3]: mean abs difference / (2 mean) = (8 pairs * 2 / 16) / (2 * 2) = 0.25
    np.testing.assert_allclose(stats.gini(T), [0.25, 0.25])
    np.testing.assert_allclose(stats.gini_of(np.array([0, 0, 0, 5.0])), 0.75)


def test_array_forms_of_the_load_statistics():
    # any [..., E] load (a load table, device loads): 3-D here, the statistic along the last axis
    load = np.array([[[2, 2, 2, 2], [0, 0, 0, 7]], [[0, 0, 0, 0], [1, 1, 2, 0]]])
    np.testing.assert_allclose(stats.max_over_mean(load), [[1.0, 4.0], [0.0, 2.0]])
    np.testing.assert_allclose(stats.entropy_bits_of(load), [[2.0, 0.0], [0.0, 1.5]])
    np.testing.assert_array_equal(stats.max_over_mean(stats.expert_load(T)), stats.imbalance(T))


def test_affinity_and_coactivation():
    c = stats.pair_counts(T, 0)
    # token 0: {0,1}->{2,3}; token 1: {0,1}->{2,0}; token 2: {0,2}->{3,1}; token 3: {3,1}->{3,2}
    assert c[0, 2] == 2 and c[0, 3] == 2 and c[0, 0] == 1 and c[3, 3] == 1 and c.sum() == 16
    a = stats.affinity(T, 0)
    np.testing.assert_allclose(a.sum(1), 1.0)
    np.testing.assert_allclose(a[0], c[0] / c[0].sum())
    co = stats.coactivation(T, 0)
    np.testing.assert_array_equal(np.diag(co), stats.expert_load(T)[0])
    assert co[0, 1] == 2 and co[1, 3] == 1 and co[2, 3] == 0
    with pytest.raises(ValueError, match="layer with a next layer 1 out of range"):
        stats.affinity(T, 1)


def test_temporal_locality_closed_form():
    # layer 0 overlaps: t1 vs t0 {0,1}&{0,1}=2/2, t2 vs t1 {0,2}&{0,1}=1/2, t3 vs t2 {3,1}&{0,2}=0 -> mean 0.5
    np.testing.assert_allclose(stats.temporal_locality(T)[0], 0.5)
    # separate sequences break the chain
    t2 = from_dense(IDS, None, META, extra={"sequence": np.array([0, 1, 2, 3], np.int32)})
    np.testing.assert_allclose(stats.temporal_locality(t2), [0.0, 0.0])


def test_tvd():
    assert stats.tvd([1, 0], [0, 1]) == 1.0
    assert stats.tvd([2, 2], [1, 1]) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        stats.tvd([1, 2], [1, 2, 3])


def test_flame_numbers_match_readme():
    from workloads.importers import load_trace

    t = load_trace("default")
    rows = stats.layer_summary(t)
    assert abs(rows[0]["max_over_mean"] - 1.86) < 0.01  # README: layer 2 max/mean 1.86
    assert abs(rows[0]["entropy_bits"] - 5.945) < 0.001
    loc = stats.temporal_locality(t)
    assert ((loc > 0.095) & (loc < 0.115)).all()  # README: about 0.10-0.11, random 0.094
    aff = stats.affinity_matrices(t)
    assert aff.shape == (7, 64, 64)
    np.testing.assert_allclose(aff.sum(-1), 1.0)


def test_trace_stats_figures(tmp_path):
    from moesim.report.html import write_report
    from moesim.report.trace_stats import trace_stats_figures

    figs = trace_stats_figures(T)
    names = [n for n, _ in figs]
    assert names[0] == "Expert load" and "Inter-layer affinity 0->1" in names and names[-1] == "Co-activation"
    z = np.asarray(figs[0][1].data[0].z)
    np.testing.assert_allclose(z, [[1.5, 1.5, 0.5, 0.5], [0.5, 0.5, 1.5, 1.5]])
    out = write_report(tmp_path / "r.html", "stats", figs)
    assert out.stat().st_size > 100_000  # plotly.js embedded


def test_trace_stats_cli(capsys):
    from moesim.cli import main

    assert main(["trace-stats", "default"]) == 0
    out = capsys.readouterr().out
    assert "flame-moe-290m: 2048 tokens, 8 layers, 64 experts, top-6" in out and "1.865" in out
    assert main(["trace-stats", "/nonexistent/x.parquet"]) == 2
    assert "no trace named or found" in capsys.readouterr().err
