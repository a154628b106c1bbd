"""Pipeline schedules: the order each stage runs its micro-batches in, and the resulting timeline.

The model's blocks are cut into ``v * p`` chunks; chunk ``q = c * p + s`` runs on stage ``s`` (its
``c``-th model chunk). ``fwd_s[q, i]`` and ``bwd_s[q, i]`` are the forward and backward (input + weight
gradient) seconds of chunk q for micro-batch i; ``p2p_s`` the send/recv between consecutive chunks.

Orders (per stage): ``1f1b``: ``min(p - s - 1, m)`` warm-up forwards, then one forward one backward,
then the remaining backwards. ``interleaved`` (Megatron's virtual pipeline, v chunks per stage):
``(p - s - 1) * 2 + (v - 1) * p`` warm-up forwards over virtual micro-batches, forward k running chunk
``(k // p) % v`` of micro-batch ``(k // (p v)) p + k % p``, backward k chunk ``v - 1 - (k // p) % v``.
``dualpipe``: the 1F1B order, where each steady-state backward overlaps the forward before it (DeepSeek's
DualPipe overlap of one chunk's all-to-all with the other's compute): the pair costs
``max(compute_f + compute_b, comm_f + comm_b)`` instead of their sum (the saving is taken off the
backward, slot ``FB``), without DualPipe's second, reverse-direction pipeline. ``dualpipe-bidir`` is the
bidirectional schedule itself (:mod:`moesim.train.dualpipe`).

An operation starts when its stage is free and its input is ready (previous chunk's forward of the
same micro-batch + p2p, or the next chunk's backward + p2p). The timeline is exact for these rules.
"""

from __future__ import annotations

import numpy as np

from moesim.train.dualpipe import run_dualpipe
from moesim.train.spec import TrainError
from moesim.train.timeline import Slot, Timeline, list_schedule, max_live

__all__ = ["Slot", "Timeline", "run_schedule", "stage_order"]


def stage_order(schedule: str, s: int, p: int, m: int, v: int) -> list[tuple[str, int, int]]:
    """(F|B, chunk, micro-batch) in the order stage ``s`` runs them."""
    if schedule in ("1f1b", "dualpipe"):
        warm = min(p - s - 1, m)
        fw = [("F", 0, i) for i in range(m)]
        bw = [("B", 0, i) for i in range(m)]
    elif schedule == "interleaved":
        total = m * v
        warm = min((p - s - 1) * 2 + (v - 1) * p, total)
        fw = [("F", (k // p) % v, (k // (p * v)) * p + k % p) for k in range(total)]
        bw = [("B", v - 1 - (k // p) % v, (k // (p * v)) * p + k % p) for k in range(total)]
    else:
        raise TrainError(f"unknown schedule {schedule!r}")
    order = fw[:warm]
    for i in range(len(fw) - warm):
        order += [fw[warm + i], bw[i]]
    return order + bw[len(fw) - warm:]


def _deps(what: str, c: int, s: int, i: int, p: int, v: int) -> tuple[str, int, int, bool] | None:
    """(F|B, chunk, stage, crosses a stage boundary) this op waits for, None for the first forward."""
    if what == "F":
        if s > 0:
            return ("F", c, s - 1, True)
        return ("F", c - 1, p - 1, p > 1) if c > 0 else None
    if s < p - 1:
        return ("B", c, s + 1, True)
    return ("B", c + 1, 0, p > 1) if c < v - 1 else ("F", c, s, False)


def run_schedule(schedule: str, fwd_s: np.ndarray, bwd_s: np.ndarray, p2p_s: float, p: int, v: int = 1,
                 fwd_comm_s: np.ndarray | None = None, bwd_comm_s: np.ndarray | None = None,
                 wgt_s: np.ndarray | None = None) -> Timeline:
    """Timeline of one step's pipeline (see the module docstring); arrays are [v * p, m] seconds. ``wgt_s``: the
    weight gradients inside ``bwd_s`` (only ``dualpipe-bidir`` defers them, :mod:`moesim.train.dualpipe`)."""
    if schedule == "dualpipe-bidir":
        return run_dualpipe(fwd_s, bwd_s, p2p_s, p, fwd_comm_s, bwd_comm_s, wgt_s)
    m = fwd_s.shape[1]
    orders = [_fuse(stage_order(schedule, s, p, m, v)) if schedule == "dualpipe" else stage_order(schedule, s, p, m, v)
              for s in range(p)]
    slots, free, busy = list_schedule(
        orders, lambda op, s, done: _ready(op, s, p, v, done, p2p_s),
        lambda op, s: _duration(op, s, p, fwd_s, bwd_s, fwd_comm_s, bwd_comm_s),
        _keys, lambda op, s: (op[1], op[2]),
        f"pipeline schedule {schedule!r} deadlocked (p={p}, v={v}, m={m})")
    return Timeline(tuple(slots), max(free), busy, np.array([max_live(o, _parts) for o in orders]))


def _fuse(order: list[tuple]) -> list[tuple]:
    """Marks each steady-state backward that follows a forward as overlapped with it: ("FB", c, i, (cf, if))."""
    out = list(order)
    for k in range(1, len(order)):
        if order[k][0] == "B" and order[k - 1][0] == "F":
            out[k] = ("FB", order[k][1], order[k][2], (order[k - 1][1], order[k - 1][2]))
    return out


def _parts(op) -> list[tuple[str, int, int]]:
    return [("B", op[1], op[2])] if op[0] == "FB" else [op]


def _keys(op, s) -> list[tuple]:
    what, c, i = _parts(op)[0]
    return [(what, c, s, i)]


def _ready(op, s, p, v, done, p2p_s) -> float | None:
    what, c, i = _parts(op)[0]
    dep = _deps(what, c, s, i, p, v)
    if dep is None:
        return 0.0
    key = (dep[0], dep[1], dep[2], i)
    if key not in done:
        return None
    return done[key] + (p2p_s if dep[3] else 0.0)


def _duration(op, s, p, fwd_s, bwd_s, fwd_comm_s, bwd_comm_s) -> float:
    """Seconds of ``op``; an overlapped backward saves min(compute, communication) of the pair, so that the
    pair costs max(compute_f + compute_b, comm_f + comm_b)."""
    if op[0] == "F":
        return float(fwd_s[op[1] * p + s, op[2]])
    b = float(bwd_s[op[1] * p + s, op[2]])
    if op[0] == "B":
        return b
    (cf, i_f), qb = op[3], op[1] * p + s
    f = float(fwd_s[cf * p + s, i_f])
    fm = float(fwd_comm_s[cf * p + s, i_f]) if fwd_comm_s is not None else 0.0
    bm = float(bwd_comm_s[qb, op[2]]) if bwd_comm_s is not None else 0.0
    return b - min(f - fm + b - bm, fm + bm)
