"""Study throughput: 1,000 configurations of a generated study, local process pool (2 workers).

Grid: 3 systems (dgx-h100, dgx-h200, dgx-a100) x nodes 1..8 x 4 placement methods x 5 micro-batch
counts x 5 HBM capacities on FLAME-MoE-290M traffic (2,048 tokens), analytic engine, memory outputs
from the ``moesim.memory`` expert-cache replay (default ``cache_policy = "lru"``, ``memory_steps = 3``;
at 1 node the 250 MB HBM point does not hold a GPU's experts, so the full per-access replay runs); the
first 1,000 of the 1,200 grid points are run (``--limit``). Acceptance: under 15 minutes on a 2-core machine.

    .venv/bin/python -m benchmarks.bench_study [--workers 2] [--limit 1000]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from benchmarks import write_result
GRID = """[study]
name = "bench_1000"
engine = "analytic"
[grid]
system = ["dgx-h100", "dgx-h200", "dgx-a100"]
nodes = [1, 2, 4, 8]
placement = ["contiguous", "round-robin", "random", "greedy"]
micro_batches = [1, 2, 4, 8, 16]
hbm_capacity_bytes = [0, 2e9, 1e9, 5e8, 2.5e8]
"""


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--limit", type=int, default=1000)
    args = p.parse_args(argv)
    from moesim.study.runner import run_study
    from moesim.study.spec import load_study

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "bench_1000"
        d.mkdir()
        (d / "study.toml").write_text(GRID)
        study = load_study(d)
        t0 = time.perf_counter()
        rows = run_study(study, executor="process", workers=args.workers, limit=args.limit)
        wall = time.perf_counter() - t0
    lines = ["## Study throughput (bench_study)", "",
             f"Command: `.venv/bin/python -m benchmarks.bench_study --workers {args.workers} --limit {args.limit}`",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs visible, Python {platform.python_version()}; "
             "shared with other jobs, so timings are noisy.", "",
             "| configurations | workers | wall s | configurations / min | mean eval s per config | acceptance (< 900 s) |",
             "|---|---|---|---|---|---|",
             f"| {len(rows)} | {args.workers} | {wall:.1f} | {len(rows) / wall * 60:.0f} | {rows['eval_wall_s'].mean():.3f} | "
             f"{'pass' if wall < 900 and len(rows) >= 1000 else 'FAIL'} |"]
    return write_result("study", lines)


if __name__ == "__main__":
    main()
