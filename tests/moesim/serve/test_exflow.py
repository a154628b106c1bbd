"""Expert-parallel token movement: standard (dispatch + combine) against ExFlow's context-coherent mode, on
hand-counted traces; the serving iteration uses it; the CLI flags."""

import json

import numpy as np
import pytest

from hwmodels.specs import load_system
from moesim.cli import main
from moesim.placement import contiguous
from moesim.serve import exflow
from moesim.serve.cost import IterationCost, ServeLayout
from workloads.hf_config import load_config
from workloads.trace import Trace, TraceMeta


def _trace(rows):
    """rows: (token, sequence, layer, expert, weight); one step."""
    a = np.array(rows, dtype=float)
    cols = {"step": np.zeros(len(a), np.int32), "token": a[:, 0].astype(np.int64), "sequence": a[:, 1].astype(np.int32),
            "layer": a[:, 2].astype(np.int32), "expert": a[:, 3].astype(np.int32), "weight": a[:, 4].astype(np.float32),
            "rank": np.zeros(len(a), np.int16)}
    return Trace(columns=cols, meta=TraceMeta("toy", 4, 1, 2, "hand-made"))


# token 0 (home device 0): expert 2 then 3; token 1 (home 1): expert 0 then 2. Contiguous on 2 devices:
# experts 0, 1 on device 0 and 2, 3 on device 1.
TOP1 = [(0, 0, 0, 2, 1.0), (0, 0, 1, 3, 1.0), (1, 1, 0, 0, 1.0), (1, 1, 1, 2, 1.0)]


def _copies(rows, mode, moe_layers=2, dedup="none"):
    return exflow.layer_copies(_trace(rows), contiguous(2, 4, 2), 2, mode, dedup, 2, moe_layers)


def test_standard_mode_counts_dispatch_and_combine():
    p = _copies(TOP1, "standard")
    # layer 0: 0 -> 1 and 1 -> 0; layer 1: 0 -> 1 and 1 -> 1 (local)
    assert p["dispatch"][0].tolist() == [[0, 1], [1, 0]]
    assert p["dispatch"][1].tolist() == [[0, 1], [0, 1]]
    assert np.array_equal(p["combine"], p["dispatch"].transpose(0, 2, 1))


def test_coherent_mode_keeps_tokens_where_their_expert_ran():
    p = _copies(TOP1, "coherent")
    assert p["dispatch"][0].tolist() == [[0, 1], [1, 0]]  # the first layer starts at home
    assert p["combine"][0].tolist() == [[1, 0], [0, 1]]  # top-1: the output stays where the expert ran (local)
    # layer 1 starts where layer 0's expert ran: token 0 on device 1 (stays), token 1 on device 0 (moves to 1)
    assert p["dispatch"][1].tolist() == [[0, 1], [0, 1]]
    # the last layer's outputs go home: token 0 from device 1 to 0, token 1 stays on 1
    assert p["combine"][1].tolist() == [[0, 0], [1, 1]]


def test_coherent_mode_wraps_trace_layers_from_where_the_previous_layer_left():
    p = _copies(TOP1, "coherent", moe_layers=3)  # model layer 2 replays trace layer 0
    assert p["combine"][1].tolist() == [[0, 0], [0, 2]]  # layer 1 is no longer the last: both stay on device 1
    assert p["dispatch"][2].tolist() == [[0, 0], [1, 1]]  # from device 1: token 0 stays, token 1 goes to 0
    assert p["combine"][2].tolist() == [[0, 1], [1, 0]]  # home from the experts of trace layer 0


def test_top2_reduce_sends_the_second_output_to_the_primary_device():
    rows = TOP1 + [(0, 0, 0, 0, 0.5)]  # token 0 also picks expert 0 (device 0) in layer 0, lower weight
    p = _copies(rows, "coherent")
    assert p["combine"][0].tolist() == [[1, 1], [0, 1]]  # device 0 sends token 0's second output to device 1
    one = exflow.layer_copies(exflow.top1(_trace(rows)), contiguous(2, 4, 2), 2, "coherent", "none", 2, 2)
    assert one["combine"][0].tolist() == [[1, 0], [0, 1]]


