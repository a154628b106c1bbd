"""Replay speed: routed token-layer-ranks simulated per wall second.

Workload: FLAME-MoE-290M routing remapped to DeepSeek-V3 shape (256 experts, top-8, 58 MoE layers;
``moesim.study.traffic.flame_remapped``), on ``dgx-h100`` x 8 nodes = 64 H100, contiguous placement.
The trace is tiled to ``--tokens`` tokens (default 1,048,576) as steps of ``--step-tokens`` tokens
(default 16,384); every step replays the same 16,384-token tile (FLAME's 2,048 tokens tiled 8x with
rotation). Each step is simulated as one call (steps are independent in the simulator: a step starts
when the previous one ends, so the makespans add); the timed part is ``simulate``/``estimate``
(aggregation + events + costs), not building the trace.

    .venv/bin/python -m benchmarks.bench_replay [--tokens N] [--step-tokens N] [--engines des,analytic]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from benchmarks import write_result


def run(tokens: int, step_tokens: int, engines: list[str]) -> list[dict]:
    from hwmodels.specs import load_system
    from moesim.analytic import ENGINES
    from moesim.placement import contiguous
    from moesim.study.traffic import flame_remapped
    from workloads.catalog import get_model

    model = get_model("deepseek-v3")
    system = load_system("dgx-h100").with_nodes(8)
    tile = flame_remapped(model, step_tokens, 1, 0)
    placement = contiguous(tile.meta.num_layers, tile.meta.num_experts, system.num_devices)
    steps = max(1, tokens // step_tokens)
    out = []
    for engine in engines:
        fn = ENGINES[engine]
        wall = 0.0
        sim_s = 0.0
        for _ in range(steps):
            t0 = time.perf_counter()
            r = fn(system, model, placement, tile, seed=0)
            wall += time.perf_counter() - t0
            sim_s += r.total_time_s
        rows = len(tile) * steps
        out.append({"engine": engine, "tokens": step_tokens * steps, "steps": steps, "token_layer_ranks": rows,
                    "wall_s": wall, "per_s": rows / wall, "simulated_s": sim_s})
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1_048_576)
    p.add_argument("--step-tokens", type=int, default=16_384)
    p.add_argument("--engines", default="des,analytic")
    args = p.parse_args(argv)
    rows = run(args.tokens, args.step_tokens, args.engines.split(","))
    lines = ["## Replay speed (bench_replay)", "",
             f"Command: `.venv/bin/python -m benchmarks.bench_replay --tokens {args.tokens} --step-tokens {args.step_tokens}`",
             f"Machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}, one core "
             "(single process) on a 2-core machine; other load on the machine was not controlled.", "",
             "DeepSeek-V3 shape (256 experts, top-8, 58 MoE layers) from remapped FLAME routing, dgx-h100 x 8 = 64 GPUs.", "",
             "| engine | tokens | steps | token-layer-ranks | wall s | token-layer-ranks / s | simulated s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['tokens']:,} | {r['steps']} | {r['token_layer_ranks']:,} | {r['wall_s']:.1f} | "
                     f"{r['per_s'] / 1e6:.2f} M | {r['simulated_s']:.4f} |")
    return write_result("replay", lines)


if __name__ == "__main__":
    main()
