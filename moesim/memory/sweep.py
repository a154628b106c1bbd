"""Sweeps over SRAM/HBM/DDR capacities and bandwidths: ``evaluate(config) -> dict`` and the Pareto front.

``evaluate`` replays expert offloading on one device of a system: expert weights live in the backing
tier (``ddr`` on SN40L, ``host`` on a GPU), HBM caches ``hbm_capacity_bytes`` worth of experts under a
cache policy, and compute streams weights HBM -> SRAM when the device has SRAM. Routing comes from a
real trace; expert shapes from a catalog model with the same number of experts (default: FLAME-MoE-290M
routing with OLMoE-1B-7B expert shapes, both 64 experts per layer, so the expert set (6.4 GB over the
trace's 8 layers) does not trivially fit a small HBM).

The machine cost is a linear model of the tiers' capacity and bandwidth with the per-unit prices in
:data:`TIER_PRICES` (assumptions, stated with their reason; override per config). It ranks designs;
it is not a quote.

A config is a flat dict (JSON-friendly); every key is optional:

    system ("sn40l-node"), trace ("default"), model ("olmoe-1b-7b"), policy ("lru"), policy_params ({}),
    batch_tokens (1), max_tokens (256), backing_tier (auto), seed (0), overlap_transfers (True),
    <tier>_capacity_bytes, <tier>_bandwidth_bytes_per_s for tier in sram/hbm/ddr/host, prices ({tier: {...}})
"""

from __future__ import annotations

import numpy as np

from hwmodels.specs import load_system
from moesim.memory.cache import ExpertShape, access_stream, cache_capacity_experts, plan, replay_timed
from moesim.memory.tiers import MemoryError_, MemoryHierarchy

TIER_PRICES = {
    # USD per GB of capacity and per GB/s of bandwidth. Assumptions for ranking designs, not quotes:
    "sram": {"usd_per_gb": 5000.0, "usd_per_gb_per_s": 0.0,
             "source": "assumption: ~5 USD per MB of on-die SRAM at 5 nm (area-dominated); bandwidth comes with it"},
    "hbm": {"usd_per_gb": 15.0, "usd_per_gb_per_s": 1.0,
            "source": "assumption: HBM3 ~15 USD/GB; ~1 USD per GB/s for stacks, PHYs and interposer"},
    "ddr": {"usd_per_gb": 3.0, "usd_per_gb_per_s": 2.0,
            "source": "assumption: DDR5 RDIMM ~3 USD/GB; ~2 USD per GB/s for channels/controllers"},
    "host": {"usd_per_gb": 3.0, "usd_per_gb_per_s": 2.0, "source": "assumption: as DDR"},
}

DEFAULTS = {"system": "sn40l-node", "trace": "default", "model": "olmoe-1b-7b", "policy": "lru", "policy_params": {},
            "batch_tokens": 1, "max_tokens": 256, "backing_tier": None, "seed": 0, "overlap_transfers": True}

_TIER_KEYS = ("capacity_bytes", "bandwidth_bytes_per_s", "latency_s")


def _hierarchy(config: dict) -> tuple[MemoryHierarchy, float]:
    system = load_system(config["system"])
    h = MemoryHierarchy.from_system(system)
    for key, value in config.items():
        for field in _TIER_KEYS:
            suffix = "_" + field
            if key.endswith(suffix) and key[:-len(suffix)] in h.tiers:
                tier = key[:-len(suffix)]
                v = float(value)
                if field != "latency_s" and not v > 0:
                    raise MemoryError_(f"config {key}: must be > 0, got {value!r}")
                if field == "latency_s" and v < 0:
                    raise MemoryError_(f"config {key}: must be >= 0, got {value!r}")
                h = h.with_tier(tier, **{field: v})
    return h, system.device.peak("bf16")


