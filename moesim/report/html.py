"""One self-contained interactive HTML file from a list of Plotly figures (works offline:
plotly.js is embedded once).

Headings and the title are escaped here; a section given as HTML text must be built from escaped
parts (``table_html`` escapes every cell and key; ``esc`` is ``html.escape``)."""

from __future__ import annotations

import html as _html
import math
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
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             ".tbl{overflow-x:auto;max-width:100%}dl.defs dt{font-weight:bold}dl.defs dd{margin:0 0 6px 16px}"
             "</style></head><body>",
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


esc = _html.escape


def format_number(v: float) -> str:
    """A table cell for a float: 4 significant digits, never exponent notation for ordinary sizes
    (77,900 not 7.79e+04)."""
    if not math.isfinite(v):
        return str(v)
    if v == 0 or abs(v) >= 1e4 or float(v).is_integer():
        return f"{v:,.0f}"
    if abs(v) >= 1e-3:
        return f"{v:.4g}"
    return f"{v:.3g}"


def table_html(rows: Sequence[dict], floatfmt: str | None = None) -> str:
    """A small HTML table from a list of dicts (same keys); every key and cell is escaped; floats via
    ``floatfmt`` or :func:`format_number`. Wide tables scroll inside their box, not off the page."""
    if not rows:
        return "<p>(empty)</p>"
    keys = list(rows[0])
    head = "".join(f"<th>{_html.escape(str(k))}</th>" for k in keys)
    body = []
    for r in rows:
        cells = []
        for k in keys:
            v = r[k]
            if isinstance(v, float):
                text = floatfmt.format(v) if floatfmt else format_number(v)
            else:
                text = str(v)
            cells.append(f"<td>{_html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<div class='tbl'><table><tr>{head}</tr>{''.join(body)}</table></div>"


def definitions_html(defs: dict[str, str]) -> str:
    """A definition list (term: meaning), escaped: every column a table shows is defined."""
    items = "".join(f"<dt>{_html.escape(k)}</dt><dd>{_html.escape(v)}</dd>" for k, v in defs.items())
    return f"<dl class='defs'>{items}</dl>"
