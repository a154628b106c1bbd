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
DEV = exflow.expert_device(contiguous(2, 4, 2))


def test_standard_mode_counts_dispatch_and_combine():
    p = exflow.pair_tokens(_trace(TOP1), DEV, 2, "standard")
    # layer 0: 0 -> 1 and 1 -> 0; layer 1: 0 -> 1 and 1 -> 1 (local); per token of the trace (2 tokens)
    assert p["dispatch"][0].tolist() == [[0, 0.5], [0.5, 0]]
    assert p["dispatch"][1].tolist() == [[0, 0.5], [0, 0.5]]
    assert np.array_equal(p["combine"], p["dispatch"].transpose(0, 2, 1))
    assert exflow.crossings(p) == pytest.approx((4 + 2) / 2 / 2)


def test_coherent_mode_keeps_tokens_where_their_expert_ran():
    p = exflow.pair_tokens(_trace(TOP1), DEV, 2, "coherent")
    assert set(p) == {"dispatch", "reduce", "return"}
    # layer 1 starts where layer 0's expert ran: token 0 on device 1 (stays), token 1 on device 0 (moves to 1)
    assert p["dispatch"][1].tolist() == [[0, 0.5], [0, 0.5]]
    assert not p["reduce"].any()  # top-1: nothing to sum
    # back home after the last layer: token 0 from device 1 to 0, token 1 stays on 1
    assert p["return"][1].tolist() == [[0, 0], [0.5, 0.5]]
    assert exflow.crossings(p) == pytest.approx((2 + 1 + 1) / 2 / 2)


def test_top2_reduce_sends_the_second_output_to_the_primary_device():
    rows = TOP1 + [(0, 0, 0, 0, 0.5)]  # token 0 also picks expert 0 (device 0) in layer 0, lower weight
    p = exflow.pair_tokens(_trace(rows), DEV, 2, "coherent")
    assert p["reduce"][0].tolist() == [[0, 0.5], [0, 0]]  # device 0 -> device 1 (where expert 2 ran)
    top1 = exflow.pair_tokens(_trace(rows), DEV, 2, "coherent", top1=True)
    assert not top1["reduce"].any()


def test_pair_tokens_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="EP mode"):
        exflow.pair_tokens(_trace(TOP1), DEV, 2, "both")


def test_split_by_sequence_is_a_partition():
    t = _trace(TOP1)
    fit, held = exflow.split_by_sequence(t)
    assert len(fit) + len(held) == len(t)
    assert set(fit.columns["sequence"]).isdisjoint(held.columns["sequence"])


def _cost(mode, replicate_kv=True):
    cfg, sy = load_config("olmoe-1b-7b"), load_system("dgx-h100")
    from workloads.importers import load_trace
    tr = load_trace("flame-moe-290m")
    pl = exflow.place(tr, "contiguous", 8, 8)
    comm = exflow.ep_comm(cfg, sy, 8, tr, pl, mode, "bf16", kv_bytes_per_token_layer=1024.0,
                          replicate_kv=replicate_kv)
    return IterationCost(cfg, sy, ServeLayout(tp=1, ep=8, dp=8), ep_comm=comm), comm


def test_iteration_cost_times_the_placements_all_to_alls():
    ic, comm = _cost("standard")
    parts = ic.layer_parts(64)
    d, c = comm.layer_times_s(64, len(ic.cfg.moe_layers))
    assert np.allclose(parts.dispatch_s[list(ic.cfg.moe_layers)], d)
    assert np.allclose(parts.combine_s[list(ic.cfg.moe_layers)], c)
    coh, _ = _cost("coherent")
    assert coh.kv_replicas == 8 and ic.kv_replicas == 1
    assert coh.kv_capacity_tokens_per_device == ic.kv_capacity_tokens_per_device // 8
    free, free_comm = _cost("coherent", replicate_kv=False)
    assert free.kv_replicas == 1 and free_comm.kv_bytes_per_token_layer == 0
    # the all-gather of the new KV is the only difference in the second step
    assert np.all(coh.ep_comm.layer_times_s(64, 16)[1] > free_comm.layer_times_s(64, 16)[1])


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
