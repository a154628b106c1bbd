"""Serving engine speed: 10,000 requests of Mixtral-8x7B on 8 GPUs (one DGX H100), goal <= 60 s wall on one core.

For each arrival rate: Poisson arrivals, Azure-conversation-2023 lengths (seed 0), tp 1, ep 8, dp 8, default
scheduler (8192-token budget, 256 sequences, 16-token blocks, chunked prefill), the device's default cost
model. Wall seconds are split into the iteration-cost grid (the training engine's operator costs at
``linear(T)``'s grid points, paid once per layout) and the event loop. Also: the relative error of the
interpolated ``linear(T)`` against the exact value at 40 random token counts (seed 0).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_serve [--requests 10000] [--rates 20,80]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from benchmarks import write_result


def run_case(rate: float, n: int) -> dict:
    from hwmodels.specs import load_system
    from moesim.serve.cost import IterationCost, ServeLayout
    from moesim.serve.engine import Replica, simulate
    from moesim.serve.kv import KVBlocks
    from moesim.serve.metrics import summarise
    from workloads.requests import AZURE_CONV_2023, generate
    from moesim.serve.scheduler import SchedulerConfig
    from workloads.hf_config import load_config

    cfg, system = load_config("mixtral-8x7b"), load_system("dgx-h100")
    sched = SchedulerConfig()
    t0 = time.perf_counter()
    ic = IterationCost(cfg, system, ServeLayout(tp=1, ep=8, dp=8))
    for t in ic._grid_upto(-(-sched.max_num_batched_tokens // 8)):
        ic.linear_s(t)
    grid_s = time.perf_counter() - t0
    req = generate("poisson", rate, 1.5 * n / rate, AZURE_CONV_2023, np.random.default_rng(0), max_requests=n)
    t1 = time.perf_counter()
    res = simulate(req, [Replica("colocated", ic, KVBlocks(ic.kv_capacity_blocks(sched.block_size)), ranks=8)], sched)
    loop_s = time.perf_counter() - t1
    m = summarise(res, num_devices=8, num_nodes=1, slo_ttft_s=2.0, slo_tpot_s=0.1)
    return {"rate": rate, "requests": len(req), "grid_s": grid_s, "loop_s": loop_s, "wall_s": grid_s + loop_s,
            "iterations": m["iterations"]["count"], "m": m, "ic": ic}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--rates", default="20,80", help="arrival rates per second, comma-separated")
    args = ap.parse_args(argv)
    from moesim.serve.cost import interpolation_error

    rows = [run_case(float(r), args.requests) for r in args.rates.split(",")]
    lines = ["## Serving engine speed (bench_serve)", "",
             f"Mixtral-8x7B on one DGX H100 (8 GPUs, tp 1, ep 8, dp 8), Poisson arrivals, Azure-conversation-2023 "
             f"lengths, seed 0; {platform.processor() or platform.machine()}, one process, shared 2-core machine; "
             "one run each. Goal: 10,000 requests in <= 60 s wall.", "",
             "| rate (req/s) | requests | iterations | grid s | event loop s | wall s | TTFT p50 ms | TPOT p50 ms | "
             "output tok/s per GPU | KV peak % | preemptions |", "|" + "---|" * 11]
    for r in rows:
        m = r["m"]
        lines.append(f"| {r['rate']:g} | {r['requests']} | {r['iterations']} | {r['grid_s']:.1f} | {r['loop_s']:.1f} | "
                     f"{r['wall_s']:.1f} | {m['latency_s']['ttft']['p50'] * 1e3:.1f} | "
                     f"{m['latency_s']['tpot']['p50'] * 1e3:.2f} | "
                     f"{m['throughput']['output_tokens_per_s_per_device']:,.0f} | "
                     f"{m['kv']['colocated']['peak_fraction'] * 100:.1f} | {m['preemption']['count']} |")
    toks = np.random.default_rng(0).integers(129, 1025, 40)
    err = np.abs(interpolation_error(rows[0]["ic"], toks))
    lines += ["", f"Interpolated linear(T) against exact, 40 random T in [129, 1024] tokens per rank: mean |error| "
              f"{err.mean() * 100:.2f} %, max {err.max() * 100:.2f} %."]
    write_result("serve", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
