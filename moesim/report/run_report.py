"""Figures of one simulation run: expert-load heatmap, per-device timeline (Gantt), per-layer
compute vs communication breakdown; and the op timeline as Chrome/Perfetto trace JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from moebase.units import to_us

OP_COLORS = {"router": "#8c564b", "dispatch": "#1f77b4", "shared_ffn": "#9467bd", "expert_ffn": "#2ca02c",
             "combine": "#ff7f0e"}


def expert_load_heatmap(expert_load: np.ndarray, title: str = "Expert load (selections)") -> go.Figure:
    """Heatmap of a [layers, experts] selection-count array."""
    fig = go.Figure(go.Heatmap(z=expert_load, x=np.arange(expert_load.shape[1]), y=np.arange(expert_load.shape[0]),
                               colorscale="Viridis", colorbar={"title": "selections"},
                               hovertemplate="layer %{y}, expert %{x}: %{z}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="expert", yaxis_title="MoE layer", height=360,
                      xaxis=int_axis(expert_load.shape[1]), yaxis=int_axis(expert_load.shape[0]))
    return fig


def timeline(ops: pd.DataFrame, max_ops: int = 20000) -> go.Figure:
    """Gantt chart: one lane per device, one bar per op; times in microseconds."""
    df = ops if len(ops) <= max_ops else ops.nsmallest(max_ops, "start_at_s")
    unit_s, unit = time_unit(float(ops["end_at_s"].max()) if len(ops) else 0.0)
    fig = go.Figure()
    for op, group in df.groupby("op", sort=False):
        dur = (group["end_at_s"] - group["start_at_s"]).to_numpy() / unit_s
        fig.add_trace(go.Bar(
            name=op, orientation="h", y=[f"dev{d}" for d in group["device"]], x=dur,
            base=group["start_at_s"].to_numpy() / unit_s, marker_color=OP_COLORS.get(op),
            customdata=np.stack([group["layer"], group["micro_batch"], group["step"]], axis=1),
            hovertemplate=f"{op}<br>layer %{{customdata[0]}} mb %{{customdata[1]}} step %{{customdata[2]}}"
                          f"<br>start %{{base:.2f}} {unit}, %{{x:.2f}} {unit}<extra></extra>"))
    fig.update_layout(barmode="overlay", title="Per-device timeline" + (" (first ops only)" if len(ops) > max_ops else ""),
                      xaxis_title=f"time ({unit})", yaxis={"autorange": "reversed"}, height=120 + 28 * ops["device"].nunique())
    return fig


def layer_breakdown(layer_compute_s, layer_comm_s, layer_time_s) -> go.Figure:
    """Per-layer compute, communication and span, each summed over steps and micro-batches (so with
    overlapping micro-batches they add up to more than the makespan)."""
    layers = np.arange(len(layer_time_s))
    unit_s, unit = time_unit(float(np.max(layer_time_s, initial=0.0)))
    fig = go.Figure([
        go.Bar(name="compute (router + experts)", x=layers, y=np.asarray(layer_compute_s) / unit_s, marker_color="#2ca02c"),
        go.Bar(name="communication (dispatch + combine)", x=layers, y=np.asarray(layer_comm_s) / unit_s,
               marker_color="#1f77b4"),
        go.Scatter(name="layer span", x=layers, y=np.asarray(layer_time_s) / unit_s, mode="lines+markers",
                   marker_color="black"),
    ])
    fig.update_layout(barmode="stack", title="Per-layer time, summed over steps and micro-batches (they overlap, so "
                      "the sum exceeds the makespan)", xaxis_title="MoE layer", yaxis_title=f"time ({unit})", height=380,
                      xaxis=int_axis(len(layers)))
    return fig


def time_unit(max_s: float) -> tuple[float, str]:
    """(seconds per unit, unit name) that fits times up to ``max_s``: us below 10 ms, ms below 10 s, else s."""
    from moebase.units import MS, US

    if max_s < 10 * MS:
        return US, "us"
    return (MS, "ms") if max_s < 10.0 else (1.0, "s")


def device_load(device_tokens: np.ndarray) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=device_tokens, colorscale="Blues", colorbar={"title": "tokens"},
                               hovertemplate="layer %{y}, dev %{x}: %{z}<extra></extra>"))
    fig.update_layout(title="Tokens computed per device", xaxis_title="device", yaxis_title="MoE layer", height=320,
                      xaxis=int_axis(device_tokens.shape[1]), yaxis=int_axis(device_tokens.shape[0]))
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


# ----------------------------------------------------------------------------- where the time went

TIME_PARTS = ("router", "shared_ffn", "expert_ffn", "dispatch", "combine", "idle")
PART_LABELS = {"router": "router", "shared_ffn": "shared-expert FFN", "expert_ffn": "expert FFN",
               "dispatch": "dispatch (exposed)", "combine": "combine (exposed)", "idle": "idle (waiting)"}


def _covered_s(starts: np.ndarray, ends: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Time in [0, t] covered by disjoint intervals sorted by start (vectorised over ``t``)."""
    cum = np.concatenate([[0.0], np.cumsum(ends - starts)])
    k = np.searchsorted(starts, t, side="right")
    tail = np.where(k > 0, np.maximum(ends[np.maximum(k - 1, 0)] - t, 0.0), 0.0)
    return cum[k] - tail


