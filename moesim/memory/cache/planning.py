"""Planning: replay an access stream through a cache of ``capacity`` experts under a policy.

:func:`plan` records, per access, hit or miss, and per group (batch, layer) the keys prefetched at its
start. A fetch (demand miss or prefetch) always brings one expert into the cache; the cache never
holds more than ``capacity`` experts (evicting first). Timing is separate
(:mod:`moesim.memory.cache.timed`), so every policy is judged on the same logical decisions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.memory.cache.policies import CACHE_POLICIES, CachePolicy
from moesim.memory.cache.stream import AccessStream
from moesim.memory.tiers import MemoryError_

#: the seed of a policy's random choices when the caller gives no ``rng``
DEFAULT_POLICY_SEED = 0


@dataclass(frozen=True, eq=False)
class CachePlan:
    """What a policy decided. hit [N] bool: access found its expert resident (fetched earlier, maybe by a
    prefetch still in flight in the timed replay); prefetched: per group, keys fetched at its start;
    fetches: demand misses + prefetches; max_resident: the most experts ever resident."""

    policy: str
    capacity: int
    hit: np.ndarray
    prefetched: list
    fetches: int
    prefetches: int
    useful_prefetches: int
    max_resident: int

    @property
    def hits(self) -> int:
        return int(self.hit.sum())

    @property
    def hit_rate(self) -> float:
        return float(self.hit.mean()) if len(self.hit) else 1.0


class _Cache:
    """The resident set of one planning run and its counters."""

    def __init__(self, pol: CachePolicy, capacity: int):
        self.pol, self.capacity = pol, capacity
        self.resident: set[int] = set()
        self.unused_prefetch: set[int] = set()
        self.fetches = self.prefetches = self.useful = self.max_resident = 0

    def warm(self, keys: np.ndarray) -> None:
        """Start with the first ``capacity`` distinct keys resident."""
        for k in dict.fromkeys(int(x) for x in keys):
            if len(self.resident) >= self.capacity:
                break
            self.resident.add(k)
            self.pol.inserted(k)

    def insert(self, k: int, protect: set[int], i: int) -> None:
        while len(self.resident) >= self.capacity:
            v = self.pol.victim(self.resident, protect, i)
            self.resident.discard(v)
            self.unused_prefetch.discard(v)
        self.resident.add(k)
        self.pol.inserted(k)

    def prefetch(self, predicted: list[int], current: set[int], i: int) -> list[int]:
        """Fetch the predicted keys not resident, as far as room allows; returns the keys fetched."""
        for k in predicted:
            if k in self.resident:
                self.pol.inserted(k)  # predicted and already resident: refresh it so it is not evicted first
        want = [k for k in predicted if k not in self.resident]
        done: list[int] = []
        if not want:
            return done
        room = self.capacity - len(current & self.resident) - len(current - self.resident)
        protect = set(current)
        for k in want[:max(room, 0)]:
            protect.add(k)
            if len(self.resident) >= self.capacity and not (self.resident - protect):
                break
            self.insert(k, protect, i)
            done.append(k)
            self.unused_prefetch.add(k)
            self.fetches += 1
            self.prefetches += 1
        return done

    def access(self, k: int, i: int) -> bool:
        """Access key ``k`` (access index ``i``): True on a hit, else fetch it."""
        if k in self.resident:
            if k in self.unused_prefetch:
                self.useful += 1
                self.unused_prefetch.discard(k)
            return True
        self.insert(k, {k}, i)
        self.fetches += 1
        return False


def plan(stream: AccessStream, capacity: int, policy: str = "lru", *, warm: bool = False,
         rng: np.random.Generator | None = None, **params) -> CachePlan:
    """Replay ``stream`` through a cache of ``capacity`` experts under ``policy`` (a key of
    :data:`CACHE_POLICIES`); ``rng`` (default ``default_rng(DEFAULT_POLICY_SEED)``) and ``params`` go to
    the policy. ``warm=True`` starts with the first ``capacity`` distinct keys resident (default: cold)."""
    if policy not in CACHE_POLICIES:
        raise MemoryError_(f"unknown cache policy {policy!r}; known: {sorted(CACHE_POLICIES)}")
    if isinstance(capacity, bool) or int(capacity) != capacity or capacity < 1:
        raise MemoryError_(f"cache capacity must be a positive whole number of experts, got {capacity!r}")
    rng = rng if rng is not None else np.random.default_rng(DEFAULT_POLICY_SEED)
    pol = CACHE_POLICIES[policy](stream, rng=rng, **params)
    cache = _Cache(pol, int(capacity))
    keys = stream.keys
    hit = np.zeros(len(keys), dtype=bool)
    prefetched: list[list[int]] = [[] for _ in range(stream.num_groups)]
    if warm:
        cache.warm(keys)
    cache.max_resident = len(cache.resident)
    for g in range(stream.num_groups):
        a, b = int(stream.group_start[g]), int(stream.group_start[g + 1])
        current = set(int(k) for k in keys[a:b])
        prefetched[g] = cache.prefetch(list(dict.fromkeys(pol.prefetch(g))), current, a)
        cache.max_resident = max(cache.max_resident, len(cache.resident))
        for i in range(a, b):
            hit[i] = cache.access(int(keys[i]), i)
            pol.touch(i)
            cache.max_resident = max(cache.max_resident, len(cache.resident))
    return CachePlan(policy=policy, capacity=int(capacity), hit=hit, prefetched=prefetched, fetches=cache.fetches,
                     prefetches=cache.prefetches, useful_prefetches=cache.useful, max_resident=cache.max_resident)


def no_cache_plan(stream: AccessStream, policy: str) -> CachePlan:
    """The plan of a cache of 0 experts: every access misses."""
    return CachePlan(policy=policy, capacity=0, hit=np.zeros(len(stream), dtype=bool),
                     prefetched=[[] for _ in range(stream.num_groups)], fetches=len(stream), prefetches=0,
                     useful_prefetches=0, max_resident=0)


def first_use_plan(stream: AccessStream, capacity: int, policy: str) -> CachePlan:
    """The plan of a demand policy when the cache holds every key of ``stream``: each key misses on its
    first access only (same result as :func:`plan`, without the per-access loop)."""
    distinct = len(np.unique(stream.keys))
    if capacity < distinct:
        raise MemoryError_(f"first_use_plan needs capacity >= {distinct} distinct keys, got {capacity}")
    hit = np.ones(len(stream), dtype=bool)
    _, first = np.unique(stream.keys, return_index=True)
    hit[first] = False
    return CachePlan(policy=policy, capacity=int(capacity), hit=hit, prefetched=[[] for _ in range(stream.num_groups)],
                     fetches=distinct, prefetches=0, useful_prefetches=0, max_resident=distinct)


def plan_exact(stream: AccessStream, capacity: int, policy: str, *, seed: int, **params) -> CachePlan:
    """:func:`plan` with ``rng = default_rng(seed)``, and two exact shortcuts: capacity 0 -> every access
    misses; a demand policy (``prefetching`` False) with a cache holding every key -> :func:`first_use_plan`."""
    if policy not in CACHE_POLICIES:
        raise MemoryError_(f"unknown cache policy {policy!r}; known: {sorted(CACHE_POLICIES)}")
    if capacity < 1:
        return no_cache_plan(stream, policy)
    if not CACHE_POLICIES[policy].prefetching and capacity >= len(np.unique(stream.keys)):
        return first_use_plan(stream, capacity, policy)
    return plan(stream, capacity, policy, rng=np.random.default_rng(seed), **params)


def from_group(stream: AccessStream, cache_plan: CachePlan, first_group: int) -> tuple[AccessStream, CachePlan]:
    """Stream and plan from group ``first_group`` on (drop a warm-up): hits keep the plan's decisions
    (an access that hit is resident in the timed replay), groups are renumbered from 0.
    ``num_tokens`` counts the batches kept x the stream's tokens per batch (rounded)."""
    g_count = stream.num_groups
    if not 0 <= first_group <= g_count:
        raise MemoryError_(f"first_group must lie in 0..{g_count}, got {first_group}")
    a = int(stream.group_start[first_group])
    batches = int(stream.group_batch[-1]) + 1 if g_count else 0
    first_batch = int(stream.group_batch[first_group]) if first_group < g_count else batches
    sub = AccessStream(keys=stream.keys[a:], group=stream.group[a:] - first_group, tokens=stream.tokens[a:],
                       group_batch=stream.group_batch[first_group:] - (first_batch if first_group < g_count else 0),
                       group_layer=stream.group_layer[first_group:], num_experts=stream.num_experts,
                       num_layers=stream.num_layers,
                       num_tokens=int(round(stream.num_tokens * (batches - first_batch) / batches)) if batches else 0)
    hit = cache_plan.hit[a:]
    pre = cache_plan.prefetched[first_group:]
    n_pre = sum(len(p) for p in pre)
    sub_plan = CachePlan(policy=cache_plan.policy, capacity=cache_plan.capacity, hit=hit, prefetched=pre,
                         fetches=int((~hit).sum()) + n_pre, prefetches=n_pre, useful_prefetches=0,
                         max_resident=cache_plan.max_resident)
    return sub, sub_plan
