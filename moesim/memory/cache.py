"""Expert caching inside one MoE model: HBM holds a subset of experts, the rest live in a lower tier.

The access stream comes from a routing trace: tokens are cut into batches of ``batch_tokens``
consecutive tokens; for each batch, layers run in order and, inside a layer, the experts the batch
routes to are computed one after another (ascending expert id). One access = one (layer, expert)
weight set used by one batch. Keys are ``layer * num_experts + expert``.

Two stages, so every policy is judged on the same logical decisions and timing is separate:

1. :func:`plan` replays the stream through a cache of ``capacity`` experts under a policy and
   records, per access, hit or miss, and per group (batch, layer) the keys prefetched at its start.
   A fetch (demand miss or prefetch) always brings one expert into the cache; the cache never holds
   more than ``capacity`` experts (evicting first).
2. :func:`replay_timed` plays a plan in SimPy on a :class:`~moesim.memory.tiers.MemoryHierarchy`:
   fetches run over the shared lower-tier -> cache-tier link (prefetches overlap with compute),
   compute of an expert waits for its weights; stall time is the time compute waits for fetches.

Policies (one dict, :data:`CACHE_POLICIES`) are classes with one signature::

    policy = CACHE_POLICIES[name](stream, **params)
    policy.touch(i)                                  # access i happened (key stream.keys[i])
    policy.victim(resident, protect, i) -> key       # which resident key to evict
    policy.prefetch(group) -> list[int]              # keys to fetch at the start of group (may be [])

Belady (furthest next use) uses the future and is the upper bound on hits for demand caching and the
lower bound on fetches for every policy, prefetching ones included.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import simpy

from moesim.memory.tiers import MemoryError_, MemoryHierarchy, SimMemory
from workloads.trace import Trace


@dataclass(frozen=True, eq=False)
class AccessStream:
    """The expert accesses of a trace, in execution order.

    keys [N] int64: ``layer * num_experts + expert``; group [N] int64: index of the (batch, layer)
    group the access belongs to (non-decreasing); tokens [N] int64: tokens of the batch routed to the
    expert; group_batch [G], group_layer [G]: batch and layer of each group; num_experts, num_layers;
    num_tokens: tokens in the stream.
    """

    keys: np.ndarray
    group: np.ndarray
    tokens: np.ndarray
    group_batch: np.ndarray
    group_layer: np.ndarray
    num_experts: int
    num_layers: int
    num_tokens: int
    group_start: np.ndarray = field(default=None)  # [G + 1] first access index of each group

    def __post_init__(self):
        if self.group_start is None:
            g = len(self.group_batch)
            start = np.searchsorted(self.group, np.arange(g + 1), side="left")
            object.__setattr__(self, "group_start", start.astype(np.int64))

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_groups(self) -> int:
        return len(self.group_batch)

    def group_keys(self, g: int) -> np.ndarray:
        return self.keys[self.group_start[g]:self.group_start[g + 1]]

    def group_of(self, batch: int, layer: int) -> int | None:
        """Index of group (batch, layer) or None when it has no accesses / does not exist."""
        g = batch * self.num_layers + layer
        if 0 <= layer < self.num_layers and g < self.num_groups and self.group_batch[g] == batch:
            return g
        return None


def access_stream(trace: Trace, batch_tokens: int = 1, max_tokens: int | None = None) -> AccessStream:
    """Cut ``trace`` into batches of ``batch_tokens`` consecutive tokens (over steps in order) and list
    the expert accesses per (batch, layer). ``max_tokens`` keeps only the first tokens."""
    if batch_tokens < 1:
        raise MemoryError_(f"batch_tokens must be >= 1, got {batch_tokens}")
    c = trace.columns
    e_count, l_count = trace.meta.num_experts, trace.meta.num_layers
    step, token = c["step"].astype(np.int64), c["token"].astype(np.int64)
    span = int(token.max(initial=0)) + 1
    tok_key = step * span + token
    uniq, tok_idx = np.unique(tok_key, return_inverse=True)
    if max_tokens is not None:
        if max_tokens < 1:
            raise MemoryError_(f"max_tokens must be >= 1, got {max_tokens}")
        keep = tok_idx < max_tokens
        tok_idx = tok_idx[keep]
        layer, expert = c["layer"][keep].astype(np.int64), c["expert"][keep].astype(np.int64)
        n_tokens = min(max_tokens, len(uniq))
    else:
        layer, expert = c["layer"].astype(np.int64), c["expert"].astype(np.int64)
        n_tokens = len(uniq)
    if len(expert) and (expert.min() < 0 or expert.max() >= e_count):
        raise MemoryError_(f"trace routes to expert {int(expert.max())}, outside 0..{e_count - 1}")
    batch = tok_idx // batch_tokens
    n_batches = -(-n_tokens // batch_tokens)
    g = batch * l_count + layer
    counts = np.bincount(g * e_count + expert, minlength=n_batches * l_count * e_count)
    nz = np.flatnonzero(counts)  # sorted: by group, then expert
    group = nz // e_count
    ex = nz % e_count
    lay = group % l_count
    gb = np.repeat(np.arange(n_batches), l_count)
    gl = np.tile(np.arange(l_count), n_batches)
    return AccessStream(keys=(lay * e_count + ex).astype(np.int64), group=group.astype(np.int64),
                        tokens=counts[nz].astype(np.int64), group_batch=gb, group_layer=gl,
                        num_experts=e_count, num_layers=l_count, num_tokens=n_tokens)


def stream_from_keys(keys, group=None, num_experts: int | None = None) -> AccessStream:
    """A stream from a plain key sequence (tests, synthetic studies); one group per access by default."""
    keys = np.asarray(keys, dtype=np.int64)
    if keys.ndim != 1 or (len(keys) and keys.min() < 0):
        raise MemoryError_("keys must be a 1-D sequence of non-negative integers")
    group = np.arange(len(keys), dtype=np.int64) if group is None else np.asarray(group, dtype=np.int64)
    e = int(num_experts if num_experts is not None else (keys.max(initial=0) + 1))
    g_count = int(group.max(initial=-1)) + 1
    return AccessStream(keys=keys, group=group, tokens=np.ones(len(keys), dtype=np.int64),
                        group_batch=np.arange(g_count), group_layer=np.zeros(g_count, dtype=np.int64),
                        num_experts=e, num_layers=1, num_tokens=len(keys))


# ----------------------------------------------------------------------------- policies


class LRU:
    """Evict the least recently used resident expert."""

    def __init__(self, stream: AccessStream, **_):
        self.stream = stream
        self.order: OrderedDict[int, None] = OrderedDict()

    def touch(self, i: int) -> None:
        k = int(self.stream.keys[i])
        self.order[k] = None
        self.order.move_to_end(k)

    def inserted(self, key: int) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def victim(self, resident: set, protect: set, i: int) -> int:
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
        raise MemoryError_("cache: every resident expert is protected; capacity too small")

    def prefetch(self, group: int) -> list[int]:
        return []


class LFU:
    """Evict the resident expert with the fewest accesses so far (ties: least recently used)."""

    def __init__(self, stream: AccessStream, **_):
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

    def victim(self, resident: set, protect: set, i: int) -> int:
        skipped = []
        try:
            while self.heap:
                c, last, k = heapq.heappop(self.heap)
                if self.count.get(k) != c or self.last.get(k) != last or k not in resident:
                    continue  # stale entry, or evicted (a fresh entry is pushed when it comes back)
                if k not in protect:
                    heapq.heappush(self.heap, (c, last, k))
                    return k
                skipped.append((c, last, k))
        finally:
            for item in skipped:
                heapq.heappush(self.heap, item)
        cand = [k for k in resident if k not in protect]
        if not cand:
            raise MemoryError_("cache: every resident expert is protected; capacity too small")
        return min(cand, key=lambda k: (self.count.get(k, 0), self.last.get(k, -1)))

    def prefetch(self, group: int) -> list[int]:
        return []


class Belady:
    """Belady's MIN: evict the resident expert whose next use is furthest in the future (or never)."""

    def __init__(self, stream: AccessStream, **_):
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

    def victim(self, resident: set, protect: set, i: int) -> int:
        skipped = []
        try:
            while self.heap:
                neg, k = heapq.heappop(self.heap)
                if self.cur.get(k) != -neg or k not in resident:
                    continue  # stale, or evicted (re-pushed when it comes back)
                if k not in protect:
                    heapq.heappush(self.heap, (neg, k))
                    return k
                skipped.append((neg, k))
        finally:
            for item in skipped:
                heapq.heappush(self.heap, item)
        raise MemoryError_("cache: every resident expert is protected; capacity too small")

    def prefetch(self, group: int) -> list[int]:
        return []