def machine_cost_usd(h: MemoryHierarchy, prices: dict | None = None, tiers: tuple[str, ...] | None = None) -> float:
    """Linear cost of the tiers: capacity [GB] x usd_per_gb + bandwidth [GB/s] x usd_per_gb_per_s."""
    prices = {**TIER_PRICES, **(prices or {})}
    total = 0.0
    for name in tiers or tuple(h.tiers):
        t = h.tiers[name]
        p = prices.get(name)
        if p is None:
            raise MemoryError_(f"no price for tier {name!r}; give prices[{name!r}] = {{usd_per_gb, usd_per_gb_per_s}}")
        total += t.capacity_bytes / 1e9 * p["usd_per_gb"] + t.bandwidth_bytes_per_s / 1e9 * p["usd_per_gb_per_s"]
    return total


def evaluate(config: dict) -> dict:
    """One design point. Returns tokens_per_s, hit_rate, stall_s, total_time_s, cost_usd, cache_experts,
    bytes moved per tier pair (``bytes_<src>_to_<dst>``) and the resolved inputs."""
    from workloads.catalog import get_model
    from workloads.importers import load_trace

    unknown = set(config) - set(DEFAULTS) - {"prices"} - {f"{t}_{f}" for t in ("sram", "hbm", "ddr", "host")
                                                            for f in _TIER_KEYS}
    if unknown:
        raise MemoryError_(f"unknown config key(s) {sorted(unknown)}")
    cfg = {**DEFAULTS, **config}
    h, peak = _hierarchy(cfg)
    trace = load_trace(cfg["trace"])
    model = get_model(cfg["model"])
    if model.num_experts != trace.meta.num_experts:
        raise MemoryError_(f"model {model.name!r} has {model.num_experts} experts per layer but trace "
                           f"{cfg['trace']!r} has {trace.meta.num_experts}")
    expert = ExpertShape.swiglu(model.hidden_size, model.moe_intermediate_size)
    backing = cfg["backing_tier"] or ("ddr" if "ddr" in h.tiers else "host")
    cap = cache_capacity_experts(h, "hbm", expert)
    stream = access_stream(trace, cfg["batch_tokens"], cfg["max_tokens"])
    params = dict(cfg["policy_params"])
    if cfg["policy"] == "pregate":
        params.setdefault("rng", np.random.default_rng(cfg["seed"]))
    cp = plan(stream, cap, cfg["policy"], **params)
    res = replay_timed(stream, cp, h, expert, peak_flops_per_s=peak, cache_tier="hbm", backing_tier=backing,
                       stream_tier="sram", overlap_transfers=cfg["overlap_transfers"])
    out = {k: v for k, v in cfg.items() if k not in ("policy_params", "prices")}
    out.update({f"{t}_capacity_bytes": h.tiers[t].capacity_bytes for t in h.tiers})
    out.update({f"{t}_bandwidth_bytes_per_s": h.tiers[t].bandwidth_bytes_per_s for t in h.tiers})
    out.update({"backing_tier": backing, "cache_experts": cap, "expert_bytes": expert.weight_bytes,
                "tokens_per_s": res.tokens_per_s, "hit_rate": res.hit_rate, "stall_s": res.stall_s,
                "total_time_s": res.total_time_s, "compute_s": res.compute_s, "fetches": res.fetches,
                "cost_usd": machine_cost_usd(h, cfg.get("prices"), tuple(t for t in h.tiers if t != "host"))})
    for path, nbytes in res.bytes_by_path.items():
        src, dst = path.split("->")
        out[f"bytes_{src}_to_{dst}"] = nbytes
    return out


def pareto_front(cost: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Mask [n] of points not dominated: no other point has cost <= and value >= with one strict."""
    cost, value = np.asarray(cost, dtype=float), np.asarray(value, dtype=float)
    n = len(cost)
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        dom = (cost <= cost[i]) & (value >= value[i]) & ((cost < cost[i]) | (value > value[i]))
        mask[i] = not dom.any()
    return mask


def grid(base: dict, axes: dict[str, list]) -> list[dict]:
    """The cartesian product of ``axes`` (config key -> values) over ``base``."""
    configs = [dict(base)]
    for key, values in axes.items():
        configs = [{**c, key: v} for c in configs for v in values]
    return configs
