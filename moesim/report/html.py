"""One self-contained interactive HTML file from a list of Plotly figures (works offline:
plotly.js is embedded once)."""

from __future__ import annotations

import html as _html
from pathlib import Path
from typing import Sequence

import plotly.graph_objects as go
import plotly.io as pio


def write_report(path: str | Path, title: str, sections: Sequence[tuple[str, go.Figure | str]],
                 intro: str = "") -> Path:
    """Write ``sections`` (heading, figure or HTML text) to ``path``. Each figure gets a div id
    ``fig-<n>``; plotly.js is inlined once, so the file needs no network."""
    path = Path(path)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_html.escape(title)}</title>",
             "<style>body{font-family:system-ui,sans-serif;margin:24px;max-width:1400px}"
             "h2{margin-top:36px;border-bottom:1px solid #ddd}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>",
             f"<h1>{_html.escape(title)}</h1>", intro]
    first = True
    n = 0
    for heading, content in sections:
        parts.append(f"<h2>{_html.escape(heading)}</h2>")
        if isinstance(content, str):
            parts.append(content)
            continue
        parts.append(pio.to_html(content, full_html=False, include_plotlyjs=True if first else False,
                                 div_id=f"fig-{n}", config={"displaylogo": False}))
        first = False
        n += 1
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def table_html(rows: Sequence[dict], floatfmt: str = "{:.4g}") -> str:
    """A small HTML table from a list of dicts (same keys)."""
    if not rows:
        return "<p>(empty)</p>"
    keys = list(rows[0])
    head = "".join(f"<th>{_html.escape(str(k))}</th>" for k in keys)
    body = []
    for r in rows:
        cells = []
        for k in keys:
            v = r[k]
            cells.append(f"<td>{floatfmt.format(v) if isinstance(v, float) else _html.escape(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"
