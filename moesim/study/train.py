"""The ``train`` engine of studies: one configuration (``moesim.study.spec.TRAIN_PARAMETERS``) -> one row.

A configuration names a model config, a system scaled to ``nodes``, the parallel layout (``dp`` is what is left:
devices / (tp x pp)), the step's options and the routing: ``balanced`` or ``table:<name>[:options]`` (an SGLang
DeepSeek-V3 expert-load table from the shared traces, e.g. ``table:prefill_in4096:tokens=8192,steps=2``) or any
trace spec :func:`workloads.importers.load_trace` reads. ``layers`` > 0 keeps the first blocks only. Memory is
reported (``memory_gb``, ``hbm_fits``), not enforced, so that layouts that do not fit still show their speed.

Outputs: ``step_time_s``, ``tokens_per_s_per_device``, ``throughput_tokens_per_s``, ``mfu``, ``bubble_fraction``,
``grad_sync_s``, ``fssdp_comm_s``, ``fssdp_bytes_per_step``, ``moe_imbalance_mean``, ``comm_fraction`` (the
communication seconds of the phases over their total), ``memory_gb``, ``hbm_fits``, ``cost_usd_per_hour`` and
``usd_per_million_tokens`` (the system's price per node-hour x nodes), and the drill-down columns the study
report reads (empty here).
"""

from __future__ import annotations

import json
from functools import lru_cache

from moebase.units import GB


@lru_cache(maxsize=4)
def _trace(routing: str):
    from workloads.importers import find_shared_traces, load_trace
    from workloads.load_table import shipped_table_path

    if routing.startswith("table:"):
        name, _, options = routing[len("table:"):].partition(":")
        shared = find_shared_traces()
        if shared is None:
            raise ValueError(f"routing {routing!r} needs the shared traces (shared/data/traces or "
                             "$MOESIM_SHARED_TRACES)")
        path = shipped_table_path(name, shared)
        return load_trace(f"{path}:{options}" if options else str(path))
    return load_trace(routing)


def _spec(config: dict, num_devices: int):
    from moesim.train.spec import TrainError, spec_from_options

    model_parallel = config["tp"] * config["cp"] * config["pp"]
    if num_devices % model_parallel:
        raise TrainError(f"tp x cp x pp = {model_parallel} does not divide the {num_devices} devices")
    return spec_from_options(config, num_devices // model_parallel,
                             "balanced" if config["routing"] == "balanced" else "trace")


def evaluate_train(config: dict) -> dict:
    """Outputs of one ``train`` study configuration (module docstring)."""
    import dataclasses

    from hwmodels.cost import COST_MODELS
    from hwmodels.specs import load_system
    from moesim.train.ops import default_cost
    from moesim.train.step import simulate_step
    from workloads.hf_config import load_config

    system = load_system(config["system"]).with_nodes(config["nodes"])
    cfg = load_config(config["model"])
    if config["layers"]:
        cfg = cfg.with_layers(min(config["layers"], cfg.num_hidden_layers))
    if config["cost"] == "default":
        cost = default_cost(system.device)
    elif config["cost"] in COST_MODELS and config["cost"] != "calibrated":
        cost = COST_MODELS[config["cost"]]()
    else:
        raise ValueError(f"cost {config['cost']!r} is not usable in train studies (default, roofline, gpu-fitted)")
    if config["comm_sms"] and hasattr(cost, "overlap_sms"):
        cost = dataclasses.replace(cost, overlap_sms=config["comm_sms"])
    spec = _spec(config, system.num_devices)
    trace = None if config["routing"] == "balanced" else _trace(config["routing"])
    r = simulate_step(cfg, system, spec, cost, trace=trace, check_memory=False)
    comm = sum(p["time_s"] for p in r.phases if p["kind"] == "communication")
    busy = sum(p["time_s"] for p in r.phases if p["kind"] in ("communication", "compute"))
    price = (system.price_per_hour_usd or 0.0) * system.num_nodes
    mem = r.memory_bytes
    return {"num_devices": system.num_devices, "dp": spec.parallel.dp, "step_time_s": r.step_time_s,
            "tokens_per_s_per_device": r.tokens_per_s_per_device, "throughput_tokens_per_s": r.tokens_per_s,
            "mfu": r.mfu, "bubble_fraction": r.breakdown["bubble_fraction"], "grad_sync_s": r.breakdown["grad_sync_s"],
            "fssdp_comm_s": r.breakdown["fssdp_comm_s"], "fssdp_bytes_per_step": r.breakdown["fssdp_bytes_per_step"],
            "moe_imbalance_mean": r.breakdown["moe_imbalance_mean"],
            "imbalance_mean": r.breakdown["moe_imbalance_mean"],
            "comm_fraction": comm / busy if busy > 0 else 0.0, "memory_gb": mem["total"]["hbm"] / GB,
            "hbm_fits": bool(mem["total"]["hbm"] <= mem["capacity"]["hbm"]), "cost_usd_per_hour": price,
            "usd_per_million_tokens": price / 3600.0 / r.tokens_per_s * 1e6 if r.tokens_per_s > 0 else 0.0,
            "collectives": r.meta["collectives"], "cost_model": r.meta["cost_model"],
            "drill_device_tokens": json.dumps([]), "drill_timeline": json.dumps([])}
