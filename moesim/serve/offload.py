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

Per token count ``T`` (tokens of one rank's iteration) this is computed once at the next power of two
(``T`` rounded up, at most the trace's tokens) and memoized: stall seconds, accesses, hits and bytes per tier
path per batch. Model MoE layer j uses trace layer j mod (trace layers): the per-batch figures of the trace's
layers are scaled by (model MoE layers / trace layers).
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

    def batch_tokens(self, tokens: int) -> int:
        """The token count the cache is replayed at for an iteration of ``tokens``."""
        return int(min(1 << max(0, int(tokens) - 1).bit_length(), self.trace_tokens))

    def per_batch(self, tokens: int, other_s_per_layer: float) -> dict:
        """Stall seconds, accesses, hits and bytes per tier path of one iteration of ``tokens`` per rank."""
        from moesim.memory.cache import ExpertShape, access_stream, plan, replay_timed

        t = self.batch_tokens(tokens)
        key = (t, round(other_s_per_layer, 12))
        got = self._memo.get(key)
        if got is not None:
            return got
        stream = access_stream(self.trace, batch_tokens=t)
        p = plan(stream, min(self.capacity_experts, stream.num_experts * stream.num_layers), self.policy, warm=True)
        r = replay_timed(stream, p, self.hierarchy, ExpertShape(self.expert_bytes, self.flops_per_token),
                         peak_flops_per_s=self.peak_flops_per_s, cache_tier=self.cache_tier,
                         backing_tier=self.backing_tier, stream_tier=None, other_s_per_layer=other_s_per_layer)
        batches = stream.num_groups / stream.num_layers
        scale = self.moe_layers / stream.num_layers / batches
        got = self._memo[key] = {"stall_s": r.stall_s * scale, "accesses": len(stream) * scale,
                                 "hits": float(p.hit.sum()) * scale,
                                 "bytes_by_path": {k: v * scale for k, v in r.bytes_by_path.items()}}
        return got


def cache_metrics(result, costs: dict) -> dict:
    """Expert-cache hit rate and bytes moved per tier path over the run, per replica whose cost has an expert
    cache (one rank's iterations: the rank that set each iteration's time, ``iterations.csv`` slowest_rank_*)."""
    it, out = result.iterations, {}
    for name, cost in costs.items():
        cache = getattr(cost, "expert_cache", None)
        rows = np.flatnonzero(it["replica"] == name) if cache is not None and len(it["replica"]) else []
        if cache is None:
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


def build(cfg, system, trace, cache_bytes_per_device: float, policy: str, tp: int, ep: int, dtype: str) -> ExpertCache:
    """The expert cache of ``--expert-cache-gb``/``--cache-policy``: one device's tensor-parallel shard of each
    routed expert (``ep`` 1: every device serves every expert)."""
    from hwmodels.roofline import DTYPE_BYTES
    from moesim.memory.tiers import MemoryHierarchy
    from workloads.catalog import swiglu_params

    if not cfg.is_moe:
        raise ValueError(f"--expert-cache-gb needs an MoE model; {cfg.name!r} is dense")
    if ep != 1:
        raise ValueError("--expert-cache-gb models offloaded serving with --ep 1 (every device serves every expert)")
    if trace is None:
        raise ValueError("--expert-cache-gb needs --trace (the expert accesses the cache sees)")
    if trace.meta.num_experts != cfg.num_experts:
        raise ValueError(f"--trace has {trace.meta.num_experts} experts per layer, --model {cfg.num_experts}")
    params = swiglu_params(cfg.hidden_size, cfg.moe_intermediate_size) / tp
    return ExpertCache(trace, MemoryHierarchy.from_system(system), policy, cache_bytes_per_device,
                       params * DTYPE_BYTES[dtype], 2.0 * params, len(cfg.moe_layers), system.device.peak(dtype))
