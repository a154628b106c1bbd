"""Expert-cache policies: one typed protocol, one dict (:data:`CACHE_POLICIES`).

A policy is a class built as ``CACHE_POLICIES[name](stream, rng=rng, **params)`` (the
:class:`CachePolicyFactory` signature: every policy gets the same keywords and ignores those it does
not use) whose instances follow :class:`CachePolicy`. Adding a policy is one edit: write the class and
name it in :data:`CACHE_POLICIES`.

Belady (furthest next use) uses the future and is the upper bound on hits for demand caching and the
lower bound on fetches for every policy, prefetching ones included.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Any, ClassVar, Protocol

import numpy as np

from moesim.memory.cache.stream import AccessStream
from moesim.memory.tiers import MemoryError_
from workloads.trace import Trace

ALL_PROTECTED = "cache: every resident expert is protected; capacity too small"


class CachePolicy(Protocol):
    """What :func:`moesim.memory.cache.plan` asks a policy. Keys are ``layer * num_experts + expert``."""

    #: False when :meth:`prefetch` always returns [] (demand caching: a cache holding every key of a
    #: stream then misses on first use only, which the planner computes without the per-access loop)
    prefetching: ClassVar[bool]

    def touch(self, i: int) -> None:
        """Access ``i`` of the stream happened (its key is ``stream.keys[i]``)."""

    def inserted(self, key: int) -> None:
        """``key`` became resident (fetched or warm-started), or was predicted while already resident."""

    def victim(self, resident: set[int], protect: set[int], i: int) -> int:
        """The resident key to evict, never one in ``protect``, before access ``i``."""

    def prefetch(self, group: int) -> list[int]:
        """Keys to fetch at the start of ``group`` (may be [])."""


class CachePolicyFactory(Protocol):
    def __call__(self, stream: AccessStream, *, rng: np.random.Generator, **params: Any) -> CachePolicy:
        """A fresh policy for ``stream``; ``rng`` feeds every random choice; unused params are ignored."""


class LRU:
    """Evict the least recently used resident expert."""

    prefetching: ClassVar[bool] = False

    def __init__(self, stream: AccessStream, **_: Any):
        self.stream = stream
        self.order: OrderedDict[int, None] = OrderedDict()

    def touch(self, i: int) -> None:
        self.inserted(int(self.stream.keys[i]))

    def inserted(self, key: int) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def victim(self, resident: set[int], protect: set[int], i: int) -> int:
        stale, found = [], None
        for k in self.order:
            if k not in resident:
                stale.append(k)  # evicted earlier; drop from the recency order
            elif k not in protect:
                found = k
                break
        for k in stale:
            del self.order[k]
        if found is not None:
            return found
        for k in resident:  # resident but never touched (should not happen)
            if k not in protect:
                return k
        raise MemoryError_(ALL_PROTECTED)

    def prefetch(self, group: int) -> list[int]:
        return []


def _pop_victim(heap: list[tuple], is_current, resident: set[int], protect: set[int]) -> int | None:
    """Smallest current, resident, unprotected entry of a lazy-deletion heap (key last in each entry);
    stale or evicted entries are dropped, protected ones kept. None when there is none."""
    skipped = []
    try:
        while heap:
            item = heapq.heappop(heap)
            k = item[-1]
            if not is_current(item) or k not in resident:
                continue  # stale, or evicted (a fresh entry is pushed when it comes back)
            if k not in protect:
                heapq.heappush(heap, item)
                return k
            skipped.append(item)
    finally:
        for item in skipped:
            heapq.heappush(heap, item)
    return None


class LFU:
    """Evict the resident expert with the fewest accesses so far (ties: least recently used)."""

    prefetching: ClassVar[bool] = False

    def __init__(self, stream: AccessStream, **_: Any):
        self.stream = stream
        self.count: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.heap: list[tuple[int, int, int]] = []

    def touch(self, i: int) -> None:
        k = int(self.stream.keys[i])
        self.count[k] = self.count.get(k, 0) + 1
        self.last[k] = i
        heapq.heappush(self.heap, (self.count[k], i, k))

    def inserted(self, key: int) -> None:
        if key not in self.count:
            self.count[key], self.last[key] = 0, -1
        heapq.heappush(self.heap, (self.count[key], self.last[key], key))

    def victim(self, resident: set[int], protect: set[int], i: int) -> int:
        def current(item):
            c, last, k = item
            return self.count.get(k) == c and self.last.get(k) == last

        k = _pop_victim(self.heap, current, resident, protect)
        if k is not None:
            return k
        cand = [k for k in resident if k not in protect]
        if not cand:
            raise MemoryError_(ALL_PROTECTED)
        return min(cand, key=lambda k: (self.count.get(k, 0), self.last.get(k, -1)))

    def prefetch(self, group: int) -> list[int]:
        return []


class Belady:
    """Belady's MIN: evict the resident expert whose next use is furthest in the future (or never)."""

    prefetching: ClassVar[bool] = False

    def __init__(self, stream: AccessStream, **_: Any):
        keys = stream.keys
        self.stream = stream
        n = len(keys)
        nxt = np.full(n, n, dtype=np.int64)  # next index with the same key (n = never)
        last: dict[int, int] = {}
        for i in range(n - 1, -1, -1):
            k = int(keys[i])
            nxt[i] = last.get(k, n + 1 + k)  # distinct "never" values keep the choice deterministic
            last[k] = i
        self.next_use = nxt
        self.first_use = last
        self.cur: dict[int, int] = {}
        self.heap: list[tuple[int, int]] = []

    def _set(self, k: int, when: int) -> None:
        self.cur[k] = when
        heapq.heappush(self.heap, (-when, k))

    def touch(self, i: int) -> None:
        self._set(int(self.stream.keys[i]), int(self.next_use[i]))

    def inserted(self, key: int) -> None:
        if key not in self.cur:
            n = len(self.stream.keys)
            self._set(key, self.first_use.get(key, n + 1 + key))
        else:
            heapq.heappush(self.heap, (-self.cur[key], key))

    def victim(self, resident: set[int], protect: set[int], i: int) -> int:
        k = _pop_victim(self.heap, lambda item: self.cur.get(item[1]) == -item[0], resident, protect)
        if k is None:
            raise MemoryError_(ALL_PROTECTED)
        return k

    def prefetch(self, group: int) -> list[int]:
        return []


