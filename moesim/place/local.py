"""Swap local search on the (robust) balance objective: improves the greedy warm start before CP-SAT.

Objective of one layer: ``sum_s max_d load[s, d]`` over the nominal load and the bootstrap
scenarios (s), where ``load[s, d]`` sums the shares of the copies on GPU d. A move swaps two copies
on different GPUs (an empty slot is a copy of share 0, so moving a copy to a free slot is a swap
too); a copy never joins a GPU that already holds its expert. Best-improvement per hot copy, until
no swap improves or the deadline passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


IMPROVE_TOL = 1e-9  # a swap must lower the objective by more than float noise (so the search ends)


@dataclass
class _Copies:
    """The search state: copy i (an expert's copy, or -1 for an empty slot) sits on GPU dev[i] with
    per-scenario share w[i] [S]; has [E, D] marks GPUs holding an expert; load [S, D] sums the shares."""

    expert: np.ndarray
    dev: np.ndarray
    w: np.ndarray
    has: np.ndarray
    load: np.ndarray


def improve_layer(assign: np.ndarray, shares: np.ndarray, slots_per_device: int, deadline_s: float,
                  max_swaps: int | None = None) -> np.ndarray:
    """assign [E, D] 0/1, shares [S, E] (tokens per copy of each expert, per scenario).
    Stops after ``deadline_s`` seconds or ``max_swaps`` swaps (the latter makes it deterministic).
    Returns an assignment [E, D] with the same copies per expert and an objective <= the input's."""
    e_count, d_count = assign.shape
    if d_count < 2:
        return assign.copy()
    s_count = shares.shape[0]
    ce, cd = np.nonzero(assign)  # copies: expert, device
    free = slots_per_device - assign.sum(axis=0)
    pad_d = np.repeat(np.arange(d_count), free)
    expert = np.concatenate([ce, np.full(len(pad_d), -1)]).astype(np.int64)
    dev = np.concatenate([cd, pad_d]).astype(np.int64)
    w = np.concatenate([shares[:, ce].T, np.zeros((len(pad_d), s_count))]).astype(float)  # [C, S]
    load = np.zeros((s_count, d_count))
    np.add.at(load.T, dev, w)
    st = _Copies(expert=expert, dev=dev, w=w, has=assign.astype(bool).copy(), load=load)
    t_end = time.perf_counter() + deadline_s
    swaps = 0
    while time.perf_counter() < t_end and (max_swaps is None or swaps < max_swaps):
        if not _swap_once(st, t_end):
            break
        swaps += 1
    out = np.zeros_like(assign)
    real = st.expert >= 0
    out[st.expert[real], st.dev[real]] = 1
    return out


def _swap_once(st: _Copies, t_end: float) -> bool:
    """Best-improvement swap for the heaviest copy of the hottest GPU that has one; False when none improves."""
    load, d_count = st.load, st.load.shape[1]
    f = load.max(axis=1).sum()
    hot = np.bincount(load.argmax(axis=1), minlength=d_count).argmax()
    cands = np.flatnonzero((st.dev == hot) & (st.expert >= 0))
    cands = cands[np.argsort(-st.w[cands].sum(axis=1))]
    for i in cands:
        j, new_f = _swap_objectives(st, i)
        if j.size == 0:
            continue
        k = int(np.argmin(new_f))
        if new_f[k] < f - IMPROVE_TOL:
            _apply_swap(st, i, j[k])
            return True
        if time.perf_counter() >= t_end:
            break
    return False


def _swap_objectives(st: _Copies, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Copies j that copy i may swap with, and the objective after each swap [J]."""
    expert, dev, w, has, load = st.expert, st.dev, st.w, st.has, st.load
    s_count, d_count = load.shape
    a = dev[i]
    ei = expert[i]
    ok = (dev != a) & ~has[ei, dev] if ei >= 0 else (dev != a)
    ej = expert
    ok &= np.where(ej >= 0, ~has[np.maximum(ej, 0), a], True)
    j = np.flatnonzero(ok)
    if j.size == 0:
        return j, np.zeros(0)
    b = dev[j]
    delta = w[j] - w[i]  # [J, S]
    new_a = load[:, a][None, :] + delta
    new_b = load[:, b].T - delta
    ex = load.copy()
    ex[:, a] = -np.inf
    rows = np.arange(s_count)
    order = np.argsort(-ex, axis=1)[:, :2]  # top-2 devices per scenario, excluding a
    top1, top2 = ex[rows, order[:, 0]], ex[rows, order[:, 1]] if d_count > 2 else np.full(s_count, -np.inf)
    rest = np.where(order[None, :, 0] == b[:, None], top2[None, :], top1[None, :])  # [J, S]
    return j, np.maximum(np.maximum(new_a, new_b), rest).sum(axis=1)


def _apply_swap(st: _Copies, i: int, jj: int) -> None:
    a, bb = st.dev[i], st.dev[jj]
    ei = st.expert[i]
    st.load[:, a] += st.w[jj] - st.w[i]
    st.load[:, bb] += st.w[i] - st.w[jj]
    if ei >= 0:
        st.has[ei, a], st.has[ei, bb] = False, True
    if st.expert[jj] >= 0:
        st.has[st.expert[jj], bb], st.has[st.expert[jj], a] = False, True
    st.dev[i], st.dev[jj] = bb, a
