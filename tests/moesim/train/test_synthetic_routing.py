"""Synthetic routing in the step: drawn from the generator fitted to a trace, seeded, loads that follow the fit."""

from __future__ import annotations

import dataclasses

import json

import numpy as np
import pytest

from hwmodels.roofline import RooflineCost
from hwmodels.specs import load_system
from moesim.cli import main
from moesim.train.moe import moe_times
from moesim.train.routing import synthetic_trace
from moesim.train.spec import Parallel, TrainError, TrainSpec
from moesim.train.step import simulate_step
from tests.moesim.train.conftest import FLAME, flame_config
from workloads import stats
from workloads.importers import load_trace


@pytest.fixture(scope="module")
def source():
    return load_trace("default")  # FLAME-MoE-290M: 32 sequences of 64 tokens, 8 MoE layers, 64 experts, top-6


def _spec(routing, samples=4):
    # 8 devices x 1024 tokens: a generated step of 8192 tokens is replayed whole and unscaled
    return TrainSpec(Parallel(dp=8, ep=8), seq_len=1024, micro_batch_size=1, global_batch_size=32, routing=routing,
                     routing_samples=samples)


def _layer_tvd(load: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.array([stats.tvd(a, b) for a, b in zip(load, ref)])


def test_synthetic_loads_follow_the_fitted_trace_within_its_own_split_half_noise(source):
    cfg, system, cost = flame_config(), load_system("dgx-h100"), RooflineCost()
    spec = _spec("synthetic")
    trace = synthetic_trace(cfg, spec, source, seed=0)
    mt = moe_times(cfg, system, spec, cost, trace)
    real = stats.expert_load(source)
    # the noise floor from the data itself: load TVD between its even and odd sequences (1024 tokens each);
    # the step replays 4 x 8192 generated tokens, so its own sampling noise is well under that of a half
    seq = source.columns["sequence"]
    halves = [stats.expert_load(source.select(seq % 2 == r)) for r in (0, 1)]
    floor = _layer_tvd(*halves).mean()
    synthetic = _layer_tvd(mt.expert_load, real)
    assert mt.expert_load.shape == real.shape and (mt.expert_load.sum(axis=1) == 4 * 8192 * 6).all()
    assert synthetic.mean() <= floor, (synthetic, floor)
    # the bound discriminates: balanced routing's (uniform) loads are further from the trace than the noise
    balanced = moe_times(cfg, system, _spec("balanced"), cost, None).expert_load
    assert _layer_tvd(np.broadcast_to(balanced, real.shape), real).mean() > floor


def test_synthetic_routing_is_seeded_and_each_step_is_drawn_anew(source):
    cfg = flame_config()
    spec = _spec("synthetic", samples=2)
    a, b = (synthetic_trace(cfg, spec, source, seed=s) for s in (0, 0))
    c = synthetic_trace(cfg, spec, source, seed=1)
    for k in ("step", "token", "layer", "expert"):
        np.testing.assert_array_equal(a.columns[k], b.columns[k])
    assert not np.array_equal(a.expert_load(), c.expert_load())
    steps = [a.select(a.columns["step"] == s).expert_load() for s in (0, 1)]
    assert not np.array_equal(*steps)  # per-step routing, not one step repeated
    assert a.meta.num_experts == 64 and a.meta.top_k == 6 and a.meta.num_layers == 8
    assert set(np.unique(a.columns["step"])) == {0, 1} and a.tokens_per_step() == {0: 8192, 1: 8192}


def test_synthetic_routing_in_the_step_differs_from_balanced(source):
    cfg, system, cost = flame_config(), load_system("dgx-h100"), RooflineCost()
    # per-expert copies: with a de-duplicating dispatch a skewed routing also sends fewer copies (fewer distinct
    # GPUs per token), which can outweigh its imbalance; the point here is the imbalance
    spec = dataclasses.replace(_spec("synthetic"), dispatch_dedup="none")
    r = simulate_step(cfg, system, spec, cost, trace=synthetic_trace(cfg, spec, source, seed=0), check_memory=False)
    b = simulate_step(cfg, system, dataclasses.replace(_spec("balanced"), dispatch_dedup="none"), cost,
                      check_memory=False)
    assert r.meta["routing"] == "synthetic"
    assert r.breakdown["moe_imbalance_mean"] > b.breakdown["moe_imbalance_mean"] == 1.0
    assert r.step_time_s > b.step_time_s


def test_train_cli_synthetic_routing_and_its_errors(tmp_path, capsys):
    cfg = tmp_path / "flame.json"
    cfg.write_text(json.dumps(FLAME))
    base = ["train", "--model", str(cfg), "--ep", "8", "--seq-len", "1024", "--global-batch-size", "32",
            "--cost", "roofline", "--out", str(tmp_path / "o")]
    assert main(base + ["--routing", "synthetic", "--synth-from", "default", "--synth-tokens", "4096",
                        "--json", str(tmp_path / "r.json")]) == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["meta"]["routing"] == "synthetic" and doc["breakdown"]["moe_imbalance_mean"] > 1.0
    for extra, msg in ((["--routing", "synthetic", "--trace", "default"], "--synth-from"),
                       (["--routing", "trace"], "--trace"), (["--routing", "zipf"], "--routing")):
        capsys.readouterr()
        assert main(base + extra) != 0
        assert msg in capsys.readouterr().err
    with pytest.raises(TrainError, match="--synth-tokens"):
        synthetic_trace(flame_config(), _spec("synthetic"), load_trace("default"), tokens_per_sample=4)
