"""The validation report: predicted vs measured per op (held-out shapes), MAPE tables, published checks,
and optional end-to-end per-layer comparison. One offline HTML file (:func:`moesim.report.html.write_report`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from moesim.report.html import table_html, write_report


def predicted_vs_measured(pred: pd.DataFrame) -> go.Figure:
    """Log-log scatter of measured vs predicted time (us) per op, table mode and fitted roofline."""
    fig = go.Figure()
    for op, g in pred.groupby("op"):
        for col, sym in (("table_s", "circle"), ("roofline_s", "x")):
            fig.add_trace(go.Scatter(x=g["measured_s"] * 1e6, y=g[col] * 1e6, mode="markers", marker_symbol=sym,
                                     name=f"{op} ({col[:-2]})", text=g["shape"],
                                     hovertemplate="%{text}<br>measured %{x:.1f} us<br>predicted %{y:.1f} us"))
    lo, hi = float(pred["measured_s"].min() * 1e6 * 0.7), float(pred["measured_s"].max() * 1e6 * 1.4)
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line=dict(dash="dash", color="gray")))
    fig.update_layout(xaxis=dict(type="log", title="measured time (us)"),
                      yaxis=dict(type="log", title="predicted time (us)"), height=600)
    return fig


def e2e_figure(e2e: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    fig.add_trace(go.Bar(x=e2e["layer"], y=e2e["measured_s"] * 1e3, name="measured (torch, CPU)"))
    fig.add_trace(go.Bar(x=e2e["layer"], y=e2e["predicted_s"] * 1e3, name="simulated (calibrated)"))
    fig.update_layout(barmode="group", xaxis_title="MoE layer", yaxis_title="time per forward (ms)", height=450)
    return fig


def write_validation_report(path: str | Path, profile, pred: pd.DataFrame | None, mape: pd.DataFrame | None,
                            published: pd.DataFrame | None, e2e: pd.DataFrame | None = None) -> Path:
    sections: list = []
    intro = ""
    if profile is not None:
        meta = profile.meta
        intro = table_html([{"key": k, "value": str(meta[k])} for k in sorted(meta)])
    if mape is not None:
        sections.append(("Held-out MAPE per operator", table_html(mape.round(2).to_dict("records"))))
        sections.append(("Predicted vs measured (held-out shapes)", predicted_vs_measured(pred)))
        cols = ["op", "shape", "measured_s", "roofline_s", "table_s", "roofline_err_pct", "table_err_pct"]
        sections.append(("Held-out shapes", table_html(pred[cols].to_dict("records"))))
    if e2e is not None:
        sections.append(("End to end: MoE layers, measured vs simulated", e2e_figure(e2e)))
        sections.append(("End to end per layer", table_html(e2e.to_dict("records"))))
    if published is not None:
        sections.append(("Published kernel figures (spec roofline)", table_html(published.to_dict("records"))))
    return write_report(path, "moesim calibration validation", sections, intro=intro)
