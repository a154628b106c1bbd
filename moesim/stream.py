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
from moesim.sim import (COMM_OPS, COMPUTE_OPS, OP_COLUMNS, Result, RoutingTotals, SimOptions, SimulationError,
                        _Des, activation_bytes, aggregate, check_trace_fits_model, collect_result, layer_times)
from workloads.catalog import MoEModel
from workloads.trace import Trace

ENGINE_NAMES = ("des", "analytic")
OP_NAMES = np.array(COMPUTE_OPS + COMM_OPS, dtype=object)  # the ``op`` column is kept as codes into this
BLOCK_ROWS = 1 << 18  # operator rows merged into one block


def replay_steps(system: System, model: MoEModel, placement: Placement, steps: Iterable[Trace], *,
                 engine: str = "des", cost: CostModel | None = None, options: SimOptions = SimOptions(),
                 seed: int = 0, progress: Callable[[int, int], None] | None = None,
                 a2a: AllToAllRouting | None = None, keep_ops: bool = True,
                 expected_steps: int | None = None) -> Result:
    """Replay the traces ``steps`` yields (each holds whole steps, steps ascending across them) as one
    trace; the same arguments and Result as :func:`moesim.sim.simulate` / :func:`moesim.analytic.estimate`.

    ``progress(done, total)`` counts groups; the total is ``expected_steps``' groups when given, else
    those of the chunks read so far.
    ``keep_ops=False`` keeps no operator rows (``Result.ops`` is empty): memory then does not grow with
    steps x layers x micro-batches x devices.
    """
    if engine not in ENGINE_NAMES:
        raise SimulationError(f"unknown engine {engine!r}; known: {list(ENGINE_NAMES)}")
    cost = cost if cost is not None else RooflineCost()
    rng = np.random.default_rng(seed)
    act_bytes = activation_bytes(model, options)
    ops = _OpsBuffer()
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
                                  f"{chunk.meta.num_experts} experts, the first had {meta.num_layers} x "
                                  f"{meta.num_experts}")
        routed = aggregate(chunk, placement, system.num_devices, options, rng, system.devices_per_node)
        total = expected_steps * options.micro_batches * meta.num_layers if expected_steps else None
        step_progress = None if progress is None else (
            lambda d, t, base=done: progress(base + d, max(total or 0, base + t)))
        df, now = _replay_chunk(engine, system, model, routed, a2a, cost, options, act_bytes, step_progress, now,
                                meta.num_layers)
        chunk_times = layer_times(df, meta.num_layers)
        times = chunk_times if times is None else tuple(a + b for a, b in zip(times, chunk_times))
        ops.add(df if keep_ops else df.iloc[:0])
        chunk_totals = RoutingTotals.of(routed, chunk.columns["layer"], meta.num_layers, system.num_devices)
        totals = chunk_totals if totals is None else totals + chunk_totals
        done += len(routed.group_key)
        del chunk, routed, df  # before the next chunk is read: one chunk in memory, not two
    if meta is None:
        raise SimulationError("the trace has no steps to replay")
    result = collect_result(ops.frame(), now, totals, a2a, system, model, options, meta, cost, act_bytes,
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


class _OpsBuffer:
    """Operator rows kept column by column, chunks merged into blocks of >= BLOCK_ROWS rows (large arrays
    go back to the system when freed; thousands of small ones would stay in the heap, doubling the peak
    when the table is assembled). ``op`` is kept as int8 codes into OP_NAMES (a string object per row
    would cost ~60 bytes)."""

    def __init__(self):
        self.parts: dict[str, list[np.ndarray]] = {c: [] for c in OP_COLUMNS}
        self.small = 0  # index of the first part not yet merged into a block
        self.pending_rows = 0

    def add(self, df: pd.DataFrame) -> None:
        for c, parts in self.parts.items():
            if c == "op":
                codes = pd.Index(OP_NAMES).get_indexer(df["op"])
                if (codes < 0).any():
                    raise SimulationError(f"unknown operator {df['op'][codes < 0].iloc[0]!r}; known: {list(OP_NAMES)}")
                parts.append(codes.astype(np.int8))
            else:
                parts.append(np.array(df[c].to_numpy()))
        self.pending_rows += len(df)
        if self.pending_rows >= BLOCK_ROWS:
            self._merge()

    def _merge(self) -> None:
        for parts in self.parts.values():
            parts[self.small:] = [np.concatenate(parts[self.small:])] if len(parts) > self.small else []
        self.small = len(self.parts["op"])
        self.pending_rows = 0

    def frame(self) -> pd.DataFrame:
        """The rows as one DataFrame (OP_COLUMNS, the in-memory path's dtypes); the buffer is emptied."""
        self._merge()
        # the names in the dtype pandas gives a column of strings, taken by code: no object per row
        names = pd.array(list(OP_NAMES), dtype=pd.Series(list(OP_NAMES)).dtype)
        return pd.DataFrame({c: names.take(_concat_freeing(parts)) if c == "op" else _concat_freeing(parts)
                             for c, parts in self.parts.items()}, copy=False)


def _concat_freeing(parts: list[np.ndarray]) -> np.ndarray:
    """The parts concatenated, the list emptied (so a column's chunks are freed before the next column
    is built: peak memory is the table plus one column, not two tables)."""
    out = np.concatenate(parts)
    parts.clear()
    return out
