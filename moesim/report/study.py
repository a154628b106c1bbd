"""The HTML report of a study: Pareto front of cost vs throughput, parallel coordinates over the
varied parameters, and a drill-down (dropdown) to each configuration's load heatmap and timeline.

One self-contained file (plotly.js inlined once, no network). The page records how its figures
rendered in ``<pre id="moesim-render-status">`` (JSON: traces per figure, JavaScript errors), which
the headless-browser test reads.
"""

from __future__ import annotations

import html as _html
import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from moesim.memory.sweep import pareto_front
from moesim.report.html import table_html

OP_COLORS = {"router": "#636efa", "dispatch": "#ef553b", "shared_ffn": "#00cc96", "expert_ffn": "#ab63fa",
             "combine": "#ffa15a"}

ERROR_HOOK = """<script>window.__moesimErrors=[];
window.addEventListener('error',function(e){window.__moesimErrors.push(String(e.message||e));});
window.addEventListener('unhandledrejection',function(e){window.__moesimErrors.push('unhandled rejection: '+String(e.reason));});
(function(){var ce=console.error;console.error=function(){window.__moesimErrors.push(Array.prototype.join.call(arguments,' '));ce.apply(console,arguments);};})();
</script>"""

STATUS_SCRIPT = """<pre id="moesim-render-status" style="display:none"></pre><script>
function moesimStatus(){var figs={};document.querySelectorAll('.plotly-graph-div').forEach(function(gd){
figs[gd.id]={traces:(gd.data||[]).length,rendered:!!(gd._fullLayout&&gd.querySelector('.main-svg')),
svg_traces:gd.querySelectorAll('.trace, .heatmaplayer image, .parcoords').length};});
document.getElementById('moesim-render-status').textContent=JSON.stringify({figures:figs,errors:window.__moesimErrors,
plotly:typeof Plotly!=='undefined'?Plotly.version:null});}
window.addEventListener('load',function(){setTimeout(moesimStatus,50);});
</script>"""


def _label(row, varied) -> str:
    """A configuration's label for hovers and the dropdown, escaped (Plotly renders HTML-like tags)."""
    return _html.escape(", ".join(f"{k}={row[k]}" for k in varied) or str(row["config_id"]))


def pareto_figure(df: pd.DataFrame, varied) -> go.Figure:
    mask = pareto_front(df["cost_usd_per_hour"], df["throughput_tokens_per_s"])
    labels = [_label(r, varied) for _, r in df.iterrows()]
    front = df[mask].sort_values("cost_usd_per_hour")
    fig = go.Figure([
        go.Scatter(x=df["cost_usd_per_hour"], y=df["throughput_tokens_per_s"], mode="markers", name="configurations",
                   text=labels, hovertemplate="%{text}<br>%{x:.4g} USD/h<br>%{y:.4g} tokens/s<extra></extra>",
                   marker=dict(color=df["usd_per_million_tokens"], colorscale="Viridis", showscale=True,
                               colorbar=dict(title="USD / M tokens"))),
        go.Scatter(x=front["cost_usd_per_hour"], y=front["throughput_tokens_per_s"], mode="lines+markers",
                   name="Pareto front", line=dict(color="crimson"), text=[_label(r, varied) for _, r in front.iterrows()],
                   hovertemplate="%{text}<extra>Pareto</extra>")])
    fig.update_layout(xaxis_title="system cost (USD per hour)", yaxis_title="throughput (tokens per second)",
                      height=480, legend=dict(orientation="h"))
    return fig


