"""Routed-expert weights cached in HBM during serving, fetched from the tier behind it on a miss.

Offloaded serving (``moesim serve --expert-cache-gb X --cache-policy P --trace T``): every device keeps the
dense weights and ``X`` GB of routed experts in HBM; all routed experts live in the tier behind HBM
(:meth:`moesim.memory.tiers.MemoryHierarchy.backing_tier`: DDR on a device that has it, else host memory
over the host link). The cache is the one of :mod:`moesim.memory.cache`: a policy of ``CACHE_POLICIES``
(LRU, LFU, pre-gated and affinity prefetch, Belady) plans hits and fetches over the trace's expert accesses
(:func:`~moesim.memory.cache.access_stream`, the trace cut into batches of the iteration's tokens, warm
start), and :func:`~moesim.memory.cache.replay_timed` plays the plan: fetches are shared-bandwidth transfers
on the tier model that overlap compute (prefetches overlap the layer's non-expert time); a layer's expert
compute waits for its weights. The iteration pays the replay's stall per batch.

With expert parallelism (``ep > 1``, tp 1): each GPU holds its own experts (``expert_devices``, the placement's
or the contiguous one) in the tier behind HBM and caches up to the same capacity of them in its HBM; a batch is
the EP group's tokens (``ep`` ranks' worth), each GPU sees the accesses to its own experts
(:func:`~moesim.memory.cache.select_accesses`), plans them with its own cache and fetches its misses over its own
link, concurrently with the others (one timed replay per GPU); the lock-step iteration waits for the slowest GPU
(the stall is the largest), hits and accesses add up over the GPUs and bytes are per GPU (mean).

Per token count ``T`` (tokens of one rank's iteration) this is computed once at the next power of two
(``T`` x ranks of the EP group rounded up, at most the trace's tokens) and memoized: stall seconds, accesses,
hits and bytes per tier path per batch. Model MoE layer j uses trace layer j mod (trace layers) and is its own
weights: the accesses run through all the model's MoE layers (:func:`model_layers`), as the online cache's do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moebase.units import GB


@dataclass
class ExpertCache:
    """See the module docstring. ``capacity_bytes``: HBM for routed experts per device; ``policy``: a key of
    :data:`moesim.memory.cache.CACHE_POLICIES`; ``expert_bytes``: one routed expert's weights; ``moe_layers``:
    the model's MoE layers; ``peak_flops_per_s``: the device's peak in the serving dtype (the replay's expert
    compute)."""

    trace: object
    hierarchy: object
    policy: str
    capacity_bytes: float
    expert_bytes: float
    flops_per_token: float
    moe_layers: int
    peak_flops_per_s: float
    cache_tier: str = "hbm"
    expert_devices: np.ndarray | None = None  # [trace layers, experts] GPU of each expert in the EP group (ep > 1)
    _memo: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        from moesim.memory.cache import CACHE_POLICIES

        if self.policy not in CACHE_POLICIES:
            raise ValueError(f"--cache-policy {self.policy!r}: known: {', '.join(sorted(CACHE_POLICIES))}")
        if self.capacity_experts < 1:
            raise ValueError(f"--expert-cache-gb {self.capacity_bytes / GB:g} holds no expert of "
                             f"{self.expert_bytes / GB:.3g} GB")
        self.backing_tier = self.hierarchy.backing_tier(self.cache_tier)
        self.trace_tokens = int(np.unique(self.trace.columns["step"].astype(np.int64)
                                          * (int(self.trace.columns["token"].max()) + 1)
                                          + self.trace.columns["token"]).size)

    @property
    def capacity_experts(self) -> int:
        return int(self.capacity_bytes // self.expert_bytes)

    @property
    def ep(self) -> int:
        return 1 if self.expert_devices is None else int(self.expert_devices.max()) + 1

    def batch_tokens(self, tokens: int) -> int:
        """The token count the cache is replayed at for an iteration of ``tokens`` per rank (the EP group's)."""
        return int(min(1 << max(0, int(tokens) * self.ep - 1).bit_length(), self.trace_tokens))

    def per_batch(self, tokens: int, other_s_per_layer: float) -> dict:
        """Stall seconds, accesses, hits and bytes per tier path of one iteration of ``tokens`` per rank."""
        from moesim.memory.cache import ExpertShape, access_stream, plan, replay_timed, select_accesses

        t = self.batch_tokens(tokens)
        key = (t, round(other_s_per_layer, 12))
        got = self._memo.get(key)
        if got is not None:
            return got
        stream = model_layers(access_stream(self.trace, batch_tokens=t), self.moe_layers)
        gpus = [stream]
        if self.expert_devices is not None:  # each GPU's accesses to its own experts
            rows = self.expert_devices.shape[0]  # model MoE layer j: trace layer j mod (trace layers)
            dev = self.expert_devices[(stream.keys // stream.num_experts) % rows, stream.keys % stream.num_experts]
            gpus = [select_accesses(stream, dev == d) for d in range(self.ep)]
        stall, hits, moved = 0.0, 0.0, []
        for s in gpus:
            if not len(s):
                continue
            p = plan(s, min(self.capacity_experts, s.num_experts * s.num_layers), self.policy, warm=True)
            r = replay_timed(s, p, self.hierarchy, ExpertShape(self.expert_bytes, self.flops_per_token),
                             peak_flops_per_s=self.peak_flops_per_s, cache_tier=self.cache_tier,
                             backing_tier=self.backing_tier, stream_tier=None, other_s_per_layer=other_s_per_layer)
            stall, hits = max(stall, r.stall_s), hits + float(p.hit.sum())
            moved.append(r.bytes_by_path)
        paths = _mean_paths(moved, len(gpus))
        scale = stream.num_layers / stream.num_groups  # per batch
        got = self._memo[key] = {"stall_s": stall * scale, "accesses": len(stream) * scale, "hits": hits * scale,
                                 "bytes_by_path": {k: v * scale for k, v in paths.items()}}
        return got


def model_layers(stream, moe_layers: int):
    """``stream`` (a trace's accesses, batch by batch) through the model's ``moe_layers`` MoE layers, each its own
    weights: model layer j replays trace layer j mod (trace layers); keys over the model's layers (as
    :meth:`OnlineCache.stream`)."""
    from moesim.memory.cache import AccessStream

    e, used = stream.num_experts, stream.num_layers
    if moe_layers == used:
        return stream
    batches = stream.num_groups // used
    src = (np.arange(batches)[:, None] * used + np.arange(moe_layers)[None, :] % used).ravel()  # source groups
    lens = stream.group_start[src + 1] - stream.group_start[src]
    idx = np.arange(int(lens.sum())) + np.repeat(stream.group_start[src] - (np.cumsum(lens) - lens), lens)
    group = np.repeat(np.arange(len(src), dtype=np.int64), lens)
    return AccessStream(keys=(group % moe_layers) * e + stream.keys[idx] % e, group=group, tokens=stream.tokens[idx],
                        group_batch=np.repeat(np.arange(batches), moe_layers),
                        group_layer=np.tile(np.arange(moe_layers), batches), num_experts=e, num_layers=moe_layers,
                        num_tokens=stream.num_tokens)


#: policies that can run online on the batches' own rows (Belady needs accesses the schedule has not made yet; the
#: affinity prefetcher learns from the whole stream it is given)
ONLINE_POLICIES = ("lru", "lfu", "pregate")


class OnlineCache:
    """Expert caches fed by each iteration's own routing rows (``--request-routing``), carrying their state from one
    iteration to the next: one per data-parallel rank (``ep`` 1: it sees its rank's rows) or per GPU of the EP group
    (``ep > 1``: it sees the group's rows routed to its experts). An iteration's accesses run through the model's MoE
    layers (layer j replays trace layer j mod the trace's layers; keys over the model's layers, no scaling): per
    layer the distinct experts of the rows, ascending. The state is the resident experts with the iteration each was
    last used in; a step replays them first, oldest iteration first and in access order within one (so a warm
    :func:`~moesim.memory.cache.plan` starts with exactly them resident, in least-recently-used order), then the
    iteration, whose part :func:`~moesim.memory.cache.replay_timed` times (:func:`~moesim.memory.cache.from_group`).
    Exact for LRU (its resident set is the ``capacity`` most recently used experts); LFU's counts and pre-gating's
    unused prefetches are not carried from one iteration to the next. The first iteration starts warm with its own
    first experts, like the trace replay. Every step is logged (``log``) for the metrics."""

    def __init__(self, cache: ExpertCache, ids: np.ndarray):
        if cache.policy not in ONLINE_POLICIES:
            raise ValueError(f"--cache-policy {cache.policy} does not run on per-request routing (online: "
                             f"{', '.join(ONLINE_POLICIES)}; Belady needs accesses the schedule has not made yet)")
        self.cache, self.ids = cache, ids
        self.state: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # who -> (resident keys, iteration last used)
        self.log: list[dict] = []
        self.iteration = 0
        self._last: tuple | None = None

    def stream(self, rows: np.ndarray, gpu: int | None = None):
        """The accesses of the tokens at ``rows`` through the model's MoE layers (only ``gpu``'s experts if set)."""
        from moesim.memory.cache import AccessStream

        c, e = self.cache, self.cache.trace.meta.num_experts
        layers = np.arange(c.moe_layers) % self.ids.shape[1]
        experts = self.ids[rows][:, layers, :]  # [n, model MoE layers, k]
        keys = (np.arange(c.moe_layers)[None, :, None] * e + experts).ravel()
        counts = np.bincount(keys, minlength=c.moe_layers * e)
        if gpu is not None:
            counts[(c.expert_devices[layers] != gpu).ravel()] = 0
        nz = np.flatnonzero(counts)
        return AccessStream(keys=nz, group=nz // e, tokens=counts[nz], group_batch=np.zeros(c.moe_layers, np.int64),
                            group_layer=np.arange(c.moe_layers), num_experts=e, num_layers=c.moe_layers,
                            num_tokens=len(rows))

    def step(self, who: int, cur, other_s_per_layer: float) -> dict:
        """Run this iteration's accesses ``cur`` through cache ``who``; returns its stall, accesses, hits, bytes."""
        from moesim.memory.cache import ExpertShape, from_group, plan, replay_timed

        c = self.cache
        first = who not in self.state  # warm start once; later the replayed state makes its experts resident
        keys, last = self.state.get(who, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        self.iteration += 1
        self.state[who] = _resident(keys, last, cur.keys, self.iteration, c.capacity_experts)
        if not len(cur):
            return {"stall_s": 0.0, "accesses": 0, "hits": 0.0, "bytes_by_path": {}}
        pieces = [_keys_stream(keys[last == it], cur) for it in np.unique(last)]
        full = _join(pieces + [cur])
        p = plan(full, min(c.capacity_experts, len(np.unique(full.keys))), c.policy, warm=first)
        sub, sp = from_group(full, p, len(pieces) * cur.num_layers)
        r = replay_timed(sub, sp, c.hierarchy, ExpertShape(c.expert_bytes, c.flops_per_token),
                         peak_flops_per_s=c.peak_flops_per_s, cache_tier=c.cache_tier, backing_tier=c.backing_tier,
                         stream_tier=None, other_s_per_layer=other_s_per_layer)
        return {"stall_s": r.stall_s, "accesses": len(sub), "hits": float(sp.hit.sum()),
                "bytes_by_path": dict(r.bytes_by_path)}

    def stall_s(self, rank: int, rank_rows: np.ndarray, group_rows: np.ndarray, other_s_per_layer: float) -> float:
        """Seconds rank ``rank``'s iteration waits for expert weights: its own cache on ``rank_rows`` (``ep`` 1), or
        the slowest GPU of the EP group on ``group_rows`` (``ep > 1``; once per iteration, every rank shares it)."""
        if self.cache.expert_devices is None:
            got = self.step(rank, self.stream(rank_rows), other_s_per_layer)
            self.log.append({"who": rank, **got})
            return got["stall_s"]
        if self._last is not None and self._last[0] is group_rows:
            return self._last[1]
        steps = [self.step(d, self.stream(group_rows, d), other_s_per_layer) for d in range(self.cache.ep)]
        got = {"who": 0, "stall_s": max(g["stall_s"] for g in steps), "accesses": sum(g["accesses"] for g in steps),
               "hits": sum(g["hits"] for g in steps),
               "bytes_by_path": _mean_paths([g["bytes_by_path"] for g in steps], len(steps))}
        self.log.append(got)
        self._last = (group_rows, got["stall_s"])
        return got["stall_s"]


def _mean_paths(moved: list[dict], n: int) -> dict:
    """Bytes per tier path summed over the dicts of ``moved``, each divided by ``n`` (a mean over ``n`` devices)."""
    paths: dict = {}
    for d in moved:
        for k, v in d.items():
            paths[k] = paths.get(k, 0.0) + v / n
    return paths


def _join(pieces: list):
    """One stream of ``pieces`` (one iteration each, the same layers) in order: iteration i is batch i."""
    from moesim.memory.cache import AccessStream

    first, layers = pieces[0], pieces[0].num_layers
    return AccessStream(keys=np.concatenate([q.keys for q in pieces]),
                        group=np.concatenate([q.group + i * layers for i, q in enumerate(pieces)]),
                        tokens=np.concatenate([q.tokens for q in pieces]),
                        group_batch=np.repeat(np.arange(len(pieces)), layers),
                        group_layer=np.tile(np.arange(layers), len(pieces)), num_experts=first.num_experts,
                        num_layers=layers, num_tokens=sum(q.num_tokens for q in pieces))


def _keys_stream(keys: np.ndarray, like):
    """One iteration's accesses to ``keys`` (ascending: the access order within an iteration), shaped like ``like``."""
    from moesim.memory.cache import AccessStream

    keys = np.sort(keys)
    return AccessStream(keys=keys, group=keys // like.num_experts, tokens=np.ones(len(keys), np.int64),
                        group_batch=like.group_batch, group_layer=like.group_layer, num_experts=like.num_experts,
                        num_layers=like.num_layers, num_tokens=0)


def _resident(keys: np.ndarray, last: np.ndarray, used: np.ndarray, now: int, capacity: int):
    """(keys, iteration last used) of the ``capacity`` most recently used experts after iteration ``now`` used
    ``used`` (ascending: later keys of one iteration are the more recent)."""
    old = ~np.isin(keys, used)
    k = np.concatenate([keys[old], used])
    t = np.concatenate([last[old], np.full(len(used), now, np.int64)])
    order = np.lexsort((k, t))[-capacity:]
    return k[order], t[order]


def cache_metrics(result, costs: dict) -> dict:
    """Expert-cache hit rate and bytes moved per tier path over the run, per replica whose cost has an expert
    cache (one rank's iterations: the rank that set each iteration's time, ``iterations.csv`` slowest_rank_*)."""
    it, out = result.iterations, {}
    for name, cost in costs.items():
        cache = getattr(cost, "expert_cache", None)
        rows = np.flatnonzero(it["replica"] == name) if cache is not None and len(it["replica"]) else []
        if cache is None:
            continue
        online = getattr(cost, "online_cache", None)
        if online is not None:
            out[name] = _online_metrics(cache, online)
            continue
        acc, hits, stall, paths = 0.0, 0.0, 0.0, {}
        for r in rows:
            tokens = int(it["slowest_rank_tokens"][r])
            if tokens <= 0:
                continue
            b = cache.per_batch(tokens, cost.non_expert_s_per_layer(tokens))
            acc, hits, stall = acc + b["accesses"], hits + b["hits"], stall + b["stall_s"]
            for k, v in b["bytes_by_path"].items():
                paths[k] = paths.get(k, 0.0) + v
        out[name] = {"policy": cache.policy, "capacity_experts_per_device": cache.capacity_experts,
                     "capacity_bytes_per_device": cache.capacity_bytes, "backing_tier": cache.backing_tier,
                     "accesses": acc, "hits": hits, "hit_rate": hits / acc if acc else None, "stall_s": stall,
                     "bytes_by_path_per_device": paths}
    return out


def _online_metrics(cache: ExpertCache, online: OnlineCache) -> dict:
    """:func:`cache_metrics` of an :class:`OnlineCache`: every logged step's accesses and hits; stall and bytes per
    device (summed over the run, averaged over the ranks with ``ep`` 1; with ``ep > 1`` each step already holds the
    slowest GPU's stall and the GPUs' mean bytes)."""
    devices = max(1, len({g["who"] for g in online.log}))
    acc, hits = sum(g["accesses"] for g in online.log), sum(g["hits"] for g in online.log)
    paths = _mean_paths([g["bytes_by_path"] for g in online.log], devices)
    return {"policy": cache.policy, "capacity_experts_per_device": cache.capacity_experts,
            "capacity_bytes_per_device": cache.capacity_bytes, "backing_tier": cache.backing_tier, "accesses": acc,
            "hits": hits, "hit_rate": hits / acc if acc else None,
            "stall_s": sum(g["stall_s"] for g in online.log) / devices, "bytes_by_path_per_device": paths,
            "routing": "per-request rows (online)"}


def build(cfg, system, trace, cache_bytes_per_device: float, policy: str, tp: int, ep: int, dtype: str,
          placement=None) -> ExpertCache:
    """The expert cache of ``--expert-cache-gb``/``--cache-policy``: with ``ep`` 1 one device's tensor-parallel shard
    of each routed expert (every device serves every expert); with ``ep > 1`` (tp 1) each GPU caches whole experts of
    its own, those ``placement`` (or the contiguous one) gives it."""
    from hwmodels.roofline import DTYPE_BYTES
    from moesim.memory.tiers import MemoryHierarchy
    from moesim.placement import contiguous
    from workloads.catalog import swiglu_params

    if not cfg.is_moe:
        raise ValueError(f"--expert-cache-gb needs an MoE model; {cfg.name!r} is dense")
    if trace is None:
        raise ValueError("--expert-cache-gb needs --trace (the expert accesses the cache sees)")
    if trace.meta.num_experts != cfg.num_experts:
        raise ValueError(f"--trace has {trace.meta.num_experts} experts per layer, --model {cfg.num_experts}")
    devices = None
    if ep > 1:
        if tp != 1:
            raise ValueError("--expert-cache-gb with --ep > 1 models whole experts per GPU: use --tp 1")
        from moesim.serve.exflow import expert_device
        layers = min(trace.meta.num_layers, len(cfg.moe_layers))
        try:
            devices = expert_device(placement if placement is not None else contiguous(layers, cfg.num_experts, ep))
        except ValueError as exc:
            raise ValueError(f"--expert-cache-gb with --ep {ep}: each GPU caches its own experts, so {exc}") from None
    params = swiglu_params(cfg.hidden_size, cfg.moe_intermediate_size) / tp
    return ExpertCache(trace, MemoryHierarchy.from_system(system), policy, cache_bytes_per_device,
                       params * DTYPE_BYTES[dtype], 2.0 * params, len(cfg.moe_layers), system.device.peak(dtype),
                       expert_devices=devices)
