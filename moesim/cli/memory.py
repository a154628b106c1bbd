"""``moesim memory cache|sweep`` and ``moesim coe``: expert offloading, memory sweeps, model switching."""

from __future__ import annotations

import json

from moebase.units import GB, MB, MS, MiB
from moesim.cli._common import float_in, floats_in, int_in

#: the default trace is FLAME-MoE-290M routing; its expert shapes come from OLMoE-1B-7B (same 64
#: experts per layer, larger experts), so the expert set does not trivially fit a small HBM
DEFAULT_TRACE_MODEL = "flame-moe-290m"
DEFAULT_SHAPES_MODEL = "olmoe-1b-7b"
#: default HBM cache: a quarter of the distinct experts the replayed tokens use
DEFAULT_CACHE_SHARE = 4
#: the seed of the sweep study (pre-gating's random mispredictions)
SWEEP_SEED = 0


def register(sub) -> None:
    p = sub.add_parser("memory", help="three-tier memory: expert caching and capacity/bandwidth sweeps")
    msub = p.add_subparsers(dest="memory_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])

    c = msub.add_parser("cache", help="replay a trace through an HBM expert cache under several policies")
    c.add_argument("--system", default="sn40l-node", help="system spec name (see 'moesim systems') or a .toml path")
    c.add_argument("--trace", default="default", help="'default' (FLAME-MoE-290M), 'switch', or a path")
    c.add_argument("--model", default=None, help="catalog model for expert shapes (default: the trace's model, "
                   "or olmoe-1b-7b for the default trace)")
    c.add_argument("--policies", default="lru,lfu,pregate,affinity,belady",
                   help="comma-separated cache policies (lru, lfu, pregate, affinity, belady)")
    c.add_argument("--capacity-experts", type=int_in(1, None), default=None,
                   help="HBM cache size in experts (default: 1/4 of the experts the trace uses)")
    c.add_argument("--batch-tokens", type=int_in(1, 1 << 20), default=1,
                   help="tokens decoded together (their experts are fetched together)")
    c.add_argument("--max-tokens", type=int_in(1, None), default=256, help="replay at most this many tokens of the trace")
    c.add_argument("--lookahead", type=int_in(1, 1024), default=1,
                   help="layers ahead that pre-gating predicts and prefetches")
    c.add_argument("--accuracy", type=float_in(0, 1), default=0.9, help="pre-gating predictor accuracy")
    c.add_argument("--seed", type=int_in(0, None), default=0, help="seed of the random generators (reproducible runs)")
    c.add_argument("--json", default=None, help="write results as JSON")
    c.set_defaults(func=_cache)

    s = msub.add_parser("sweep", help="sweep HBM capacity and backing-tier bandwidth (writes and runs an "
                        "engine = 'memory' study in --out); Pareto front of cost vs tokens/s")
    s.add_argument("--system", default="sn40l-node", help="system spec name (see 'moesim systems') or a .toml path")
    s.add_argument("--trace", default="default", help="'default', 'switch', or a trace path")
    s.add_argument("--model", default="olmoe-1b-7b", help="catalog model for expert shapes")
    s.add_argument("--policies", default="lru,pregate",
                   help="comma-separated cache policies (lru, lfu, pregate, affinity, belady)")
    s.add_argument("--hbm-gb", type=floats_in(0, 1e6, open_lo=True), default="0.5,1,2,4,8", help="HBM capacities [GB]")
    s.add_argument("--backing-gbps", type=floats_in(1e-3, 1e6), default="50,100,200",
                   help="backing-tier (DDR or host) bandwidths [GB/s]")
    s.add_argument("--sram-mib", type=floats_in(0, 1e6, open_lo=True), default="",
                   help="SRAM capacities [MiB] (empty: spec value)")
    s.add_argument("--max-tokens", type=int_in(1, None), default=128, help="replay at most this many tokens of the trace")
    s.add_argument("--out", default="run/memory-sweep", help="output directory (study.toml, results.parquet, "
                   "report.html, sweep.json)")
    s.set_defaults(func=_sweep)

    q = sub.add_parser("coe", help="Composition of Experts: serve a request stream, compare schedulers")
    q.add_argument("--system", default="sn40l-node", help="system spec name (see 'moesim systems') or a .toml path")
    q.add_argument("--tp", type=int_in(1, 4096), default=None, help="devices per model (default: all)")
    q.add_argument("--experts", type=int_in(1, 100000), default=150, help="expert models (Llama-2-7B sized)")
    q.add_argument("--requests", type=int_in(1, 10_000_000), default=300, help="requests in the stream")
    q.add_argument("--rate", type=float_in(0, 1e6, open_lo=True), default=10.0, help="requests per second")
    q.add_argument("--zipf", type=float_in(0, 100), default=1.0, help="Zipf exponent of expert popularity (0: uniform)")
    q.add_argument("--batch", type=int_in(1, 65536), default=8, help="requests batched per model switch")
    q.add_argument("--output-tokens", type=int_in(1, 1_000_000), default=20, help="tokens generated per request")
    q.add_argument("--prompt-tokens", type=int_in(0, 10_000_000), default=128, help="prompt tokens per request")
    q.add_argument("--latency-bound-s", type=float_in(0, 1e6, open_lo=True), default=5.0,
                   help="latency bound per request [s]")
    q.add_argument("--schedulers", default="fifo,lru,cpsat", help="comma-separated schedulers (fifo, lru, cpsat)")
    q.add_argument("--seed", type=int_in(0, None), default=0, help="seed of the random generators (reproducible runs)")
    q.add_argument("--json", default=None, help="also write the results as JSON to this file")
    q.set_defaults(func=_coe)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of numbers, got {text!r}") from None


def _cache(args) -> int:
    import numpy as np

    from hwmodels.specs import load_system
    from moesim.cli._common import check_writable, progress_bar
    from moesim.memory.cache import CACHE_POLICIES, access_stream
    from moesim.memory.evaluator import evaluate, offload_setup
    from workloads.catalog import get_model
    from workloads.importers import load_trace

    if args.json:
        check_writable(args.json, flag="--json")
    trace = load_trace(args.trace)
    name = args.model or (DEFAULT_SHAPES_MODEL if trace.meta.model == DEFAULT_TRACE_MODEL else trace.meta.model)
    model = get_model(name)
    if model.num_experts != trace.meta.num_experts:
        raise ValueError(f"model {name!r} has {model.num_experts} experts per layer, trace has {trace.meta.num_experts}")
    setup = offload_setup(load_system(args.system), model)
    stream = access_stream(trace, args.batch_tokens, args.max_tokens)
    cap = args.capacity_experts or max(1, len(np.unique(stream.keys)) // DEFAULT_CACHE_SHARE)
    policies = _names(args.policies, CACHE_POLICIES, "cache policy")
    params = {"lookahead": args.lookahead, "accuracy": args.accuracy}
    if trace.num_tokens >= 2 * stream.num_tokens:
        # the affinity predictor learns from tokens the replay does not use (the second half of the trace)
        params["train"] = trace.split_tokens(0.5)[1]
    rows = []
    with progress_bar("cache policies", total=len(policies)) as update:
        for n, p in enumerate(policies):
            rows.append(evaluate(setup, stream, p, capacity_experts=cap, seed=args.seed, **params).as_dict())
            update(n + 1)
    print(f"{args.trace}: {stream.num_tokens} tokens, {len(stream)} expert accesses; {model.name} experts of "
          f"{setup.expert.weight_bytes / MB:.3g} MB; HBM cache {cap} experts; backing tier {setup.backing_tier}")
    print(f"{'policy':9s} {'hit':>6s} {'fetches':>8s} {'stall_s':>9s} {'total_s':>9s} {'tok/s':>9s}  bytes moved")
    for r in rows:
        moved = ", ".join(f"{k} {v / GB:.3g} GB" for k, v in r["bytes_by_path"].items())
        print(f"{r['policy']:9s} {r['hit_rate']:6.3f} {r['fetches']:8d} {r['stall_s']:9.4f} {r['total_time_s']:9.4f} "
              f"{r['tokens_per_s']:9.1f}  {moved}")
    _write_json(args.json, rows)
    return 0


def _names(text: str, known: dict, kind: str) -> list[str]:
    """Comma-separated names, each a key of ``known`` (ValueError naming the unknown one)."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    for x in names:
        if x not in known:
            from moebase.names import unknown_name
            raise ValueError(unknown_name(kind, x, known))
    return names


def _write_json(path: str | None, rows: list[dict]) -> None:
    if path:
        with open(path, "w") as fh:
            json.dump(rows, fh, indent=2)


def _sweep_toml(args) -> str:
    """The ``study.toml`` of a memory sweep (an ordinary ``engine = "memory"`` study) from the flags."""
    def values(xs: list[float]) -> str:
        return "[" + ", ".join(repr(float(x)) for x in xs) + "]"

    def text(x: str) -> str:
        return json.dumps(x)  # a TOML basic string (same escapes as JSON)

    grid = [f"cache_policy = [{', '.join(text(p.strip()) for p in args.policies.split(',') if p.strip())}]",
            f"hbm_capacity_bytes = {values([g * GB for g in _floats(args.hbm_gb)])}",
            f"backing_bandwidth_bytes_per_s = {values([g * GB for g in _floats(args.backing_gbps)])}"]
    if args.sram_mib:
        grid.append(f"sram_capacity_bytes = {values([m * MiB for m in _floats(args.sram_mib)])}")
    return "\n".join([
        "# written by 'moesim memory sweep'; rerun with 'moesim study run <this folder>'",
        "[study]", 'name = "memory_sweep"', 'engine = "memory"', f"seed = {SWEEP_SEED}", "",
        "[base]", f"system = {text(args.system)}", f"trace = {text(args.trace)}", f"model = {text(args.model)}",
        f"tokens = {args.max_tokens}", "", "[grid]", *grid, ""])


def _sweep(args) -> int:
    from pathlib import Path

    from moesim.cli._common import check_writable, progress_bar
    from moesim.memory.sweep import pareto_front
    from moesim.report.memory import write_memory_report
    from moesim.study.runner import run_study
    from moesim.study.spec import load_study

    check_writable(args.out, directory=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.toml").write_text(_sweep_toml(args))
    study = load_study(out)
    with progress_bar("memory sweep", total=len(study.configs), unit="point") as update:
        df = run_study(study, executor="serial", progress=update)
    failed = df[df["status"] != "ok"] if "status" in df.columns else df.iloc[:0]
    if len(failed):
        raise ValueError(f"memory sweep: {len(failed)} points failed; first: {failed.iloc[0]['error']}")
    rows = df.to_dict("records")
    (out / "sweep.json").write_text(json.dumps(rows, indent=2))
    path = write_memory_report(out / "report.html", f"Memory sweep on {args.system}", sweep_rows=rows,
                               intro="<p>Expert offloading replayed on a real trace; cost is a linear price model "
                                     "of tier capacity and bandwidth (assumptions in moesim/memory/sweep.py).</p>")
    front = pareto_front([r["cost_usd"] for r in rows], [r["tokens_per_s"] for r in rows])
    print(f"{len(rows)} points, {int(front.sum())} on the Pareto front; report: {path}")
    for r, f in zip(rows, front):
        if f:
            print(f"  pareto: {r['cache_policy']:8s} HBM {r['hbm_capacity_bytes'] / GB:5.2f} GB, backing "
                  f"{r['backing_bandwidth_bytes_per_s'] / GB:5.0f} GB/s -> {r['tokens_per_s']:8.1f} tok/s, "
                  f"{r['cost_usd']:8.0f} USD")
    return 0


def _coe(args) -> int:
    import numpy as np

    from hwmodels.specs import load_system
    from moesim.cli._common import check_writable, progress_bar
    from moesim.memory.coe import SCHEDULERS, Deployment, ExpertModel, make_requests, serve

    if args.json:
        check_writable(args.json, flag="--json")
    dep = Deployment.from_system(load_system(args.system), tp=args.tp)
    models = [ExpertModel.llama2_7b(f"expert{i}") for i in range(args.experts)]
    reqs = make_requests(args.requests, args.experts, np.random.default_rng(args.seed), rate_per_s=args.rate,
                         zipf_s=args.zipf, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens)
    scheds = _names(args.schedulers, SCHEDULERS, "scheduler")
    rows = []
    with progress_bar("schedulers", total=len(scheds)) as update:
        for n, s in enumerate(scheds):
            rows.append(serve(reqs, models, dep, scheduler=s, max_batch=args.batch,
                              latency_bound_s=args.latency_bound_s).summary())
            update(n + 1)
    print(f"{dep.name}: {args.experts} experts, {dep.slots(models[0])} fit in HBM, switch "
          f"{dep.switch_s(models[0]) / MS:.1f} ms; {args.requests} requests at {args.rate}/s")
    print(f"{'scheduler':9s} {'switches':>8s} {'switch_s':>9s} {'mean_lat':>9s} {'p99_lat':>9s} {'misses':>6s} {'req/s':>7s}")
    for r in rows:
        print(f"{r['scheduler']:9s} {r['switches']:8d} {r['switch_s']:9.3f} {r['mean_latency_s']:9.3f} "
              f"{r['p99_latency_s']:9.3f} {r['deadline_misses']:6d} {r['requests_per_s']:7.2f}")
    _write_json(args.json, rows)
    return 0
