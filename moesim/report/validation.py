"""The validation report: predicted vs measured per op (held-out shapes), MAPE tables, published checks,
and optional end-to-end per-layer comparison. One offline HTML file (:func:`moesim.report.html.write_report`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from moebase.units import MS, US, to_us
from moesim.report.html import table_html, write_report


def predicted_vs_measured(pred: pd.DataFrame) -> go.Figure:
    """Log-log scatter of measured vs predicted time (us) per op, table mode and fitted roofline."""
    fig = go.Figure()
    for op, g in pred.groupby("op"):
        for col, sym in (("table_s", "circle"), ("roofline_s", "x")):
            fig.add_trace(go.Scatter(x=to_us(g["measured_s"]), y=to_us(g[col]), mode="markers", marker_symbol=sym,
                                     name=f"{op} ({col[:-2]})", text=g["shape"],
                                     hovertemplate="%{text}<br>measured %{x:.1f} us<br>predicted %{y:.1f} us"))
    lo, hi = float(to_us(pred["measured_s"].min()) * 0.7), float(to_us(pred["measured_s"].max()) * 1.4)
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line=dict(dash="dash", color="gray")))
    fig.update_layout(xaxis=dict(type="log", title="measured time (us)"),
                      yaxis=dict(type="log", title="predicted time (us)"), height=600)
    return fig


def e2e_figure(e2e: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    fig.add_trace(go.Bar(x=e2e["layer"], y=e2e["measured_s"] / MS, name="measured (torch, CPU)"))
    fig.add_trace(go.Bar(x=e2e["layer"], y=e2e["predicted_s"] / MS, name="simulated (calibrated)"))
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


# ----------------------------------------------------------------------------- GPU fidelity (shared public data)


def _scatter_measured_predicted(groups, x_title: str, y_title: str, log: bool = True) -> go.Figure:
    """``groups``: (name, measured [N], predicted [N], hover text [N]) -> scatter with the y = x line."""
    fig = go.Figure()
    lo, hi = float("inf"), 0.0
    for name, meas, pred, text in groups:
        fig.add_trace(go.Scatter(x=list(meas), y=list(pred), mode="markers", name=str(name), text=list(text),
                                 marker=dict(size=4),
                                 hovertemplate="%{text}<br>measured %{x:.4g}<br>predicted %{y:.4g}"))
        lo, hi = min(lo, float(min(meas)), float(min(pred))), max(hi, float(max(meas)), float(max(pred)))
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line=dict(dash="dash", color="gray")))
    axis = dict(type="log") if log else {}
    fig.update_layout(xaxis=dict(title=x_title, **axis), yaxis=dict(title=y_title, **axis), height=550)
    return fig


def gpu_fidelity_sections(res: dict) -> list:
    """Report sections of :func:`hwmodels.gpu_fit.gpu_fidelity` results: tables and predicted-vs-measured plots."""
    lomo_rows = res["lomo_rows"]
    secs = [("GEMM model: leave-one-model-out on Vidur (fit on two models, predict the third)",
             table_html(res["lomo"].round(3).to_dict("records")))]
    for gpu, g in lomo_rows.groupby("gpu"):
        groups = [(f"{gpu} held-out {model}", sub["time_s"] / US, sub["predicted_s"] / US,
                   sub["op"] + " m=" + sub["m"].astype(int).astype(str) + " n=" + sub["n"].astype(int).astype(str)
                   + " k=" + sub["k"].astype(int).astype(str)) for model, sub in g.groupby("model")]
        secs.append((f"Predicted vs measured GEMM time (us), {gpu}, held-out models",
                     _scatter_measured_predicted(groups, "measured (us)", "predicted (us)")))
    dg = res["deepgemm"]
    secs.append(("DeepGEMM FP8 GEMMs on H800 (fp8 efficiencies fitted on the dense table, role 'fit'; grouped "
                 "contiguous and masked tables held out)",
                 table_html(dg.round(2).to_dict("records"))))
    secs.append(("DeepGEMM: published vs predicted TFLOPS", _scatter_measured_predicted(
        [(f"{layout} ({role})", g["published_tflops"], g["predicted_tflops"],
          g["groups"].astype(str) + "x" + g["m_per_group"].astype(str) + " n=" + g["n"].astype(str) + " k="
          + g["k"].astype(str)) for (layout, role), g in dg.groupby(["layout", "role"])],
        "published (TFLOPS)", "predicted (TFLOPS)", log=False)))
    llm = res["llmcompass"]
    secs.append(("LLMCompass A100 matmul sweep (held out; A100 fit from Vidur on each A100 spec)",
                 table_html(llm.round(4).to_dict("records"))))
    secs.append(("LLMCompass: predicted vs measured (us)", _scatter_measured_predicted(
        [(spec, g["time_s"] / US, g["predicted_s"] / US,
          "m=" + g["m"].astype(int).astype(str) + " n=" + g["n"].astype(int).astype(str) + " k="
          + g["k"].astype(int).astype(str)) for spec, g in llm.groupby("spec")], "measured (us)", "predicted (us)")))
    secs.append(("NCCL collectives (Vidur): fitted and held-out errors",
                 table_html(res["collectives"].round(2).to_dict("records"))))
    de = res["deepep"]
    secs.append(("DeepEP on H800 (not fitted)", table_html(de.round(2).to_dict("records"))))
    secs.append(("DeepEP: published vs predicted", _scatter_measured_predicted(
        [(unit, g["published"], g["predicted"], g["check"]) for unit, g in de.groupby("unit")],
        "published (GB/s or us)", "predicted", log=True)))
    return secs



def write_gpu_fidelity_report(path: str | Path, res: dict) -> Path:
    """One HTML file with every GPU-fidelity table and plot."""
    intro = ("<p>GPU cost models fitted to public measurements (Vidur, MIT; LLMCompass, BSD-3; DeepGEMM and DeepEP "
             "published tables) and checked on data they were not fitted on. See docs/validation.md.</p>")
    return write_report(path, "moesim GPU fidelity", gpu_fidelity_sections(res), intro=intro)
