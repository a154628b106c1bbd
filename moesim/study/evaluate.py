"""Evaluate one study configuration into one results row (all inputs and outputs).

Outputs (units in names): ``total_time_s`` (replayed MoE-layer makespan), ``memory_stall_s``
(memory model below), ``step_time_s`` = (total + stall) / steps, ``throughput_tokens_per_s``,
``cost_usd_per_hour`` (system price per node-hour x nodes), ``usd_per_million_tokens``,
``imbalance_mean``/``imbalance_max`` (tokens per device, max/mean), ``comm_fraction``, bytes per
link kind, ``expert_weight_bytes_per_device`` (max over devices), ``hbm_fits``, ``hbm_cache_experts``,
``hbm_hit_rate``, ``hbm_fetch_bytes_per_step``, ``memory_bottleneck_device``, ``memory_backing_tier``,
``sram_hit_fraction``.

Memory model: the expert-cache simulator of ``moesim.memory`` (``cache.plan`` + ``cache.replay_timed``).
A device holds the weights of the expert slots the placement gives it, for every MoE layer (routed
experts only; attention and shared-expert weights are not counted). Its HBM (``hbm_capacity_bytes``, or
the spec's main memory) is an expert cache of ``hbm_capacity_bytes // expert bytes`` experts under
``cache_policy`` (a key of ``moesim.memory.cache.CACHE_POLICIES``); misses are fetched from the backing
tier (``ddr`` when the device has one, as on SN40L, else host memory over the host link, e.g. PCIe).
The replayed access stream is ``memory_steps`` steps of the study's traffic (not ``steps``), one batch
per micro-batch (``tokens / micro_batches`` tokens); in a batch, layers run in order and each device
uses every expert it holds that the batch routes to (an expert with replicas counts on every device
holding it). The cache starts cold; step 0 warms it and is not measured. Outputs over steps 1..:

- ``hbm_hit_rate``: hits / accesses over all devices (an access = one expert's weights used by one batch);
- the *bottleneck device* is the one with the most fetches; ``hbm_fetch_bytes_per_step`` are its
  fetched bytes per step, and its plan is played in SimPy (``replay_timed``: fetches share the
  backing link, compute waits for them) -> ``memory_stall_s = steps * stall per replayed step``, added
  to the makespan (no overlap with communication assumed). A cache of 0 experts fetches every access
  one after the other (closed form). A cache holding all of a device's experts under a demand policy
  (lru/lfu/belady) misses on first use only (computed without the per-access loop; exact);
- ``sram_hit_fraction``: SRAM (``sram_capacity_bytes``, or the spec's ``sram`` tier) as a second cache
  level with the same policy over the same stream: the fraction of routed (token, expert) choices of
  steps 1.. whose expert was resident in SRAM. Logical only: its effect on time is not modelled.

Results are deterministic: every random choice uses ``seed`` (``pregate`` gets ``default_rng(seed)``).

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

SCHEMA_VERSION = 2
DEMAND_POLICIES = ("lru", "lfu", "belady")  # no prefetching: a cache holding every key misses on first use only


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


def _memory_stream(config: dict, seed: int):
    """The access stream of the memory replay: ``memory_steps`` steps of the study's traffic, one batch per
    micro-batch (``tokens / micro_batches`` tokens), layers in order (process-cached)."""
    return _stream(config["traffic"], config["model"], config["tokens"], config["memory_steps"], seed,
                   max(config["tokens"] // config["micro_batches"], 1))


@lru_cache(maxsize=4)
def _stream(name: str, model: str, tokens: int, steps: int, seed: int, batch_tokens: int):
    from moesim.memory.cache import access_stream
    return access_stream(_traffic(name, model, tokens, steps, seed), batch_tokens)


def _plan(stream, capacity: int, policy: str, seed: int):
    """Cache plan of one device's stream; capacity 0 -> every access misses; a cache that holds every
    key of the stream (demand policies) -> misses on first use only (exact, no per-access loop)."""
    from moesim.memory.cache import CachePlan, first_use_plan, plan
    if capacity < 1:
        return CachePlan(policy=policy, capacity=0, hit=np.zeros(len(stream), dtype=bool),
                         prefetched=[[] for _ in range(stream.num_groups)], fetches=len(stream), prefetches=0,
                         useful_prefetches=0, max_resident=0)
    if policy in DEMAND_POLICIES and capacity >= len(np.unique(stream.keys)):
        return first_use_plan(stream, capacity, policy)
    params = {"rng": np.random.default_rng(seed)} if policy == "pregate" else {}
    return plan(stream, capacity, policy, **params)


def _memory(config: dict, system, model, placement, seed: int) -> dict:
    """Memory outputs from the ``moesim.memory`` expert-cache simulator (see the module docstring)."""
    from moesim.memory.cache import CACHE_POLICIES, ExpertShape, from_group, replay_timed, select_accesses
    from moesim.memory.tiers import MemoryHierarchy

    policy = config["cache_policy"]
    if policy not in CACHE_POLICIES:
        raise ValueError(f"cache_policy {policy!r} is unknown; known: {', '.join(sorted(CACHE_POLICIES))}")
    if config["memory_steps"] < 2:
        raise ValueError(f"memory_steps must be >= 2 (step 0 warms the cache), got {config['memory_steps']}")
    dev = system.device
    h = MemoryHierarchy.from_system(system)
    cache_tier = dev.main_memory.name
    hbm = config["hbm_capacity_bytes"] or dev.main_memory.capacity_bytes
    h = h.with_tier(cache_tier, capacity_bytes=float(hbm))
    backing = "ddr" if "ddr" in h.tiers and cache_tier != "ddr" else "host"
    sram = config["sram_capacity_bytes"] or (h.tiers["sram"].capacity_bytes if "sram" in h.tiers else 0.0)
    dtype_bytes = DTYPE_BYTES[config["dtype"]]
    expert = ExpertShape(weight_bytes=float(model.expert_weight_bytes(dtype_bytes)),
                         flops_per_token=2.0 * 3 * model.hidden_size * model.moe_intermediate_size)
    d_count, spd = system.num_devices, placement.slots_per_device
    l_count, e_count = placement.num_layers, placement.num_experts
    used = (placement.slot_to_expert >= 0).reshape(l_count, d_count, spd).sum(axis=2)  # [L, D]
    weights = used.sum(axis=0) * expert.weight_bytes  # [D] bytes of expert weights placed per device
    stream = _memory_stream(config, seed)
    if stream.num_layers != l_count or stream.num_experts != e_count:
        raise ValueError(f"memory replay: traffic has {stream.num_layers} layers x {stream.num_experts} experts, "
                         f"placement {l_count} x {e_count}")
    steps_mem = config["memory_steps"]
    batch_tokens = max(config["tokens"] // config["micro_batches"], 1)
    first = min(-(-config["tokens"] // batch_tokens) * l_count, stream.num_groups)  # groups of step 0 (warm-up)
    cap_hbm = int(hbm // expert.weight_bytes)
    cap_sram = int(sram // expert.weight_bytes)
    holds = np.zeros((d_count, l_count * e_count), dtype=bool)  # device d holds key layer * E + expert
    s2e = placement.slot_to_expert
    for layer in range(l_count):
        dev_of = np.arange(s2e.shape[1]) // spd
        ok = s2e[layer] >= 0
        holds[dev_of[ok], layer * e_count + s2e[layer, ok]] = True
    hits = accesses = sram_hit_tokens = tokens = 0
    worst = None  # (misses in measured steps, device, stream, plan)
    for d in range(d_count):
        s = select_accesses(stream, holds[d][stream.keys])
        p = _plan(s, cap_hbm, policy, seed)
        sub, sub_plan = from_group(s, p, first)
        hits += int(sub_plan.hit.sum())
        accesses += len(sub)
        misses = int((~sub_plan.hit).sum()) + sub_plan.prefetches
        if worst is None or misses > worst[0]:
            worst = (misses, d, sub, sub_plan)
        if cap_sram >= 1:
            _, sp = from_group(s, _plan(s, cap_sram, policy, seed), first)
            sram_hit_tokens += int(sub.tokens[sp.hit].sum())
        tokens += int(sub.tokens.sum())
    _, worst_d, sub, sub_plan = worst
    if len(sub) and cap_hbm >= 1:
        res = replay_timed(sub, sub_plan, h, expert, peak_flops_per_s=dev.peak(config["dtype"]), cache_tier=cache_tier,
                           backing_tier=backing, stream_tier="sram", overlap_transfers=True)
        stall_step = res.stall_s / (steps_mem - 1)
    else:  # nothing cached: every access fetches its expert, one after the other
        stall_step = len(sub) * h.transfer_time_s(expert.weight_bytes, backing, cache_tier) / (steps_mem - 1)
    return {"hbm_capacity_bytes_used": float(hbm), "sram_capacity_bytes_used": float(sram),
            "expert_weight_bytes_per_device": float(weights.max()), "hbm_fits": bool(weights.max() <= hbm),
            "hbm_cache_experts": cap_hbm, "memory_backing_tier": backing,
            "hbm_hit_rate": hits / accesses if accesses else 1.0,
            "hbm_fetch_bytes_per_step": worst[0] * expert.weight_bytes / (steps_mem - 1),
            "memory_bottleneck_device": int(worst_d),
            "memory_stall_s": config["steps"] * stall_step,
            "sram_hit_fraction": sram_hit_tokens / tokens if tokens else 0.0}


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
    mem = _memory(config, system, model, placement, seed)
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