class PreGating(LRU):
    """Pre-gating prefetch (Pre-gated MoE style) on top of LRU eviction.

    At the start of group (batch b, layer l) it prefetches its prediction of the experts that group
    (b, l + lookahead) will use. ``accuracy`` in [0, 1]: each true expert is predicted with that
    probability, otherwise a uniformly drawn expert that the layer does not use is predicted instead
    (so the prediction has the true size). ``rng``: a ``np.random.Generator``.
    """

    def __init__(self, stream: AccessStream, *, lookahead: int = 1, accuracy: float = 1.0,
                 rng: np.random.Generator | None = None, **_):
        super().__init__(stream)
        if lookahead < 1:
            raise MemoryError_(f"lookahead must be >= 1 layer, got {lookahead}")
        if not 0.0 <= accuracy <= 1.0:
            raise MemoryError_(f"accuracy must lie in [0, 1], got {accuracy}")
        self.lookahead, self.accuracy = lookahead, accuracy
        self.rng = rng if rng is not None else np.random.default_rng(0)

    def _target(self, group: int) -> int | None:
        s = self.stream
        return s.group_of(int(s.group_batch[group]), int(s.group_layer[group]) + self.lookahead)

    def prefetch(self, group: int) -> list[int]:
        t = self._target(group)
        if t is None:
            return []
        s = self.stream
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
    in the *training* tokens (``train`` stream, default: the replayed stream itself; pass a disjoint
    stream for an honest estimate). At the start of group (b, l), the experts of group (b, l) vote
    with their affinity rows; the ``width`` best experts of layer l + lookahead are prefetched
    (``width`` defaults to the size of the current group).
    """

    def __init__(self, stream: AccessStream, *, lookahead: int = 1, train: "Trace | None" = None,
                 width: int | None = None, **_):
        super().__init__(stream)
        if lookahead < 1:
            raise MemoryError_(f"lookahead must be >= 1 layer, got {lookahead}")
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
        width = self.width or len(cur)
        best = np.argsort(-score, kind="stable")[:width]
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


CACHE_POLICIES = {"lru": LRU, "lfu": LFU, "pregate": PreGating, "affinity": AffinityPrefetch, "belady": Belady}


# ----------------------------------------------------------------------------- planning


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


def plan(stream: AccessStream, capacity: int, policy: str = "lru", *, warm: bool = False, **params) -> CachePlan:
    """Replay ``stream`` through a cache of ``capacity`` experts under ``policy`` (a key of
    :data:`CACHE_POLICIES`); ``params`` go to the policy. ``warm=True`` starts with the first
    ``capacity`` distinct keys resident (default: cold, empty cache)."""
    if policy not in CACHE_POLICIES:
        raise MemoryError_(f"unknown cache policy {policy!r}; known: {sorted(CACHE_POLICIES)}")
    if isinstance(capacity, bool) or int(capacity) != capacity or capacity < 1:
        raise MemoryError_(f"cache capacity must be a positive whole number of experts, got {capacity!r}")
    capacity = int(capacity)
    pol = CACHE_POLICIES[policy](stream, **params)
    keys = stream.keys
    resident: set[int] = set()
    hit = np.zeros(len(keys), dtype=bool)
    prefetched: list[list[int]] = [[] for _ in range(stream.num_groups)]
    fetches = prefetches = useful = 0
    unused_prefetch: set[int] = set()
    max_res = 0
    if warm:
        for k in dict.fromkeys(int(x) for x in keys):
            if len(resident) >= capacity:
                break
            resident.add(k)
            pol.inserted(k)
    max_res = len(resident)

    def insert(k: int, protect: set, i: int) -> None:
        while len(resident) >= capacity:
            v = pol.victim(resident, protect, i)
            resident.discard(v)
            unused_prefetch.discard(v)
        resident.add(k)
        pol.inserted(k)

    for g in range(stream.num_groups):
        a, b = int(stream.group_start[g]), int(stream.group_start[g + 1])
        current = set(int(k) for k in keys[a:b])
        predicted = list(dict.fromkeys(pol.prefetch(g)))
        for k in predicted:
            if k in resident:
                pol.inserted(k)  # predicted and already resident: refresh it so it is not evicted first
        want = [k for k in predicted if k not in resident]
        if want:
            room = capacity - len(current & resident) - len(current - resident)
            protect = set(current)
            for k in want[:max(room, 0)]:
                protect.add(k)
                if len(resident) >= capacity and not (resident - protect):
                    break
                insert(k, protect, a)
                prefetched[g].append(k)
                unused_prefetch.add(k)
                fetches += 1
                prefetches += 1
        max_res = max(max_res, len(resident))
        for i in range(a, b):
            k = int(keys[i])
            if k in resident:
                hit[i] = True
                if k in unused_prefetch:
                    useful += 1
                    unused_prefetch.discard(k)
            else:
                insert(k, {k}, i)
                fetches += 1
            pol.touch(i)
            max_res = max(max_res, len(resident))
    return CachePlan(policy=policy, capacity=capacity, hit=hit, prefetched=prefetched, fetches=fetches,
                     prefetches=prefetches, useful_prefetches=useful, max_resident=max_res)


# ----------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class ExpertShape:
    """One expert's weight bytes and its FLOPs per routed token (SwiGLU: 3 matrices of hidden x inter)."""

    weight_bytes: float
    flops_per_token: float

    @classmethod
    def swiglu(cls, hidden_size: int, moe_intermediate_size: int, dtype_bytes: int = 2) -> "ExpertShape":
        return cls(weight_bytes=3.0 * hidden_size * moe_intermediate_size * dtype_bytes,
                   flops_per_token=2.0 * 3 * hidden_size * moe_intermediate_size)


