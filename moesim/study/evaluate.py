"""Evaluate one study configuration into one results row (all inputs and outputs).

Outputs (units in names): ``total_time_s`` (replayed MoE-layer makespan), ``memory_stall_s``
(capacity model below), ``step_time_s`` = (total + stall) / steps, ``throughput_tokens_per_s``,
``cost_usd_per_hour`` (system price per node-hour x nodes), ``usd_per_million_tokens``,
``imbalance_mean``/``imbalance_max`` (tokens per device, max/mean), ``comm_fraction``, bytes per
link kind, ``expert_weight_bytes_per_device`` (max over devices), ``hbm_fits``, ``sram_hit_fraction``.

Memory capacity model (simple, documented; the detailed cache models live in ``moesim/memory``):
a device holds the weights of the expert slots the placement gives it, for every MoE layer
(routed experts only; attention and shared-expert weights are not counted). When those exceed the
HBM capacity, the excess is streamed from host memory over the host link once per step:
``memory_stall_s = steps * max_d(excess_d) / host_link bandwidth``. ``sram_hit_fraction`` is the
fraction of routed (token, expert) choices whose expert weights would sit in on-chip SRAM if each
device kept its most-used (layer, expert) weights there -- a static-cache hit rate.

Drill-down columns (JSON text): ``drill_device_tokens`` [layers][devices] choices computed per
device; ``drill_timeline`` list of [op, layer, start_s, end_s] for step 0, micro-batch 0.

Process-level caches (systems, all-to-all routes, traffic) make repeated configurations cheap.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache

import numpy as np

from hwmodels.cost import DTYPE_BYTES
from moesim.study.spec import PARAMETERS, config_id

SCHEMA_VERSION = 1


@lru_cache(maxsize=16)
def _system(name: str, nodes: int):
    from hwmodels.specs import load_system
    s = load_system(name)
    return s.with_nodes(nodes) if nodes != s.num_nodes else s


@lru_cache(maxsize=16)
def _a2a(name: str, nodes: int):
    from hwmodels.topology import all_to_all_routing
    return all_to_all_routing(_system(name, nodes))


@lru_cache(maxsize=8)
def _model(name: str):
    from workloads.catalog import get_model
    return get_model(name)


@lru_cache(maxsize=4)
def _traffic(name: str, model: str, tokens: int, steps: int, seed: int):
    from moesim.study.traffic import make_traffic
    return make_traffic(name, _model(model), tokens, steps, seed)


def placement_methods() -> dict:
    """Placement methods by name: ``moesim.place`` baselines (and optimisers) when available,
    else :func:`moesim.placement.contiguous` only. Each is ``(problem, rng) -> Placement``."""
    methods = {}
    try:
        from moesim.place.baselines import BASELINES
        methods.update(BASELINES)
    except ImportError:
        pass
    try:  # the OR-Tools placers, if the placement package offers them
        from moesim.place import PLACERS  # type: ignore[attr-defined]
        methods.update(PLACERS)
    except ImportError:
        pass
    return methods


def _placement(method: str, fit_trace, system, replicas: int, seed: int):
    from moesim.placement import contiguous
    if method == "contiguous" and replicas == 0 and "contiguous" not in placement_methods():
        return contiguous(fit_trace.meta.num_layers, fit_trace.meta.num_experts, system.num_devices)
    methods = placement_methods()
    if method not in methods:
        raise ValueError(f"unknown placement method {method!r}; known: {', '.join(sorted(methods)) or 'contiguous'}")
    from moesim.place.problem import link_costs, problem_from_trace
    gpu_cost, node_cost = link_costs(system)
    problem = problem_from_trace(fit_trace, system.num_devices, system.devices_per_node, num_replicas=replicas,
                                 cross_gpu_cost=gpu_cost, cross_node_cost=node_cost, with_affinity=False)
    return methods[method](problem, np.random.default_rng(seed))


def _memory(config: dict, system, model, placement, trace, steps: int) -> dict:
    dev = system.device
    hbm = config["hbm_capacity_bytes"] or dev.main_memory.capacity_bytes
    sram_tiers = [t for t in dev.memory if t.name == "sram"]
    sram = config["sram_capacity_bytes"] or (sram_tiers[0].capacity_bytes if sram_tiers else 0.0)
    expert_bytes = model.expert_weight_bytes(DTYPE_BYTES[config["dtype"]])
    d_count, spd = system.num_devices, placement.slots_per_device
    used = (placement.slot_to_expert >= 0).reshape(placement.num_layers, d_count, spd).sum(axis=2)  # [L, D]
    weights = used.sum(axis=0) * float(expert_bytes)  # [D] (all MoE layers of the trace)
    excess = np.maximum(weights - hbm, 0.0)
    stall = steps * float(excess.max()) / system.host_link.bandwidth_bytes_per_s
    # static SRAM cache: each device keeps its most-used (layer, expert) weights that fit in SRAM
    sram_slots = int(sram // expert_bytes) if expert_bytes else 0
    load = trace.expert_load()  # [L, E]
    hits = 0
    if sram_slots:
        for d in range(d_count):
            held = np.concatenate([load[layer, placement.experts_on_device(layer, d)]
                                   for layer in range(placement.num_layers)])
            hits += np.sort(held)[::-1][:sram_slots].sum()
    total = load.sum()
    return {"hbm_capacity_bytes_used": float(hbm), "sram_capacity_bytes_used": float(sram),
            "expert_weight_bytes_per_device": float(weights.max()), "hbm_fits": bool(excess.max() == 0),
            "memory_stall_s": stall, "sram_hit_fraction": float(hits / total) if total else 0.0}


def evaluate(config: dict, engine: str, seed: int) -> dict:
    """One configuration -> one row: the configuration's parameters, ``config_id``, outputs."""
    from moesim.analytic import estimate
    from moesim.sim import SimOptions, simulate
    from hwmodels.cost import COST_MODELS

    t0 = time.perf_counter()
    system = _system(config["system"], config["nodes"])
    model = _model(config["model"])
    trace = _traffic(config["traffic"], config["model"], config["tokens"], config["steps"], seed)
    fit = _traffic(config["traffic"], config["model"], config["tokens"], 1, seed + 1)  # placement fitted on other tokens
    placement = _placement(config["placement"], fit, system, config["replicas"], seed)
    if config["cost"] not in COST_MODELS or config["cost"] != "roofline":
        raise ValueError(f"cost model {config['cost']!r} is not usable in studies (known: roofline)")
    cost = COST_MODELS["roofline"]()
    options = SimOptions(micro_batches=config["micro_batches"], dtype=config["dtype"],
                         overlap_micro_batches=config["overlap_micro_batches"], replica_routing=config["replica_routing"])
    if engine == "analytic":
        result = estimate(system, model, placement, trace, cost=cost, options=options, seed=seed,
                          a2a=_a2a(config["system"], config["nodes"]))
    else:
        result = simulate(system, model, placement, trace, cost=cost, options=options, seed=seed)
    mem = _memory(config, system, model, placement, trace, config["steps"])
    tokens = config["tokens"] * config["steps"]
    busy = result.total_time_s + mem["memory_stall_s"]
    price = (system.price_per_hour_usd or 0.0) * system.num_nodes
    link = result.link_bytes.groupby("kind")["bytes"].sum().to_dict()
    ops = result.ops
    first = ops[(ops["step"] == ops["step"].min()) & (ops["micro_batch"] == 0)]
    tl = first.groupby(["layer", "op"]).agg(s=("start_at_s", "min"), e=("end_at_s", "max")).reset_index()
    imb = result.imbalance
    row = {"config_id": config_id(config, engine, seed), **{k: config[k] for k in PARAMETERS},
           "engine": engine, "seed": seed, "num_devices": system.num_devices, "device": system.device.name,
           "total_time_s": result.total_time_s, **mem,
           "step_time_s": busy / config["steps"], "throughput_tokens_per_s": tokens / busy if busy > 0 else 0.0,
           "cost_usd_per_hour": price,
           "usd_per_million_tokens": price / 3600.0 / (tokens / busy) * 1e6 if busy > 0 else 0.0,
           "imbalance_mean": float(imb.mean()), "imbalance_max": float(imb.max()),
           "comm_fraction": float(result.layer_comm_s.sum() / max(result.layer_time_s.sum(), 1e-30)),
           "scale_up_bytes": float(link.get(system.scale_up.kind, 0.0)),
           "scale_out_bytes": float(link.get(system.scale_out.kind, 0.0)) if system.scale_out else 0.0,
           "tokens_routed": int(result.tokens["dispatched"].sum()),
           "drill_device_tokens": json.dumps(result.device_tokens.tolist()),
           "drill_timeline": json.dumps([[r.op, int(r.layer), float(r.s), float(r.e)] for r in tl.itertuples()]),
           "eval_wall_s": time.perf_counter() - t0, "schema_version": SCHEMA_VERSION}
    return row