def test_layer_copies_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="EP mode"):
        _copies(TOP1, "both")


@pytest.mark.parametrize("devices,dedup", [(8, "none"), (8, "node"), (16, "node"), (16, "gpu")])
def test_standard_copies_are_the_training_engines(devices, dedup):
    """The standard mode's copies per layer equal moesim.sim.aggregate's on the same routing window."""
    from moesim.sim import SimOptions, aggregate
    from moesim.train.moe import sample_steps
    from workloads.importers import load_trace
    parts, _ = sample_steps(load_trace("flame-moe-290m"), devices, 64, 1, 8)
    pl = contiguous(8, 64, devices)
    got = exflow.layer_copies(parts[0], pl, devices, "standard", dedup, 8, 8)
    want = aggregate(parts[0], pl, devices, SimOptions(micro_batches=1, dispatch_dedup=dedup),
                     np.random.default_rng(0), 8).pair_tokens
    assert np.array_equal(got["dispatch"], want)
    assert np.array_equal(got["combine"], want.transpose(0, 2, 1))


def _shifted_trace(tokens_per_device: int, devices: int, layers: int, experts: int) -> Trace:
    """Top-1: the token of home device h routes, in every layer, to an expert of device h + 1 (contiguous)."""
    n = tokens_per_device * devices
    tok = np.repeat(np.arange(n), layers)
    layer = np.tile(np.arange(layers), n)
    home = (tok * devices) // n
    expert = ((home + 1) % devices) * (experts // devices) + tok % (experts // devices)
    cols = {"step": np.zeros(len(tok), np.int32), "token": tok.astype(np.int64), "layer": layer.astype(np.int32),
            "expert": expert.astype(np.int32), "weight": np.ones(len(tok), np.float32),
            "rank": np.zeros(len(tok), np.int16)}
    return Trace(columns=cols, meta=TraceMeta("shifted", experts, 1, layers, "hand-made"))


def test_coherent_removes_exactly_the_all_to_alls_perfect_affinity_makes_local():
    """Each token's expert sits one device from home in every layer: standard sends it there and back per layer
    (2 L all-to-alls); coherent sends it there once and home once after the last layer, all other layers local. With
    the spec bottleneck-link all-to-all (roofline cost) each is T x bytes / link bandwidth + latency."""
    from hwmodels.collectives import a2a_payload_bytes
    from hwmodels.cost import RooflineCost
    cfg, sy = load_config("olmoe-1b-7b"), load_system("dgx-h100")
    t, layers = 64, len(cfg.moe_layers)
    tr = _shifted_trace(t, 8, layers, cfg.num_experts)
    pl = contiguous(layers, cfg.num_experts, 8)
    ic = {m: IterationCost(cfg, sy, ServeLayout(tp=1, ep=8, dp=8), RooflineCost(), trace=tr, placement=pl,
                           ep_mode=exflow.EPMode(m)) for m in exflow.MODES}
    std, coh = ic["standard"].layer_parts(t), ic["coherent"].layer_parts(t)
    link = sy.scale_up
    one_s = t * a2a_payload_bytes(1, cfg.hidden_size, "bf16") / link.bandwidth_bytes_per_s + link.latency_s
    assert std.dispatch_s == pytest.approx(one_s, rel=1e-12) and std.combine_s == pytest.approx(one_s, rel=1e-12)
    assert coh.dispatch_s[0] == pytest.approx(one_s, rel=1e-12) and coh.combine_s[-1] == pytest.approx(one_s, rel=1e-12)
    assert not coh.dispatch_s[1:].any() and not coh.combine_s[:-1].any()
    for part in ("pre_s", "shared_s", "expert_s"):
        assert np.array_equal(getattr(std, part), getattr(coh, part))
    saved = ic["standard"].linear_exact_s(t) - ic["coherent"].linear_exact_s(t)
    assert saved == pytest.approx((2 * layers - 2) * one_s, rel=1e-9)


def _cost(mode, replicate_kv=True):
    cfg, sy = load_config("olmoe-1b-7b"), load_system("dgx-h100")
    from workloads.importers import load_trace
    tr = load_trace("flame-moe-290m")
    pl = exflow.place(tr, "contiguous", 8, 8)
    return IterationCost(cfg, sy, ServeLayout(tp=1, ep=8, dp=8), trace=tr, placement=pl,
                         ep_mode=exflow.EPMode(mode, 1024.0, replicate_kv=replicate_kv))


def test_standard_mode_is_the_placement_path_and_coherent_kv_costs_a_gather():
    from hwmodels.cost import collective_model
    from hwmodels.topology import all_to_all_routing
    ic, placed = _cost("standard"), _cost("standard")
    placed.ep_mode = None
    a, b = ic.layer_parts(64), placed.layer_parts(64)
    for part in ("pre_s", "dispatch_s", "shared_s", "expert_s", "combine_s"):
        assert np.array_equal(getattr(a, part), getattr(b, part))
    coh, free = _cost("coherent"), _cost("coherent", replicate_kv=False)
    assert coh.kv_replicas == 8 and ic.kv_replicas == 1 and free.kv_replicas == 1
    assert coh.kv_capacity_tokens_per_device == ic.kv_capacity_tokens_per_device // 8
    m = np.full((8, 8), 64 * 1024.0)
    np.fill_diagonal(m, 0)
    gather_s = collective_model(coh.cost, coh.system).duration_s(all_to_all_routing(coh.system), m)
    c, f = coh.layer_parts(64), free.layer_parts(64)
    assert gather_s > 0 and np.allclose(c.combine_s - f.combine_s, gather_s, rtol=1e-12)
    assert np.array_equal(c.dispatch_s, f.dispatch_s)


def test_cli_ep_mode_standard_is_the_placement_path(tmp_path):
    base = ["serve", "--model", "olmoe-1b-7b", "--system", "dgx-h100", "--ep", "8", "--trace", "flame-moe-290m",
            "--placement", "balance", "--rate", "40", "--duration-s", "0.5", "--no-report"]
    assert main([*base, "--ep-mode", "standard", "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / x / "metrics.json").read_text()) for x in "ab")
    assert a["requests"]["finished"] > 0
    for m in (a, b):
        m.pop("config")
    assert a == b


def test_split_by_sequence_is_a_partition():
    t = _trace(TOP1)
    fit, held = exflow.split_by_sequence(t)
    assert len(fit) + len(held) == len(t)
    assert set(fit.columns["sequence"]).isdisjoint(held.columns["sequence"])
    assert sorted(set(held.columns["token"])) == list(range(len(set(held.columns["token"]))))  # renumbered 0..n-1


def test_cli_ep_mode_needs_a_trace(tmp_path, capsys):
    base = ["serve", "--model", "olmoe-1b-7b", "--system", "dgx-h100", "--ep", "8", "--rate", "5",
            "--duration-s", "1", "--no-report"]
    assert main([*base, "--ep-mode", "coherent", "--out", str(tmp_path / "a")]) != 0
    assert "--trace" in capsys.readouterr().err
    assert main([*base, "--ep-mode", "coherent", "--trace", "flame-moe-290m", "--out", str(tmp_path / "b")]) == 0
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["config"]["pools"]["colocated"]["ep_mode"] == "coherent"
    assert m["requests"]["finished"] == m["requests"]["total"]


def test_placement_reaches_the_training_engines_moe_phases():
    from workloads.importers import load_trace
    tr = load_trace("flame-moe-290m")
    pl = exflow.place(tr, "balance", 8, 8, time_limit_s=2.0)
    ic = IterationCost(load_config("olmoe-1b-7b"), load_system("dgx-h100"), ServeLayout(tp=1, ep=8, dp=8), trace=tr,
                       placement=pl)
    assert ic._moe_times(64).placement is pl


def test_validation_decode_batch_is_the_largest_meeting_the_latency():
    from moesim.serve import validation as v
    case = v.CASES[0]
    p = v.predict(case)
    ic = v._cost(case)
    assert p["iteration_s"] <= case.latency_s < v.decode_s(ic, p["batch_per_rank"] + 1, case.context)
    assert p["tokens_per_s_per_node"] == pytest.approx(8 * p["batch_per_rank"] / p["iteration_s"])
