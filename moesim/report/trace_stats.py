"""Plotly figures of routing-trace statistics (``workloads.stats``) for the HTML report."""

from __future__ import annotations

import html as _html

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from moesim.report.run_report import int_axis
from workloads import stats
from workloads.trace import Trace


def trace_stats_figures(trace: Trace, *, max_affinity_layers: int = 3,
                        include_load: bool = True) -> list[tuple[str, go.Figure]]:
    """Figures: expert-load heatmap (unless ``include_load`` is False, e.g. when the report shows one
    already), per-layer imbalance/entropy/Gini/locality, inter-layer affinity heatmaps (first
    ``max_affinity_layers`` pairs), co-activation of layer 0. Returns (heading, figure) pairs.
    The model name is escaped (Plotly renders HTML-like tags in titles)."""
    m = trace.meta
    model = _html.escape(m.model)
    figs: list[tuple[str, go.Figure]] = []
    frac = stats.load_fraction(trace)
    if include_load:
        f = go.Figure(go.Heatmap(z=frac * m.num_experts, colorscale="Viridis", colorbar={"title": "load / mean"},
                                 hovertemplate="layer %{y}, expert %{x}: %{z:.2f} x mean<extra></extra>"))
        f.update_layout(title=f"{model}: expert load per layer (1.0 = balanced)", xaxis_title="expert",
                        yaxis_title="MoE layer", xaxis=int_axis(m.num_experts), yaxis=int_axis(m.num_layers))
        figs.append(("Expert load", f))
    rows = stats.layer_summary(trace)
    layers = [r["layer"] for r in rows]
    f = make_subplots(rows=1, cols=4, subplot_titles=("max / mean load", "entropy share of log2 E", "Gini",
                                                       "temporal locality"))
    for i, key in enumerate(("max_over_mean", "entropy_share", "gini", "temporal_locality")):
        f.add_trace(go.Bar(x=layers, y=[r[key] for r in rows], name=key, showlegend=False), row=1, col=i + 1)
    f.add_hline(y=m.top_k / m.num_experts, line_dash="dot", row=1, col=4,
                annotation_text="random k/E")
    f.update_layout(title="Load imbalance and locality per layer", height=380)
    f.update_xaxes(**int_axis(m.num_layers), title_text="MoE layer")
    figs.append(("Imbalance, entropy, Gini, locality", f))
    for layer in range(min(max_affinity_layers, m.num_layers - 1)):
        a = stats.affinity(trace, layer)
        lift = a / np.clip(frac[layer + 1][None, :], 1e-12, None)
        f = go.Figure(go.Heatmap(z=lift, colorscale="RdBu_r", zmid=1.0, colorbar={"title": "lift"},
                                 hovertemplate="P(%{x} at l+1 | %{y} at l) / P(%{x}): %{z:.2f}<extra></extra>"))
        f.update_layout(title=f"Affinity layer {layer} -> {layer + 1}: P(j | i) over next-layer load",
                        xaxis_title=f"expert at layer {layer + 1}", yaxis_title=f"expert at layer {layer}",
                        xaxis=int_axis(m.num_experts), yaxis=int_axis(m.num_experts))
        figs.append((f"Inter-layer affinity {layer}->{layer + 1}", f))
    co = stats.coactivation(trace, 0)
    np.fill_diagonal(co, np.nan)
    f = go.Figure(go.Heatmap(z=co, colorscale="Viridis", colorbar={"title": "tokens"}))
    f.update_layout(title="Co-activation in layer 0 (tokens choosing both experts)", xaxis_title="expert",
                    yaxis_title="expert", xaxis=int_axis(m.num_experts), yaxis=int_axis(m.num_experts))
    figs.append(("Co-activation", f))
    return figs
