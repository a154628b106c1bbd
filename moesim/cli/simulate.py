"""``moesim simulate``: replay a routing trace on a modelled system and write a run directory."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("simulate", help="replay a routing trace on a modelled system",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--system", default="dgx-h100", help="system spec name (see 'moesim systems') or a .toml path")
    p.add_argument("--nodes", type=int, default=None, help="scale the system to this many nodes")
    p.add_argument("--model", default=None, help="model catalog name (default: the trace's model)")
    p.add_argument("--trace", default="default", help="'default' (embedded FLAME-MoE-290M), 'flame', 'switch', "
                   "a .parquet trace, a capture directory, a FLAME .npz or a switch .json")
    p.add_argument("--placement", default="contiguous", help="'contiguous' or a placement JSON from 'moesim place'")
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--cost", default="roofline", help="cost model: roofline | calibrated")
    p.add_argument("--profile", default=None, help="kernel-timing profile (.parquet) for --cost calibrated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="run", help="output run directory")
    p.set_defaults(func=run)


def resolve_cost(name: str, profile: str | None, device):
    from hwmodels import cost as cost_mod

    if name not in cost_mod.COST_MODELS:
        raise ValueError(f"unknown cost model {name!r}; known: {', '.join(sorted(cost_mod.COST_MODELS))}")
    factory = cost_mod.COST_MODELS[name]
    if name == "roofline":
        return factory()
    return factory.from_profile(profile, device)


def resolve_placement(spec: str, num_layers: int, num_experts: int, num_devices: int):
    from moesim.io import load_placement
    from moesim.placement import contiguous

    if spec == "contiguous":
        return contiguous(num_layers, num_experts, num_devices)
    if not Path(spec).exists():
        raise ValueError(f"placement {spec!r} is neither 'contiguous' nor an existing placement file")
    return load_placement(spec)


def run(args) -> int:
    from hwmodels.specs import load_system
    from moesim.cli._common import progress_bar
    from moesim.io import write_run
    from moesim.sim import SimOptions, simulate
    from workloads.catalog import get_model
    from workloads.importers import load_trace

    system = load_system(args.system)
    if args.nodes:
        system = system.with_nodes(args.nodes)
    trace = load_trace(args.trace)
    model = get_model(args.model or trace.meta.model)
    placement = resolve_placement(args.placement, trace.meta.num_layers, trace.meta.num_experts, system.num_devices)
    cost = resolve_cost(args.cost, args.profile, system.device)
    options = SimOptions(micro_batches=args.micro_batches, dtype=args.dtype)
    t0 = time.perf_counter()
    with progress_bar("simulating", unit="layer") as update:
        result = simulate(system, model, placement, trace, cost=cost, options=options, seed=args.seed, progress=update)
    wall_s = time.perf_counter() - t0
    spec = args.trace if not Path(args.trace).exists() else str(Path(args.trace).resolve())
    out = write_run(result, args.out, trace.expert_load(), extra={"trace_spec": spec})
    imb = result.imbalance
    print(f"simulated {trace.num_tokens} tokens x {trace.meta.num_layers} MoE layers of {model.name} on {system.name} "
          f"({system.num_devices} x {system.device.name}) in {wall_s:.2f} s wall")
    per_layer_us = result.total_time_s * 1e6 / max(trace.meta.num_layers * trace.num_steps, 1)
    print(f"  simulated time {result.total_time_s * 1e6:.1f} us ({per_layer_us:.1f} us per MoE layer and step); "
          f"load imbalance max/mean {imb.mean():.3f} (worst {imb.max():.3f})")
    print(f"  wrote {out}/ (next: moesim report {out})")
    return 0