def parcoords_figure(df: pd.DataFrame, varied) -> go.Figure:
    dims = []
    for key in list(varied) + ["throughput_tokens_per_s", "usd_per_million_tokens", "imbalance_mean", "comm_fraction"]:
        col = df[key]
        if not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
            cats = sorted(col.astype(str).unique())
            codes = col.astype(str).map({c: i for i, c in enumerate(cats)})
            dims.append(dict(label=_html.escape(key), values=codes, tickvals=list(range(len(cats))),
                             ticktext=[_html.escape(c) for c in cats]))
        else:
            dims.append(dict(label=_html.escape(key), values=col.astype(float)))
    fig = go.Figure(go.Parcoords(line=dict(color=df["throughput_tokens_per_s"], colorscale="Viridis", showscale=True),
                                 dimensions=dims))
    fig.update_layout(height=480)
    return fig


def _drill_rows(df: pd.DataFrame, n: int) -> pd.DataFrame:
    """The Pareto-front configurations first, then the fastest others, at most ``n``."""
    mask = pareto_front(df["cost_usd_per_hour"], df["throughput_tokens_per_s"])
    front = df[mask].sort_values("cost_usd_per_hour")
    rest = df[~mask].sort_values("throughput_tokens_per_s", ascending=False)
    return pd.concat([front, rest]).head(n)


