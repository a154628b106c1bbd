"""Timed replay: play a :class:`~moesim.memory.cache.planning.CachePlan` in SimPy on a
:class:`~moesim.memory.tiers.MemoryHierarchy`. Fetches run over the shared backing-tier -> cache-tier
link (prefetches overlap with compute), compute of an expert waits for its weights; stall time is the
time compute waits for fetches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import simpy

from hwmodels.roofline import ffn_work
from moebase.units import GB, MB
from moesim.memory.cache.planning import CachePlan
from moesim.memory.cache.stream import AccessStream
from moesim.memory.tiers import MemoryError_, MemoryHierarchy, SimMemory
from workloads.catalog import MoEModel


@dataclass(frozen=True)
class ExpertShape:
    """One expert's weight bytes and its FLOPs per routed token."""

    weight_bytes: float
    flops_per_token: float

    @classmethod
    def of(cls, model: MoEModel, dtype_bytes: int) -> "ExpertShape":
        """A routed expert of ``model``: weight bytes from the catalog (:meth:`MoEModel.expert_weight_bytes`),
        FLOPs of one token through its GEMMs from the roofline (:func:`hwmodels.roofline.ffn_work`)."""
        flops_up, _, flops_down, _ = ffn_work(np.ones(1), model.hidden_size, model.moe_intermediate_size, dtype_bytes)
        return cls(weight_bytes=float(model.expert_weight_bytes(dtype_bytes)),
                   flops_per_token=float(flops_up[0] + flops_down[0]))


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
        raise MemoryError_(f"tier {cache_tier!r} ({t.capacity_bytes / GB:.3g} GB x {fraction}) cannot hold one "
                           f"expert of {expert.weight_bytes / MB:.3g} MB")
    return n


@dataclass(frozen=True)
class ReplayTiers:
    """Where a timed replay moves weights: misses ``backing -> cache``; compute streams weights
    ``cache -> stream`` when ``stream`` is a tier of the hierarchy (else reads them at cache bandwidth)."""

    cache: str = "hbm"
    backing: str = "ddr"
    stream: str | None = "sram"


class _Replay:
    """One SimPy replay of a plan (see :func:`replay_timed`)."""

    def __init__(self, stream: AccessStream, cache_plan: CachePlan, hierarchy: MemoryHierarchy,
                 expert: ExpertShape, peak_flops_per_s: float, tiers: ReplayTiers):
        self.stream, self.plan, self.expert, self.peak, self.tiers = stream, cache_plan, expert, peak_flops_per_s, tiers
        self.env = simpy.Environment()
        self.mem = SimMemory(self.env, hierarchy)
        self.use_stream = tiers.stream is not None and tiers.stream in hierarchy.tiers and tiers.stream != tiers.cache
        self.cache_bw = hierarchy.tier(tiers.cache).bandwidth_bytes_per_s
        self.ready: dict[int, simpy.Event] = {}
        self.inflight: list[simpy.Event] = []
        self.stall_s = self.compute_s = 0.0

    def fetch(self, k: int) -> simpy.Event:
        ev = self.mem.transfer(self.expert.weight_bytes, self.tiers.backing, self.tiers.cache)
        self.ready[k] = ev
        self.inflight.append(ev)
        return ev

    def wait(self, ev):
        if not ev.triggered:
            t0 = self.env.now
            yield ev
            self.stall_s += self.env.now - t0

    def compute(self, i: int):
        """Access ``i``: wait for the expert's weights, then compute its tokens."""
        env, k, hit = self.env, int(self.stream.keys[i]), self.plan.hit[i]
        ev = self.ready.get(k) if hit else None
        if ev is None:
            ev = self.ready[k] = self.fetch(k) if not hit else env.timeout(0)
        yield from self.wait(ev)
        t0 = env.now
        flops_s = self.stream.tokens[i] * self.expert.flops_per_token / self.peak
        if self.use_stream:
            yield env.all_of([env.timeout(flops_s),
                              self.mem.transfer(self.expert.weight_bytes, self.tiers.cache, self.tiers.stream)])
        else:
            yield env.timeout(max(flops_s, self.expert.weight_bytes / self.cache_bw))
        self.compute_s += env.now - t0

    def main(self, overlap_transfers: bool, other_s_per_layer: float):
        s = self.stream
        for g in range(s.num_groups):
            for k in self.plan.prefetched[g]:
                self.fetch(k)
            if not overlap_transfers:
                pending = [e for e in self.inflight if not e.triggered]
                if pending:
                    yield from self.wait(self.env.all_of(pending))
            if other_s_per_layer > 0:
                yield self.env.timeout(other_s_per_layer)
            for i in range(int(s.group_start[g]), int(s.group_start[g + 1])):
                yield from self.compute(i)
            self.inflight[:] = [e for e in self.inflight if not e.triggered]


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
    run = _Replay(stream, cache_plan, hierarchy, expert, peak_flops_per_s,
                  ReplayTiers(cache=cache_tier, backing=backing_tier, stream=stream_tier))
    run.env.process(run.main(overlap_transfers, other_s_per_layer))
    run.env.run()
    total = float(run.env.now)
    return TimedResult(policy=cache_plan.policy, total_time_s=total, stall_s=run.stall_s, compute_s=run.compute_s,
                       tokens_per_s=stream.num_tokens / total if total > 0 else float("inf"),
                       hit_rate=cache_plan.hit_rate, fetches=cache_plan.fetches, prefetches=cache_plan.prefetches,
                       useful_prefetches=cache_plan.useful_prefetches, bytes_by_path=dict(run.mem.bytes_by_path))
