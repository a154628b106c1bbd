"""Benchmarks (not timed tests): each ``bench_*.py`` has ``main()`` that writes ``benchmarks/results/<name>.md``;
``python -m benchmarks.run_all`` runs them all and assembles ``benchmarks/results.md``."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_result(name: str, lines: list[str]) -> Path:
    """Write ``benchmarks/results/<name>.md`` (one benchmark's section of results.md), echo it, return its path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path
