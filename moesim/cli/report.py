"""``moesim report RUN_DIR``: one self-contained interactive HTML report plus a Perfetto trace."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("report", help="write an interactive HTML report (and Perfetto trace JSON) for a run")
    p.add_argument("run_dir", help="directory written by 'moesim simulate --out'")
    p.add_argument("--out", default=None, help="HTML path (default RUN_DIR/report.html)")
    p.set_defaults(func=run)


def build_sections(run) -> list:
    from moesim.report import run_report as rr
    from moesim.report.html import table_html
    from moesim.units import format_quantity

    s = run.summary
    imb = s["imbalance_max_over_mean"]
    rows = [{"layer": i, "time_us": t * 1e6, "compute_us": c * 1e6, "comm_us": m * 1e6, "imbalance": b}
            for i, (t, c, m, b) in enumerate(zip(s["layer_time_s"], s["layer_compute_s"], s["layer_comm_s"], imb))]
    links = run.link_bytes.groupby("kind")["bytes"].sum()
    link_rows = [{"link kind": k, "bytes": float(v), "amount": format_quantity(float(v), "bytes")} for k, v in links.items()]
    sections = [
        ("Summary", "<p>" + (f"{s['model']} on {s['system']} ({s['num_devices']} x {s['device']}), "
                             f"{s['num_tokens']} tokens x {s['num_layers']} MoE layers, cost model {s['cost_model']}, "
                             f"{s['micro_batches']} micro-batch(es), {s['dtype']}. "
                             f"Simulated time <b>{s['total_time_s'] * 1e6:.1f} us</b>. Trace: {s['trace_source']}.")
         + "</p>" + table_html(rows) + "<h3>Bytes on links (dispatch + combine)</h3>" + table_html(link_rows)),
        ("Expert load (from the replayed trace)", rr.expert_load_heatmap(run.expert_load)),
        ("Per-device timeline", rr.timeline(run.ops)),
        ("Per-layer time breakdown", rr.layer_breakdown(s["layer_compute_s"], s["layer_comm_s"], s["layer_time_s"])),
        ("Tokens computed per device", rr.device_load(run.device_tokens)),
    ]
    sections += _trace_sections(s.get("trace_spec"))
    return sections


def _trace_sections(spec: str | None) -> list:
    """Routing statistics of the replayed trace (load, imbalance, affinity, co-activation), if it can be reloaded."""
    from moesim.report.trace_stats import trace_stats_figures
    from workloads.importers import load_trace
    from workloads.trace import TraceError

    if not spec:
        return []
    try:
        trace = load_trace(spec)
    except (TraceError, OSError) as exc:
        return [("Trace statistics", f"<p>(trace {spec!r} could not be reloaded: {exc})</p>")]
    return [(f"Trace statistics: {heading}", fig) for heading, fig in trace_stats_figures(trace)]


def run(args) -> int:
    from moesim.io import read_run
    from moesim.report.html import write_report
    from moesim.report.run_report import write_chrome_trace

    run_ = read_run(args.run_dir)
    html_path = Path(args.out) if args.out else run_.path / "report.html"
    sections = build_sections(run_)
    write_report(html_path, f"moesim run: {run_.summary['model']} on {run_.summary['system']}", sections)
    trace_path = write_chrome_trace(run_.ops, run_.summary, run_.path / "timeline.perfetto.json")
    print(f"wrote {html_path.resolve()} (open in a browser; works offline)")
    print(f"wrote {trace_path.resolve()} (open in ui.perfetto.dev or chrome://tracing)")
    return 0
