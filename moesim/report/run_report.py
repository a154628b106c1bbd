"""Figures of one simulation run: expert-load heatmap, per-device timeline (Gantt), per-layer
compute vs communication breakdown; and the op timeline as Chrome/Perfetto trace JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from moesim.units import to_us

OP_COLORS = {"router": "#8c564b", "dispatch": "#1f77b4", "shared_ffn": "#9467bd", "expert_ffn": "#2ca02c",
             "combine": "#ff7f0e"}


def expert_load_heatmap(expert_load: np.ndarray, title: str = "Expert load (selections)") -> go.Figure:
    """Heatmap of a [layers, experts] selection-count array."""
    fig = go.Figure(go.Heatmap(z=expert_load, x=np.arange(expert_load.shape[1]), y=np.arange(expert_load.shape[0]),
                               colorscale="Viridis", colorbar={"title": "selections"},
                               hovertemplate="layer %{y}, expert %{x}: %{z}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="expert", yaxis_title="MoE layer", height=360)
    return fig


def timeline(ops: pd.DataFrame, max_ops: int = 20000) -> go.Figure:
    """Gantt chart: one lane per device, one bar per op; times in microseconds."""
    df = ops if len(ops) <= max_ops else ops.nsmallest(max_ops, "start_at_s")
    fig = go.Figure()
    for op, group in df.groupby("op", sort=False):
        dur_us = (group["end_at_s"] - group["start_at_s"]).to_numpy() * 1e6
        fig.add_trace(go.Bar(
            name=op, orientation="h", y=[f"dev{d}" for d in group["device"]], x=dur_us,
            base=group["start_at_s"].to_numpy() * 1e6, marker_color=OP_COLORS.get(op),
            customdata=np.stack([group["layer"], group["micro_batch"], group["step"]], axis=1),
            hovertemplate=f"{op}<br>layer %{{customdata[0]}} mb %{{customdata[1]}} step %{{customdata[2]}}"
                          "<br>start %{base:.2f} us, %{x:.2f} us<extra></extra>"))
    fig.update_layout(barmode="overlay", title="Per-device timeline" + (" (first ops only)" if len(ops) > max_ops else ""),
                      xaxis_title="time (us)", yaxis={"autorange": "reversed"}, height=120 + 28 * ops["device"].nunique())
    return fig


def layer_breakdown(layer_compute_s, layer_comm_s, layer_time_s) -> go.Figure:
    layers = np.arange(len(layer_time_s))
    fig = go.Figure([
        go.Bar(name="compute (router + experts)", x=layers, y=np.asarray(layer_compute_s) * 1e6, marker_color="#2ca02c"),
        go.Bar(name="communication (dispatch + combine)", x=layers, y=np.asarray(layer_comm_s) * 1e6, marker_color="#1f77b4"),
        go.Scatter(name="layer time (span)", x=layers, y=np.asarray(layer_time_s) * 1e6, mode="lines+markers",
                   marker_color="black"),
    ])
    fig.update_layout(barmode="stack", title="Per-layer time: compute vs communication (summed over micro-batches)",
                      xaxis_title="MoE layer", yaxis_title="time (us)", height=380)
    return fig


def device_load(device_tokens: np.ndarray) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=device_tokens, colorscale="Blues", colorbar={"title": "tokens"},
                               hovertemplate="layer %{y}, dev %{x}: %{z}<extra></extra>"))
    fig.update_layout(title="Tokens computed per device", xaxis_title="device", yaxis_title="MoE layer", height=320)
    return fig


def chrome_trace(ops: pd.DataFrame, meta: dict) -> dict:
    """Chrome/Perfetto trace-event JSON (complete events, microseconds; pid = device)."""
    events = []
    devices = sorted(ops["device"].unique())
    for d in devices:
        events.append({"name": "process_name", "ph": "M", "pid": int(d), "tid": 0, "args": {"name": f"dev{d}"}})
    tid = {"router": 0, "shared_ffn": 0, "expert_ffn": 0, "dispatch": 1, "combine": 1}
    for d in devices:
        events.append({"name": "thread_name", "ph": "M", "pid": int(d), "tid": 0, "args": {"name": "compute"}})
        events.append({"name": "thread_name", "ph": "M", "pid": int(d), "tid": 1, "args": {"name": "network"}})
    for row in ops.itertuples(index=False):
        events.append({"name": row.op, "cat": "comm" if row.op in ("dispatch", "combine") else "compute", "ph": "X",
                       "pid": int(row.device), "tid": tid.get(row.op, 0), "ts": to_us(row.start_at_s),
                       "dur": to_us(row.end_at_s - row.start_at_s),
                       "args": {"layer": int(row.layer), "micro_batch": int(row.micro_batch), "step": int(row.step),
                                "flops": float(row.flops), "bytes": float(row.bytes)}})
    return {"traceEvents": events, "displayTimeUnit": "ns", "otherData": {k: str(v) for k, v in meta.items()}}


def write_chrome_trace(ops: pd.DataFrame, meta: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(chrome_trace(ops, meta)))
    return path