def _dropdown(labels: list[str], traces_per: int) -> list[dict]:
    n = len(labels)
    buttons = []
    for i, lab in enumerate(labels):
        vis = [j // traces_per == i for j in range(n * traces_per)]
        buttons.append(dict(label=lab[:80], method="update", args=[{"visible": vis}]))
    return [dict(buttons=buttons, direction="down", x=0, xanchor="left", y=1.18, yanchor="top")]


def heatmap_figure(drill: pd.DataFrame, varied) -> go.Figure:
    fig = go.Figure()
    labels = []
    for i, (_, r) in enumerate(drill.iterrows()):
        z = np.asarray(json.loads(r["drill_device_tokens"]))
        fig.add_trace(go.Heatmap(z=z, colorscale="Viridis", visible=i == 0, name=r["config_id"],
                                 colorbar=dict(title="choices"),
                                 hovertemplate="layer %{y}, device %{x}: %{z} choices<extra></extra>"))
        labels.append(_label(r, varied))
    fig.update_layout(updatemenus=_dropdown(labels, 1), xaxis_title="device", yaxis_title="MoE layer", height=520,
                      margin=dict(t=110))
    return fig


def timeline_figure(drill: pd.DataFrame, varied) -> go.Figure:
    fig = go.Figure()
    labels = []
    for i, (_, r) in enumerate(drill.iterrows()):
        tl = json.loads(r["drill_timeline"])
        ops = [t[0] for t in tl]
        fig.add_trace(go.Bar(y=[f"L{t[1]} {t[0]}" for t in tl], x=[(t[3] - t[2]) * 1e6 for t in tl],
                             base=[t[2] * 1e6 for t in tl], orientation="h", visible=i == 0, name=r["config_id"],
                             marker=dict(color=[OP_COLORS.get(o, "#888") for o in ops]),
                             hovertemplate="%{y}: %{base:.2f} + %{x:.2f} us<extra></extra>"))
        labels.append(_label(r, varied))
    fig.update_layout(updatemenus=_dropdown(labels, 1), xaxis_title="time (us), step 0, micro-batch 0",
                      yaxis=dict(autorange="reversed"), height=max(420, 14 * 5 * 8), margin=dict(t=110))
    return fig


def build_figures(df: pd.DataFrame, varied, drill: int = 24) -> list[tuple[str, go.Figure]]:
    """(heading, figure) in report order; trace counts: Pareto 2, parallel coordinates 1, heatmap and
    timeline one per drill-down configuration (``min(drill, len(df))``)."""
    rows = _drill_rows(df, drill)
    return [("Pareto front: cost vs throughput", pareto_figure(df, varied)),
            ("Parallel coordinates over the parameters", parcoords_figure(df, varied)),
            ("Drill-down: tokens per device and layer (pick a configuration)", heatmap_figure(rows, varied)),
            ("Drill-down: timeline of step 0 (pick a configuration)", timeline_figure(rows, varied))]


def write_study_report(study, out: str | Path | None = None, *, drill: int = 24, png_dir: str | Path | None = None) -> Path:
    """Write the report of ``study`` (a :class:`moesim.study.spec.Study` with results) to ``out``."""
    if not study.results_path.exists():
        raise FileNotFoundError(f"{study.results_path} does not exist; run 'moesim study run {study.path}' first")
    if study.engine == "memory":  # expert-offloading studies: cost vs tokens/s of one device (moesim.report.memory)
        from moesim.report.memory import write_memory_study_report
        return write_memory_study_report(study, out)
    df = pd.read_parquet(study.results_path)
    if "status" in df.columns:  # configurations that failed (moesim.study.runner) have no outputs
        df = df[df["status"] == "ok"].reset_index(drop=True)
    if df.empty:
        raise ValueError(f"{study.results_path} has no rows")
    varied = [k for k in study.varied if k in df.columns]
    figures = build_figures(df, varied, drill)
    out = Path(out) if out else study.path / "report.html"
    top = df.sort_values("throughput_tokens_per_s", ascending=False).head(10)
    cols = ["config_id", *varied, "throughput_tokens_per_s", "cost_usd_per_hour", "usd_per_million_tokens",
            "imbalance_mean", "comm_fraction", "hbm_fits", *[c for c in ("cost_model",) if c in df.columns]]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_html.escape(study.name)}</title>", ERROR_HOOK,
             "<style>body{font-family:system-ui,sans-serif;margin:24px;max-width:1400px}"
             "h2{margin-top:36px;border-bottom:1px solid #ddd}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}.tbl{overflow-x:auto;max-width:100%}"
             "</style></head><body>",
             f"<h1>Study {_html.escape(study.name)}</h1><p>{_html.escape(study.description)}</p>",
             f"<p>{len(df)} configurations, engine <b>{_html.escape(study.engine)}</b>, seed {study.seed}; varied: "
             f"{_html.escape(', '.join(varied))}.</p>",
             _cost_html(df), "<h2>Fastest configurations</h2>",
             table_html([{c: r[c] for c in cols} for _, r in top.iterrows()])]
    for n, (heading, fig) in enumerate(figures):
        parts.append(f"<h2>{_html.escape(heading)}</h2>")
        parts.append(pio.to_html(fig, full_html=False, include_plotlyjs=n == 0, div_id=f"fig-{n}",
                                 config={"displaylogo": False}))
    parts += [STATUS_SCRIPT, "</body></html>"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    if png_dir is not None:
        export_png(figures, png_dir)
    return out


def _cost_html(df: pd.DataFrame) -> str:
    """Which cost models ran, with their provenance (column ``cost_description`` of the rows), escaped."""
    if "cost_description" not in df.columns:
        return ""
    items = "".join(f"<li>{_html.escape(str(d))}</li>" for d in df["cost_description"].dropna().unique())
    return ("<p>Cost models that ran (columns <code>cost_model</code>, <code>cost_description</code>):</p>"
            f"<ul>{items}</ul>")


def export_png(figures, png_dir: str | Path) -> list[Path]:
    """Static PNGs of the figures (for papers) via kaleido, which drives a Chrome/Chromium it finds on
    the machine (Debian's ``chromium`` works). One browser session for all figures. Clear error when missing."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        raise ValueError("PNG export needs the 'kaleido' package (pip install kaleido) and a Chrome/Chromium "
                         "browser; the HTML report was written") from None
    import plotly.io as pio

    png_dir = Path(png_dir)
    png_dir.mkdir(parents=True, exist_ok=True)
    paths = [png_dir / f"fig-{n}.png" for n in range(len(figures))]
    figs = [fig for _, fig in figures]
    try:
        pio.write_images(figs, paths, width=1200, height=[f.layout.height or 500 for f in figs])
    except Exception as exc:  # kaleido raises its own types when it cannot start a browser
        raise ValueError(f"PNG export failed ({exc}); is Chrome/Chromium installed? The HTML report was written") from None
    return paths
