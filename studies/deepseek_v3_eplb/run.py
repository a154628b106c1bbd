"""DeepSeek-V3 expert placement and replication on real serving loads (the SGLang EPLB tables).

Question: on the per-layer expert loads SGLang published for DeepSeek-V3 serving, how balanced do the
placement methods get (contiguous, round-robin, flat greedy = EPLB's global policy, EPLB-style
node-then-GPU packing, the CP-SAT balance model) at EP32..EP256 with 0..64 redundant slots, what does that
do to the simulated MoE-layer time, and how much of the gain survives when the placement was fitted on
another workload (staleness)?

Run from the repository root (the tables are read from ../shared at run time, never copied):

    .venv/bin/python -m studies.deepseek_v3_eplb.run scale       # point 2: methods x nodes x replicas
    .venv/bin/python -m studies.deepseek_v3_eplb.run staleness   # point 3: fit on A, replay on B
    .venv/bin/python -m studies.deepseek_v3_eplb.run step        # training-step tokens/s per placement
    .venv/bin/python -m studies.deepseek_v3_eplb.run serve       # serving output tokens/s and TPOT per placement

Each writes ``results_<what>.parquet`` here (derived numbers only: max/mean loads, layer times, CP-SAT
objective/bound) and prints the README tables. Fitting loads = the table apportioned to ``TOKENS`` tokens
(``workloads.load_table.scaled_counts``); replay = the table expanded to ``TOKENS`` tokens (seed 0; its
loads are exactly those), analytic engine, roofline costs, dgx-h100 nodes, local-first replica routing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TABLE_DIR = "deepseek-v3-expert-loads"
TOKENS = 4096  # tokens per replayed batch (one 4096-token prefill; a 4096-token decode batch)
SYSTEM, MODEL = "dgx-h100", "deepseek-v3"
SCALE_WORKLOADS = ("prefill_in4096", "decode_in1000out1000")
NODES = (4, 8, 16, 32)  # EP32 .. EP256 with 8 GPUs per node
REPLICAS = (0, 16, 32, 64)
NO_REPLICA_METHODS = ("contiguous", "round-robin")
REPLICA_METHODS = ("greedy", "eplb-hier", "balance")
CPSAT_LIMIT_S = 10.0  # wall seconds per CP-SAT solve (58 layers): the 2-core machine is shared
CPSAT_WORKLOADS = ("prefill_in4096",)  # CP-SAT on the most skewed table only (16 solves x 10 s)
CPSAT_WORKERS = 2
STALE_SETTINGS = ((8, 32, "greedy"), (4, 32, "eplb-hier"))  # (nodes, replicas, method) fitted on A, replayed on B


def tables_dir() -> Path:
    from workloads.importers import find_shared_traces
    shared = find_shared_traces(REPO)
    if shared is None or not (shared / TABLE_DIR).is_dir():
        sys.exit(f"the DeepSeek-V3 load tables are not there: expected ../shared/data/traces/{TABLE_DIR} next to "
                 f"the repository (or $MOESIM_SHARED_TRACES)")
    return shared / TABLE_DIR


def workload_names() -> list[str]:
    return sorted(p.name.removesuffix(".json.gz") for p in tables_dir().glob("*.json.gz"))


@lru_cache(maxsize=None)
def table(name: str):
    import warnings
    from workloads.load_table import InconsistentTableWarning, read_load_table
    with warnings.catch_warnings():  # the prefill_in*out* files: totals differ by <= 0.04% (README); apportioned
        warnings.simplefilter("ignore", InconsistentTableWarning)
        return read_load_table(tables_dir() / f"{name}.json.gz")


@lru_cache(maxsize=None)
def fit_load(name: str) -> np.ndarray:
    from workloads.load_table import scaled_counts
    return scaled_counts(table(name), TOKENS)


@lru_cache(maxsize=None)
def replay_trace(name: str):
    from workloads.load_table import expand
    return expand(table(name), TOKENS, seed=0)


@lru_cache(maxsize=None)
def system(nodes: int):
    from hwmodels.specs import load_system
    return load_system(SYSTEM).with_nodes(nodes)


@lru_cache(maxsize=None)
def a2a(nodes: int):
    from hwmodels.topology import all_to_all_routing
    return all_to_all_routing(system(nodes))


def problem(load: np.ndarray, nodes: int, replicas: int):
    from moesim.place import PlacementProblem, min_slots_per_device
    s = system(nodes)
    return PlacementProblem(load=load, affinity=None, num_devices=s.num_devices, devices_per_node=s.devices_per_node,
                            slots_per_device=min_slots_per_device(load.shape[1], s.num_devices, replicas),
                            num_replicas=replicas)


def place(method: str, prob, seed: int = 0):
    """(placement, CP-SAT report summary or None)."""
    from moesim.place import get_method
    m = get_method(method)
    if m.placer is not None:
        return m.placer(prob, np.random.default_rng(seed)), None
    placement, report = m.place(prob, np.random.default_rng(seed), time_limit_s=CPSAT_LIMIT_S,
                                num_workers=CPSAT_WORKERS, seed=seed)
    return placement, report


def split_max_mean(load: np.ndarray, placement, nodes: int, replicas: int) -> np.ndarray:
    """Per-layer max/mean of GPU loads [L] on ``load`` under the even split over replicas (placement model)."""
    from moesim.place.baselines import device_load
    from moesim.place.problem import placement_to_assignment
    from workloads.stats import max_over_mean
    return max_over_mean(device_load(problem(load, nodes, replicas), placement_to_assignment(placement)))


def replay(name: str, placement, nodes: int) -> dict:
    """Analytic replay of workload ``name`` (TOKENS tokens): mean MoE-layer time and simulated max/mean."""
    from moesim.analytic import estimate
    from workloads.catalog import get_model
    res = estimate(system(nodes), get_model(MODEL), placement, replay_trace(name), a2a=a2a(nodes))
    return {"layer_time_s": float(res.layer_time_s.mean()), "moe_time_s": float(res.total_time_s),
            "sim_max_mean": float(res.imbalance.mean()), "comm_fraction": float(res.layer_comm_s.sum() /
                                                                                 res.layer_time_s.sum())}


def _cpsat_columns(report, load: np.ndarray, gpus: int, replicas: int) -> dict:
    """CP-SAT's objective and proven bound per layer, as max/mean; ``bound_max_mean`` also takes the two
    closed-form bounds (even load; the largest per-copy share under the replica counts CP-SAT is given)."""
    if report is None:
        return {}
    from moesim.place import replica_counts
    solves = sorted(report.stage("balance"), key=lambda s: s.layer)
    mean = load.sum(axis=1) / gpus  # tokens per GPU if perfectly even [L]
    share = (load / replica_counts(load, replicas, gpus)).max(axis=1)
    obj = np.array([s.objective for s in solves])
    own = np.array([s.bound for s in solves])
    bound = np.maximum(own, np.maximum(mean, share))
    gap = (obj - bound) / obj
    return {"cpsat_objective_max_mean": float(np.mean(obj / mean)), "cpsat_own_bound_max_mean": float(np.mean(own / mean)),
            "bound_max_mean": float(np.mean(bound / mean)), "cpsat_gap": float((obj.sum() - bound.sum()) / obj.sum()),
            "cpsat_max_layer_gap": float(gap.max()), "cpsat_status": json.dumps(sorted({s.status for s in solves})),
            "cpsat_optimal_layers": int(sum(s.status == "optimal" or g <= 1e-9 for s, g in zip(solves, gap))),
            "cpsat_wall_s": report.wall_s}


def run_scale(workloads: list[str]) -> pd.DataFrame:
    rows = []
    for name in workloads:
        load = fit_load(name)
        for nodes in NODES:
            gpus = system(nodes).num_devices
            configs = [(m, 0) for m in NO_REPLICA_METHODS] + [(m, r) for r in REPLICAS for m in REPLICA_METHODS
                                                               if m != "balance" or name in CPSAT_WORKLOADS]
            for method, replicas in configs:
                t0 = time.perf_counter()
                placement, report = place(method, problem(load, nodes, replicas))
                mm = split_max_mean(load, placement, nodes, replicas)
                rows.append({"workload": name, "nodes": nodes, "gpus": gpus, "replicas": replicas, "method": method,
                             "max_mean": float(mm.mean()), "worst_layer_max_mean": float(mm.max()),
                             "max_mean_per_layer": json.dumps(np.round(mm, 4).tolist()),
                             **replay(name, placement, nodes), **_cpsat_columns(report, load, gpus, replicas),
                             "wall_s": time.perf_counter() - t0})
                r = rows[-1]
                print(f"{name} EP{gpus} R={replicas} {method}: max/mean {r['max_mean']:.3f}, layer "
                      f"{r['layer_time_s'] * 1e6:.1f} us" + (f", CP-SAT gap {r['cpsat_gap']:.4f}" if report else ""),
                      file=sys.stderr)
    return pd.DataFrame(rows)


def run_staleness(workloads: list[str]) -> pd.DataFrame:
    rows = []
    fits = {name: fit_load(name) for name in workloads}
    # one static placement for every workload: fitted on the mean of the tables' normalised loads
    fits["mean-of-all"] = np.rint(np.mean([f / f.sum(axis=1, keepdims=True) for f in fits.values()], axis=0)
                                  * TOKENS * table(workloads[0]).top_k).astype(np.int64)
    for nodes, replicas, method in STALE_SETTINGS:
        gpus = system(nodes).num_devices
        base = {b: replay(b, place("contiguous", problem(fit_load(b), nodes, 0))[0], nodes) for b in workloads}
        placed = {a: place(method, problem(load, nodes, replicas))[0] for a, load in fits.items()}
        for a, placement in placed.items():
            for b in workloads:
                mm = split_max_mean(fit_load(b), placement, nodes, replicas)
                rows.append({"nodes": nodes, "gpus": gpus, "replicas": replicas, "method": method, "fit": a,
                             "replay": b, "max_mean": float(mm.mean()), **replay(b, placement, nodes),
                             "base_layer_time_s": base[b]["layer_time_s"]})
            print(f"EP{gpus} R={replicas} {method}: fitted on {a} done", file=sys.stderr)
    df = pd.DataFrame(rows)
    fresh = df[df["fit"] == df["replay"]].set_index(["gpus", "replay"])["layer_time_s"]
    df["fresh_layer_time_s"] = [fresh[(g, b)] for g, b in zip(df["gpus"], df["replay"])]
    df["gain_survives"] = (df["base_layer_time_s"] - df["layer_time_s"]) / (df["base_layer_time_s"] - df["fresh_layer_time_s"])
    df["replacing_buys"] = df["layer_time_s"] / df["fresh_layer_time_s"] - 1.0
    return df


# training step (moesim.train), the layout of benchmarks/bench_train.py: DeepSeek-V3 on 32 HGX H800 nodes,
# pp 16 x dp 16, EP 16, DualPipe, FP8, selective recompute, 15,360 sequences of 4,096 tokens per step
STEP_SYSTEM, STEP_NODES, STEP_PP, STEP_DP, STEP_EP, STEP_GBS = "hgx-h800", 32, 16, 16, 16, 15360
STEP_TRACE_TOKENS = 8192  # routed tokens per replayed micro-batch sample (2 steps of the expansion)
STEP_CONFIGS = (("contiguous", 0), ("greedy", 0), ("eplb-hier", 0), ("greedy", 16), ("eplb-hier", 16), ("greedy", 32))


def run_step(workloads: list[str]) -> pd.DataFrame:
    """Training-step time and tokens/s with each workload's routing and each placement of its EP group."""
    from hwmodels.specs import load_system
    from moesim.place import PlacementProblem, min_slots_per_device
    from moesim.train.ops import default_cost
    from moesim.train.spec import Parallel, TrainSpec
    from moesim.train.step import simulate_step
    from workloads.hf_config import load_config
    from workloads.load_table import expand

    cfg = load_config(MODEL)
    sys_ = load_system(STEP_SYSTEM).with_nodes(STEP_NODES)
    cost = default_cost(sys_.device)
    rows = []
    for name in [None, *workloads]:  # None: the engine's balanced routing, for reference
        trace = None if name is None else expand(table(name), STEP_TRACE_TOKENS, steps=2, seed=0)
        spec = TrainSpec(Parallel(pp=STEP_PP, dp=STEP_DP, ep=STEP_EP, zero=1), seq_len=4096, micro_batch_size=1,
                         global_batch_size=STEP_GBS, schedule="dualpipe", recompute="selective", dtype="fp8",
                         routing="trace" if trace is not None else "balanced")
        for method, replicas in (STEP_CONFIGS if trace is not None else (("balanced routing", 0),)):
            placement = None
            if trace is not None:
                load = trace.expert_load()
                prob = PlacementProblem(load=load, affinity=None, num_devices=STEP_EP,
                                        devices_per_node=sys_.devices_per_node,
                                        slots_per_device=min_slots_per_device(load.shape[1], STEP_EP, replicas),
                                        num_replicas=replicas)
                placement, _ = place(method, prob)
            r = simulate_step(cfg, sys_, spec, cost, trace=trace, check_memory=False, placement=placement)
            rows.append({"workload": name or "-", "method": method, "replicas": replicas, "step_time_s": r.step_time_s,
                         "tokens_per_s": r.tokens_per_s, "mfu": r.mfu})
            print(f"{name} {method} R={replicas}: step {r.step_time_s:.1f} s, {r.tokens_per_s:,.0f} tokens/s",
                  file=sys.stderr)
    return pd.DataFrame(rows)


