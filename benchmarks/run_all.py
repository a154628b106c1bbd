"""Run every ``benchmarks/bench_*.py`` module's ``main()`` and assemble ``benchmarks/results.md``
from the ``benchmarks/results/*.md`` files they write.

    .venv/bin/python -m benchmarks.run_all [--only replay,study] [--assemble-only]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def assemble() -> Path:
    parts = sorted(RESULTS.glob("*.md")) if RESULTS.is_dir() else []
    text = ["# moesim benchmark results", "",
            "Assembled by `.venv/bin/python -m benchmarks.run_all` from `benchmarks/results/*.md` (one file per "
            f"benchmark). Last assembled on {platform.node() or 'unknown host'} ({platform.machine()}, Python "
            f"{platform.python_version()}).", ""]
    for p in parts:
        text += [p.read_text().rstrip(), ""]
    out = HERE / "results.md"
    out.write_text("\n".join(text))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="comma-separated benchmark names (bench_<name>.py)")
    p.add_argument("--assemble-only", action="store_true")
    args = p.parse_args(argv)
    failed = []
    if not args.assemble_only:
        names = sorted(f.stem[len("bench_"):] for f in HERE.glob("bench_*.py"))
        if args.only:
            wanted = set(args.only.split(","))
            unknown = wanted - set(names)
            if unknown:
                raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; known: {names}")
            names = [n for n in names if n in wanted]
        for name in names:
            t0 = time.perf_counter()
            print(f"== bench_{name}", flush=True)
            try:
                fn = importlib.import_module(f"benchmarks.bench_{name}").main
                fn([]) if inspect.signature(fn).parameters else fn()
            except Exception:  # one broken benchmark must not hide the others' figures
                traceback.print_exc()
                failed.append(name)
            print(f"== bench_{name}: {time.perf_counter() - t0:.1f} s", flush=True)
    out = assemble()
    print(f"wrote {out}" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
