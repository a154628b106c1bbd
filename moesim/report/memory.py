"""Plots for the memory studies: the cost vs tokens/s Pareto front of a sweep, cache-policy and CoE
scheduler comparisons. Figures are returned; :func:`write_memory_report` writes one offline HTML file
through :func:`moesim.report.html.write_report`."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from moebase.units import GB
from moesim.memory.sweep import pareto_front
from moesim.report.html import table_html, write_report


def pareto_figure(rows: Sequence[dict], color_by: str = "cache_policy") -> go.Figure:
    """Scatter of cost_usd vs tokens_per_s for rows of a memory study, one trace per ``color_by`` value,
    with the Pareto front (over all rows) as a line; hover shows the tier capacities and bandwidths."""
    cost = np.array([r["cost_usd"] for r in rows], dtype=float)
    tps = np.array([r["tokens_per_s"] for r in rows], dtype=float)
    front = pareto_front(cost, tps)
    fig = go.Figure()
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(str(r.get(color_by, "")), []).append(i)

    def hover(r: dict) -> str:
        parts = [f"{k}: {r[k] / GB:.3g} GB" for k in sorted(r) if k.endswith("_capacity_bytes_used")]
        parts += [f"{k}: {r[k] / GB:.3g} GB/s" for k in sorted(r) if k.endswith("_bandwidth_bytes_per_s_used")]
        parts += [f"hit rate: {r.get('hit_rate', float('nan')):.3f}", f"stall: {r.get('stall_s', float('nan')):.3g} s"]
        return "<br>".join(parts)

    for name, idx in groups.items():
        fig.add_trace(go.Scatter(x=cost[idx], y=tps[idx], mode="markers", name=f"{color_by}={name}",
                                 text=[hover(rows[i]) for i in idx], hovertemplate="%{text}<extra></extra>"))
    order = np.flatnonzero(front)[np.argsort(cost[front])]
    fig.add_trace(go.Scatter(x=cost[order], y=tps[order], mode="lines", name="Pareto front",
                             line={"color": "black", "dash": "dot"}))
    fig.update_layout(xaxis_title="machine memory cost [USD] (linear price model, assumptions)",
                      yaxis_title="tokens/s", height=520)
    return fig


def policy_figure(results: Sequence[dict]) -> go.Figure:
    """Bars of hit rate and stall share per cache policy (results: TimedResult.as_dict() rows)."""
    names = [r["policy"] for r in results]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=names, y=[r["hit_rate"] for r in results], name="hit rate"))
    fig.add_trace(go.Bar(x=names, y=[r["stall_s"] / r["total_time_s"] if r["total_time_s"] else 0 for r in results],
                         name="stall / total time"))
    fig.update_layout(barmode="group", yaxis_title="fraction", height=420)
    return fig


SWEEP_COLUMNS = ("cache_policy", "hbm_capacity_bytes_used", "hbm_bandwidth_bytes_per_s_used", "backing_tier",
                 "backing_bandwidth_bytes_per_s_used", "sram_capacity_bytes_used", "cache_experts", "hit_rate",
                 "stall_s", "tokens_per_s", "cost_usd")


def _sweep_row(r: dict) -> dict:
    """The table columns of one memory-study row (the backing tier's bandwidth under one name)."""
    r = {**r, "backing_bandwidth_bytes_per_s_used": r.get(f"{r.get('backing_tier')}_bandwidth_bytes_per_s_used", "")}
    return {c: r.get(c, "") for c in SWEEP_COLUMNS}


def write_memory_study_report(study, out: str | Path | None = None) -> Path:
    """The report of an ``engine = "memory"`` study (``moesim study report``): its ok rows as a sweep."""
    import pandas as pd

    df = pd.read_parquet(study.results_path)
    if "status" in df.columns:
        df = df[df["status"] == "ok"]
    if df.empty:
        raise ValueError(f"{study.results_path} has no rows")
    return write_memory_report(Path(out) if out else study.path / "report.html", f"Study {study.name}",
                               sweep_rows=df.to_dict("records"), intro=f"<p>{html.escape(study.description)}</p>")


def write_memory_report(path: str | Path, title: str, sweep_rows: Sequence[dict] | None = None,
                        cache_rows: Sequence[dict] | None = None, coe_rows: Sequence[dict] | None = None,
                        intro: str = "") -> Path:
    sections: list = []
    if sweep_rows:
        sections.append(("Cost vs tokens/s (Pareto front)", pareto_figure(sweep_rows)))
        front = pareto_front([r["cost_usd"] for r in sweep_rows], [r["tokens_per_s"] for r in sweep_rows])
        table = [_sweep_row(r) | {"pareto": bool(f)} for r, f in zip(sweep_rows, front)]
        sections.append(("Sweep points", table_html(table)))
    if cache_rows:
        sections.append(("Cache policies", policy_figure(cache_rows)))
        sections.append(("Cache policy table", table_html([{k: v for k, v in r.items() if k != "bytes_by_path"}
                                                           for r in cache_rows])))
    if coe_rows:
        sections.append(("Composition of Experts schedulers", table_html(list(coe_rows))))
    return write_report(path, title, sections, intro=intro)
