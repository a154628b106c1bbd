"""ExFlow's context-coherent expert parallelism against the standard two all-to-alls, on the FLAME-MoE-290M
routing trace (see README.md): token crossings and all-to-all time per MoE layer, then end-to-end serving.

    .venv/bin/python studies/exflow_context_coherent/run.py [--json FILE] [--no-serve]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

TRACE = "flame-moe-290m"
MODEL = "olmoe-1b-7b"  # 64 routed experts like the trace's model; hidden size 2048 sets the bytes per token
SYSTEM = "dgx-h100"
PLACEMENTS = ("contiguous", "balance", "traffic")
TOKENS_PER_DEVICE = 256  # decode-sized batch per device for the all-to-all times


def comm_rows(trace_fit, trace_eval, cfg, system, devices: int, per_node: int, seed: int) -> list[dict]:
    """Cross-GPU copies and all-to-all seconds per MoE layer for each placement, mode and top-k variant: the serving
    engine's MoE phases (moesim.serve.exflow.ep_moe_times: the training engine's routing window, de-duplicated copies
    and NCCL-fitted all-to-all) at TOKENS_PER_DEVICE tokens per GPU, EP over all GPUs."""
    from moesim.serve import exflow
    from moesim.train.moe import sample_steps, step_options
    from moesim.train.ops import default_cost
    from moesim.train.spec import Parallel, TrainSpec

    spec = TrainSpec(parallel=Parallel(tp=1, pp=1, dp=devices, ep=devices), seq_len=TOKENS_PER_DEVICE,
                     micro_batch_size=1, global_batch_size=devices, routing="trace", routing_samples=1)
    cost, n_moe = default_cost(system.device), len(cfg.moe_layers)
    rows = []
    for name in PLACEMENTS:
        placement = exflow.place(trace_fit, name, devices, per_node, seed=seed)
        for top1 in (False, True):
            trace = exflow.top1(trace_eval) if top1 else trace_eval
            parts, _ = sample_steps(trace, devices, TOKENS_PER_DEVICE, 1, placement.num_layers)
            window = int(parts[0].columns["token"].max()) + 1
            for mode in exflow.MODES:
                mt = exflow.ep_moe_times(cfg, system, spec, cost, trace, placement, exflow.EPMode(mode))
                copies = exflow.layer_copies(parts[0], placement, devices, mode, step_options(spec).dispatch_dedup,
                                             per_node, n_moe)
                cross = sum(float(v.sum() - np.einsum("lii->", v)) for v in copies.values()) / window / n_moe
                rows.append({"devices": devices, "placement": name, "routing": "top-1" if top1 else "top-6 (as traced)",
                             "mode": mode, "crossings_per_token_layer": cross,
                             "a2a_s_per_layer": float((mt.dispatch_s[0] + mt.combine_s[0]).mean())})
    return rows


def serve_rows(nodes: int, seed: int, rate: float, duration_s: float) -> list[dict]:
    """Saturated serving of MODEL on SYSTEM x nodes, EP over all devices, per (mode, placement)."""
    from moesim.cli.serve import serve_metrics

    rows = []
    for mode, kv, placement in (("standard", "-", "contiguous"), ("standard", "-", "traffic"),
                                ("coherent", "replicated", "contiguous"), ("coherent", "replicated", "traffic"),
                                ("coherent", "free", "contiguous"), ("coherent", "free", "traffic")):
        flags = ["--model", MODEL, "--system", SYSTEM, "--nodes", str(nodes), "--ep", str(8 * nodes),
                 "--trace", TRACE, "--ep-mode", mode, "--placement", placement, "--rate", str(rate),
                 "--duration-s", str(duration_s), "--seed", str(seed)]
        m = serve_metrics(flags + (["--coherent-kv", kv] if kv != "-" else []))
        rows.append({"nodes": nodes, "mode": mode, "coherent_kv": kv, "placement": placement,
                     "output_tokens_per_s": m["throughput"]["output_tokens_per_s"],
                     "tpot_ms_mean": m["latency_s"]["tpot"]["mean"] * 1e3,
                     "ttft_ms_mean": m["latency_s"]["ttft"]["mean"] * 1e3,
                     "duration_s": m["throughput"]["duration_s"],
                     "kv_peak_fraction": m["kv"]["colocated"]["peak_fraction"],
                     "preemptions": m["preemption"]["count"]})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-serve", action="store_true")
    p.add_argument("--rate", type=float, default=100_000.0, help="arrivals per second (all at once: offline batch)")
    p.add_argument("--duration-s", type=float, default=0.02)
    args = p.parse_args(argv)
    from hwmodels.specs import load_system
    from moesim.serve import exflow
    from workloads.hf_config import load_config
    from workloads.importers import load_trace

    fit, held = exflow.split_by_sequence(load_trace(TRACE))
    cfg = load_config(MODEL)
    out = {"comm": [], "serve": []}
    for nodes in (1, 2):
        system = load_system(SYSTEM).with_nodes(nodes)
        out["comm"] += comm_rows(fit, held, cfg, system, 8 * nodes, 8, args.seed)
    if not args.no_serve:
        for nodes in (1, 2):
            out["serve"] += serve_rows(nodes, args.seed, args.rate, args.duration_s)
    for name, rows in out.items():
        if rows:
            print(f"\n{name}:")
            print(" | ".join(rows[0]))
            for r in rows:
                print(" | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