@dataclass(frozen=True)
class TimedResult:
    """Timing of one replayed plan. bytes_by_path: bytes per ``src->dst`` tier pair (fetches into the
    cache tier and, on a three-tier device, weight streaming cache tier -> SRAM)."""

    policy: str
    total_time_s: float
    stall_s: float
    compute_s: float
    tokens_per_s: float
    hit_rate: float
    fetches: int
    prefetches: int
    useful_prefetches: int
    bytes_by_path: dict

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def cache_capacity_experts(hierarchy: MemoryHierarchy, cache_tier: str, expert: ExpertShape,
                           fraction: float = 1.0) -> int:
    """How many experts fit in ``fraction`` of ``cache_tier`` (raises when not even one fits)."""
    t = hierarchy.tier(cache_tier)
    hierarchy.check_fits(expert.weight_bytes, "one expert")
    n = int((t.capacity_bytes * fraction) // expert.weight_bytes)
    if n < 1:
        raise MemoryError_(f"tier {cache_tier!r} ({t.capacity_bytes / 1e9:.3g} GB x {fraction}) cannot hold one "
                           f"expert of {expert.weight_bytes / 1e6:.3g} MB")
    return n


def replay_timed(stream: AccessStream, cache_plan: CachePlan, hierarchy: MemoryHierarchy, expert: ExpertShape, *,
                 peak_flops_per_s: float, cache_tier: str = "hbm", backing_tier: str = "ddr",
                 stream_tier: str | None = "sram", overlap_transfers: bool = True,
                 other_s_per_layer: float = 0.0) -> TimedResult:
    """Play ``cache_plan`` in SimPy. Fetches move ``expert.weight_bytes`` from ``backing_tier`` to
    ``cache_tier`` over a shared (processor-sharing) link; computing an expert for n tokens takes
    ``max(n * flops_per_token / peak, weight streaming cache_tier -> stream_tier)`` (streaming through
    the shared cache-tier port when ``stream_tier`` exists in the hierarchy, else weight_bytes / cache
    bandwidth). ``overlap_transfers=False`` makes compute wait for every in-flight fetch first (no
    copy/compute overlap). ``other_s_per_layer``: non-expert time per (batch, layer) (attention etc.)."""
    if peak_flops_per_s <= 0:
        raise MemoryError_(f"peak_flops_per_s must be > 0, got {peak_flops_per_s}")
    hierarchy.tier(cache_tier), hierarchy.tier(backing_tier)
    hierarchy.check_fits(expert.weight_bytes, "one expert")
    if len(cache_plan.hit) != len(stream):
        raise MemoryError_("cache plan and stream have different lengths")
    env = simpy.Environment()
    mem = SimMemory(env, hierarchy)
    use_stream = stream_tier is not None and stream_tier in hierarchy.tiers and stream_tier != cache_tier
    cache_bw = hierarchy.tier(cache_tier).bandwidth_bytes_per_s
    ready: dict[int, simpy.Event] = {}
    inflight: list[simpy.Event] = []
    acc = {"stall": 0.0, "compute": 0.0}
    keys, tokens, hit = stream.keys, stream.tokens, cache_plan.hit

    def fetch(k: int) -> simpy.Event:
        ev = mem.transfer(expert.weight_bytes, backing_tier, cache_tier)
        ready[k] = ev
        inflight.append(ev)
        return ev

    def wait(ev):
        if not ev.triggered:
            t0 = env.now
            yield ev
            acc["stall"] += env.now - t0

    def main():
        for g in range(stream.num_groups):
            for k in cache_plan.prefetched[g]:
                fetch(k)
            if not overlap_transfers:
                pending = [e for e in inflight if not e.triggered]
                if pending:
                    yield from wait(env.all_of(pending))
            if other_s_per_layer > 0:
                yield env.timeout(other_s_per_layer)
            for i in range(int(stream.group_start[g]), int(stream.group_start[g + 1])):
                k = int(keys[i])
                ev = ready.get(k) if hit[i] else None
                if ev is None:
                    ev = ready[k] = fetch(k) if not hit[i] else env.timeout(0)
                yield from wait(ev)
                t0 = env.now
                flops_s = tokens[i] * expert.flops_per_token / peak_flops_per_s
                if use_stream:
                    yield env.all_of([env.timeout(flops_s), mem.transfer(expert.weight_bytes, cache_tier, stream_tier)])
                else:
                    yield env.timeout(max(flops_s, expert.weight_bytes / cache_bw))
                acc["compute"] += env.now - t0
            inflight[:] = [e for e in inflight if not e.triggered]

    env.process(main())
    env.run()
    total = float(env.now)
    return TimedResult(policy=cache_plan.policy, total_time_s=total, stall_s=acc["stall"], compute_s=acc["compute"],
                       tokens_per_s=stream.num_tokens / total if total > 0 else float("inf"),
                       hit_rate=cache_plan.hit_rate, fetches=cache_plan.fetches, prefetches=cache_plan.prefetches,
                       useful_prefetches=cache_plan.useful_prefetches, bytes_by_path=dict(mem.bytes_by_path))


# ----------------------------------------------------------------------------- sub-streams (studies)


def select_accesses(stream: AccessStream, keep: np.ndarray) -> AccessStream:
    """The accesses of ``stream`` where ``keep`` [N] bool is True (e.g. the experts one device holds);
    groups keep their indices (a group may become empty)."""
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (len(stream),):
        raise MemoryError_(f"keep mask has shape {keep.shape}, the stream has {len(stream)} accesses")
    return AccessStream(keys=stream.keys[keep], group=stream.group[keep], tokens=stream.tokens[keep],
                        group_batch=stream.group_batch, group_layer=stream.group_layer,
                        num_experts=stream.num_experts, num_layers=stream.num_layers, num_tokens=stream.num_tokens)


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


def from_group(stream: AccessStream, cache_plan: CachePlan, first_group: int) -> tuple[AccessStream, CachePlan]:
    """Stream and plan from group ``first_group`` on (drop a warm-up): hits keep the plan's decisions
    (an access that hit is resident in the timed replay), groups are renumbered from 0.
    ``num_tokens`` counts the batches kept x the stream's tokens per batch (rounded)."""
    g_count = stream.num_groups
    if not 0 <= first_group <= g_count:
        raise MemoryError_(f"first_group must lie in 0..{g_count}, got {first_group}")
    a = int(stream.group_start[first_group])
    batches = int(stream.group_batch[-1]) + 1 if g_count else 0
    kept_batches = batches - (int(stream.group_batch[first_group]) if first_group < g_count else batches)
    sub = AccessStream(keys=stream.keys[a:], group=stream.group[a:] - first_group, tokens=stream.tokens[a:],
                       group_batch=stream.group_batch[first_group:] - (stream.group_batch[first_group] if first_group < g_count else 0),
                       group_layer=stream.group_layer[first_group:], num_experts=stream.num_experts,
                       num_layers=stream.num_layers,
                       num_tokens=int(round(stream.num_tokens * kept_batches / batches)) if batches else 0)
    hit = cache_plan.hit[a:]
    pre = cache_plan.prefetched[first_group:]
    n_pre = sum(len(p) for p in pre)
    sub_plan = CachePlan(policy=cache_plan.policy, capacity=cache_plan.capacity, hit=hit, prefetched=pre,
                         fetches=int((~hit).sum()) + n_pre, prefetches=n_pre, useful_prefetches=0,
                         max_resident=cache_plan.max_resident)
    return sub, sub_plan