def time_breakdown(ops: pd.DataFrame, makespan_s: float, num_devices: int) -> dict[str, float]:
    """Where the makespan went, in mean seconds per device; the TIME_PARTS sum to ``makespan_s``.

    A device's compute ops (router, shared-expert FFN, expert FFN) never overlap (one compute queue).
    Its all-to-all time counts only where no compute of its own runs ("exposed"); the part hidden
    behind compute is returned as ``hidden_comm`` (not in the sum). Idle is the rest: the device waits
    for another device or for the fabric."""
    from moesim.sim import COMM_OPS, COMPUTE_OPS

    out = dict.fromkeys(TIME_PARTS, 0.0)
    out["hidden_comm"] = 0.0
    dur = ops["end_at_s"] - ops["start_at_s"]
    for op in COMPUTE_OPS:
        out[op] = float(dur[ops["op"] == op].sum())
    for _, dev in ops.groupby("device"):
        comp = dev[dev["op"].isin(COMPUTE_OPS)].sort_values("start_at_s")
        starts, ends = comp["start_at_s"].to_numpy(float), comp["end_at_s"].to_numpy(float)
        for op in COMM_OPS:
            comm = dev[dev["op"] == op]
            a, b = comm["start_at_s"].to_numpy(float), comm["end_at_s"].to_numpy(float)
            hidden = _covered_s(starts, ends, b) - _covered_s(starts, ends, a) if len(starts) else np.zeros(len(a))
            out[op] += float((b - a - hidden).sum())
            out["hidden_comm"] += float(hidden.sum())
    out = {k: v / max(num_devices, 1) for k, v in out.items()}
    out["idle"] = max(makespan_s - sum(out[k] for k in TIME_PARTS if k != "idle"), 0.0)
    return out


def breakdown_rows(parts: dict[str, float], makespan_s: float) -> list[dict]:
    """Table rows: activity, mean time per device, % of the makespan (the rows add up to 100 %)."""
    from moebase.units import format_quantity

    rows = [{"activity": PART_LABELS[k], "time per device": format_quantity(parts[k], "s"),
             "% of makespan": f"{100 * parts[k] / makespan_s:.1f} %" if makespan_s > 0 else "n/a"}
            for k in TIME_PARTS if parts[k] > 0 or k in ("expert_ffn", "idle")]
    rows.append({"activity": "total (makespan)", "time per device": format_quantity(makespan_s, "s"),
                 "% of makespan": "100.0 %"})
    return rows


