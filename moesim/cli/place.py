"""``moesim place``: optimise expert placement with OR-Tools CP-SAT, or compare all methods on
held-out tokens (``--compare``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from moesim.cli._common import float_in, int_in, load_system_nodes

# method and objective names come from one registry (moesim.place.METHODS / OBJECTIVES), imported in run()
# only: CP-SAT and the simulator load slowly, and every moesim command builds this parser


def register(sub) -> None:
    p = sub.add_parser("place", help="optimise expert placement (CP-SAT) or compare placements on held-out tokens",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trace", default="default", help="'default', 'flame', 'switch', a .parquet trace or capture dir")
    p.add_argument("--system", default="dgx-h100", help="system spec name or .toml path")
    p.add_argument("--nodes", type=int_in(1, 4096), default=None, help="scale the system to this many nodes")
    p.add_argument("--model", default=None, help="model catalog name (default: the trace's model)")
    p.add_argument("--objective", default="joint",
                   help="a key of moesim.place.OBJECTIVES: balance: even load; traffic: fewer cross-GPU/node bytes; joint: least traffic within "
                   "--tolerance of the best balance")
    p.add_argument("--replicas", type=int_in(0, 65536), default=0, help="redundant expert slots per layer (in total)")
    p.add_argument("--slots-per-device", type=int_in(1, 65536), default=None,
                   help="expert slots per GPU (memory capacity); default: the minimum that fits")
    p.add_argument("--time-limit", default="30s", help="wall-time limit of the solve, e.g. 30s, 500ms")
    p.add_argument("--workers", type=int_in(1, 1024), default=None, help="CP-SAT threads in total (default: all cores)")
    p.add_argument("--scenarios", type=int_in(0, 100000), default=32,
                   help="bootstrap scenarios for the robust balance objective (0: nominal load only)")
    p.add_argument("--tolerance", type=float_in(0, 1), default=0.0,
                   help="joint: allowed relative loss in the balance objective when reducing traffic")
    p.add_argument("--current", default=None, help="current placement JSON (for --max-moves)")
    p.add_argument("--max-moves", type=int_in(0, None), default=None,
                   help="at most this many new (expert, GPU) copies per layer versus --current (default contiguous)")
    p.add_argument("--fit-fraction", type=float_in(0, 1, open_lo=True), default=None,
                   help="fit on this first fraction of every step's tokens (default: 1.0; 0.5 with --compare)")
    p.add_argument("--compare", action="store_true",
                   help="fit every method on the first part, replay the rest through the simulator, print a table")
    p.add_argument("--methods", default=None,
                   help="--compare: comma-separated placement methods (default: all of moesim.place.METHODS)")
    p.add_argument("--report", default=None, help="--compare: HTML report path, its table beside it as .json "
                   "(default: <out stem>-compare.html)")
    p.add_argument("--cost", default="default", help="--compare: cost model of the held-out replay: default (the "
                   "fitted GPU model where the device spec ships one, else roofline; as moesim simulate) | roofline | "
                   "gpu-fitted | calibrated")
    p.add_argument("--profile", default=None, help="--compare: kernel-timing profile (.parquet) for --cost calibrated")
    p.add_argument("--deterministic", action="store_true",
                   help="reproducible solves: --time-limit counts CP-SAT deterministic time, not wall seconds")
    p.add_argument("--seed", type=int_in(0, None), default=0, help="seed of the random generators (reproducible runs)")
    p.add_argument("--out", default="placement.json", help="placement JSON to write (with --compare: the method "
                   "fastest on held-out tokens)")
    p.set_defaults(func=run)


def _parse_time(text: str) -> float:
    from moebase.units import parse_quantity

    try:
        value = parse_quantity("time_limit_s", text)
    except ValueError as exc:
        raise ValueError(f"--time-limit {text!r}: {exc}") from None
    if value <= 0:
        raise ValueError(f"--time-limit must be > 0, got {text!r}")
    return value


def run(args) -> int:
    import numpy as np

    from moesim.place import BASELINES, METHODS, OBJECTIVES, get_method

    if args.objective not in OBJECTIVES:
        raise ValueError(f"--objective {args.objective!r}: unknown objective; known: {', '.join(OBJECTIVES)}")
    methods = [m.strip() for m in (args.methods or ",".join(METHODS)).split(",") if m.strip()]
    for name in methods:
        get_method(name)  # ValueError naming the known methods
    from moesim.cli._common import check_writable

    check_writable(args.out)  # before the solve, not after it
    if args.compare:
        check_writable(_report_path(args))
    setup = _setup(args)
    problem = setup["problem"]
    current = None
    if args.current:
        from moesim.io import load_placement

        current = load_placement(args.current)
    if args.max_moves is not None and current is None:
        current = BASELINES["contiguous"](problem, np.random.default_rng(args.seed))
    solve_kw = dict(time_limit_s=setup["time_limit_s"], num_workers=args.workers, current=current,
                    max_moves=args.max_moves, balance_tolerance=args.tolerance, seed=args.seed,
                    deterministic=args.deterministic)
    if not args.compare:
        return _place(args, setup, solve_kw)
    return _compare(args, setup, methods, solve_kw)


def _setup(args) -> dict:
    """System, trace, model, fit/held-out split, the placement problem and the report context."""
    import numpy as np

    from moesim.place import link_costs, problem_from_trace
    from workloads.catalog import get_model
    from workloads.importers import load_trace

    time_limit_s = _parse_time(args.time_limit)
    system = load_system_nodes(args.system, args.nodes)
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
    context = {"trace": f"{args.trace} ({trace.meta.model}, {trace.num_tokens} tokens, {trace.meta.num_layers} MoE "
                        f"layers, top-{trace.meta.top_k} of {trace.meta.num_experts})",
               "system": f"{system.name}: {system.num_devices} x {system.device.name} in {system.num_nodes} node(s)",
               "fit / held-out": f"first {fraction:.0%} of every step's tokens / the rest",
               "slots per GPU": problem.slots_per_device, "replicas": args.replicas,
               "time limit per CP-SAT method": f"{time_limit_s:g} s", "bootstrap scenarios": args.scenarios}
    return {"time_limit_s": time_limit_s, "system": system, "trace": trace, "model": model, "fraction": fraction,
            "heldout": heldout, "problem": problem, "context": context}


def _place(args, setup: dict, solve_kw: dict) -> int:
    """Solve one objective on the whole (fit) trace and write the placement JSON."""
    from moesim.cli._common import progress_bar
    from moesim.io import save_placement
    from moesim.place import STAGES, solve

    trace, system, problem = setup["trace"], setup["system"], setup["problem"]
    t0 = time.perf_counter()
    with progress_bar(f"placing ({args.objective})", unit="layer") as update:
        placement, report = solve(problem, args.objective, progress=update, **solve_kw)
    wall_s = time.perf_counter() - t0
    summary = report.summary()
    out = save_placement(placement, args.out,
                         extra={"solve": summary, **{k: str(v) for k, v in setup["context"].items()}})
    print(f"placed {trace.meta.num_experts} experts x {trace.meta.num_layers} layers on {system.num_devices} GPUs "
          f"({problem.slots_per_device} slots each, {args.replicas} replicas) in {wall_s:.2f} s")
    for stage in STAGES:
        if stage in summary:
            s = summary[stage]
            print(f"  {stage}: objective {s['objective_sum']:.1f}, proven bound {s['bound_sum']:.1f}, "
                  f"gap {s['gap']:.2%} (worst layer {s['max_layer_gap']:.2%}); "
                  f"{s['optimal_layers']}/{s['layers']} layers proven optimal")
    print(f"  wrote {out} (next: {next_command(args, out)})")
    return 0


def _compare(args, setup: dict, methods: list[str], solve_kw: dict) -> int:
    """Fit every method, replay the held-out tokens, print the table, write the HTML and JSON reports."""
    import numpy as np

    from moesim.cli._common import progress_bar
    from moesim.io import save_placement
    from moesim.place import STAGES, get_method, problem_from_trace
    from moesim.place.evaluate import evaluate
    from moesim.report.placement import format_table, write_placement_report

    from hwmodels.cost import describe_cost
    from moesim.cli.simulate import resolve_cost
    from moesim.sim import SimOptions

    system, problem, heldout, context = setup["system"], setup["problem"], setup["heldout"], setup["context"]
    cost = resolve_cost(args.cost, args.profile, system.device)
    context["cost model"] = describe_cost(cost, system.device, getattr(cost, "dtype", SimOptions().dtype), system=system)
    heldout_problem = problem_from_trace(heldout, system.num_devices, system.devices_per_node,
                                         num_replicas=args.replicas, slots_per_device=problem.slots_per_device)
    rows, placements = [], {}
    with progress_bar("comparing placements", total=len(methods), unit="method") as update:
        for i, name in enumerate(methods):
            t0 = time.perf_counter()
            placement, report = get_method(name).place(problem, np.random.default_rng(args.seed), **solve_kw)
            gap = ""
            if report is not None:
                s = report.summary()
                gap = "; ".join(f"{k} {s[k]['gap']:.1%}" for k in STAGES if k in s)
            solve_s = time.perf_counter() - t0
            row = evaluate(placement, heldout, system, setup["model"], heldout_problem, seed=args.seed, cost=cost)
            row.update(placement=name, solve_s=solve_s, gap=gap)
            rows.append(row)
            placements[name] = placement
            update(i + 1)
    print(f"held-out replay: {context['trace']} on {context['system']}; fit on {setup['fraction']:.0%} of tokens, "
          f"{problem.slots_per_device} slots/GPU, {args.replicas} replicas")
    print(f"  cost model: {context['cost model']}")
    print(format_table(rows))
    report_path = _report_path(args)
    write_placement_report(report_path, rows, context)
    json_path = report_path.with_suffix(".json")
    json_path.write_text(json.dumps({"context": {k: str(v) for k, v in context.items()}, "rows": rows}, indent=2,
                                    default=float))
    print(f"  wrote {report_path} and {json_path}")
    best = min(rows, key=lambda r: r["total_time_s"])["placement"]
    out = save_placement(placements[best], args.out, extra={"compare": "fastest on held-out tokens",
                                                            **{k: str(v) for k, v in context.items()}})
    print(f"  wrote {out}: {best!r}, the fastest on held-out tokens (next: {next_command(args, out)})")
    return 0


def _report_path(args) -> Path:
    """--compare's HTML report (its table goes beside it as .json): --report, else <out stem>-compare.html,
    so the table never takes the name of the placement written to --out."""
    out = Path(args.out)
    return Path(args.report) if args.report else out.with_name(f"{out.stem}-compare.html")


def next_command(args, out) -> str:
    """The 'moesim simulate' command that replays ``out`` on the same system, nodes, trace and model
    (so it runs as printed: a placement fits only the system and trace it was made for)."""
    import shlex

    parts = ["moesim", "simulate", "--placement", str(out), "--system", args.system, "--trace", args.trace]
    if args.nodes:
        parts += ["--nodes", str(args.nodes)]
    if args.model:
        parts += ["--model", args.model]
    return " ".join(shlex.quote(str(p)) for p in parts)
