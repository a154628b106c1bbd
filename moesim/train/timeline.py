"""A pipeline schedule's result: its slots (one per operation on a stage) and their summary."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
