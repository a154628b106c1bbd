"""Pure analytical replay: the same routing aggregation and cost functions as the DES, no SimPy.

Every (step, micro-batch, layer) group runs the four phases of :mod:`moesim.sim` back to back:

``router`` (max over devices) -> ``dispatch`` all-to-all in parallel with ``shared_ffn`` (max of the
two) -> ``expert_ffn`` (max over devices) -> ``combine`` all-to-all.

Micro-batches run one after another (no overlap of one micro-batch's communication with another's
compute). This is exactly what the DES does when nothing contends for a resource, i.e. with
``micro_batches=1`` or ``overlap_micro_batches=False``; there :func:`estimate` agrees with
:func:`moesim.sim.simulate` to floating-point rounding (tested). With overlapping micro-batches the
analytical time is an upper bound of the DES time (the DES overlaps, the formula does not).

No file I/O, no globals; ``estimate`` takes values and returns a :class:`moesim.sim.Result`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from hwmodels.cost import CostModel, RooflineCost, collective_model, overlapped_cost
from hwmodels.specs import System
from hwmodels.topology import AllToAllRouting
from moesim.placement import Placement
from moesim.sim import OP_COLUMNS, PayloadBytes, Result, Routed, SimOptions, _collect, a2a_pair_bytes, prepare, simulate
from workloads.catalog import MoEModel
from workloads.trace import Trace


@dataclass(frozen=True, eq=False)
class GroupCosts:
    """Operator costs of every group g = (step, micro_batch, layer) and device d.

    router_s, shared_s, expert_s [G, D]: seconds of each device's operator (0 where it has no work);
    *_flops, *_bytes [G, D]: work of those operators (FLOPs, bytes moved to/from memory);
    dispatch_s, combine_s [G]: all-to-all durations (the cost model's all-to-all model, per direction's dtype);
    sent_bytes [G, D]: bytes each device sends to other devices in dispatch (combine: received).
    """

    router_s: np.ndarray
    router_flops: np.ndarray
    router_bytes: np.ndarray
    shared_s: np.ndarray
    shared_flops: np.ndarray
    shared_bytes: np.ndarray
    expert_s: np.ndarray
    expert_flops: np.ndarray
    expert_bytes: np.ndarray
    dispatch_s: np.ndarray
    combine_s: np.ndarray
    dispatch_sent_bytes: np.ndarray
    combine_sent_bytes: np.ndarray
    has_shared: bool


def group_costs(system: System, model: MoEModel, routed: Routed, a2a: AllToAllRouting, cost: CostModel,
                options: SimOptions, act_bytes: PayloadBytes) -> GroupCosts:
    """Call the cost model once per (group, device) operator, exactly as the DES does: the shared-expert FFN
    runs beside its group's dispatch, so with the SMs the all-to-all kernel leaves where the dispatch moves bytes."""
    g_count, d_count = routed.router_tokens.shape
    device = system.device
    dt = options.dtype
    shared = options.include_shared_experts and model.num_shared_experts > 0
    out = {k: np.zeros((g_count, d_count)) for k in
           ("router_s", "router_flops", "router_bytes", "shared_s", "shared_flops", "shared_bytes",
            "expert_s", "expert_flops", "expert_bytes")}
    # the router and shared-expert costs depend only on the token count: one call per distinct count
    counts, inv = np.unique(routed.router_tokens, return_inverse=True)
    inv = inv.reshape(g_count, d_count)
    r = [cost.router(device, int(n), model.hidden_size, model.num_experts, dt) for n in counts]
    for name, attr in (("router_s", "time_s"), ("router_flops", "flops"), ("router_bytes", "bytes")):
        out[name] = np.array([getattr(c, attr) for c in r])[inv]
    a2a_model = collective_model(cost, system)
    dispatch_bytes, combine_bytes = a2a_pair_bytes(routed.pair_tokens, act_bytes)  # [G, D, D] each
    dispatch = np.array([a2a_model.duration_s(a2a, dispatch_bytes[g]) for g in range(g_count)])
    combine = np.array([a2a_model.duration_s(a2a, combine_bytes[g]) for g in range(g_count)])
    if shared:
        comm = overlapped_cost(cost, options.comm_sms)
        beside = np.broadcast_to((dispatch > 0)[:, None] & (comm is not cost), (g_count, d_count))
        for c_model, mask in ((cost, ~beside), (comm, beside)):
            if not mask.any():
                continue
            s = [c_model.expert_ffn(device, np.array([n]), model.hidden_size, model.shared_expert_intermediate_size, dt)
                 for n in counts]
            for name, attr in (("shared_s", "time_s"), ("shared_flops", "flops"), ("shared_bytes", "bytes")):
                out[name] = np.where(mask, np.array([getattr(c, attr) for c in s])[inv], out[name])
    et = routed.expert_tokens
    for g in range(g_count):
        for d in range(d_count):
            c = cost.expert_ffn(device, et[g, d], model.hidden_size, model.moe_intermediate_size, dt)
            out["expert_s"][g, d], out["expert_flops"][g, d], out["expert_bytes"][g, d] = c.time_s, c.flops, c.bytes
    return GroupCosts(**out, dispatch_s=dispatch, combine_s=combine,
                      dispatch_sent_bytes=dispatch_bytes.sum(axis=2) - np.einsum("gii->gi", dispatch_bytes),
                      combine_sent_bytes=combine_bytes.sum(axis=2) - np.einsum("gii->gi", combine_bytes),
                      has_shared=shared)


