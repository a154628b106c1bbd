"""``moesim serve``: requests arrive at a model served on a modelled system; TTFT, TPOT, throughput, goodput."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moesim.cli._common import add_model_system_flags, float_in, int_in

MAX_DEVICES = 1_000_000
SYNTH_TOKENS = 16384  # rows --request-routing synthetic draws by default


def register(sub) -> None:
    p = sub.add_parser("serve", help="simulate serving a whole model: arrivals, continuous batching, KV cache",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_system_flags(p)
    _add_workload_flags(p)
    _add_scheduler_flags(p)
    _add_output_flags(p)
    p.set_defaults(func=run)


def _add_workload_flags(p) -> None:
    """Layout, arrivals, routing and placement."""
    p.add_argument("--tp", type=int_in(1, MAX_DEVICES), default=1, help="tensor parallel size")
    p.add_argument("--ep", type=int_in(1, MAX_DEVICES), default=1, help="expert parallel size (divides tp x dp)")
    p.add_argument("--dp", type=int_in(1, MAX_DEVICES), default=None,
                   help="data-parallel attention ranks (default: devices of the pool / tp)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--rate", type=float_in(0, 1e7, open_lo=True), help="mean arrivals per second (generated)")
    src.add_argument("--arrivals", help="CSV file with header arrival_s,prompt_tokens,output_tokens")
    p.add_argument("--arrival-process", default="poisson", help="poisson | gamma (with --cv; cv > 1 is bursty)")
    p.add_argument("--cv", type=float_in(0, 100, open_lo=True), default=1.0,
                   help="coefficient of variation of gamma inter-arrival times")
    p.add_argument("--duration-s", type=float_in(0, 1e7, open_lo=True), default=None,
                   help="arrivals over [0, D) seconds: generated (needed with --rate) or kept from --arrivals")
    p.add_argument("--num-requests", type=int_in(1, 10_000_000), default=None,
                   help="keep only the first N requests")
    p.add_argument("--lengths", default="azure-conv-2023", help="prompt/output length model for --rate")
    p.add_argument("--trace", default=None, help="route MoE layers by this routing trace (name or path, see "
                   "'moesim simulate'); default: balanced routing")
    p.add_argument("--ep-mode", default=None, help="standard (dispatch + combine all-to-all per layer: the training "
                   "engine's MoE phases, the same as --placement alone) | coherent (ExFlow's context-coherent EP: "
                   "tokens stay where their expert ran, one all-to-all per layer, KV on every device of the EP "
                   "group); replays --trace on --placement (default contiguous)")
    p.add_argument("--coherent-kv", default="replicated", help="coherent mode's KV: replicated (every device of the "
                   "EP group holds every request's KV, all-gathered per layer) | free (no copies: the mode's bound)")
    p.add_argument("--placement", default=None, help="expert placement method fitted on --trace (a 'moesim place' "
                   "method, e.g. contiguous, traffic, balance); default contiguous when --ep-mode is set")
    p.add_argument("--redundant-slots", type=int_in(0, 1_000_000), default=0,
                   help="redundant expert slots of --placement (EPLB-style replicas of hot experts over the EP group; "
                   "a choice goes to a copy local-first)")
    p.add_argument("--request-routing", nargs="?", const="trace", default=None, metavar="SOURCE",
                   help="per-request routing: each request's tokens take consecutive rows of a routing trace from a "
                   "seeded start, so expert loads follow the batch; SOURCE trace (--trace, the default) | synthetic "
                   "(rows drawn from the routing generator fitted to --synth-from, as 'moesim train --routing "
                   "synthetic'; placements are then fitted on them)")
    p.add_argument("--synth-from", default="default", help="trace the routing generator of --request-routing "
                   "synthetic is fitted to (name or path; default: the embedded FLAME-MoE trace)")
    p.add_argument("--synth-tokens", type=int_in(1, 10_000_000), default=SYNTH_TOKENS,
                   help="tokens (trace rows) generated for --request-routing synthetic")
    p.add_argument("--expert-cache-gb", type=float_in(0, 1e6, open_lo=True), default=None,
                   help="offloaded serving: HBM per device for routed experts (the rest in DDR/host memory, fetched "
                   "on a miss); needs --trace; with --ep > 1 (and --tp 1) each GPU caches its own experts")


def _add_scheduler_flags(p) -> None:
    """Cache, batching, memory and SLOs."""
    p.add_argument("--cache-policy", default="lru", help="expert cache policy (moesim.memory.cache CACHE_POLICIES: "
                   "lru, lfu, pregate, affinity, belady)")
    p.add_argument("--disaggregate", default=None, metavar="P:D",
                   help="separate prefill and decode pools of P and D devices (P + D = the system's devices)")
    p.add_argument("--max-num-batched-tokens", type=int_in(1, 10_000_000), default=8192,
                   help="token budget of one iteration")
    p.add_argument("--max-num-seqs", type=int_in(1, 1_000_000), default=256, help="running requests at most")
    p.add_argument("--block-size", type=int_in(1, 65536), default=16, help="KV tokens per block")
    p.add_argument("--no-chunked-prefill", action="store_true", help="prefill each prompt in one iteration")
    p.add_argument("--two-batch-overlap", action="store_true", help="split each iteration into two micro-batches "
                   "whose compute and all-to-alls overlap (DeepSeek-V3/SGLang decode)")
    p.add_argument("--preemption", default="recompute", help="recompute (drop the KV, redo the prefill) | swap "
                   "(copy the KV to host memory and back over the host link)")
    p.add_argument("--swap-space-gib", type=float_in(0, 1e6, open_lo=True), default=4.0,
                   help="host memory per device for swapped KV (vLLM's swap_space default: 4 GiB)")
    p.add_argument("--kv-offload", default="none", help="none | spill (when HBM KV is full, the least recently used "
                   "running requests' KV blocks move to the tier behind HBM: DDR where the device has it, else host "
                   "memory; iterations read spilled KV over that link, overlapping compute)")
    p.add_argument("--kv-spill-gib", type=float_in(0, 1e9, open_lo=True), default=None,
                   help="at most this much KV per device in the spill tier (default: the tier's share per device)")
    p.add_argument("--kv-sram-gib", type=float_in(0, 1e9), default=0.0,
                   help="reserve this much of the on-chip SRAM tier above HBM per device (SN40L) for the newest KV "
                   "blocks of running requests, read by attention at SRAM bandwidth; older blocks move down to HBM "
                   "as SRAM fills, overlapping compute (default 0: off; refused above the SRAM per device or "
                   "without such a tier). The serving cost model does not model SRAM capacity for weight streaming, "
                   "so reserving it changes no weight time")
    p.add_argument("--memory-fraction", type=float_in(0, 1, open_lo=True), default=0.9,
                   help="part of HBM for weights and KV cache (vLLM's gpu_memory_utilization)")
    p.add_argument("--slo-ttft-s", type=float_in(0, None, open_lo=True), default=2.0, help="TTFT SLO for goodput")
    p.add_argument("--slo-tpot-s", type=float_in(0, None, open_lo=True), default=0.1, help="TPOT SLO for goodput")


def _add_output_flags(p) -> None:
    """Precision, cost model, seed and outputs."""
    p.add_argument("--dtype", default="bf16", help="weights, KV and compute dtype: bf16 | fp16 | fp8")
    p.add_argument("--cost", default="default", help="cost model: default (the device's) | roofline | gpu-fitted | "
                   "calibrated")
    p.add_argument("--profile", default=None, help="kernel-timing profile for --cost calibrated")
    p.add_argument("--seed", type=int_in(0, None), default=0, help="seed of the request generator")
    p.add_argument("--out", default="serve_run", help="output directory (metrics.json, requests.csv, iterations.csv, "
                   "report.html)")
    p.add_argument("--force", action="store_true", help="overwrite the files in --out")
    p.add_argument("--json", default=None, help="also write the metrics JSON to this file")
    p.add_argument("--no-report", action="store_true", help="skip report.html (rebuild it with 'moesim report OUT')")


def _requests(args):
    import numpy as np

    from workloads import requests as rq

    if args.arrivals is not None:
        req = rq.load_arrivals(args.arrivals)
        if args.duration_s is not None:
            keep = int(np.searchsorted(req.arrival_s, args.duration_s, side="left"))
            req = rq.Requests(req.arrival_s[:keep], req.prompt_tokens[:keep], req.output_tokens[:keep], req.source)
    else:
        if args.duration_s is None:
            raise ValueError("--rate needs --duration-s (arrivals are generated over [0, D) seconds)")
        if args.lengths not in rq.LENGTH_MODELS:
            raise ValueError(f"--lengths {args.lengths!r}: known: {', '.join(rq.LENGTH_MODELS)}")
        if args.arrival_process not in rq.ARRIVALS:
            raise ValueError(f"--arrival-process must be one of {', '.join(rq.ARRIVALS)}, got {args.arrival_process!r}")
        if args.arrival_process == "poisson" and args.cv != 1.0:
            raise ValueError("--cv applies to --arrival-process gamma (Poisson has cv 1)")
        if args.num_requests is None and args.rate * args.duration_s > rq.MAX_REQUESTS:
            raise ValueError(f"--rate x --duration-s = {args.rate * args.duration_s:.0f} requests exceeds "
                             f"{rq.MAX_REQUESTS}; lower them or set --num-requests")
        req = rq.generate(args.arrival_process, args.rate, args.duration_s, rq.LENGTH_MODELS[args.lengths],
                          np.random.default_rng(args.seed), cv=args.cv, max_requests=args.num_requests)
    if args.num_requests is not None and len(req) > args.num_requests:
        n = args.num_requests
        req = rq.Requests(req.arrival_s[:n], req.prompt_tokens[:n], req.output_tokens[:n], source=req.source)
    if not len(req):
        raise ValueError("no request arrives before --duration-s: raise --rate or --duration-s")
    return req


def _pools(args, system) -> list[tuple[str, object, int]]:
    """(role, system of the pool, devices) of each pool."""
    from moesim.serve.cost import pool_system

    if args.disaggregate is None:
        return [("colocated", system, system.num_devices)]
    if args.dp is not None:
        raise ValueError("--dp applies to a colocated run; with --disaggregate each pool's dp is its devices / --tp")
    parts = args.disaggregate.split(":")
    if len(parts) != 2 or not all(x.strip().isdigit() and int(x) > 0 for x in parts):
        raise ValueError(f"--disaggregate must be P:D with positive integers, got {args.disaggregate!r}")
    p, d = int(parts[0]), int(parts[1])
    if p + d != system.num_devices:
        raise ValueError(f"--disaggregate {p}:{d}: P + D = {p + d} must equal the system's "
                         f"{system.num_devices} devices")
    return [("prefill", pool_system(system, p), p), ("decode", pool_system(system, d), d)]


def _cost(args, device):
    from moesim.cli.simulate import resolve_cost
    from moesim.serve.cost import default_cost

    return default_cost(device) if args.cost == "default" else resolve_cost(args.cost, args.profile, device)


def _replicas(args, system, cfg, sched, trace):
    from moebase.units import GiB
    from moesim.serve.cost import IterationCost, ServeError, ServeLayout
    from moesim.serve.engine import Replica
    from moesim.serve.kv import KVBlocks

    routing = None
    if args.request_routing is not None:
        if trace is None:
            raise ServeError("--request-routing needs --trace (the rows requests draw their routing from)")
        from moesim.serve.routing import RequestRouting
        try:
            routing = RequestRouting(trace, seed=args.seed)
        except ValueError as exc:
            raise ServeError(str(exc)) from None
    out = []
    for role, pool, devices in _pools(args, system):
        if devices % args.tp:
            raise ServeError(f"--tp {args.tp} must divide the {devices} devices of the {role} pool")
        dp = args.dp if args.dp is not None and args.disaggregate is None else devices // args.tp
        layout = ServeLayout(tp=args.tp, ep=args.ep, dp=dp)
        placed = _placed(args, cfg, pool, trace)
        ic = IterationCost(cfg, pool, layout, _cost(args, pool.device), dtype=args.dtype,
                           memory_fraction=args.memory_fraction, trace=trace, two_batch_overlap=args.two_batch_overlap,
                           **placed, expert_cache=_expert_cache(args, cfg, pool, trace, placed.get("placement")),
                           request_routing=routing)
        host = None
        if sched.preemption == "swap":
            blocks = ic.host_kv_capacity_blocks(sched.block_size, args.swap_space_gib * GiB)
            host = KVBlocks(blocks, sched.block_size) if blocks > 0 else None
        spill = None
        if sched.kv_offload == "spill":
            from moesim.serve.kv import spill_tier
            limit = args.kv_spill_gib * GiB if args.kv_spill_gib is not None else None
            spill = spill_tier(pool, ic.kv_bytes_per_token, sched.block_size, limit)
        sram = None
        if args.kv_sram_gib > 0:
            from moesim.serve.kv import sram_tier
            try:
                sram = sram_tier(pool, ic.kv_bytes_per_token, sched.block_size, args.kv_sram_gib * GiB)
            except ValueError as exc:
                raise ServeError(str(exc)) from None
        out.append(Replica(role, ic, KVBlocks(ic.kv_capacity_blocks(sched.block_size), sched.block_size), role=role,
                           host=host, ranks=dp, spill=spill, sram=sram))
    return out


def _expert_cache(args, cfg, pool, trace, placement=None):
    """The HBM expert cache of ``--expert-cache-gb`` (None without it)."""
    if args.expert_cache_gb is None:
        return None
    from moebase.units import GB
    from moesim.serve.cost import ServeError
    from moesim.serve.offload import build

    try:
        return build(cfg, pool, trace, args.expert_cache_gb * GB, args.cache_policy, args.tp, args.ep, args.dtype,
                     placement)
    except ValueError as exc:
        raise ServeError(str(exc)) from None


def _placed(args, cfg, pool, trace) -> dict:
    """IterationCost arguments of ``--placement`` (the experts' placement, fitted on ``--trace``) and ``--ep-mode``
    (the trace's all-to-alls on it, standard or context-coherent); empty when neither is given."""
    if args.ep_mode is None and args.placement is None:
        if args.redundant_slots:
            from moesim.serve.cost import ServeError
            raise ServeError("--redundant-slots needs --placement (the method that places the replicas)")
        return {}
    from moesim.serve import exflow
    from moesim.serve.cost import ServeError

    mode = args.ep_mode or "standard"
    if mode not in exflow.MODES:
        raise ServeError(f"--ep-mode must be one of {', '.join(exflow.MODES)}, got {mode!r}")
    if trace is None or args.ep < 2:
        raise ServeError("--ep-mode/--placement need --trace (the routing to move) and --ep >= 2")
    if trace.meta.num_experts != cfg.num_experts:
        raise ServeError(f"--trace has {trace.meta.num_experts} experts per layer, --model {cfg.num_experts}")
    per_node = min(pool.devices_per_node, args.ep)
    try:
        placement_name = args.placement or "contiguous"
        placement = exflow.place(trace, placement_name, args.ep, per_node, seed=args.seed,
                                 num_replicas=args.redundant_slots)
    except ValueError as exc:
        raise ServeError(f"--placement {args.placement} --redundant-slots {args.redundant_slots}: {exc}") from None
    if mode == "standard":  # the training engine's MoE phases on the placement (--ep-mode standard is the same)
        return {"placement": placement}
    from hwmodels.roofline import DTYPE_BYTES
    from moesim.serve.cost import kv_elements_per_token_layer
    if args.coherent_kv not in ("replicated", "free"):
        raise ServeError(f"--coherent-kv must be replicated or free, got {args.coherent_kv!r}")
    try:
        exflow.expert_device(placement)
    except ValueError as exc:
        raise ServeError(f"--ep-mode coherent --placement {placement_name}: {exc}") from None
    kv = kv_elements_per_token_layer(cfg, args.tp) * DTYPE_BYTES[args.dtype]
    return {"placement": placement, "ep_mode": exflow.EPMode(mode, kv, replicate_kv=args.coherent_kv == "replicated")}


def run(args) -> int:
    import time

    from moesim.cli._common import check_writable, load_model_config, load_system_nodes, progress_bar
    from moesim.cli.simulate import refuse_existing_run
    from moesim.serve.engine import simulate
    from moesim.serve.metrics import summarise, time_breakdown
    from moesim.serve.scheduler import SchedulerConfig

    check_writable(args.out, directory=True)
    refuse_existing_run(args.out, args.force)
    if args.json:
        check_writable(args.json, flag="--json")
    cfg = load_model_config(args.model, "moesim serve")
    system = load_system_nodes(args.system, args.nodes)
    trace = _routing_trace(args, cfg)
    sched = SchedulerConfig(args.max_num_batched_tokens, args.max_num_seqs, args.block_size,
                            chunked_prefill=not args.no_chunked_prefill, preemption=args.preemption,
                            kv_offload=args.kv_offload)
    replicas = _replicas(args, system, cfg, sched, trace)
    req = _requests(args)
    transfer = None
    if args.disaggregate:
        link = system.scale_out if system.scale_out is not None else system.scale_up
        transfer = (replicas[0].cost.kv_bytes_per_token_model, link.bandwidth_bytes_per_s, link.latency_s)
    t0 = time.perf_counter()
    with progress_bar("serving", total=len(req), unit="req") as update:
        result = simulate(req, replicas, sched, transfer=transfer, progress=update)
    wall_s = time.perf_counter() - t0
    metrics = summarise(result, num_devices=system.num_devices, num_nodes=system.num_nodes,
                        slo_ttft_s=args.slo_ttft_s, slo_tpot_s=args.slo_tpot_s)
    metrics["iteration_time"] = time_breakdown(result, {r.name: r.cost for r in replicas})
    if args.expert_cache_gb is not None:
        from moesim.serve.offload import cache_metrics
        metrics["expert_cache"] = cache_metrics(result, {r.name: r.cost for r in replicas})
    metrics["config"] = _config(args, cfg, system, req, replicas, sched, wall_s)
    _write(args, result, metrics)
    if not args.no_report:
        from moesim.report.serve import write_serve_report
        write_serve_report(args.out)
    _print_summary(metrics, args.out, args.no_report)
    return 0


def _routing_trace(args, cfg):
    """The routing trace of the run: --trace, rows drawn from the generator fitted to --synth-from
    (--request-routing synthetic), or None (balanced routing)."""
    from moesim.serve.cost import ServeError
    from workloads.importers import load_trace

    if args.request_routing not in (None, "trace", "synthetic"):
        raise ServeError(f"--request-routing must be trace or synthetic, got {args.request_routing!r}")
    if args.request_routing != "synthetic":
        if args.synth_from != "default" or args.synth_tokens != SYNTH_TOKENS:
            raise ServeError("--synth-from/--synth-tokens apply to --request-routing synthetic")
        return load_trace(args.trace) if args.trace else None
    if args.trace:
        raise ServeError("--request-routing synthetic draws its rows from the generator fitted to --synth-from; "
                         "drop --trace (or use --request-routing trace)")
    from moesim.serve.routing import synthetic_rows_trace
    try:
        return synthetic_rows_trace(cfg, load_trace(args.synth_from), args.synth_tokens, seed=args.seed)
    except ValueError as exc:
        raise ServeError(str(exc)) from None


def serve_metrics(flags: list[str]) -> dict:
    """metrics.json of ``moesim serve FLAGS`` run without the report in a temporary directory (for studies);
    SystemExit naming the command when it fails."""
    import tempfile

    from moesim.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        args = ["serve", *flags, "--no-report", "--out", tmp]
        if main(args) != 0:
            raise SystemExit(f"moesim {' '.join(args)} failed")
        return json.loads((Path(tmp) / "metrics.json").read_text())


def _config(args, cfg, system, req, replicas, sched, wall_s) -> dict:
    return {"model": cfg.name, "model_source": cfg.source, "system": system.name, "device": system.device.name,
            "num_devices": system.num_devices, "requests_source": req.source, "seed": args.seed,
            "scheduler": {"max_num_batched_tokens": sched.max_num_batched_tokens, "max_num_seqs": sched.max_num_seqs,
                          "block_size": sched.block_size, "chunked_prefill": sched.chunked_prefill,
                          "preemption": sched.preemption, "kv_offload": sched.kv_offload,
                          **({"kv_sram_gib": args.kv_sram_gib} if args.kv_sram_gib > 0 else {})},
            "pools": {r.name: r.cost.describe() for r in replicas}, "disaggregate": args.disaggregate,
            "routing": "synthetic" if args.request_routing == "synthetic" else "trace" if args.trace else "balanced",
            "trace": args.trace, "ep_mode": args.ep_mode,
            "placement": args.placement, "redundant_slots": args.redundant_slots,
            "request_routing": args.request_routing, "expert_cache_gb": args.expert_cache_gb,
            "synth_from": args.synth_from if args.request_routing == "synthetic" else None,
            "cache_policy": args.cache_policy if args.expert_cache_gb is not None else None, "wall_s": wall_s}


def _write(args, result, metrics: dict) -> None:
    from moesim.serve.metrics import per_request

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(metrics, indent=1)
    (out / "metrics.json").write_text(text)
    if args.json:
        Path(args.json).write_text(text)
    req, pr = result.requests, per_request(result)
    cols = {"arrival_s": req.arrival_s, "prompt_tokens": req.prompt_tokens, "output_tokens": req.output_tokens,
            **pr, "preemptions": result.preemptions, "rejected": result.rejected.astype(int)}
    _csv(out / "requests.csv", cols)
    _csv(out / "iterations.csv", result.iterations)


def _csv(path: Path, cols: dict) -> None:
    import numpy as np

    names = list(cols)
    with open(path, "w", encoding="utf-8") as f:
        f.write(",".join(names) + "\n")
        rows = zip(*[np.asarray(cols[c]).tolist() for c in names])
        f.writelines(",".join("" if isinstance(v, float) and v != v else str(v) for v in row) + "\n" for row in rows)


def _print_summary(m: dict, out: str, no_report: bool = False) -> None:
    c, lat, th, g = m["config"], m["latency_s"], m["throughput"], m["goodput"]
    r = m["requests"]
    ms = lambda s: "n/a" if s is None else f"{s * 1e3:.1f} ms"  # noqa: E731
    print(f"{c['model']} on {c['system']} ({c['num_devices']} x {c['device']}): {r['finished']} of {r['total']} "
          f"requests served ({r['rejected']} rejected) in {th['duration_s']:.1f} s simulated, {c['wall_s']:.1f} s wall")
    for k in ("ttft", "tpot", "e2e"):
        print(f"  {k.upper():5s} mean {ms(lat[k]['mean'])}, p50 {ms(lat[k]['p50'])}, p90 {ms(lat[k]['p90'])}, "
              f"p99 {ms(lat[k]['p99'])}")
    fmt = lambda x: "n/a" if x is None else f"{x:,.0f}"  # noqa: E731
    print(f"  throughput: {fmt(th['input_tokens_per_s'])} input and {fmt(th['output_tokens_per_s'])} output tokens/s "
          f"({fmt(th['output_tokens_per_s_per_device'])} output tokens/s per device)")
    good = "n/a" if g["requests_per_s"] is None else f"{g['requests_per_s']:.2f}"
    print(f"  goodput (TTFT <= {g['slo_ttft_s']:g} s, TPOT <= {g['slo_tpot_s']:g} s): {good} req/s, "
          f"{g['fraction'] * 100:.1f} % of requests")
    kv = ", ".join(f"{k} peak {v['peak_fraction'] * 100:.1f} %" for k, v in m["kv"].items())
    pre = m["preemption"]
    print(f"  KV cache: {kv}; preemptions {pre['count']} ({pre['evicted_tokens']:,} tokens recomputed, "
          f"{pre['swapped_tokens']:,} swapped)")
    print(f"  wrote {out}/metrics.json, requests.csv, iterations.csv" + ("" if no_report else ", report.html"))
