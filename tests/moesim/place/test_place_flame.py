"""Placement on the real FLAME-MoE-290M trace, judged by replay of the held-out half; the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hwmodels.specs import load_system
from moebase.units import to_us
from moesim.cli import main
from moesim.io import load_placement
from moesim.place import BASELINES, evaluate, problem_from_trace, solve
from workloads.catalog import get_model
from workloads.importers import load_trace


@pytest.fixture(scope="module")
def flame():
    trace = load_trace("default")
    fit, heldout = trace.split_tokens(0.5)
    return trace, fit, heldout, get_model(trace.meta.model), load_system("dgx-h100")


def test_joint_beats_contiguous_time_and_greedy_balance_on_heldout(flame):
    trace, fit, heldout, model, system = flame
    fit_p = problem_from_trace(fit, 8, 8, num_scenarios=32, rng=np.random.default_rng(0))
    held_p = problem_from_trace(heldout, 8, 8)
    joint, report = solve(fit_p, "joint", time_limit_s=3.0, num_workers=2, deterministic=True, seed=0)
    rows = {"joint": evaluate(joint, heldout, system, model, held_p)}
    for name in ("contiguous", "greedy"):
        rows[name] = evaluate(BASELINES[name](fit_p, np.random.default_rng(0)), heldout, system, model, held_p)
    print({k: (round(v["max_mean_load"], 4), round(to_us(v["layer_time_s"]), 3)) for k, v in rows.items()})
    assert rows["joint"]["layer_time_s"] < rows["contiguous"]["layer_time_s"]
    assert rows["joint"]["max_mean_load"] < rows["greedy"]["max_mean_load"]
    s = report.summary()
    assert 0.0 <= s["balance"]["gap"] < 0.1 and s["balance"]["bound_sum"] <= s["balance"]["objective_sum"]


def test_renumbered_heldout_starts_on_every_gpu(flame):
    _, _, heldout, _, _ = flame
    tok = heldout.renumber_tokens().columns["token"]
    assert tok.min() == 0 and tok.max() == heldout.num_tokens - 1
    assert np.array_equal(np.unique(tok), np.arange(heldout.num_tokens))


def test_cli_place_writes_a_placement_the_simulator_loads(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["place", "--objective", "balance", "--replicas", "8", "--time-limit", "1s", "--scenarios", "4",
                 "--workers", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "proven bound" in text and "gap" in text
    placement = load_placement(out)
    assert placement.num_devices == 8 and placement.slots_per_device == 9
    assert int(placement.replica_count.sum()) == 8 * (64 + 8)
    doc = json.loads(out.read_text())
    assert doc["extra"]["solve"]["balance"]["layers"] == 8
    assert main(["simulate", "--placement", str(out), "--out", str(tmp_path / "run")]) == 0


def test_cli_compare_prints_one_table_and_writes_html(tmp_path, capsys):
    out = tmp_path / "cmp.json"
    assert main(["place", "--compare", "--methods", "contiguous,round-robin,random,greedy,traffic",
                 "--time-limit", "1s", "--workers", "2", "--deterministic", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("contiguous", "round-robin", "random", "greedy", "traffic", "MoE layer us", "max/mean load"):
        assert name in text
    html = (tmp_path / "cmp-compare.html").read_text()
    assert "<table>" in html and "round-robin" in html
    rows = json.loads((tmp_path / "cmp-compare.json").read_text())["rows"]
    assert json.loads(out.read_text())["format"] == "moesim.placement/1"  # --out is a placement (the fastest)
    traffic = next(r for r in rows if r["placement"] == "traffic")
    contiguous = next(r for r in rows if r["placement"] == "contiguous")
    assert traffic["affinity_cross_gpu_tokens"] < contiguous["affinity_cross_gpu_tokens"]


@pytest.mark.parametrize("argv,message", [
    (["--slots-per-device", "7"], "minimum capacity is 8 slots per GPU"),
    (["--nodes", "16"], "more GPUs (128) than expert slots"),
    (["--model", "mixtral-8x7b"], "disagree on the expert count"),
    (["--time-limit=-3s"], "--time-limit must be > 0"),
])
def test_cli_bad_input(argv, message, tmp_path, capsys):
    assert main(["place", "--out", str(tmp_path / "x.json"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_compare_replays_with_the_simulators_cost_model(tmp_path, capsys):
    """--compare replays held-out tokens with the same cost model as `moesim simulate` (default: GPU-fitted on
    dgx-h100), and --cost roofline gives the datasheet replay; the cost model is printed and recorded."""
    times = {}
    for cost in ("default", "roofline"):
        out = tmp_path / f"{cost}.json"
        assert main(["place", "--compare", "--methods", "contiguous", "--cost", cost, "--out", str(out)]) == 0
        text = capsys.readouterr().out
        doc = json.loads((tmp_path / f"{cost}-compare.json").read_text())
        assert doc["context"]["cost model"].split(":")[0].split(" ")[0] in text
        times[cost] = doc["rows"][0]["layer_time_s"]
        assert doc["context"]["cost model"].startswith("gpu-fitted" if cost == "default" else "roofline")
    assert times["default"] > times["roofline"]  # the fitted GPU model is slower than the datasheet


def test_cli_compare_bad_cost_is_one_line(tmp_path, capsys):
    assert main(["place", "--compare", "--methods", "contiguous", "--cost", "nonsense",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "cost model" in capsys.readouterr().err
