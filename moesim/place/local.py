"""Swap local search on the (robust) balance objective: improves the greedy warm start before CP-SAT.

Objective of one layer: ``sum_s max_d load[s, d]`` over the nominal load and the bootstrap
scenarios (s), where ``load[s, d]`` sums the shares of the copies on GPU d. A move swaps two copies
on different GPUs (an empty slot is a copy of share 0, so moving a copy to a free slot is a swap
too); a copy never joins a GPU that already holds its expert. Best-improvement per hot copy, until
no swap improves or the deadline passes.
"""

from __future__ import annotations

import time

import numpy as np


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
    has = assign.astype(bool).copy()
    load = np.zeros((s_count, d_count))
    np.add.at(load.T, dev, w)
    t_end = time.perf_counter() + deadline_s
    rows = np.arange(s_count)
    swaps = 0
    while time.perf_counter() < t_end and (max_swaps is None or swaps < max_swaps):
        f = load.max(axis=1).sum()
        hot = np.bincount(load.argmax(axis=1), minlength=d_count).argmax()
        cands = np.flatnonzero((dev == hot) & (expert >= 0))
        cands = cands[np.argsort(-w[cands].sum(axis=1))]
        improved = False
        for i in cands:
            a = dev[i]
            ei = expert[i]
            ok = (dev != a) & ~has[ei, dev] if ei >= 0 else (dev != a)
            ej = expert
            ok &= np.where(ej >= 0, ~has[np.maximum(ej, 0), a], True)
            j = np.flatnonzero(ok)
            if j.size == 0:
                continue
            b = dev[j]
            delta = w[j] - w[i]  # [J, S]
            new_a = load[:, a][None, :] + delta
            new_b = load[:, b].T - delta
            ex = load.copy()
            ex[:, a] = -np.inf
            order = np.argsort(-ex, axis=1)[:, :2]  # top-2 devices per scenario, excluding a
            top1, top2 = ex[rows, order[:, 0]], ex[rows, order[:, 1]] if d_count > 2 else np.full(s_count, -np.inf)
            rest = np.where(order[None, :, 0] == b[:, None], top2[None, :], top1[None, :])  # [J, S]
            new_f = np.maximum(np.maximum(new_a, new_b), rest).sum(axis=1)
            k = int(np.argmin(new_f))
            if new_f[k] < f - 1e-9:
                jj = j[k]
                bb = dev[jj]
                load[:, a] += w[jj] - w[i]
                load[:, bb] += w[i] - w[jj]
                if ei >= 0:
                    has[ei, a], has[ei, bb] = False, True
                if expert[jj] >= 0:
                    has[expert[jj], bb], has[expert[jj], a] = False, True
                dev[i], dev[jj] = bb, a
                improved = True
                swaps += 1
                break
            if time.perf_counter() >= t_end:
                break
        if not improved:
            break
    out = np.zeros_like(assign)
    real = expert >= 0
    out[expert[real], dev[real]] = 1
    return out