def print_step(df: pd.DataFrame) -> None:
    print(f"\nDeepSeek-V3 training step, {STEP_NODES} x {STEP_SYSTEM} ({STEP_NODES * 8} GPUs), pp {STEP_PP} x dp "
          f"{STEP_DP}, EP {STEP_EP}: tokens/s (MFU)\n")
    print("| routing | placement | R | step [s] | tokens/s | MFU |\n|---|---|---|---|---|---|")
    for x in df.itertuples():
        print(f"| {x.workload} | {x.method} | {x.replicas} | {x.step_time_s:.1f} | {x.tokens_per_s:,.0f} | {x.mfu:.1%} |")


# serving (moesim.serve): DeepSeek-V3 on hgx-h800 nodes, DP attention x EP over every GPU (tp 1), FP8, decode-heavy
# requests arriving at a fixed rate, per-request routing from the decode table (moesim.serve.routing), roofline costs
# (as `scale`; the per-iteration MoE replay of 58 layers x 32 GPUs with the fitted GPU cost is ~5x slower)
SERVE_SYSTEM, SERVE_NODES, SERVE_WORKLOAD = "hgx-h800", (4, 8), "decode_in1000out1000"
SERVE_RATE_PER_GPU_S, SERVE_DURATION_S = 16.0, 1.0  # Poisson arrivals (seed 0): ~16 requests per GPU (DP rank)
SERVE_PROMPT_TOKENS, SERVE_OUTPUT_TOKENS = 1000, 100  # 1,000-token prompts as in the table; 100 decodes each
SERVE_TRACE_TOKENS = 8192  # trace rows the requests draw from (the table expanded, seed 0)
SERVE_CONFIGS = (("contiguous", 0), ("greedy", 0), ("eplb-hier", 0), ("greedy", 32),  # contiguous places no replicas
                 ("eplb-hier", 32))


