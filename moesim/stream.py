"""Replay a trace step by step: memory bounded by one step, the Result of the in-memory replay.

Both engines run a trace's steps one after another (a step starts when the previous one ends), so
a trace can be replayed in chunks of whole steps: each chunk is aggregated (:func:`moesim.sim.aggregate`,
one replica-routing RNG carried across chunks), replayed from where the previous chunk ended, and
its integer routing totals (:class:`moesim.sim.RoutingTotals`) and per-layer times added up. The
operator rows of all chunks are kept, column by column (one row per operator, device, layer,
micro-batch and step: they do not grow with tokens per step), unless ``keep_ops=False``.

With the DES the operator rows, the makespan, counts and bytes equal the in-memory Result exactly (the
event loop starts at the previous chunk's end time) and per-layer times to rounding (summed per chunk);
with the analytic engine, times agree to rounding (the running sum restarts at each chunk's end),
counts and bytes exactly.

No file I/O: ``replay_steps`` takes an iterable of one-step (or whole-step) traces, e.g.
:meth:`workloads.trace_stream.TraceStream.steps`.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import pandas as pd

from hwmodels.roofline import CostModel, RooflineCost
from hwmodels.specs import System
from hwmodels.topology import AllToAllRouting, all_to_all_routing
from moesim.analytic import _timeline, group_costs
from moesim.placement import Placement
from moesim.sim import (OP_COLUMNS, Result, RoutingTotals, SimOptions, SimulationError, _Des, activation_bytes,
                        aggregate, check_trace_fits_model, collect_result, layer_times)
from workloads.catalog import MoEModel
from workloads.trace import Trace

ENGINE_NAMES = ("des", "analytic")


def replay_steps(system: System, model: MoEModel, placement: Placement, steps: Iterable[Trace], *,
                 engine: str = "des", cost: CostModel | None = None, options: SimOptions = SimOptions(),
                 seed: int = 0, progress: Callable[[int, int], None] | None = None,
                 a2a: AllToAllRouting | None = None, keep_ops: bool = True) -> Result:
    """Replay the traces ``steps`` yields (each holds whole steps, steps ascending across them) as one
    trace; the same arguments and Result as :func:`moesim.sim.simulate` / :func:`moesim.analytic.estimate`.

    ``progress(done, total)`` counts groups of the chunks read so far (the total grows as chunks come).
    ``keep_ops=False`` keeps no operator rows (``Result.ops`` is empty): memory then does not grow with
    steps x layers x micro-batches x devices.
    """
    if engine not in ENGINE_NAMES:
        raise SimulationError(f"unknown engine {engine!r}; known: {list(ENGINE_NAMES)}")
    cost = cost if cost is not None else RooflineCost()
    rng = np.random.default_rng(seed)
    act_bytes = activation_bytes(model, options)
    columns: dict[str, list[np.ndarray]] = {c: [] for c in OP_COLUMNS}  # operator rows, column by column
    times = None  # per-layer (span, compute, communication) seconds, summed chunk by chunk
    totals: RoutingTotals | None = None
    meta = None
    now = 0.0
    done = 0
    for chunk in steps:
        if meta is None:
            meta = chunk.meta
            check_trace_fits_model(chunk, model)
            placement.check_fits(meta.num_layers, meta.num_experts, system.num_devices)
            a2a = a2a if a2a is not None else all_to_all_routing(system)
        elif (chunk.meta.num_layers, chunk.meta.num_experts) != (meta.num_layers, meta.num_experts):
            raise SimulationError(f"a chunk of the trace has {chunk.meta.num_layers} layers x "
                                  f"{chunk.meta.num_experts} experts, the first had {meta.num_layers} x {meta.num_experts}")
        routed = aggregate(chunk, placement, system.num_devices, options, rng)
        step_progress = None if progress is None else (lambda d, t, base=done: progress(base + d, base + t))
        df, now = _replay_chunk(engine, system, model, routed, a2a, cost, options, act_bytes, step_progress, now,
                                meta.num_layers)
        chunk_times = layer_times(df, meta.num_layers)
        times = chunk_times if times is None else tuple(a + b for a, b in zip(times, chunk_times))
        for c, parts in columns.items():
            parts.append(np.array(df[c].to_numpy()[:len(df) if keep_ops else 0]))
        chunk_totals = RoutingTotals.of(routed, chunk.columns["layer"], meta.num_layers, system.num_devices)
        totals = chunk_totals if totals is None else totals + chunk_totals
        done += len(routed.group_key)
    if meta is None:
        raise SimulationError("the trace has no steps to replay")
    ops = pd.DataFrame({c: _concat_freeing(parts) for c, parts in columns.items()}, copy=False)
    result = collect_result(ops, now, totals, a2a, system, model, options, meta, cost, act_bytes,
                            times=times)
    if engine == "analytic":
        result.meta["engine"] = "analytic"
    return result


def _replay_chunk(engine, system, model, routed, a2a, cost, options, act_bytes, progress, start_s, l_count):
    """(operator rows, end time) of one chunk replayed from ``start_s``."""
    if engine == "des":
        des = _Des(system, model, routed, a2a, cost, options, act_bytes, progress, start_s=start_s)
        des.env.process(des.main(l_count))
        des.env.run()
        return pd.DataFrame(des.ops, columns=OP_COLUMNS), float(des.env.now)
    gc = group_costs(system, model, routed, a2a, cost, options, act_bytes)
    return _timeline(routed, gc, progress, start_s=start_s)


def _concat_freeing(parts: list[np.ndarray]) -> np.ndarray:
    """The parts concatenated, the list emptied (so a column's chunks are freed before the next column
    is built: peak memory is the table plus one column, not two tables)."""
    out = np.concatenate(parts)
    parts.clear()
    return out
