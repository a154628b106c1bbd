"""The ``memory`` engine of studies: expert offloading on one device that holds every expert.

A configuration (the keys of :data:`moesim.study.spec.MEMORY_PARAMETERS`) names a system, a catalog
model for the expert shapes, a routing trace and a cache policy. This module loads them
(process-cached) and calls the one memory evaluator, :func:`moesim.memory.evaluator.evaluate`: the
cache tier (HBM) holds as many experts as ``hbm_capacity_bytes`` fits, misses are fetched from the
backing tier (DDR on SN40L, host memory on a GPU), compute streams weights into SRAM when the device
has it. Tier values of 0 keep the spec's numbers.

Outputs (units in names): ``cache_experts``, ``expert_bytes``, ``backing_tier``, ``tokens_per_s``,
``hit_rate``, ``stall_s``, ``total_time_s``, ``compute_s``, ``fetches``, ``cost_usd`` (the linear price
model :func:`moesim.memory.sweep.machine_cost_usd` of the device tiers: assumptions, for ranking),
``<tier>_capacity_bytes_used`` and ``<tier>_bandwidth_bytes_per_s_used`` (the tiers replayed), and
``bytes_<src>_to_<dst>`` (bytes moved per tier pair).
"""

from __future__ import annotations

from functools import lru_cache

from moesim.memory.tiers import HOST


@lru_cache(maxsize=4)
def _trace(name: str):
    from workloads.importers import load_trace
    return load_trace(name)


@lru_cache(maxsize=8)
def _stream(trace: str, batch_tokens: int, tokens: int):
    from moesim.memory.cache import access_stream
    return access_stream(_trace(trace), batch_tokens, tokens)


def _setup(config: dict):
    """The offload setup of a configuration: spec tiers with the configuration's non-zero values."""
    from hwmodels.specs import load_system
    from moesim.memory.evaluator import offload_setup
    from workloads.catalog import get_model

    model = get_model(config["model"])
    trace = _trace(config["trace"])
    if model.num_experts != trace.meta.num_experts:
        raise ValueError(f"model {model.name!r} has {model.num_experts} experts per layer but trace "
                         f"{config['trace']!r} has {trace.meta.num_experts}")
    values = {"cache_capacity_bytes": config["hbm_capacity_bytes"],
              "cache_bandwidth_bytes_per_s": config["hbm_bandwidth_bytes_per_s"],
              "stream_capacity_bytes": config["sram_capacity_bytes"],
              "backing_bandwidth_bytes_per_s": config["backing_bandwidth_bytes_per_s"]}
    return offload_setup(load_system(config["system"]), model, dtype=config["dtype"],
                         tier_values={k: v for k, v in values.items() if v})


def evaluate_memory(config: dict, seed: int) -> dict:
    """The outputs of one ``memory`` configuration (see the module docstring)."""
    from moesim.memory.cache import cache_capacity_experts
    from moesim.memory.evaluator import evaluate
    from moesim.memory.sweep import machine_cost_usd

    setup = _setup(config)
    h = setup.hierarchy
    cap = cache_capacity_experts(h, setup.cache_tier, setup.expert)
    stream = _stream(config["trace"], config["batch_tokens"], config["tokens"])
    res = evaluate(setup, stream, config["cache_policy"], capacity_experts=cap, seed=seed,
                   overlap_transfers=config["overlap_transfers"], lookahead=config["prefetch_lookahead"],
                   accuracy=config["prefetch_accuracy"])
    out = {f"{t}_capacity_bytes_used": h.tiers[t].capacity_bytes for t in h.tiers}
    out.update({f"{t}_bandwidth_bytes_per_s_used": h.tiers[t].bandwidth_bytes_per_s for t in h.tiers})
    out.update({"backing_tier": setup.backing_tier, "cache_experts": cap, "expert_bytes": setup.expert.weight_bytes,
                "tokens_per_s": res.tokens_per_s, "hit_rate": res.hit_rate, "stall_s": res.stall_s,
                "total_time_s": res.total_time_s, "compute_s": res.compute_s, "fetches": res.fetches,
                "cost_usd": machine_cost_usd(h, tiers=tuple(t for t in h.tiers if t != HOST))})
    for path, nbytes in res.bytes_by_path.items():
        src, dst = path.split("->")
        out[f"bytes_{src}_to_{dst}"] = nbytes
    return out