def _serve_requests(gpus: int):
    from workloads.requests import Requests
    rate = SERVE_RATE_PER_GPU_S * gpus
    rng = np.random.default_rng(0)
    arrival = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * SERVE_DURATION_S * 2)))
    arrival = arrival[arrival < SERVE_DURATION_S]
    n = len(arrival)
    return Requests(arrival, np.full(n, SERVE_PROMPT_TOKENS), np.full(n, SERVE_OUTPUT_TOKENS),
                    source=f"Poisson {rate:g}/s over {SERVE_DURATION_S:g} s, seed 0")


def _serve_one(cfg, sys_, trace, method: str, replicas: int) -> dict:
    from hwmodels.roofline import RooflineCost
    from moesim.serve import exflow
    from moesim.serve.cost import IterationCost, ServeLayout
    from moesim.serve.engine import Replica, simulate
    from moesim.serve.kv import KVBlocks
    from moesim.serve.metrics import summarise
    from moesim.serve.routing import RequestRouting
    from moesim.serve.scheduler import SchedulerConfig

    gpus = sys_.num_devices
    placement = exflow.place(trace, method, gpus, sys_.devices_per_node, num_replicas=replicas)
    ic = IterationCost(cfg, sys_, ServeLayout(tp=1, ep=gpus, dp=gpus), RooflineCost(), dtype="fp8", trace=trace,
                       placement=placement, request_routing=RequestRouting(trace, seed=0))
    sched = SchedulerConfig()
    rep = Replica("colocated", ic, KVBlocks(ic.kv_capacity_blocks(sched.block_size), sched.block_size), ranks=gpus)
    res = simulate(_serve_requests(gpus), [rep], sched)
    m = summarise(res, num_devices=gpus, num_nodes=sys_.num_nodes, slo_ttft_s=2.0, slo_tpot_s=0.1)
    th, lat = m["throughput"], m["latency_s"]
    return {"nodes": sys_.num_nodes, "gpus": gpus, "method": method, "replicas": replicas,
            "requests": m["requests"]["finished"], "iterations": len(res.iterations["tokens"]),
            "duration_s": th["duration_s"], "output_tokens_per_s_per_gpu": th["output_tokens_per_s_per_device"],
            "tpot_p50_s": lat["tpot"]["p50"], "tpot_p90_s": lat["tpot"]["p90"], "ttft_p50_s": lat["ttft"]["p50"]}


