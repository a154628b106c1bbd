"""``moesim report RUN_DIR``: one self-contained interactive HTML report plus a Perfetto trace."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("report", help="write an interactive HTML report (and Perfetto trace JSON) for a run")
    p.add_argument("run_dir", help="directory written by 'moesim simulate --out' or 'moesim serve --out'")
    p.add_argument("--out", default=None, help="HTML path (default RUN_DIR/report.html)")
    p.set_defaults(func=run)


COLUMN_DEFS = {
    "layer": "MoE-layer ordinal in the trace (0 = the model's first MoE layer the trace covers).",
    "span": "from the layer's first router start to its last combine end, summed over steps and micro-batches; "
            "micro-batches overlap, so the spans add up to more than the makespan.",
    "compute": "router, shared-expert and expert-FFN time of the layer (per op: first start to last end over "
               "devices), summed over steps and micro-batches.",
    "communication": "dispatch and combine all-to-all time of the layer, summed over steps and micro-batches.",
    "imbalance": "max over devices / mean over devices of the (token, expert) choices each device computes in "
                 "the layer; 1.00 = perfectly balanced, 2.00 = the busiest device does twice the mean work.",
}


def summary_html(s: dict) -> str:
    """The run's headline, every user string escaped (trace source, system, device and model names)."""
    from moesim.cli.simulate import time_text
    from moesim.report.html import esc

    text = (f"{esc(str(s['model']))} on {esc(str(s['system']))} ({s['num_devices']} x {esc(str(s['device']))}), "
            f"{s['num_tokens']} tokens x {s['num_layers']} MoE layers, cost model {esc(str(s['cost_model']))}, "
            f"{s['micro_batches']} micro-batch(es), {esc(str(s['dtype']))}. Simulated time (makespan) "
            f"<b>{time_text(float(s['total_time_s']))}</b>. Trace: {esc(str(s.get('trace_source', '')))}.")
    if s.get("cost_model_provenance"):
        text += f" Cost model: {esc(str(s['cost_model_provenance']))}."
    warnings = "".join(f"<li>{esc(str(w))}</li>" for w in s.get("warnings", []))
    return f"<p>{text}</p>" + (f"<p><b>Warnings</b></p><ul>{warnings}</ul>" if warnings else "")


def build_sections(run) -> list:
    """The report: where the time went first, then achieved rates, per-layer table (defined columns),
    link bytes, figures, and the trace's routing statistics from the run's own copy of the trace."""
    from moesim.report import run_report as rr
    from moesim.report.html import definitions_html, table_html
    from moebase.units import GB, format_quantity

    s = run.summary
    span_s = float(s["total_time_s"])
    parts = rr.time_breakdown(run.ops, span_s, int(s["num_devices"]))
    rows = [{"layer": i, "span": format_quantity(t, "s"), "compute": format_quantity(c, "s"),
             "communication": format_quantity(m, "s"), "imbalance": f"{b:.2f}"}
            for i, (t, c, m, b) in enumerate(zip(s["layer_time_s"], s["layer_compute_s"], s["layer_comm_s"],
                                                 s["imbalance_max_over_mean"]))]
    links = run.link_bytes.groupby("kind")["bytes"].sum()
    link_rows = [{"link kind": k, "bytes (GB)": f"{float(v) / GB:.4f}"} for k, v in links.items()]
    where = ("<p>Mean per device; the rows add up to the makespan. Communication counts only where the device "
             f"computes nothing else (exposed); {format_quantity(parts['hidden_comm'], 's')} per device was hidden "
             "behind compute. Idle: waiting for other devices or the fabric.</p>")
    sections = [
        ("Summary", summary_html(s)),
        ("Where the time went", where + table_html(rr.breakdown_rows(parts, span_s)) + rr.micro_batch_note(run.ops, s, parts)),
        ("Achieved rates against the device's peaks", table_html(rr.efficiency_rows(run.ops, s, parts))),
        ("Per-layer time", table_html(rows) + definitions_html(COLUMN_DEFS)),
        ("Bytes on links (dispatch + combine)", table_html(link_rows)),
        ("Expert load (selections in the replayed trace)", rr.expert_load_heatmap(run.expert_load)),
        ("Per-device timeline", rr.timeline(run.ops)),
        ("Per-layer time breakdown", rr.layer_breakdown(s["layer_compute_s"], s["layer_comm_s"], s["layer_time_s"])),
        ("Tokens computed per device", rr.device_load(run.device_tokens)),
    ]
    return sections + _trace_sections(run)


def _trace_sections(run) -> list:
    """Routing statistics of the replayed trace (imbalance, affinity, co-activation) from the copy in the
    run directory (checksum-verified), never from the trace path, which may have changed since."""
    from moesim.io import read_run_trace
    from moesim.report.html import esc
    from moesim.report.trace_stats import trace_stats_figures

    trace, note = read_run_trace(run)
    if trace is None:
        return [("Trace statistics", f"<p>({esc(note)})</p>")]
    return [(f"Trace statistics: {heading}", fig) for heading, fig in trace_stats_figures(trace, include_load=False)]


def run(args) -> int:
    from moesim.cli._common import check_writable
    from moesim.io import read_run
    from moesim.report.html import write_report
    from moesim.report.run_report import write_chrome_trace

    if Path(args.run_dir).exists() and not Path(args.run_dir).is_dir():
        raise ValueError(f"{args.run_dir} is a file; give the run directory written by 'moesim simulate --out'")
    from moesim.report.serve import is_serve_run, write_serve_report
    if is_serve_run(args.run_dir):  # a 'moesim serve --out' directory
        html_path = Path(args.out) if args.out else Path(args.run_dir) / "report.html"
        check_writable(html_path)
        print(f"wrote {write_serve_report(args.run_dir, html_path).resolve()} (open in a browser; works offline)")
        return 0
    run_ = read_run(args.run_dir)
    html_path = Path(args.out) if args.out else run_.path / "report.html"
    check_writable(html_path)
    check_writable(run_.path / "timeline.perfetto.json")
    sections = build_sections(run_)
    write_report(html_path, f"moesim run: {run_.summary['model']} on {run_.summary['system']}", sections)
    trace_path = write_chrome_trace(run_.ops, run_.summary, run_.path / "timeline.perfetto.json")
    print(f"wrote {html_path.resolve()} (open in a browser; works offline)")
    print(f"wrote {trace_path.resolve()} (open in ui.perfetto.dev or chrome://tracing)")
    return 0
