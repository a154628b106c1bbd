"""Trace-fitted generator: matches FLAME's load (TVD <= 0.05), beats uniform/Zipf, any shape."""

from __future__ import annotations

import numpy as np
import pytest

from workloads import stats, synth
from workloads.importers import load_trace
from workloads.trace import validate


@pytest.fixture(scope="module")
def flame():
    return load_trace("default")


@pytest.fixture(scope="module")
def fitted(flame):
    return synth.fit(flame)


def test_generated_load_matches_real(flame, fitted):
    g = synth.generate(fitted, 16384, seed=2)
    validate(g)
    c = synth.compare(g, flame)
    assert c["load_tvd"].max() <= 0.05
    u = synth.compare(synth.uniform_trace(16384, 64, 6, 8, seed=2), flame)
    z = synth.compare(synth.zipf_trace(16384, 64, 6, 8, seed=2), flame)
    assert c["load_tvd"].mean() < u["load_tvd"].mean() < z["load_tvd"].mean()
    assert c["affinity_tvd"].mean() < u["affinity_tvd"].mean() < z["affinity_tvd"].mean()
    assert np.abs(c["locality_diff"]).max() < 0.01
    # imbalance is reproduced (uniform would be about 1.1)
    np.testing.assert_allclose(stats.imbalance(g), stats.imbalance(flame), atol=0.25)


def test_other_shapes_and_steps(fitted):
    g = synth.generate(fitted, 300, num_steps=2, num_experts=128, top_k=8, num_layers=12, seed=1, seq_len=50)
    validate(g)
    assert (g.meta.num_experts, g.meta.top_k, g.meta.num_layers) == (128, 8, 12)
    assert g.tokens_per_step() == {0: 300, 1: 300}
    e, w = g.dense()
    assert e.shape == (600, 12, 8) and (np.diff(w, axis=-1) <= 1e-6).all()  # weights fall with rank
    # load skew survives the split to 128 experts (uniform 8-of-128 would be near 1)
    assert stats.imbalance(g).mean() > 1.3
    g2 = synth.generate(fitted, 300, num_steps=2, num_experts=128, top_k=8, num_layers=12, seed=1, seq_len=50)
    np.testing.assert_array_equal(g.expert, g2.expert)  # seeded


def test_bad_input(fitted):
    with pytest.raises(ValueError, match="top_k=9 exceeds num_experts=8"):
        synth.generate(fitted, 10, num_experts=8, top_k=9)
    with pytest.raises(ValueError, match="num_tokens must be >= 1"):
        synth.generate(fitted, 0)


def test_olmoe_paper_stats():
    from workloads.importers import find_shared_traces

    shared = find_shared_traces()
    if shared is None:
        pytest.skip("shared/data/traces not present")
    load, pairs, k = synth.load_olmoe_stats(shared, "OLMoE", "github")
    assert load.shape == (3, 64) and k == 8 and pairs.shape == (2, 64, 64)
    m = synth.fit_counts(load, pairs, k, source="OLMoE paper", model="olmoe")
    g = synth.generate(m, 8192, seq_len=64, seed=0)
    fitted_tvd = [stats.tvd(stats.expert_load(g)[i], load[i]) for i in range(3)]
    uni = synth.uniform_trace(8192, 64, 8, 3, seed=0)
    uni_tvd = [stats.tvd(stats.expert_load(uni)[i], load[i]) for i in range(3)]
    assert max(fitted_tvd) <= 0.05 < min(uni_tvd)
    with pytest.raises(ValueError, match="no OLMoE-paper load rows"):
        synth.load_olmoe_stats(shared, "OLMoE", "klingon")


def test_synth_cli(tmp_path, capsys):
    from moesim.cli import main
    from workloads.trace import read_parquet

    out = tmp_path / "s.parquet"
    assert main(["synth", "--fit", "default", "--out", str(out), "--tokens", "128", "--experts", "32",
                 "--top-k", "4", "--layers", "3"]) == 0
    t = read_parquet(out)
    assert (t.meta.num_experts, t.meta.top_k, t.meta.num_layers, t.num_tokens) == (32, 4, 3, 128)
    assert main(["synth", "--fit", "default"]) == 2
    assert "give --out" in capsys.readouterr().err
