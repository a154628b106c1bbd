"""MoETuner-style expert placement for serving: end-to-end gain of load- and affinity-aware placements over the
contiguous one on one and two DGX H100 nodes (see README.md).

    .venv/bin/python studies/moetuner_placement/run.py [--json FILE] [--rate R] [--duration-s D]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TRACE = "flame-moe-290m"
MODEL = "olmoe-1b-7b"  # 64 routed experts, like the trace's model
SYSTEM = "dgx-h100"
PLACEMENTS = ("contiguous", "balance", "traffic", "joint")


def serve(nodes: int, placement: str, rate: float, duration_s: float, seed: int) -> dict:
    """Metrics of one saturated run: EP over every device, the trace's routing replayed on ``placement``."""
    from moesim.cli.serve import serve_metrics

    return serve_metrics(["--model", MODEL, "--system", SYSTEM, "--nodes", str(nodes), "--ep", str(8 * nodes),
                          "--trace", TRACE, "--placement", placement, "--rate", str(rate),
                          "--duration-s", str(duration_s), "--seed", str(seed)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rate", type=float, default=100_000.0, help="arrivals per second (all at once: offline batch)")
    p.add_argument("--duration-s", type=float, default=0.02)
    args = p.parse_args(argv)
    rows = []
    for nodes in (1, 2):
        base = None
        for name in PLACEMENTS:
            m = serve(nodes, name, args.rate, args.duration_s, args.seed)
            th = m["throughput"]["output_tokens_per_s"]
            e2e = m["latency_s"]["e2e"]["mean"]
            base = base or (th, e2e)
            rows.append({"nodes": nodes, "placement": name, "output_tokens_per_s": th,
                         "throughput_gain_%": 100 * (th / base[0] - 1), "e2e_mean_s": e2e,
                         "e2e_speedup_%": 100 * (base[1] / e2e - 1),
                         "tpot_ms_mean": m["latency_s"]["tpot"]["mean"] * 1e3,
                         "busy_s": m["iterations"]["busy_s"]})
    print(" | ".join(rows[0]))
    for r in rows:
        print(" | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
