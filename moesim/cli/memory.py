"""``moesim memory cache|sweep`` and ``moesim coe``: expert offloading, memory sweeps, model switching."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("memory", help="three-tier memory: expert caching and capacity/bandwidth sweeps")
    msub = p.add_subparsers(dest="memory_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])

    c = msub.add_parser("cache", help="replay a trace through an HBM expert cache under several policies")
    c.add_argument("--system", default="sn40l-node")
    c.add_argument("--trace", default="default", help="'default' (FLAME-MoE-290M), 'switch', or a path")
    c.add_argument("--model", default=None, help="catalog model for expert shapes (default: the trace's model, "
                   "or olmoe-1b-7b for the default trace)")
    c.add_argument("--policies", default="lru,lfu,pregate,affinity,belady")
    c.add_argument("--capacity-experts", type=int, default=None, help="HBM cache size in experts (default: 1/4 "
                   "of the experts the trace uses)")
    c.add_argument("--batch-tokens", type=int, default=1)
    c.add_argument("--max-tokens", type=int, default=256)
    c.add_argument("--lookahead", type=int, default=1)
    c.add_argument("--accuracy", type=float, default=0.9, help="pre-gating predictor accuracy")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", default=None, help="write results as JSON")
    c.set_defaults(func=_cache)

    s = msub.add_parser("sweep", help="sweep HBM capacity and DDR/HBM bandwidth; Pareto front of cost vs tokens/s")
    s.add_argument("--system", default="sn40l-node")
    s.add_argument("--trace", default="default")
    s.add_argument("--model", default="olmoe-1b-7b")
    s.add_argument("--policies", default="lru,pregate")
    s.add_argument("--hbm-gb", default="0.5,1,2,4,8", help="HBM capacities [GB]")
    s.add_argument("--backing-gbps", default="50,100,200", help="backing-tier (DDR or host) bandwidths [GB/s]")
    s.add_argument("--sram-mib", default="", help="SRAM capacities [MiB] (empty: spec value)")
    s.add_argument("--max-tokens", type=int, default=128)
    s.add_argument("--out", default="run/memory-sweep", help="output directory (report.html, sweep.json)")
    s.set_defaults(func=_sweep)

    q = sub.add_parser("coe", help="Composition of Experts: serve a request stream, compare schedulers")
    q.add_argument("--system", default="sn40l-node")
    q.add_argument("--tp", type=int, default=None, help="devices per model (default: all)")
    q.add_argument("--experts", type=int, default=150, help="expert models (Llama-2-7B sized)")
    q.add_argument("--requests", type=int, default=300)
    q.add_argument("--rate", type=float, default=10.0, help="requests per second")
    q.add_argument("--zipf", type=float, default=1.0)
    q.add_argument("--batch", type=int, default=8)
    q.add_argument("--output-tokens", type=int, default=20)
    q.add_argument("--prompt-tokens", type=int, default=128)
    q.add_argument("--latency-bound-s", type=float, default=5.0)
    q.add_argument("--schedulers", default="fifo,lru,cpsat")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", default=None)
    q.set_defaults(func=_coe)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of numbers, got {text!r}") from None


def _cache(args) -> int:
    import numpy as np

    from hwmodels.specs import load_system
    from moesim.cli._common import progress_bar
    from moesim.memory.cache import CACHE_POLICIES, ExpertShape, access_stream, plan, replay_timed
    from moesim.memory.tiers import MemoryHierarchy
    from workloads.catalog import get_model
    from workloads.importers import load_trace

    trace = load_trace(args.trace)
    name = args.model or ("olmoe-1b-7b" if trace.meta.model == "flame-moe-290m" else trace.meta.model)
    model = get_model(name)
    if model.num_experts != trace.meta.num_experts:
        raise ValueError(f"model {name!r} has {model.num_experts} experts per layer, trace has {trace.meta.num_experts}")
    system = load_system(args.system)
    h = MemoryHierarchy.from_system(system)
    backing = "ddr" if "ddr" in h.tiers else "host"
    expert = ExpertShape.swiglu(model.hidden_size, model.moe_intermediate_size)
    stream = access_stream(trace, args.batch_tokens, args.max_tokens)
    cap = args.capacity_experts or max(1, len(np.unique(stream.keys)) // 4)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for p in policies:
        if p not in CACHE_POLICIES:
            raise ValueError(f"unknown cache policy {p!r}; known: {sorted(CACHE_POLICIES)}")
    # the affinity predictor learns from tokens the replay does not use (the second half of the trace)
    train = None
    if trace.num_tokens >= 2 * stream.num_tokens:
        _, train = trace.split_tokens(0.5)
    rows = []
    with progress_bar("cache policies", total=len(policies)) as update:
        for n, p in enumerate(policies):
            params = {"lookahead": args.lookahead}
            if p == "pregate":
                params.update(accuracy=args.accuracy, rng=np.random.default_rng(args.seed))
            if p == "affinity" and train is not None:
                params["train"] = train
            cp = plan(stream, cap, p, **params)
            r = replay_timed(stream, cp, h, expert, peak_flops_per_s=system.device.peak("bf16"), backing_tier=backing)
            rows.append(r.as_dict())
            update(n + 1)
    print(f"{args.trace}: {stream.num_tokens} tokens, {len(stream)} expert accesses; {model.name} experts of "
          f"{expert.weight_bytes / 1e6:.3g} MB; HBM cache {cap} experts; backing tier {backing}")
    print(f"{'policy':9s} {'hit':>6s} {'fetches':>8s} {'stall_s':>9s} {'total_s':>9s} {'tok/s':>9s}  bytes moved")
    for r in rows:
        moved = ", ".join(f"{k} {v / 1e9:.3g} GB" for k, v in r["bytes_by_path"].items())
        print(f"{r['policy']:9s} {r['hit_rate']:6.3f} {r['fetches']:8d} {r['stall_s']:9.4f} {r['total_time_s']:9.4f} "
              f"{r['tokens_per_s']:9.1f}  {moved}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


def _sweep(args) -> int:
    from pathlib import Path

    from moesim.cli._common import progress_bar
    from moesim.memory.sweep import grid, evaluate
    from moesim.report.memory import write_memory_report

    base = {"system": args.system, "trace": args.trace, "model": args.model, "max_tokens": args.max_tokens}
    backing = "ddr" if args.system.startswith("sn40l") else "host"
    axes = {"policy": [p.strip() for p in args.policies.split(",") if p.strip()],
            "hbm_capacity_bytes": [g * 1e9 for g in _floats(args.hbm_gb)],
            f"{backing}_bandwidth_bytes_per_s": [g * 1e9 for g in _floats(args.backing_gbps)]}
    if args.sram_mib:
        axes["sram_capacity_bytes"] = [m * 2**20 for m in _floats(args.sram_mib)]
    configs = grid(base, axes)
    rows = []
    with progress_bar("memory sweep", total=len(configs), unit="point") as update:
        for n, cfg in enumerate(configs):
            rows.append(evaluate(cfg))
            update(n + 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=2))
    path = write_memory_report(out / "report.html", f"Memory sweep on {args.system}", sweep_rows=rows,
                               intro="<p>Expert offloading replayed on a real trace; cost is a linear price model "
                                     "of tier capacity and bandwidth (assumptions in moesim/memory/sweep.py).</p>")
    from moesim.memory.sweep import pareto_front
    front = pareto_front([r["cost_usd"] for r in rows], [r["tokens_per_s"] for r in rows])
    print(f"{len(rows)} points, {int(front.sum())} on the Pareto front; report: {path}")
    for r, f in zip(rows, front):
        if f:
            print(f"  pareto: {r['policy']:8s} HBM {r['hbm_capacity_bytes'] / 1e9:5.2f} GB, backing "
                  f"{r[f'{backing}_bandwidth_bytes_per_s'] / 1e9:5.0f} GB/s -> {r['tokens_per_s']:8.1f} tok/s, "
                  f"{r['cost_usd']:8.0f} USD")
    return 0


def _coe(args) -> int:
    import numpy as np

    from hwmodels.specs import load_system
    from moesim.cli._common import progress_bar
    from moesim.memory.coe import SCHEDULERS, Deployment, ExpertModel, make_requests, serve

    dep = Deployment.from_system(load_system(args.system), tp=args.tp)
    models = [ExpertModel.llama2_7b(f"expert{i}") for i in range(args.experts)]
    reqs = make_requests(args.requests, args.experts, np.random.default_rng(args.seed), rate_per_s=args.rate,
                         zipf_s=args.zipf, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens)
    scheds = [s.strip() for s in args.schedulers.split(",") if s.strip()]
    for s in scheds:
        if s not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {s!r}; known: {sorted(SCHEDULERS)}")
    rows = []
    with progress_bar("schedulers", total=len(scheds)) as update:
        for n, s in enumerate(scheds):
            rows.append(serve(reqs, models, dep, scheduler=s, max_batch=args.batch,
                              latency_bound_s=args.latency_bound_s).summary())
            update(n + 1)
    print(f"{dep.name}: {args.experts} experts, {dep.slots(models[0])} fit in HBM, switch "
          f"{dep.switch_s(models[0]) * 1e3:.1f} ms; {args.requests} requests at {args.rate}/s")
    print(f"{'scheduler':9s} {'switches':>8s} {'switch_s':>9s} {'mean_lat':>9s} {'p99_lat':>9s} {'misses':>6s} {'req/s':>7s}")
    for r in rows:
        print(f"{r['scheduler']:9s} {r['switches']:8d} {r['switch_s']:9.3f} {r['mean_latency_s']:9.3f} "
              f"{r['p99_latency_s']:9.3f} {r['deadline_misses']:6d} {r['requests_per_s']:7.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0
