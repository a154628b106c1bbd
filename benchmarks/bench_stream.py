"""Streaming replay: peak memory and wall time vs tokens, and how cost grows with GPUs, layers and micro-batches.

Workload: FLAME-MoE-290M routing remapped to DeepSeek-V3 shape (256 experts, top-8;
``moesim.study.traffic.flame_remapped``), cut to the first ``--layers`` MoE layers (all 58 would make
a 10M-token trace 4.6 G rows: ~14 GB of Parquet and an hour to write on this machine), tiled as steps
of 16,384 tokens (every step the same tile), written one step per row group
(``workloads.trace_stream.write_steps``) to ``$TMPDIR`` (never the repository), then replayed on
``dgx-h100`` x 8 nodes = 64 H100 in a fresh child process each (peak RSS = the child's ``ru_maxrss``):

* ``stream``: ``TraceStream(path).steps()`` -> ``moesim.stream.replay_steps`` (what ``moesim simulate``
  does for a large .parquet trace);
* ``stream, no ops``: the same with ``keep_ops=False`` (no operator table kept; for callers that need
  only the figures, e.g. a training step);
* ``in-memory``: ``read_parquet`` -> ``simulate`` / ``estimate`` (the path before streaming).

The scaling table replays one 16,384-token step in this process, varying one factor from the base
(64 GPUs, 4 layers, 1 micro-batch); ``ops rows`` is the size of the Result's operator table, which is
kept whole (it does not grow with tokens per step, but with steps x layers x micro-batches x GPUs).

    .venv/bin/python -m benchmarks.bench_stream [--layers 2] [--tokens 1048576,10485760]

The full 10M-token x 58-layer replay (12.5 GiB of Parquet in $TMPDIR, about 40 minutes on 2 shared cores):
``--layers 2 --tokens 16384 --full-steps 640`` (its rows are in ``benchmarks/results/stream.md``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchmarks import write_result
from moebase.units import GiB, MiB

STEP_TOKENS = 16_384
FULL_LAYERS = 58  # DeepSeek-V3's MoE layers
BASE = {"nodes": 8, "layers": 4, "micro_batches": 1}
SWEEP = [("GPUs", "nodes", (1, 8, 32)), ("MoE layers", "layers", (1, 4, 16)), ("micro-batches", "micro_batches", (1, 4, 16))]


@functools.lru_cache(maxsize=1)
def _full_tile():
    from moesim.study.traffic import flame_remapped
    from workloads.catalog import get_model

    full = flame_remapped(get_model("deepseek-v3"), STEP_TOKENS, 1, 0)
    return (*full.dense(), full.meta)


def make_tile(layers: int):
    """One step of STEP_TOKENS tokens, DeepSeek-V3 shaped, the first ``layers`` MoE layers."""
    import numpy as np

    from workloads.trace import from_dense

    e, w, meta = _full_tile()
    return from_dense(np.ascontiguousarray(e[:, :layers]), np.ascontiguousarray(w[:, :layers]),
                      replace(meta, num_layers=layers))


def write_trace(path: Path, tile, steps: int) -> float:
    import numpy as np

    from workloads.trace_stream import write_steps

    t0 = time.perf_counter()
    write_steps(path, tile.meta, ({**tile.columns, "step": np.full(len(tile), s, dtype=np.int32)} for s in range(steps)))
    return time.perf_counter() - t0


def child(path: str, mode: str, engine: str) -> dict:
    """Replay ``path`` in this (fresh) process; wall time and peak RSS."""
    from hwmodels.specs import load_system
    from moesim.analytic import ENGINES
    from moesim.placement import contiguous
    from moesim.stream import replay_steps
    from workloads.catalog import get_model
    from workloads.trace import read_parquet
    from workloads.trace_stream import TraceStream

    model = get_model("deepseek-v3")
    system = load_system("dgx-h100").with_nodes(8)
    t0 = time.perf_counter()
    if mode in ("stream", "stream, no ops"):
        stream = TraceStream(path)
        placement = contiguous(stream.meta.num_layers, stream.meta.num_experts, system.num_devices)
        result = replay_steps(system, model, placement, stream.steps(), engine=engine, keep_ops=mode == "stream")
    else:
        trace = read_parquet(path)
        placement = contiguous(trace.meta.num_layers, trace.meta.num_experts, system.num_devices)
        result = ENGINES[engine](system, model, placement, trace)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "peak_rss_bytes": peak_rss_bytes(),
            "simulated_s": result.total_time_s, "ops_rows": len(result.ops), "tokens": result.meta["num_tokens"]}


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM of /proc/self/status (ru_maxrss would include the parent's
    RSS at fork, which Linux keeps across exec), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(path: Path, mode: str, engine: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_stream", "--child", str(path), mode, engine]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def scaling() -> list[dict]:
    """Wall time of one step, one factor varied from BASE at a time, both engines."""
    from hwmodels.specs import load_system
    from moesim.placement import contiguous
    from moesim.sim import SimOptions
    from moesim.stream import replay_steps
    from workloads.catalog import get_model

    model = get_model("deepseek-v3")
    tiles = {}
    rows = []
    for label, key, values in SWEEP:
        for v in values:
            cfg = {**BASE, key: v}
            tile = tiles.setdefault(cfg["layers"], make_tile(cfg["layers"]))
            system = load_system("dgx-h100").with_nodes(cfg["nodes"])
            placement = contiguous(cfg["layers"], tile.meta.num_experts, system.num_devices)
            row = {"factor": label, "gpus": system.num_devices, **cfg}
            for engine in ("des", "analytic"):
                t0 = time.perf_counter()
                r = replay_steps(system, model, placement, [tile], engine=engine,
                                 options=SimOptions(micro_batches=cfg["micro_batches"]))
                row[f"{engine}_s"] = time.perf_counter() - t0
                row["ops_rows"] = len(r.ops)
            rows.append(row)
    return rows


def run(layers: int, token_counts: list[int], full_steps: int) -> tuple[list[dict], list[dict]]:
    """Replays of ``token_counts`` tokens of ``layers`` layers, then ``full_steps`` steps of all 58 layers."""
    cases = [(layers, max(1, tokens // STEP_TOKENS)) for tokens in token_counts]
    cases += [(FULL_LAYERS, full_steps)] if full_steps else []
    out = []
    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmp:
        for n_layers, steps in cases:
            tile = make_tile(n_layers)
            path = Path(tmp) / f"trace_{n_layers}_{steps}.parquet"
            write_s = write_trace(path, tile, steps)
            base = {"tokens": steps * STEP_TOKENS, "layers": n_layers, "rows": len(tile) * steps,
                    "file_bytes": path.stat().st_size, "write_s": write_s}
            del tile
            if n_layers == FULL_LAYERS or steps > 64:  # in memory it would need ~125 bytes a row
                plans = [("stream", "analytic"), ("stream, no ops", "analytic")]
            else:
                plans = [("stream", "analytic"), ("stream", "des"), ("in-memory", "analytic")]
            for mode, engine in plans:
                out.append({**base, "mode": mode, "engine": engine, **measure(path, mode, engine)})
            path.unlink()
    return out, scaling()


def extrapolate(replays: list[dict], tokens: int) -> dict | None:
    """Peak RSS of ``tokens`` tokens x 58 layers streamed with the operator table kept, from measured
    costs: the 58-layer run without the table (one step's working set) + bytes per operator row, the
    difference between the largest smaller-layer run with and without the table over its rows."""
    def find(mode, full):
        rows = [r for r in replays if r["mode"] == mode and (r["layers"] == FULL_LAYERS) == full]
        return max(rows, key=lambda r: r["tokens"]) if rows else None

    kept, lean, full = find("stream", False), find("stream, no ops", False), find("stream, no ops", True)
    if not (kept and lean and full) or kept["tokens"] != lean["tokens"]:
        return None
    per_op = (kept["peak_rss_bytes"] - lean["peak_rss_bytes"]) / kept["ops_rows"]
    ops_rows = kept["ops_rows"] // kept["layers"] * FULL_LAYERS * tokens // kept["tokens"]
    return {"per_op_row_bytes": per_op, "ops_rows": ops_rows, "base_bytes": full["peak_rss_bytes"],
            "rss_bytes": full["peak_rss_bytes"] + per_op * ops_rows}


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", default="1048576,10485760")
    p.add_argument("--full-steps", type=int, default=4, help="steps of a 58-layer trace to stream (0: none)")
    p.add_argument("--child", nargs=3, metavar=("PATH", "MODE", "ENGINE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return Path(args.child[0])
    t0 = time.perf_counter()
    replays, scale = run(args.layers, [int(x) for x in args.tokens.split(",")], args.full_steps)
    lines = ["## Streaming replay (bench_stream)", "",
             f"Command: `.venv/bin/python -m benchmarks.bench_stream --layers {args.layers} --tokens {args.tokens}` "
             f"({time.perf_counter() - t0:.0f} s in all)",
             f"Machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}, "
             f"{os.cpu_count()} cores shared with other jobs (load not controlled); one process per replay.", "",
             f"DeepSeek-V3 shape (256 experts, top-8), the first {args.layers} MoE layers (all {FULL_LAYERS} in the last rows), "
             f"steps of {STEP_TOKENS:,} tokens, "
             "dgx-h100 x 8 = 64 GPUs. Peak RSS of a fresh process that reads and replays the trace.", "",
              "| tokens | MoE layers | rows | file MiB | write s | mode | engine | replay wall s | peak RSS MiB | ops rows |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in replays:
        lines.append(f"| {r['tokens']:,} | {r['layers']} | {r['rows']:,} | {r['file_bytes'] / MiB:.0f} | {r['write_s']:.1f} | {r['mode']} | "
                     f"{r['engine']} | {r['wall_s']:.1f} | {r['peak_rss_bytes'] / MiB:.0f} | {r['ops_rows']:,} |")
    lines += ["", f"Peak RSS limit of the issue: {2 * GiB / MiB:.0f} MiB (2 GiB) for 10M tokens."]
    ex = extrapolate(replays, 10 * STEP_TOKENS * 64)
    if ex:
        lines += ["", f"Extrapolated (not run), 10,485,760 tokens x {FULL_LAYERS} layers streamed on 64 GPUs: without the "
                  f"operator table as the {FULL_LAYERS}-layer run without it (its peak is one step's working set, "
                  f"{ex['base_bytes'] / MiB:.0f} MiB); with it, + {ex['per_op_row_bytes']:.0f} bytes per operator row "
                  f"(the largest {args.layers}-layer run with minus without the table, over its rows) x "
                  f"{ex['ops_rows']:,} rows = {ex['rss_bytes'] / MiB:.0f} MiB."]
    lines += ["",
              "How cost grows (one step of 16,384 tokens; base 64 GPUs, 4 MoE layers, 1 micro-batch; one factor varied):", "",
              "| factor | GPUs | MoE layers | micro-batches | ops rows | DES wall s | analytic wall s |", "|---|---|---|---|---|---|---|"]
    for r in scale:
        lines.append(f"| {r['factor']} | {r['gpus']} | {r['layers']} | {r['micro_batches']} | {r['ops_rows']:,} | "
                     f"{r['des_s']:.2f} | {r['analytic_s']:.2f} |")
    return write_result("stream", lines)


if __name__ == "__main__":
    main()
