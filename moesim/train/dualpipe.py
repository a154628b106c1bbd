"""DualPipe's bidirectional pipeline schedule (DeepSeek-V3 report sec. 3.2.1; github.com/deepseek-ai/DualPipe).

``p`` ranks (even), ``m`` micro-batches (even, ``m >= 2 p``): half of them enter at rank 0 and run the model's
chunks 0..p-1 on ranks 0..p-1 (direction 0), the other half enter at rank p-1 and run chunk k on rank p-1-k
(direction 1), so rank r holds chunks r and p-1-r (two stages' parameters). Each rank runs the eight steps of
``DualPipe.step`` in the reference implementation (``dualpipe/dualpipe.py``), with ``half_rank = min(r, p-1-r)``
and phase 0 = direction 0 on the first half of the ranks, direction 1 on the second half:

1. ``(p/2 - half_rank - 1) * 2`` forwards of phase 0;
2. ``half_rank + 1`` x (forward phase 0, forward phase 1);
3. ``p/2 - half_rank - 1`` x (input-gradient backward phase 1 with its weight gradient deferred, a deferred
   weight gradient, forward phase 1);
4. ``m/2 - p + half_rank + 1`` x (forward phase 0 overlapped with backward phase 1, forward phase 1 overlapped
   with backward phase 0); on the middle ranks (``half_rank = p/2 - 1``) the first pair is not overlapped;
5. ``p/2 - half_rank - 1`` x (backward phase 1, forward phase 1 overlapped with backward phase 0);
6. ``half_rank + 1`` x (backward phase 1, backward phase 0), deferring weight gradients from the middle on;
7. ``p/2 - half_rank - 1`` x (deferred weight gradient, backward phase 0 with its weight gradient deferred);
8. ``half_rank + 1`` deferred weight gradients.

Weight gradients are deferred first in, first out (the reference's ``WeightGradStore`` queue). Costs: ``F`` =
``fwd_s``, ``B`` = ``bwd_s`` (input and weight gradient), ``Bi`` = ``bwd_s - wgt_s`` (weight gradient deferred),
``W`` = ``wgt_s``, ``FB`` (an overlapped forward and backward) = ``max(compute_f + compute_b, comm_f + comm_b)``
as in :mod:`moesim.train.pipeline`. A forward waits for the previous chunk's forward of its micro-batch (+ p2p),
a backward for the next chunk's backward (+ p2p) or, on the last chunk, its own forward.

Micro-batch ``j`` of direction ``d`` is micro-batch ``d * m/2 + j`` of the step's arrays (routing samples).
The reference's published bubble, ``(p/2 - 1)(F&B + B - 3W)``, is tested on uniform stages.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from moesim.train.spec import TrainError
from moesim.train.timeline import Timeline, list_schedule, max_live


def rank_order(r: int, p: int, m: int) -> list[tuple]:
    """Operations of rank ``r`` in order: ("F", d, j), ("B", d, j, deferred), ("W", d, j) or
    ("FB", (d_f, j_f), (d_b, j_b)) with d the direction and j the micro-batch within it."""
    half, hr, hm = p // 2, min(r, p - 1 - r), m // 2
    second = int(r >= half)
    nf, nb, queue, out = [0, 0], [0, 0], deque(), []

    def f(phase):
        d = phase ^ second
        nf[d] += 1
        return ("F", d, nf[d] - 1)

    def b(phase, deferred=False):
        d = phase ^ second
        nb[d] += 1
        if deferred:
            queue.append((d, nb[d] - 1))
        return ("B", d, nb[d] - 1, deferred)

    def w():
        return ("W", *queue.popleft())

    def fb(pf, pb):
        op_f, op_b = f(pf), b(pb)
        return ("FB", op_f[1:], op_b[1:3])

    out += [f(0) for _ in range((half - hr - 1) * 2)]
    for _ in range(hr + 1):
        out += [f(0), f(1)]
    for _ in range(half - hr - 1):
        out += [b(1, True), w(), f(1)]
    for i in range(hm - p + hr + 1):
        out += [f(0), b(1)] if i == 0 and hr == half - 1 else [fb(0, 1)]
        out.append(fb(1, 0))
    for _ in range(half - hr - 1):
        out += [b(1), fb(1, 0)]
    deferred = False
    for i in range(hr + 1):
        deferred = deferred or (i == (hr + 1) // 2 and hr % 2 == 1)
        out.append(b(1, deferred))
        deferred = deferred or (i == (hr + 1) // 2 and hr % 2 == 0)
        out.append(b(0, deferred))
    for _ in range(half - hr - 1):
        out += [w(), b(0, True)]
    out += [w() for _ in range(hr + 1)]
    return out


def _check(p: int, m: int) -> None:
    if p % 2 or p < 2:
        raise TrainError(f"--schedule dualpipe needs an even --pp >= 2, got {p}")
    if m % 2 or m < 2 * p:
        raise TrainError(f"--schedule dualpipe needs an even number of micro-batches >= 2 x pp = {2 * p}, got {m}")


def run_dualpipe(fwd_s: np.ndarray, bwd_s: np.ndarray, p2p_s: float, p: int, fwd_comm_s: np.ndarray | None = None,
                 bwd_comm_s: np.ndarray | None = None, wgt_s: np.ndarray | None = None) -> Timeline:
    """Timeline of the bidirectional schedule (module docstring); arrays are [p, m] seconds, ``wgt_s`` the weight
    gradients inside ``bwd_s`` (None: 0, nothing to defer)."""
    m = fwd_s.shape[1]
    _check(p, m)
    zero = np.zeros_like(fwd_s)
    costs = (fwd_s, bwd_s, zero if wgt_s is None else wgt_s, zero if fwd_comm_s is None else fwd_comm_s,
             zero if bwd_comm_s is None else bwd_comm_s)
    orders = [rank_order(r, p, m) for r in range(p)]
    slots, free, busy = list_schedule(
        orders, lambda op, r, done: _ready(op, r, p, m, done, p2p_s), lambda op, r: _cost(op, r, p, m, costs),
        lambda op, r: _keys(op, r, p), lambda op, r: _slot_ids(op, r, p, m),
        f"pipeline schedule 'dualpipe' deadlocked (p={p}, m={m})")
    return Timeline(tuple(slots), max(free), busy, np.array([max_live(o, _parts) for o in orders]))


def _chunk(d: int, r: int, p: int) -> int:
    """The model chunk rank ``r`` runs for direction ``d``."""
    return r if d == 0 else p - 1 - r


def _parts(op) -> list[tuple]:
    """("F"|"B"|"W", d, j) parts of an operation (an FB pair has two)."""
    if op[0] == "FB":
        return [("F", *op[1]), ("B", *op[2])]
    return [op[:3]]


def _keys(op, r: int, p: int) -> list[tuple]:
    return [(what, d, _chunk(d, r, p), j) for what, d, j in _parts(op)]


def _ready(op, r: int, p: int, m: int, done: dict, p2p_s: float) -> float | None:
    """When every input of ``op`` has arrived, or None while one is missing."""
    at = 0.0
    for what, d, j in _parts(op):
        k = _chunk(d, r, p)
        if what == "F" and k > 0:
            dep, hop = ("F", d, k - 1, j), p2p_s
        elif what == "B":
            dep, hop = (("B", d, k + 1, j), p2p_s) if k < p - 1 else (("F", d, k, j), 0.0)
        elif what == "W":
            dep, hop = ("B", d, k, j), 0.0
        else:
            continue
        if dep not in done:
            return None
        at = max(at, done[dep] + hop)
    return at


def _cost(op, r: int, p: int, m: int, costs) -> float:
    fwd, bwd, wgt, fcomm, bcomm = costs

    def at(a, d, j):
        return float(a[_chunk(d, r, p), d * (m // 2) + j])

    if op[0] == "F":
        return at(fwd, op[1], op[2])
    if op[0] == "B":
        return at(bwd, op[1], op[2]) - (at(wgt, op[1], op[2]) if op[3] else 0.0)
    if op[0] == "W":
        return at(wgt, op[1], op[2])
    (df, jf), (db, jb) = op[1], op[2]
    f, b, fm, bm = at(fwd, df, jf), at(bwd, db, jb), at(fcomm, df, jf), at(bcomm, db, jb)
    return f + b - min(f - fm + b - bm, fm + bm)


def _slot_ids(op, r: int, p: int, m: int) -> tuple:
    """(chunk, micro-batch) of a timeline slot; an FB pair gives its backward's."""
    d, j = op[2] if op[0] == "FB" else op[1:3]
    return _chunk(d, r, p), d * (m // 2) + j
