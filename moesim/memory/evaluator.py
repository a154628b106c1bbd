"""The one memory evaluator: expert offloading on a device, from a system spec and a model.

:func:`offload_setup` owns every choice the replay needs, from the spec's attributes (never its name):

- the *cache tier* is the device's main memory (``Device.main_memory``, HBM on every shipped device);
- the *backing tier* misses are fetched from is the tier listed after it
  (:meth:`MemoryHierarchy.backing_tier`: ``ddr`` on an SN40L, ``host`` memory over PCIe on a GPU);
- the *stream tier* compute streams weights into is the fastest tier when it is not the cache tier
  (:meth:`MemoryHierarchy.stream_tier`: SRAM on an SN40L, none on a GPU);
- expert weight bytes and FLOPs per token come from the model (:meth:`ExpertShape.of`), peak FLOP/s
  from the device at ``dtype``.

:func:`evaluate` replays one access stream on one device holding every expert (``moesim memory
cache``, the ``memory`` study engine); :func:`evaluate_placed` replays the share of each device of a
placement (the memory columns of the analytic/DES studies). Both plan with
:func:`~moesim.memory.cache.plan_exact`, which gives every policy ``rng = default_rng(seed)``.
Values in, values out: no file I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from hwmodels.specs import System
from moebase.units import DEFAULT_DTYPE, DTYPE_BYTES
from moesim.memory.cache import (AccessStream, CachePlan, ExpertShape, TimedResult, from_group, plan_exact,
                                 replay_timed, select_accesses)
from moesim.memory.tiers import MemoryError_, MemoryHierarchy
from moesim.placement import Placement
from workloads.catalog import MoEModel

TIER_FIELDS = ("capacity_bytes", "bandwidth_bytes_per_s", "latency_s")
ROLES = ("cache", "backing", "stream")


@dataclass(frozen=True)
class OffloadSetup:
    """Where one device keeps expert weights and how fast they move (see the module docstring)."""

    hierarchy: MemoryHierarchy
    cache_tier: str
    backing_tier: str
    stream_tier: str | None
    expert: ExpertShape
    peak_flops_per_s: float

    def experts_in(self, capacity_bytes: float) -> int:
        """Whole experts that fit in ``capacity_bytes`` (may be 0)."""
        return int(capacity_bytes // self.expert.weight_bytes)

    def capacity_bytes(self, role: str) -> float:
        """Capacity of the tier playing ``role`` (a key of :data:`ROLES`); 0 when there is none."""
        name = {"cache": self.cache_tier, "backing": self.backing_tier, "stream": self.stream_tier}[role]
        return self.hierarchy.tiers[name].capacity_bytes if name is not None else 0.0


def with_tier_values(hierarchy: MemoryHierarchy, values: Mapping[str, float],
                     roles: Mapping[str, str] | None = None) -> MemoryHierarchy:
    """A copy of ``hierarchy`` with ``<tier>_<field>`` values applied in order; ``<tier>`` is a tier
    name or a key of ``roles`` (e.g. ``backing`` -> ``ddr``), ``<field>`` one of :data:`TIER_FIELDS`.
    Capacities and bandwidths must be > 0, latencies >= 0; unknown keys raise ValueError."""
    roles = dict(roles or {})
    names = {**{t: t for t in hierarchy.tiers}, **roles}
    parsed, unknown = [], []
    for key, value in values.items():
        match = [(names[key[:-len(f) - 1]], f) for f in TIER_FIELDS
                 if key.endswith("_" + f) and key[:-len(f) - 1] in names]
        if match:
            parsed.append((key, *match[0], value))
        else:
            unknown.append(key)
    if unknown:
        raise MemoryError_(f"unknown config key(s) {sorted(unknown)} (known: <tier>_<field> for tier in "
                           f"{sorted(names)}, field in {list(TIER_FIELDS)})")
    for key, tier, field, value in parsed:
        v = float(value)
        if field != "latency_s" and not v > 0:
            raise MemoryError_(f"config {key}: must be > 0, got {value!r}")
        if field == "latency_s" and v < 0:
            raise MemoryError_(f"config {key}: must be >= 0, got {value!r}")
        hierarchy = hierarchy.with_tier(tier, **{field: v})
    return hierarchy


def offload_setup(system: System, model: MoEModel, *, dtype: str = DEFAULT_DTYPE,
                  tier_values: Mapping[str, float] | None = None) -> OffloadSetup:
    """The tiers, expert shape and peak of one device of ``system`` running ``model`` at ``dtype``;
    ``tier_values`` override tier numbers (:func:`with_tier_values`; roles ``cache``, ``backing``, ``stream``)."""
    if dtype not in DTYPE_BYTES:
        raise MemoryError_(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    h = MemoryHierarchy.from_system(system)
    cache = system.device.main_memory.name
    backing, stream = h.backing_tier(cache), h.stream_tier(cache)
    roles = {"cache": cache, "backing": backing, **({"stream": stream} if stream else {})}
    return OffloadSetup(hierarchy=with_tier_values(h, tier_values or {}, roles), cache_tier=cache,
                        backing_tier=backing, stream_tier=stream, expert=ExpertShape.of(model, DTYPE_BYTES[dtype]),
                        peak_flops_per_s=system.device.peak(dtype))


def replay(setup: OffloadSetup, stream: AccessStream, cache_plan: CachePlan, *,
           overlap_transfers: bool = True) -> TimedResult:
    """:func:`~moesim.memory.cache.replay_timed` of ``cache_plan`` on the tiers of ``setup``."""
    return replay_timed(stream, cache_plan, setup.hierarchy, setup.expert, peak_flops_per_s=setup.peak_flops_per_s,
                        cache_tier=setup.cache_tier, backing_tier=setup.backing_tier, stream_tier=setup.stream_tier,
                        overlap_transfers=overlap_transfers)


def evaluate(setup: OffloadSetup, stream: AccessStream, policy: str, *, capacity_experts: int, seed: int,
             overlap_transfers: bool = True, **params) -> TimedResult:
    """Expert offloading on one device holding every expert of ``stream``: a cache of ``capacity_experts``
    in the cache tier under ``policy`` (``params`` go to the policy, with ``rng = default_rng(seed)``),
    replayed in SimPy from a cold cache."""
    cache_plan = plan_exact(stream, capacity_experts, policy, seed=seed, **params)
    return replay(setup, stream, cache_plan, overlap_transfers=overlap_transfers)


def device_holds(placement: Placement) -> np.ndarray:
    """[devices, layers * experts] bool: device d holds the weights of key ``layer * num_experts + expert``."""
    l_count, e_count, spd = placement.num_layers, placement.num_experts, placement.slots_per_device
    s2e = placement.slot_to_expert
    holds = np.zeros((placement.num_devices, l_count * e_count), dtype=bool)
    dev_of = np.arange(s2e.shape[1]) // spd
    for layer in range(l_count):
        ok = s2e[layer] >= 0
        holds[dev_of[ok], layer * e_count + s2e[layer, ok]] = True
    return holds


@dataclass(frozen=True)
class PlacedResult:
    """Memory of a placement over the measured groups (after the warm-up). hit_rate: hits / accesses over
    all devices; bottleneck_device: the device with the most fetches (bottleneck_fetches) and
    bottleneck_stall_s, the time its compute waits for them; sram_hit_fraction: routed (token, expert)
    choices whose expert was resident in the stream tier (a second cache level, logical only);
    weight_bytes_max: expert weight bytes the fullest device holds."""

    hit_rate: float
    bottleneck_device: int
    bottleneck_fetches: int
    bottleneck_stall_s: float
    sram_hit_fraction: float
    weight_bytes_max: float


def evaluate_placed(setup: OffloadSetup, placement: Placement, stream: AccessStream, policy: str, *,
                    hbm_experts: int, sram_experts: int, warmup_groups: int, seed: int) -> PlacedResult:
    """Each device of ``placement`` caches the experts it holds (``hbm_experts`` in the cache tier,
    ``sram_experts`` in the stream tier, same policy) over its share of ``stream``; the first
    ``warmup_groups`` groups warm the caches and are not measured; the device with the most fetches is
    replayed in SimPy (a cache of 0 experts fetches every access one after the other, closed form)."""
    if stream.num_layers != placement.num_layers or stream.num_experts != placement.num_experts:
        raise MemoryError_(f"memory replay: traffic has {stream.num_layers} layers x {stream.num_experts} experts, "
                           f"placement {placement.num_layers} x {placement.num_experts}")
    holds = device_holds(placement)
    hits = accesses = sram_hit_tokens = tokens = 0
    worst = None  # (fetches in measured groups, device, stream, plan)
    for d in range(placement.num_devices):
        s = select_accesses(stream, holds[d][stream.keys])
        sub, sub_plan = from_group(s, plan_exact(s, hbm_experts, policy, seed=seed), warmup_groups)
        hits += int(sub_plan.hit.sum())
        accesses += len(sub)
        fetches = int((~sub_plan.hit).sum()) + sub_plan.prefetches
        if worst is None or fetches > worst[0]:
            worst = (fetches, d, sub, sub_plan)
        if sram_experts >= 1:
            _, sp = from_group(s, plan_exact(s, sram_experts, policy, seed=seed), warmup_groups)
            sram_hit_tokens += int(sub.tokens[sp.hit].sum())
        tokens += int(sub.tokens.sum())
    fetches, worst_d, sub, sub_plan = worst
    if len(sub) and hbm_experts >= 1:
        stall_s = replay(setup, sub, sub_plan).stall_s
    else:
        stall_s = len(sub) * setup.hierarchy.transfer_time_s(setup.expert.weight_bytes, setup.backing_tier,
                                                             setup.cache_tier)
    return PlacedResult(hit_rate=hits / accesses if accesses else 1.0, bottleneck_device=int(worst_d),
                        bottleneck_fetches=fetches, bottleneck_stall_s=stall_s,
                        sram_hit_fraction=sram_hit_tokens / tokens if tokens else 0.0,
                        weight_bytes_max=_weight_bytes_max(placement, setup.expert))


def _weight_bytes_max(placement: Placement, expert: ExpertShape) -> float:
    """Expert weight bytes of the fullest device: its used slots over all layers x bytes per expert."""
    l_count, spd = placement.num_layers, placement.slots_per_device
    used = (placement.slot_to_expert >= 0).reshape(l_count, placement.num_devices, spd).sum(axis=2)  # [L, D]
    return float((used.sum(axis=0) * expert.weight_bytes).max())