def run_serve(workloads: list[str]) -> pd.DataFrame:
    """Serving throughput and TPOT per placement method and redundant slots, routing drawn per request."""
    from hwmodels.specs import load_system
    from workloads.hf_config import load_config
    from workloads.load_table import expand

    cfg = load_config(MODEL)
    rows = []
    for name in workloads:
        trace = expand(table(name), SERVE_TRACE_TOKENS, seed=0)
        for nodes in SERVE_NODES:
            sys_ = load_system(SERVE_SYSTEM).with_nodes(nodes)
            for method, replicas in SERVE_CONFIGS:
                t0 = time.perf_counter()
                rows.append({"workload": name, **_serve_one(cfg, sys_, trace, method, replicas),
                             "wall_s": time.perf_counter() - t0})
                r = rows[-1]
                print(f"{name} EP{r['gpus']} {method} R={replicas}: {r['output_tokens_per_s_per_gpu']:,.0f} output "
                      f"tokens/s per GPU, TPOT p50 {r['tpot_p50_s'] * 1e3:.1f} ms ({r['wall_s']:.0f} s)", file=sys.stderr)
    return pd.DataFrame(rows)


def print_serve(df: pd.DataFrame) -> None:
    print(f"\nDeepSeek-V3 serving on {SERVE_SYSTEM} (tp 1, DP attention x EP over all GPUs, FP8): "
          f"{SERVE_PROMPT_TOKENS}-token prompts, {SERVE_OUTPUT_TOKENS} output tokens, Poisson {SERVE_RATE_PER_GPU_S:g}/s "
          f"per GPU for {SERVE_DURATION_S:g} s; routing per request from the table\n")
    print("| workload | GPUs | placement | R | requests | output tokens/s per GPU | TPOT p50 [ms] | TPOT p90 [ms] | "
          "TTFT p50 [ms] |\n|---|---|---|---|---|---|---|---|---|")
    for x in df.itertuples():
        print(f"| {x.workload} | {x.gpus} | {x.method} | {x.replicas} | {x.requests} | "
              f"{x.output_tokens_per_s_per_gpu:,.0f} | {x.tpot_p50_s * 1e3:.1f} | {x.tpot_p90_s * 1e3:.1f} | "
              f"{x.ttft_p50_s * 1e3:.0f} |")


