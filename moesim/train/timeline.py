"""A pipeline schedule's result (its slots, one per operation on a stage, and their summary) and the list-scheduling
loop both schedulers (:mod:`moesim.train.pipeline`, :mod:`moesim.train.dualpipe`) run it with."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.train.spec import TrainError


@dataclass(frozen=True)
class Slot:
    """One scheduled operation: ``what`` is ``F``, ``B``, ``FB`` (a backward overlapped with the forward before it)
    or, in ``dualpipe-bidir``, ``W`` (a deferred weight gradient; its ``B`` is then the input gradient only)."""

    stage: int
    what: str
    chunk: int
    micro_batch: int
    start_at_s: float
    end_at_s: float


@dataclass(frozen=True, eq=False)
class Timeline:
    slots: tuple[Slot, ...]
    makespan_s: float
    busy_s: np.ndarray  # [p] seconds each stage computes
    max_live: np.ndarray  # [p] most forward chunks whose backward has not run, per stage

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the pipeline: 1 - mean busy / makespan."""
        return float(1.0 - self.busy_s.mean() / self.makespan_s) if self.makespan_s > 0 else 0.0


def list_schedule(orders: list[list[tuple]], ready, duration, keys, slot_ids,
                  deadlock: str) -> tuple[list[Slot], list[float], np.ndarray]:
    """Runs each stage's ``orders`` in turn, an operation as soon as its stage is free and ``ready(op, s, done)``
    (None while an input is missing) has passed; ``keys(op, s)`` names what it finishes in ``done``,
    ``slot_ids(op, s)`` its (chunk, micro-batch). Returns (slots, each stage's end, each stage's busy seconds);
    a round without progress raises ``TrainError(deadlock)``."""
    p = len(orders)
    done: dict[tuple, float] = {}
    free, pos, busy, slots = [0.0] * p, [0] * p, np.zeros(p), []
    remaining = sum(len(o) for o in orders)
    while remaining:
        progress = False
        for s in range(p):
            while pos[s] < len(orders[s]):
                op = orders[s][pos[s]]
                at = ready(op, s, done)
                if at is None:
                    break
                dur = duration(op, s)
                start = max(free[s], at)
                free[s] = start + dur
                busy[s] += dur
                for key in keys(op, s):
                    done[key] = free[s]
                slots.append(Slot(s, op[0], *slot_ids(op, s), start, free[s]))
                pos[s] += 1
                remaining -= 1
                progress = True
        if not progress:
            raise TrainError(deadlock)
    return slots, free, busy


def max_live(order, parts) -> int:
    """Most forwards whose (input-gradient) backward has not run, in one stage's ``order``; ``parts(op)`` gives
    the (what, ...) parts of an operation."""
    live = peak = 0
    for op in order:
        for what, _, _ in parts(op):
            live += {"F": 1, "B": -1}.get(what, 0)
            peak = max(peak, live)
    return peak


def gradient_slots(timeline: Timeline, stage: int) -> list[Slot]:
    """The slots of ``stage`` that finish each of its chunks' weight gradients: per chunk, the last one that
    computes weight gradients (``B``, ``FB`` or a deferred ``W``), in time order. Gradient reduction of a chunk
    can only start in it (Megatron reduces in the last micro-batch's backward; :mod:`moesim.train.overlap`)."""
    last: dict = {}
    for slot in timeline.slots:
        if slot.stage == stage and slot.what in ("B", "FB", "W"):
            prev = last.get(slot.chunk)
            if prev is None or slot.end_at_s >= prev.end_at_s:
                last[slot.chunk] = slot
    return sorted(last.values(), key=lambda sl: sl.start_at_s)
