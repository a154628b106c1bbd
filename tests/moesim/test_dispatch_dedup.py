"""De-duplicated dispatch (SimOptions.dispatch_dedup) on a hand case: 2 nodes x 2 GPUs, 8 experts (2 per GPU),
top-4, one token per GPU; pair counts and per-link bytes against hand-computed values; DES == analytic."""

import dataclasses

import numpy as np
import pytest

from hwmodels.specs import load_system
from moesim.analytic import estimate
from moesim.placement import contiguous
from moesim.sim import SimOptions, SimulationError, prepare, simulate
from workloads.catalog import get_model
from workloads.importers import load_trace
from workloads.trace import Trace, TraceMeta

# token t lives on GPU t (4 tokens, 4 GPUs); expert e lives on GPU e // 2; GPUs 0, 1 are node 0, GPUs 2, 3 node 1
EXPERTS = {0: (2, 3, 4, 5), 1: (4, 6, 0, 1), 2: (4, 5, 6, 7), 3: (0, 2, 6, 7)}

# copies sent src (row) -> dst (column), worked out by hand from EXPERTS
EXPECTED = {
    "none": [[0, 2, 2, 0], [2, 0, 1, 1], [0, 0, 2, 2], [1, 1, 0, 2]],
    "gpu": [[0, 1, 1, 0], [1, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 1]],
    # token 0: IB 0->2 (its relay in node 1), 2 keeps it; NVLink 0->1.  token 1: IB 1->3, 3 forwards to 2 and
    # keeps one; NVLink 1->0.  token 2: intra-node as 'gpu'.  token 3: IB 3->1, 1 forwards to 0 and keeps one;
    # 3 keeps its own.  Diagonal (no link): 2 holds token 0's copy and its own token 2's.
    "node": [[0, 1, 1, 0], [2, 1, 0, 1], [0, 0, 2, 1], [0, 1, 1, 2]],
}
# copies crossing scale-out and scale-up links (off-diagonal pairs between / within nodes)
SCALE_OUT_COPIES = {"none": 6, "gpu": 5, "node": 3}
SCALE_UP_COPIES = {"none": 6, "gpu": 3, "node": 5}


def _system():
    base = load_system("dgx-h100")
    return dataclasses.replace(base, num_nodes=2, devices_per_node=2)


def _model():
    m = get_model("flame-moe-290m")
    return dataclasses.replace(m, name="tiny", num_experts=8, num_experts_per_tok=4, num_layers=1, moe_layers=(0,))


def _trace():
    rows = [(t, r, e) for t, es in EXPERTS.items() for r, e in enumerate(es)]
    tok, rank, exp = (np.array(x) for x in zip(*rows))
    cols = {"step": np.zeros(len(rows), np.int32), "layer": np.zeros(len(rows), np.int32),
            "token": tok.astype(np.int64),
            "rank": rank.astype(np.int16), "expert": exp.astype(np.int32),
            "weight": np.full(len(rows), 0.25, np.float32)}
    return Trace(columns=cols, meta=TraceMeta(model="tiny", num_experts=8, top_k=4, num_layers=1, source="hand"))


@pytest.mark.parametrize("mode", ["none", "gpu", "node"])
def test_pair_copies_and_link_bytes_match_hand_count(mode):
    system, model, trace = _system(), _model(), _trace()
    placement = contiguous(1, 8, 4)
    options = SimOptions(dispatch_dedup=mode, include_shared_experts=False)
    routed, _, act = prepare(system, model, placement, trace, options, seed=0)
    np.testing.assert_array_equal(routed.pair_tokens[0], np.array(EXPECTED[mode]))
    np.testing.assert_array_equal(routed.expert_tokens[0].sum(axis=0), 
                                  np.bincount(np.concatenate(list(EXPERTS.values())), minlength=8))  # not de-duplicated
    result = simulate(system, model, placement, trace, options=options)
    by_kind = result.summary()["bytes_by_link_kind"]
    per_copy = act.dispatch_bytes + act.combine_bytes  # dispatch out and combine back; two edges per route
    assert by_kind[system.scale_out.kind] == pytest.approx(2 * SCALE_OUT_COPIES[mode] * per_copy)
    assert by_kind[system.scale_up.kind] == pytest.approx(2 * SCALE_UP_COPIES[mode] * per_copy)


def test_dedup_never_sends_more_over_scale_out_and_gpu_never_more_anywhere():
    system, model, trace = _system(), _model(), _trace()
    placement = contiguous(1, 8, 4)
    kinds = {m: simulate(system, model, placement, trace, options=SimOptions(dispatch_dedup=m)).summary()
             ["bytes_by_link_kind"] for m in ("none", "gpu", "node")}
    out, up = system.scale_out.kind, system.scale_up.kind
    assert kinds["node"][out] < kinds["gpu"][out] < kinds["none"][out]
    assert kinds["gpu"][up] < kinds["none"][up]


def test_unknown_dedup_mode_is_refused():
    with pytest.raises(SimulationError, match="dispatch_dedup"):
        SimOptions(dispatch_dedup="rack")


@pytest.mark.parametrize("mode", ["gpu", "node"])
def test_analytic_matches_des_with_dedup(mode):
    trace = load_trace("default")
    system = load_system("dgx-h100").with_nodes(2)
    model = get_model("flame-moe-290m")
    placement = contiguous(trace.meta.num_layers, trace.meta.num_experts, system.num_devices)
    options = SimOptions(dispatch_dedup=mode)
    des = simulate(system, model, placement, trace, options=options, seed=3)
    ana = estimate(system, model, placement, trace, options=options, seed=3)
    base = simulate(system, model, placement, trace, seed=3)
    assert ana.total_time_s == pytest.approx(des.total_time_s, rel=1e-9)
    np.testing.assert_allclose(ana.layer_comm_s, des.layer_comm_s, rtol=1e-9)
    out = system.scale_out.kind
    assert des.summary()["bytes_by_link_kind"][out] < base.summary()["bytes_by_link_kind"][out]
    assert des.meta["dispatch_dedup"] == mode
