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


def md_table(table, floatfmt: str = "{:.3g}") -> str:
    """A DataFrame (or a list of row dicts, columns from the first) as a Markdown table: floats through
    ``floatfmt``, everything else through ``str``."""
    rows = table.to_dict("records") if hasattr(table, "to_dict") else list(table)
    cols = list(table.columns) if hasattr(table, "columns") else list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(floatfmt.format(r[c]) if isinstance(r[c], float) else str(r[c]) for c in cols)
                     + " |")
    return "\n".join(lines)