def write(df: pd.DataFrame, what: str) -> Path:
    path = HERE / f"results_{what}.parquet"
    df.to_parquet(path, index=False)
    return path


def print_scale(df: pd.DataFrame) -> None:
    for name, part in df.groupby("workload", sort=False):
        print(f"\n{name}: max/mean GPU load (mean over 58 layers) / mean MoE-layer time [us]\n")
        have = set(zip(part["method"], part["replicas"]))
        cols = [(m, r) for m, r in [(m, 0) for m in NO_REPLICA_METHODS] + [(m, r) for r in REPLICAS for m in REPLICA_METHODS]
                if (m, r) in have]
        print("| GPUs | " + " | ".join(f"{m} R={r}" for m, r in cols) + " |")
        print("|---" * (len(cols) + 1) + "|")
        for gpus, g in part.groupby("gpus"):
            cells = []
            for m, r in cols:
                x = g[(g["method"] == m) & (g["replicas"] == r)].iloc[0]
                cells.append(f"{x['max_mean']:.2f} / {x['layer_time_s'] * 1e6:.0f}")
            print(f"| {gpus} | " + " | ".join(cells) + " |")
        cp = part[part["method"] == "balance"]
        if cp.empty:
            continue
        print(f"\n{name}: CP-SAT balance ({CPSAT_LIMIT_S:g} s, {CPSAT_WORKERS} workers) vs greedy, max/mean; bound: proven "
              f"lower bound given the replica counts (CP-SAT's own / with the closed-form cuts)\n\n"
              f"| GPUs | R | greedy | CP-SAT | bound (own / combined) | gap | worst layer gap | layers at bound |\n"
              f"|---|---|---|---|---|---|---|---|")
        for x in cp.itertuples():
            gr = part[(part["method"] == "greedy") & (part["gpus"] == x.gpus) & (part["replicas"] == x.replicas)].iloc[0]
            print(f"| {x.gpus} | {x.replicas} | {gr['max_mean']:.3f} | {x.max_mean:.3f} | {x.cpsat_own_bound_max_mean:.3f} / "
                  f"{x.bound_max_mean:.3f} | {x.cpsat_gap:.2%} | {x.cpsat_max_layer_gap:.2%} | {int(x.cpsat_optimal_layers)} |")