def efficiency_rows(ops: pd.DataFrame, summary: dict, parts: dict[str, float]) -> list[dict]:
    """Achieved FLOP/s and bandwidths against the device's peaks (mean per device), over the
    makespan and while the op runs. Peaks come from the run's summary (n/a for older runs)."""
    from moebase.units import format_quantity

    d = max(int(summary["num_devices"]), 1)
    span = float(summary["total_time_s"])
    expert = ops[ops["op"] == "expert_ffn"]
    comm = ops[ops["op"].isin(("dispatch", "combine"))]
    comm_s = float((comm["end_at_s"] - comm["start_at_s"]).sum()) / d
    compute_s = sum(parts[k] for k in ("router", "shared_ffn", "expert_ffn"))
    rows = []
    for what, amount, busy_s, kind, peak_key in (
            ("compute (all ops)", ops["flops"].sum() / d, compute_s, "flops_per_s", "device_peak_flops_per_s"),
            ("expert FFN compute", expert["flops"].sum() / d, parts["expert_ffn"], "flops_per_s",
             "device_peak_flops_per_s"),
            ("memory traffic of compute ops", ops.loc[~ops["op"].isin(("dispatch", "combine")), "bytes"].sum() / d,
             compute_s, "bytes_per_s", "device_memory_bandwidth_bytes_per_s"),
            ("all-to-all bytes sent", comm["bytes"].sum() / d, comm_s, "bytes_per_s", "scale_up_bandwidth_bytes_per_s")):
        peak = summary.get(peak_key)
        over_span = amount / span if span > 0 else float("nan")
        while_busy = amount / busy_s if busy_s > 0 else float("nan")
        rows.append({"quantity": what, "over the makespan": format_quantity(over_span, kind),
                     "while running": format_quantity(while_busy, kind),
                     "peak": format_quantity(peak, kind) if peak else "n/a",
                     "% of peak (while running)": f"{100 * while_busy / peak:.1f} %" if peak and busy_s > 0 else "n/a"})
    return rows


def micro_batch_note(ops: pd.DataFrame, summary: dict, parts: dict[str, float]) -> str:
    """HTML paragraph: what micro-batches cost and what they hide (plain numbers from the ops)."""
    import html as _html

    from moebase.units import GB, format_quantity

    m = int(summary.get("micro_batches", 1))
    if m <= 1:
        return ""
    d = max(int(summary["num_devices"]), 1)
    expert = ops[ops["op"] == "expert_ffn"]
    per_device_ops = len(ops[~ops["op"].isin(("dispatch", "combine"))]) / d
    collectives = len(ops[ops["op"].isin(("dispatch", "combine"))]) // d
    launch = summary.get("device_launch_latency_s")
    launch_text = (f" ({format_quantity(per_device_ops * launch, 's')} of launch latency)" if launch else "")
    text = (f"Why {m} micro-batches can be slower than 1: every micro-batch runs each layer's router, expert FFN "
            f"and both all-to-alls by itself. Every expert that receives tokens in a micro-batch reads its weights "
            f"from memory again (the shared experts' weights too): the expert FFN moved "
            f"{expert['bytes'].sum() / d / GB:.3f} GB per device here, and at small batches these ops are "
            f"memory-bound, so their time grows with the number of micro-batches. Each device ran {per_device_ops:.0f} compute ops"
            f"{launch_text}, and the fabric ran {collectives} all-to-alls one at a time, each paying its link "
            f"latency. In return, {format_quantity(parts['hidden_comm'], 's')} of communication per device was "
            f"hidden behind compute. More micro-batches pay off only when the hidden communication exceeds the "
            f"extra weight reads and latencies.")
    return f"<p>{_html.escape(text)}</p>"


def int_axis(n: int) -> dict:
    """Plotly axis settings for an integer axis of ``n`` values: ticks at integers, at most ~16."""
    return {"tickmode": "linear", "tick0": 0, "dtick": max(1, -(-int(n) // 16)), "tickformat": "d"}