def estimate(system: System, model: MoEModel, placement: Placement, trace: Trace, *,
             cost: CostModel | None = None, options: SimOptions = SimOptions(), seed: int = 0,
             progress: Callable[[int, int], None] | None = None, a2a: AllToAllRouting | None = None) -> Result:
    """Analytical replay of ``trace`` (same arguments and Result as :func:`moesim.sim.simulate`).

    ``a2a`` may pass a precomputed :func:`hwmodels.topology.all_to_all_routing` of ``system`` (it is
    the expensive part for hundreds of devices, and studies reuse it). ``progress(done, total)`` is
    called once per group.
    """
    cost = cost if cost is not None else RooflineCost()
    routed, a2a, act_bytes = prepare(system, model, placement, trace, options, seed, a2a)
    gc = group_costs(system, model, routed, a2a, cost, options, act_bytes)
    ops, now = _timeline(routed, gc, progress)
    result = _collect(ops, now, routed, a2a, system, model, options, trace, cost, act_bytes)
    result.meta["engine"] = "analytic"
    return result


def _timeline(routed: Routed, gc: GroupCosts, progress, start_s: float = 0.0) -> tuple[pd.DataFrame, float]:
    """Start/end of every operator row, groups back to back in (step, micro_batch, layer) order from
    ``start_s`` (where a streamed step starts)."""
    g_count, d_count = gc.router_s.shape
    r_max = gc.router_s.max(axis=1)
    mid = np.maximum(gc.dispatch_s, gc.shared_s.max(axis=1))
    e_max = gc.expert_s.max(axis=1)
    group_s = r_max + mid + e_max + gc.combine_s
    t0 = np.cumsum(np.concatenate([[start_s], group_s]))[:-1]  # [G]
    t1, t2 = t0 + r_max, t0 + r_max + mid
    t3 = t2 + e_max
    key = routed.group_key  # [G, 3]
    dev = np.broadcast_to(np.arange(d_count), (g_count, d_count))
    frames = []

    def block(name, start, end, flops, bytes_):
        start = np.broadcast_to(np.asarray(start).reshape(g_count, -1), (g_count, d_count))
        end = np.broadcast_to(np.asarray(end).reshape(g_count, -1), (g_count, d_count))
        frames.append(pd.DataFrame({
            "op": name, "step": np.repeat(key[:, 0], d_count), "micro_batch": np.repeat(key[:, 1], d_count),
            "layer": np.repeat(key[:, 2], d_count), "device": dev.ravel(), "start_at_s": start.ravel(),
            "end_at_s": end.ravel(), "flops": np.broadcast_to(flops, (g_count, d_count)).ravel().astype(float),
            "bytes": np.broadcast_to(bytes_, (g_count, d_count)).ravel().astype(float)}))

    block("router", t0, t0[:, None] + gc.router_s, gc.router_flops, gc.router_bytes)
    block("dispatch", t1, t1 + gc.dispatch_s, 0.0, gc.dispatch_sent_bytes)
    if gc.has_shared:
        block("shared_ffn", t1, t1[:, None] + gc.shared_s, gc.shared_flops, gc.shared_bytes)
    block("expert_ffn", t2, t2[:, None] + gc.expert_s, gc.expert_flops, gc.expert_bytes)
    block("combine", t3, t3 + gc.combine_s, 0.0, gc.combine_sent_bytes)
    if progress is not None:
        progress(g_count, g_count)
    ops = pd.concat(frames, ignore_index=True)[OP_COLUMNS]
    return ops, float(t3[-1] + gc.combine_s[-1]) if g_count else float(start_s)


#: replay engines by name; both have the signature of :func:`moesim.sim.simulate`.
ENGINES: dict[str, Callable[..., Result]] = {"des": simulate, "analytic": estimate}