def print_staleness(df: pd.DataFrame) -> None:
    for (gpus, replicas, method), part in df.groupby(["gpus", "replicas", "method"], sort=False):
        names = list(dict.fromkeys(part["replay"]))
        print(f"\nEP{gpus}, {method}, R={replicas}: share of the fresh placement's layer-time gain over contiguous "
              f"that survives (rows: fitted on, columns: replayed)\n")
        print("| fitted on \\ replayed | " + " | ".join(names) + " |\n" + "|---" * (len(names) + 1) + "|")
        for a, g in part.groupby("fit", sort=False):
            g = g.set_index("replay")
            print(f"| {a} | " + " | ".join(f"{g.loc[b, 'gain_survives']:.2f}" for b in names) + " |")
        print("\nre-placing buys (stale / fresh layer time - 1):\n")
        print("| fitted on \\ replayed | " + " | ".join(names) + " |\n" + "|---" * (len(names) + 1) + "|")
        for a, g in part.groupby("fit", sort=False):
            g = g.set_index("replay")
            print(f"| {a} | " + " | ".join(f"{g.loc[b, 'replacing_buys']:.1%}" for b in names) + " |")
        for label, sel in (("stale (fitted on another workload)", part["fit"].isin(names) & (part["fit"] != part["replay"])),
                           ("static (mean of all)", ~part["fit"].isin(names))):
            x = part[sel]
            print(f"\n{label}: gain survives median {x['gain_survives'].median():.2f}, min {x['gain_survives'].min():.2f}; "
                  f"re-placing buys median {x['replacing_buys'].median():.1%}, max {x['replacing_buys'].max():.1%}; "
                  f"max/mean median {x['max_mean'].median():.2f} (fresh: "
                  f"{part[part['fit'] == part['replay']]['max_mean'].median():.2f})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("scale", "staleness", "step", "serve"))
    ap.add_argument("--workloads", default=None, help="comma-separated table names (default: the study's set)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.what == "scale":
        names = args.workloads.split(",") if args.workloads else list(SCALE_WORKLOADS)
        df = run_scale(names)
        print_scale(df)
    elif args.what == "serve":
        df = run_serve(args.workloads.split(",") if args.workloads else [SERVE_WORKLOAD])
        print_serve(df)
    elif args.what == "step":
        df = run_step(args.workloads.split(",") if args.workloads else list(SCALE_WORKLOADS))
        print_step(df)
    else:
        names = args.workloads.split(",") if args.workloads else workload_names()
        df = run_staleness(names)
        print_staleness(df)
    print(f"\nwrote {write(df, args.what).relative_to(REPO)} ({len(df)} rows, {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
