"""HTML report of one training step (``moesim train``): where the time goes, the pipeline timeline,
memory per device. Every user string (model, system names) is escaped; figures carry no user strings."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go

from moebase.units import GB, MS
from moesim.report.html import definitions_html, esc, table_html
from moesim.report.html import write_report as _write_html
from moesim.train.step import TrainResult

MAX_TIMELINE_SLOTS = 4000
COLORS = {"F": "#4C78A8", "B": "#F58518", "FB": "#54A24B", "W": "#B279A2"}


def time_by_phase(result: TrainResult) -> list[dict]:
    """Seconds per phase and kind summed over layers and directions, largest first."""
    acc: dict[tuple, float] = {}
    for r in result.phases:
        key = (r["phase"], r["kind"])
        acc[key] = acc.get(key, 0.0) + r["time_s"]
    rows = [{"phase": p, "kind": k, "time_ms": t / MS} for (p, k), t in acc.items() if t > 0]
    return sorted(rows, key=lambda r: -r["time_ms"])


def _phase_figure(rows: list[dict]) -> go.Figure:
    fig = go.Figure(go.Bar(x=[r["time_ms"] for r in rows], y=[f"{r['phase']} ({r['kind']})" for r in rows],
                           orientation="h"))
    fig.update_layout(xaxis_title="time per step on the device running it (ms)", yaxis_autorange="reversed",
                      height=max(300, 22 * len(rows)), margin=dict(l=220))
    return fig


def _timeline_figure(result: TrainResult) -> go.Figure:
    slots = result.timeline.slots[:MAX_TIMELINE_SLOTS]
    fig = go.Figure()
    for what, color in COLORS.items():
        sel = [s for s in slots if s.what == what]
        if not sel:
            continue
        fig.add_bar(x=[(s.end_at_s - s.start_at_s) / MS for s in sel], base=[s.start_at_s / MS for s in sel],
                    y=[s.stage for s in sel], orientation="h", marker_color=color, name=what,
                    text=[str(s.micro_batch) for s in sel], hovertemplate="stage %{y}<br>%{base:.2f} ms + %{x:.2f} ms")
    p = int(max((s.stage for s in slots), default=0)) + 1
    fig.update_layout(barmode="overlay", xaxis_title="time (ms)", yaxis=dict(title="pipeline stage", dtick=1,
                      autorange="reversed"), height=160 + 40 * p)
    return fig


def _memory_figure(result: TrainResult) -> go.Figure:
    stages = result.memory_per_stage
    fig = go.Figure()
    for cat in ("weights", "gradients", "optimizer", "activations", "comm_buffers", "fssdp_buffers", "weight_buffers"):  # HBM only (offloaded: absent)
        if any(cat in s for s in stages):
            fig.add_bar(x=[s["stage"] for s in stages], y=[s.get(cat, 0.0) / GB for s in stages], name=cat)
    cap = result.memory_bytes["capacity"]["hbm"] / GB
    fig.add_hline(y=cap, line_dash="dash", annotation_text="HBM capacity")
    fig.update_layout(barmode="stack", xaxis=dict(title="pipeline stage", dtick=1), yaxis_title="GB per device")
    return fig


def write_report(result: TrainResult, path: str | Path, what_if: list[dict] | None = None) -> Path:
    """The report of ``result``; ``what_if``: rows of one-change variants (``moesim train --what-if``)."""
    m, b = result.meta, result.breakdown
    title = f"moesim train: {m['model']} on {m['system']}"
    intro = (f"<p>{esc(str(m['num_devices']))} x {esc(m['device'])}; tp {m['tp']}, pp {m['pp']}, dp {m['dp']}, "
             f"ep {m['ep']}, ZeRO {m['zero']}; schedule {esc(m['schedule'])}, recompute {esc(m['recompute'])}; "
             f"cost model {esc(str(m['cost_model']))}; routing {esc(m['routing'])}.</p>"
             f"<p><b>step {result.step_time_s:.4g} s</b>, {result.tokens_per_s_per_device:,.0f} tokens/s per device, "
             f"MFU {result.mfu * 100:.1f} %.</p>")
    summary = [{"part": "pipeline (forward + backward of all micro-batches)", "value": b["pipeline_s"], "unit": "s"},
               {"part": "gradient synchronisation", "value": b["grad_sync_s"], "unit": "s"},
               {"part": "optimizer step", "value": b["optimizer_s"], "unit": "s"},
               {"part": "pipeline bubble, share of the pipeline time", "value": b["bubble_fraction"] * 100, "unit": "%"}]
    rows = time_by_phase(result)
    defs = definitions_html({"time_ms": "milliseconds per step spent in the phase on the device that runs it, summed "
                             "over layers, micro-batches and directions (forward, backward_input, backward_weight)",
                             "kind": "compute, communication or idle (pipeline bubble)"})
    sections = [("Where the step's time goes", table_html(summary) + table_html(rows) + defs),
                ("Time per phase", _phase_figure(rows)),
                ("Pipeline timeline (F forward, B backward, FB backward overlapped with the forward before it)",
                 _timeline_figure(result)),
                ("Memory per device", _memory_figure(result)),
                ("Memory per stage (bytes)", table_html(result.memory_per_stage))]
    if what_if:
        rows = [{k: ("" if v is None else v) for k, v in r.items()} for r in what_if]
        sections.append(("What if (one change each)", table_html(rows)))
    return _write_html(path, title, sections, intro)
