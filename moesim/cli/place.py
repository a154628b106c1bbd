"""``moesim place``: optimise expert placement with OR-Tools CP-SAT, or compare all methods on
held-out tokens (``--compare``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

METHOD_NAMES = ("contiguous", "round-robin", "random", "greedy", "balance", "traffic", "joint")


def register(sub) -> None:
    p = sub.add_parser("place", help="optimise expert placement (CP-SAT) or compare placements on held-out tokens",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trace", default="default", help="'default', 'flame', 'switch', a .parquet trace or capture dir")
    p.add_argument("--system", default="dgx-h100", help="system spec name or .toml path")
    p.add_argument("--nodes", type=int, default=None, help="scale the system to this many nodes")
    p.add_argument("--model", default=None, help="model catalog name (default: the trace's model)")
    p.add_argument("--objective", default="joint", choices=("balance", "traffic", "joint"))
    p.add_argument("--replicas", type=int, default=0, help="redundant expert slots per layer (in total)")
    p.add_argument("--slots-per-device", type=int, default=None,
                   help="expert slots per GPU (memory capacity); default: the minimum that fits")
    p.add_argument("--time-limit", default="30s", help="wall-time limit of the solve, e.g. 30s, 500ms")
    p.add_argument("--workers", type=int, default=None, help="CP-SAT threads in total (default: all cores)")
    p.add_argument("--scenarios", type=int, default=32,
                   help="bootstrap scenarios for the robust balance objective (0: nominal load only)")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="joint: allowed relative loss in the balance objective when reducing traffic")
    p.add_argument("--current", default=None, help="current placement JSON (for --max-moves)")
    p.add_argument("--max-moves", type=int, default=None,
                   help="at most this many new (expert, GPU) copies per layer versus --current (default contiguous)")
    p.add_argument("--fit-fraction", type=float, default=None,
                   help="fit on this first fraction of every step's tokens (default: 1.0; 0.5 with --compare)")
    p.add_argument("--compare", action="store_true",
                   help="fit every method on the first part, replay the rest through the simulator, print a table")
    p.add_argument("--methods", default=",".join(METHOD_NAMES), help="--compare: comma-separated methods")
    p.add_argument("--report", default=None, help="--compare: HTML report path (default: <out stem>.html)")
    p.add_argument("--deterministic", action="store_true",
                   help="reproducible solves: --time-limit counts CP-SAT deterministic time, not wall seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="placement.json", help="placement JSON to write")
    p.set_defaults(func=run)


def _parse_time(text: str) -> float:
    from moesim.units import parse_quantity

    try:
        value = parse_quantity("time_limit_s", text)
    except ValueError as exc:
        raise ValueError(f"--time-limit {text!r}: {exc}") from None
    if value <= 0:
        raise ValueError(f"--time-limit must be > 0, got {text!r}")
    return value


def run(args) -> int:
    import numpy as np

    from hwmodels.specs import load_system
    from moesim.cli._common import progress_bar
    from moesim.io import load_placement, save_placement
    from moesim.place import BASELINES, link_costs, problem_from_trace, solve
    from moesim.place.evaluate import evaluate
    from moesim.report.placement import format_table, write_placement_report
    from workloads.catalog import get_model
    from workloads.importers import load_trace

    time_limit_s = _parse_time(args.time_limit)
    system = load_system(args.system)
    if args.nodes:
        system = system.with_nodes(args.nodes)
    trace = load_trace(args.trace)
    model = get_model(args.model or trace.meta.model)
    if model.num_experts != trace.meta.num_experts:
        raise ValueError(f"trace and model disagree on the expert count: trace {args.trace!r} has "
                         f"{trace.meta.num_experts} experts per layer, model {model.name!r} has {model.num_experts}")
    fraction = args.fit_fraction if args.fit_fraction is not None else (0.5 if args.compare else 1.0)
    if not 0 < fraction <= 1:
        raise ValueError(f"--fit-fraction must be in (0, 1], got {fraction}")
    if args.compare and fraction >= 1:
        raise ValueError("--compare needs held-out tokens: --fit-fraction must be < 1")
    fit, heldout = trace.split_tokens(fraction) if fraction < 1 else (trace, None)
    gpu_cost, node_cost = link_costs(system)
    rng = np.random.default_rng(args.seed)
    problem = problem_from_trace(fit, system.num_devices, system.devices_per_node, num_replicas=args.replicas,
                                 slots_per_device=args.slots_per_device, num_experts=model.num_experts,
                                 cross_gpu_cost=gpu_cost, cross_node_cost=node_cost,
                                 num_scenarios=args.scenarios, rng=rng)
    current = load_placement(args.current) if args.current else None
    if args.max_moves is not None and current is None:
        current = BASELINES["contiguous"](problem, rng)
    solve_kw = dict(time_limit_s=time_limit_s, num_workers=args.workers, current=current, max_moves=args.max_moves,
                    balance_tolerance=args.tolerance, seed=args.seed,
                    deterministic=args.deterministic)
    context = {"trace": f"{args.trace} ({trace.meta.model}, {trace.num_tokens} tokens, {trace.meta.num_layers} MoE "
                        f"layers, top-{trace.meta.top_k} of {trace.meta.num_experts})",
               "system": f"{system.name}: {system.num_devices} x {system.device.name} in {system.num_nodes} node(s)",
               "fit / held-out": f"first {fraction:.0%} of every step's tokens / the rest",
               "slots per GPU": problem.slots_per_device, "replicas": args.replicas,
               "time limit per CP-SAT method": f"{time_limit_s:g} s", "bootstrap scenarios": args.scenarios}

    if not args.compare:
        t0 = time.perf_counter()
        with progress_bar(f"placing ({args.objective})", unit="layer") as update:
            placement, report = solve(problem, args.objective, progress=update, **solve_kw)
        wall_s = time.perf_counter() - t0
        summary = report.summary()
        out = save_placement(placement, args.out, extra={"solve": summary, **{k: str(v) for k, v in context.items()}})
        print(f"placed {trace.meta.num_experts} experts x {trace.meta.num_layers} layers on {system.num_devices} GPUs "
              f"({problem.slots_per_device} slots each, {args.replicas} replicas) in {wall_s:.2f} s")
        for stage in ("balance", "traffic"):
            if stage in summary:
                s = summary[stage]
                print(f"  {stage}: objective {s['objective_sum']:.1f}, proven bound {s['bound_sum']:.1f}, "
                      f"gap {s['gap']:.2%} (worst layer {s['max_layer_gap']:.2%}); "
                      f"{s['optimal_layers']}/{s['layers']} layers proven optimal")
        print(f"  wrote {out} (next: moesim simulate --placement {out})")
        return 0

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHOD_NAMES)}")
    heldout_problem = problem_from_trace(heldout, system.num_devices, system.devices_per_node,
                                         num_replicas=args.replicas, slots_per_device=problem.slots_per_device)
    rows = []
    with progress_bar("comparing placements", total=len(methods), unit="method") as update:
        for i, name in enumerate(methods):
            t0 = time.perf_counter()
            gap = ""
            if name in BASELINES:
                placement = BASELINES[name](problem, np.random.default_rng(args.seed))
            else:
                placement, report = solve(problem, name, **solve_kw)
                s = report.summary()
                gap = "; ".join(f"{k} {s[k]['gap']:.1%}" for k in ("balance", "traffic") if k in s)
            solve_s = time.perf_counter() - t0
            row = evaluate(placement, heldout, system, model, heldout_problem, seed=args.seed)
            row.update(placement=name, solve_s=solve_s, gap=gap)
            rows.append(row)
            update(i + 1)
    print(f"held-out replay: {context['trace']} on {context['system']}; fit on {fraction:.0%} of tokens, "
          f"{problem.slots_per_device} slots/GPU, {args.replicas} replicas")
    print(format_table(rows))
    report_path = Path(args.report) if args.report else Path(args.out).with_suffix(".html")
    write_placement_report(report_path, rows, context)
    json_path = report_path.with_suffix(".json")
    json_path.write_text(json.dumps({"context": {k: str(v) for k, v in context.items()}, "rows": rows}, indent=2,
                                    default=float))
    print(f"  wrote {report_path} and {json_path}")
    return 0
