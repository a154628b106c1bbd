"""The placement comparison as a text table and an HTML report section (app layer)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from moebase.units import MB, US

COLUMNS = [("placement", "method", "{}"), ("replicas", "replicas", "{:d}"),
           ("max_mean_load", "max/mean load", "{:.3f}"), ("worst_max_mean_load", "worst layer", "{:.3f}"),
           ("cross_gpu_bytes", "cross-GPU MB", "{:.2f}"), ("cross_node_bytes", "cross-node MB", "{:.2f}"),
           ("affinity_cross_gpu_tokens", "ExFlow cross-GPU tok", "{:.0f}"),
           ("affinity_cross_node_tokens", "ExFlow cross-node tok", "{:.0f}"),
           ("layer_time_s", "MoE layer us", "{:.3f}"), ("vs_contiguous", "vs contiguous", "{:+.2%}"),
           ("solve_s", "solve s", "{:.2f}"), ("gap", "gap", "{}")]
_SCALE = {"cross_gpu_bytes": 1 / MB, "cross_node_bytes": 1 / MB, "layer_time_s": 1 / US}  # to display units


def display_rows(rows: Sequence[dict]) -> list[dict]:
    """Rows with the columns above, in display units (MB = 10**6 bytes, us), formatted as strings."""
    base = next((r["layer_time_s"] for r in rows if r["placement"] == "contiguous"), None)
    out = []
    for r in rows:
        r = dict(r)
        if base:
            r["vs_contiguous"] = r["layer_time_s"] / base - 1.0
        d = {}
        for key, label, fmt in COLUMNS:
            v = r.get(key)
            if v is None or v == "":
                d[label] = "-"
                continue
            v = v * _SCALE.get(key, 1)
            d[label] = fmt.format(int(v) if fmt == "{:d}" else v)
        out.append(d)
    return out


def format_table(rows: Sequence[dict]) -> str:
    disp = display_rows(rows)
    if not disp:
        return "(no rows)"
    keys = list(disp[0])
    width = {k: max(len(k), *(len(r[k]) for r in disp)) for k in keys}
    lines = ["  ".join(k.rjust(width[k]) for k in keys), "  ".join("-" * width[k] for k in keys)]
    lines += ["  ".join(r[k].rjust(width[k]) for k in keys) for r in disp]
    return "\n".join(lines)


def write_placement_report(path: str | Path, rows: Sequence[dict], context: dict) -> Path:
    """One self-contained HTML file with the comparison table, a bar chart and the context."""
    import html

    import plotly.graph_objects as go

    from moesim.report.html import table_html, write_report

    disp = display_rows(rows)
    fig = go.Figure()
    fig.add_bar(x=[r["placement"] for r in rows], y=[r["layer_time_s"] * _SCALE["layer_time_s"] for r in rows], name="MoE layer time")
    fig.update_layout(yaxis_title="simulated MoE-layer time (us, mean over layers)", height=380)
    fig2 = go.Figure()
    fig2.add_bar(x=[r["placement"] for r in rows], y=[r["max_mean_load"] for r in rows])
    fig2.update_layout(yaxis_title="max/mean GPU load (held-out, mean over layers)", height=380)
    ctx = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>" for k, v in context.items())
    return write_report(path, "moesim placement comparison (held-out replay)", [
        ("Setup", f"<ul>{ctx}</ul>"),
        ("All methods on held-out tokens", table_html(disp)),
        ("Simulated MoE-layer time", fig),
        ("Load balance", fig2),
    ])
