"""Evaluate one study configuration into one results row (all inputs and outputs).

Outputs (units in names): ``total_time_s`` (replayed MoE-layer makespan), ``memory_stall_s``
(memory model below), ``step_time_s`` = (total + stall) / steps, ``throughput_tokens_per_s``,
``cost_usd_per_hour`` (system price per node-hour x nodes), ``usd_per_million_tokens``,
``imbalance_mean``/``imbalance_max`` (tokens per device, max/mean), ``comm_fraction``, bytes per
link kind, ``expert_weight_bytes_per_device`` (max over devices), ``hbm_fits``, ``hbm_cache_experts``,
``hbm_hit_rate``, ``hbm_fetch_bytes_per_step``, ``memory_bottleneck_device``, ``memory_backing_tier``,
``sram_hit_fraction``, ``cost_model`` (the cost model that ran: ``cost = "default"`` is the device's default,
:func:`hwmodels.cost.default_cost_model`, as in ``moesim simulate``) and ``cost_description`` (its provenance:
what it was fitted on and its validated error, :func:`hwmodels.cost.describe_cost`).

Memory model: the expert-cache simulator of ``moesim.memory`` (:func:`moesim.memory.evaluator.evaluate_placed`).
A device holds the weights of the expert slots the placement gives it, for every MoE layer (routed
experts only; attention and shared-expert weights are not counted). Its HBM (``hbm_capacity_bytes``, or
the spec's main memory) is an expert cache of ``hbm_capacity_bytes // expert bytes`` experts under
``cache_policy`` (a key of ``moesim.memory.cache.CACHE_POLICIES``); misses are fetched from the backing
tier, the tier behind the cache tier (``MemoryHierarchy.backing_tier``: ``ddr`` on SN40L, else host memory
over the host link, e.g. PCIe).
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

Results are deterministic: every random choice uses ``seed`` (each cache plan gets ``default_rng(seed)``).

Drill-down columns (JSON text): ``drill_device_tokens`` [layers][devices] choices computed per
device (per node [layers][nodes] for load-table traffic, ``moesim.study.traffic.drill_tokens``);
``drill_timeline`` list of [op, layer, start_s, end_s] for step 0, micro-batch 0.

Process-level caches (systems, all-to-all routes, traffic) make repeated configurations cheap.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache

import numpy as np

from moesim.study.spec import PARAMETERS, config_id

SCHEMA_VERSION = 2


@lru_cache(maxsize=16)
def _system(name: str, nodes: int):
    from hwmodels.specs import load_system
    s = load_system(name)
    return s.with_nodes(nodes) if nodes != s.num_nodes else s


@lru_cache(maxsize=16)
def _a2a(name: str, nodes: int):
    from hwmodels.topology import all_to_all_routing
    return all_to_all_routing(_system(name, nodes))


@lru_cache(maxsize=16)
def _cost(name: str, system: str, nodes: int):
    """The cost model ``name`` (``default``: the device's, as ``moesim simulate``; :func:`hwmodels.cost.cost_model`)."""
    from hwmodels.cost import cost_model
    return cost_model(name, _system(system, nodes).device)


@lru_cache(maxsize=8)
def _model(name: str):
    from workloads.catalog import get_model
    return get_model(name)


@lru_cache(maxsize=4)
def _traffic(name: str, model: str, tokens: int, steps: int, seed: int):
    from moesim.study.traffic import make_traffic
    return make_traffic(name, _model(model), tokens, steps, seed)


def _placement(method: str, fit_trace, system, replicas: int, seed: int):
    from moesim.place import get_method
    from moesim.place.problem import link_costs, problem_from_trace
    chosen = get_method(method)  # ValueError naming the known methods
    gpu_cost, node_cost = link_costs(system)
    problem = problem_from_trace(fit_trace, system.num_devices, system.devices_per_node, num_replicas=replicas,
                                 cross_gpu_cost=gpu_cost, cross_node_cost=node_cost,
                                 with_affinity=chosen.needs_affinity)
    return chosen.study_placer(problem, np.random.default_rng(seed))


def _memory_stream(config: dict, seed: int):
    """The access stream of the memory replay: ``memory_steps`` steps of the study's traffic, one batch per
    micro-batch (``tokens / micro_batches`` tokens), layers in order (process-cached)."""
    return _stream(config["traffic"], config["model"], config["tokens"], config["memory_steps"], seed,
                   _batch_tokens(config))


def _batch_tokens(config: dict) -> int:
    return max(config["tokens"] // config["micro_batches"], 1)


@lru_cache(maxsize=4)
def _stream(name: str, model: str, tokens: int, steps: int, seed: int, batch_tokens: int):
    from moesim.memory.cache import access_stream
    return access_stream(_traffic(name, model, tokens, steps, seed), batch_tokens)


def _memory(config: dict, system, model, placement, seed: int) -> dict:
    """Memory outputs from the ``moesim.memory`` expert-cache simulator (see the module docstring)."""
    from moesim.memory.cache import CACHE_POLICIES
    from moesim.memory.evaluator import evaluate_placed, offload_setup

    policy = config["cache_policy"]
    if policy not in CACHE_POLICIES:
        raise ValueError(f"cache_policy {policy!r} is unknown; known: {', '.join(sorted(CACHE_POLICIES))}")
    steps_mem = config["memory_steps"]
    if steps_mem < 2:
        raise ValueError(f"memory_steps must be >= 2 (step 0 warms the cache), got {steps_mem}")
    hbm = config["hbm_capacity_bytes"] or system.device.main_memory.capacity_bytes
    setup = offload_setup(system, model, dtype=config["dtype"], tier_values={"cache_capacity_bytes": float(hbm)})
    sram = config["sram_capacity_bytes"] or setup.capacity_bytes("stream")
    stream = _memory_stream(config, seed)
    warmup = min(-(-config["tokens"] // _batch_tokens(config)) * placement.num_layers, stream.num_groups)
    mem = evaluate_placed(setup, placement, stream, policy, hbm_experts=setup.experts_in(hbm),
                          sram_experts=setup.experts_in(sram), warmup_groups=warmup, seed=seed)
    measured_steps = steps_mem - 1
    return {"hbm_capacity_bytes_used": float(hbm), "sram_capacity_bytes_used": float(sram),
            "expert_weight_bytes_per_device": mem.weight_bytes_max, "hbm_fits": bool(mem.weight_bytes_max <= hbm),
            "hbm_cache_experts": setup.experts_in(hbm), "memory_backing_tier": setup.backing_tier,
            "hbm_hit_rate": mem.hit_rate,
            "hbm_fetch_bytes_per_step": mem.bottleneck_fetches * setup.expert.weight_bytes / measured_steps,
            "memory_bottleneck_device": mem.bottleneck_device,
            "memory_stall_s": config["steps"] * (mem.bottleneck_stall_s / measured_steps),
            "sram_hit_fraction": mem.sram_hit_fraction}


def evaluate(config: dict, engine: str, seed: int) -> dict:
    """One configuration -> one row: the configuration's parameters, ``config_id``, outputs."""
    from moesim.analytic import estimate
    from moesim.sim import SimOptions, simulate
    from moesim.study.traffic import drill_tokens
    from hwmodels.cost import describe_cost

    t0 = time.perf_counter()
    if engine == "memory":  # expert offloading on one device (moesim.study.memory)
        from moesim.study.memory import evaluate_memory
        return {"config_id": config_id(config, engine, seed), **config, "engine": engine, "seed": seed,
                **evaluate_memory(config, seed), "eval_wall_s": time.perf_counter() - t0,
                "schema_version": SCHEMA_VERSION}
    if engine == "train":  # one training step of a whole model (moesim.study.train)
        from moesim.study.train import evaluate_train
        return {"config_id": config_id(config, engine, seed), **config, "engine": engine, "seed": seed,
                **evaluate_train(config), "eval_wall_s": time.perf_counter() - t0, "schema_version": SCHEMA_VERSION}
    system = _system(config["system"], config["nodes"])
    model = _model(config["model"])
    trace = _traffic(config["traffic"], config["model"], config["tokens"], config["steps"], seed)
    fit = _traffic(config["traffic"], config["model"], config["tokens"], 1, seed + 1)  # placement fitted on other tokens
    placement = _placement(config["placement"], fit, system, config["replicas"], seed)
    cost = _cost(config["cost"], config["system"], config["nodes"])
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
           "cost_model": getattr(cost, "name", type(cost).__name__),
           "cost_description": describe_cost(cost, system.device, config["dtype"], system=system),
           "total_time_s": result.total_time_s, **mem,
           "step_time_s": busy / config["steps"], "throughput_tokens_per_s": tokens / busy if busy > 0 else 0.0,
           "cost_usd_per_hour": price,
           "usd_per_million_tokens": price / 3600.0 / (tokens / busy) * 1e6 if busy > 0 else 0.0,
           "imbalance_mean": float(imb.mean()), "imbalance_max": float(imb.max()),
           "comm_fraction": float(result.layer_comm_s.sum() / max(result.layer_time_s.sum(), 1e-30)),
           "scale_up_bytes": float(link.get(system.scale_up.kind, 0.0)),
           "scale_out_bytes": float(link.get(system.scale_out.kind, 0.0)) if system.scale_out else 0.0,
           "tokens_routed": int(result.tokens["dispatched"].sum()),
           "drill_device_tokens": json.dumps(drill_tokens(config["traffic"], result.device_tokens,
                                                          system.devices_per_node).tolist()),
           "drill_timeline": json.dumps([[r.op, int(r.layer), float(r.s), float(r.e)] for r in tl.itertuples()]),
           "eval_wall_s": time.perf_counter() - t0, "schema_version": SCHEMA_VERSION}
    return row