def _check_lookahead(lookahead: int) -> None:
    if lookahead < 1:
        raise MemoryError_(f"lookahead must be >= 1 layer, got {lookahead}")


class PreGating(LRU):
    """Pre-gating prefetch (Pre-gated MoE style) on top of LRU eviction.

    At the start of group (batch b, layer l) it prefetches its prediction of the experts that group
    (b, l + lookahead) will use. ``accuracy`` in [0, 1]: each true expert is predicted with that
    probability, otherwise a uniformly drawn expert that the layer does not use is predicted instead
    (so the prediction has the true size), drawn from ``rng``.
    """

    prefetching: ClassVar[bool] = True

    def __init__(self, stream: AccessStream, *, rng: np.random.Generator, lookahead: int = 1,
                 accuracy: float = 1.0, **_: Any):
        super().__init__(stream)
        _check_lookahead(lookahead)
        if not 0.0 <= accuracy <= 1.0:
            raise MemoryError_(f"accuracy must lie in [0, 1], got {accuracy}")
        self.lookahead, self.accuracy, self.rng = lookahead, accuracy, rng

    def prefetch(self, group: int) -> list[int]:
        s = self.stream
        t = s.group_of(int(s.group_batch[group]), int(s.group_layer[group]) + self.lookahead)
        if t is None:
            return []
        true = s.group_keys(t)
        if self.accuracy >= 1.0 or len(true) == 0:
            return [int(k) for k in true]
        layer = int(s.group_layer[t])
        keep = self.rng.random(len(true)) < self.accuracy
        out = [int(k) for k in true[keep]]
        others = np.setdiff1d(np.arange(s.num_experts) + layer * s.num_experts, true)
        n_wrong = int((~keep).sum())
        if n_wrong and len(others):
            out += [int(k) for k in self.rng.choice(others, size=min(n_wrong, len(others)), replace=False)]
        return out


class AffinityPrefetch(LRU):
    """Prefetch learned from the trace's inter-layer affinity, on top of LRU eviction.

    ``affinity[l, e, e']`` counts tokens that chose expert e at layer l and e' at layer l + lookahead
    in the *training* tokens (``train`` trace, default: the replayed stream itself; pass disjoint
    tokens for an honest estimate). At the start of group (b, l), the experts of group (b, l) vote
    with their affinity rows; the ``width`` best experts of layer l + lookahead are prefetched
    (``width`` defaults to the size of the current group).
    """

    prefetching: ClassVar[bool] = True

    def __init__(self, stream: AccessStream, *, lookahead: int = 1, train: Trace | None = None,
                 width: int | None = None, **_: Any):
        super().__init__(stream)
        _check_lookahead(lookahead)
        self.lookahead, self.width = lookahead, width
        self.affinity = learn_affinity(train, stream.num_layers, stream.num_experts, lookahead) if train is not None \
            else _affinity_from_stream(stream, lookahead)

    def prefetch(self, group: int) -> list[int]:
        s = self.stream
        layer = int(s.group_layer[group])
        t_layer = layer + self.lookahead
        if t_layer >= s.num_layers:
            return []
        cur = s.group_keys(group) - layer * s.num_experts
        if len(cur) == 0:
            return []
        score = self.affinity[layer][cur].sum(axis=0)
        best = np.argsort(-score, kind="stable")[:self.width or len(cur)]
        best = best[score[best] > 0]
        return [int(t_layer * s.num_experts + e) for e in best]


def learn_affinity(trace: Trace, num_layers: int, num_experts: int, lookahead: int = 1) -> np.ndarray:
    """[L, E, E] counts: tokens choosing expert e at layer l and e' at layer l + lookahead."""
    ids, _ = trace.dense()  # [T, L, K]
    aff = np.zeros((num_layers, num_experts, num_experts), dtype=np.float64)
    for layer in range(num_layers - lookahead):
        a, b = ids[:, layer, :], ids[:, layer + lookahead, :]
        src = np.repeat(a, b.shape[1], axis=1).ravel()
        dst = np.tile(b, (1, a.shape[1])).ravel()
        np.add.at(aff[layer], (src, dst), 1.0)
    return aff


def _affinity_from_stream(stream: AccessStream, lookahead: int) -> np.ndarray:
    """Batch-level affinity from the stream itself (co-occurrence of experts in (b, l) and (b, l+N))."""
    e_count = stream.num_experts
    aff = np.zeros((stream.num_layers, e_count, e_count))
    for g in range(stream.num_groups):
        t = stream.group_of(int(stream.group_batch[g]), int(stream.group_layer[g]) + lookahead)
        if t is None:
            continue
        layer = int(stream.group_layer[g])
        a = stream.group_keys(g) - layer * e_count
        b = stream.group_keys(t) - (layer + lookahead) * e_count
        aff[layer][np.ix_(a, b)] += 1.0
    return aff


#: cache policies by name; each is a :class:`CachePolicyFactory`
CACHE_POLICIES: dict[str, CachePolicyFactory] = {
    "lru": LRU, "lfu": LFU, "pregate": PreGating, "affinity": AffinityPrefetch, "belady": Belady}
