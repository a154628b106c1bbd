"""HTML report of one serving run (``moesim serve``, or ``moesim report DIR`` on its output directory).

Read from the run directory only (``metrics.json``, ``requests.csv``, ``iterations.csv``), so a report can be
rebuilt later: latency CDFs (TTFT, TPOT, end to end), throughput over time, KV memory per tier over time,
where the iterations' time goes, the expert cache (offloaded serving), and the configuration. Every user string (model, system, device, trace and
file names, table cells) is escaped; figures carry no user strings (replica roles are fixed words) but the spill
tier's name, escaped. With `--kv-offload spill` the KV figure shows the KV spilled to the tier behind HBM and a table
the bytes moved per tier path.
The page records JavaScript errors and a render status (tests/moesim/report/test_browser_serve_report.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from moebase.limits import check_alloc
from moebase.units import GB, MS
from moesim.report.html import definitions_html, esc, table_html
from moesim.report.html import write_report as _write_html
from moesim.report.study import ERROR_HOOK, STATUS_SCRIPT

SCHEMA_PREFIX = "moesim.serve.metrics/"
MAX_POINTS = 2000  # points per curve in a figure (CDFs and time series are evenly thinned above)
TIME_BINS = 100
LATENCIES = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "end-to-end latency"))
PART_DEFS = {
    "embedding": "token embedding lookup",
    "attention side": "norms, QKV and output projections, tensor-parallel collectives and the MoE router",
    "attention core": "the paged-attention kernels over the batch's (query, key) pairs and KV reads",
    "dispatch": "the all-to-all sending tokens to their experts' devices",
    "shared experts": "shared-expert time not hidden beside the dispatch",
    "experts": "routed experts' grouped GEMMs",
    "combine": "the all-to-all bringing expert outputs back",
    "LM head": "final norm and LM head of the sequences that sample a token",
    "KV swap": "KV copied between HBM and host memory for swapped preemptions",
    "KV spill wait": "time an iteration waited beyond its compute for KV moved to or read from the spill tier",
    "KV SRAM move-down wait": "time an iteration waited beyond its compute for KV blocks moved from SRAM down to HBM",
    "expert fetch stall": "time waiting for routed-expert weights fetched into HBM on cache misses",
    "hidden by two-batch overlap": "(negative) time the two micro-batches' overlap saves",
}


def is_serve_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a ``moesim serve`` output (a metrics.json of the serving schema)."""
    p = Path(run_dir) / "metrics.json"
    if not p.is_file():
        return False
    try:
        return str(json.loads(p.read_text(encoding="utf-8")).get("schema", "")).startswith(SCHEMA_PREFIX)
    except (ValueError, AttributeError):
        return False


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    """Columns of a run's CSV (numbers; empty cells NaN; the ``replica`` column as text), size-checked first."""
    import pandas as pd

    if not path.is_file():
        raise ValueError(f"{path}: missing (run 'moesim serve --out {path.parent}' again)")
    check_alloc(str(path), (path.stat().st_size,), 8)
    df = pd.read_csv(path)
    return {c: (df[c].astype(str).to_numpy() if c == "replica" else df[c].to_numpy(dtype=float)) for c in df.columns}


def load_run(run_dir: str | Path) -> tuple[dict, dict, dict]:
    """(metrics, requests columns, iterations columns) of a serve run directory; clear error when not one."""
    d = Path(run_dir)
    if not is_serve_run(d):
        raise ValueError(f"{d}: no metrics.json of a 'moesim serve' run")
    mp = d / "metrics.json"
    check_alloc(str(mp), (mp.stat().st_size,), 8)
    return json.loads(mp.read_text(encoding="utf-8")), _read_csv(d / "requests.csv"), _read_csv(d / "iterations.csv")


def _thin(n: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, MAX_POINTS)).astype(int)) if n else np.zeros(0, dtype=int)


def cdf_points(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted finite values, cumulative fraction) thinned to at most MAX_POINTS points (first and last kept)."""
    v = np.sort(np.asarray(values, float)[np.isfinite(values)])
    if not len(v):
        return v, v
    k = _thin(len(v))
    return v[k], (k + 1) / len(v)


def _cdf_figure(values: np.ndarray, label: str) -> go.Figure:
    x, y = cdf_points(values)
    fig = go.Figure(go.Scatter(x=x / MS, y=y, mode="lines", name=label))
    fig.update_layout(xaxis_title=f"{label} (ms)", yaxis_title="fraction of finished requests", yaxis_range=[0, 1],
                      height=320)
    return fig


def throughput_over_time(it: dict, bins: int = TIME_BINS) -> dict[str, np.ndarray]:
    """Input (prefill) and output (sampled) tokens per second in ``bins`` equal time bins, by iteration end."""
    if not len(it.get("start_s", [])):
        return {"time_s": np.zeros(0), "input_tokens_per_s": np.zeros(0), "output_tokens_per_s": np.zeros(0)}
    end = it["start_s"] + it["duration_s"]
    lo, hi = float(it["start_s"].min()), float(end.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    width = edges[1] - edges[0]
    idx = np.clip(np.searchsorted(edges, end, side="right") - 1, 0, bins - 1)
    inp = np.bincount(idx, weights=it["prefill_tokens"], minlength=bins) / width
    out = np.bincount(idx, weights=it["sampled"], minlength=bins) / width
    return {"time_s": 0.5 * (edges[:-1] + edges[1:]), "input_tokens_per_s": inp, "output_tokens_per_s": out}


def _throughput_figure(it: dict) -> go.Figure:
    t = throughput_over_time(it)
    fig = go.Figure()
    fig.add_scatter(x=t["time_s"], y=t["input_tokens_per_s"], mode="lines", name="input (prefill) tokens/s")
    fig.add_scatter(x=t["time_s"], y=t["output_tokens_per_s"], mode="lines", name="output tokens/s")
    fig.update_layout(xaxis_title="simulated time (s)", yaxis_title="tokens per second (all devices)", height=360)
    return fig


def kv_bytes_per_block(metrics: dict, replica: str) -> float:
    """KV bytes one block of a rank holds on all its tp devices."""
    pool, kv = metrics["config"]["pools"][replica], metrics["kv"][replica]
    return float(kv["block_size"]) * float(pool["kv_bytes_per_token_per_device"]) * float(pool["tp"])


def _memory_figure(metrics: dict, it: dict) -> go.Figure:
    """Per replica: KV in HBM, its capacity, KV swapped to host memory and live KV spilled to the tier behind HBM
    (``--kv-offload spill``; GB over all devices) against time."""
    fig = go.Figure()
    for name, kv in metrics["kv"].items():
        rows = np.flatnonzero(it["replica"] == name)[_thin(int(np.sum(it["replica"] == name)))]
        per_block = kv_bytes_per_block(metrics, name) / GB
        t = it["start_s"][rows]
        role = str(kv["role"])
        fig.add_scatter(x=t, y=it["kv_used_blocks"][rows] * per_block, mode="lines", name=f"{role}: KV in HBM")
        fig.add_scatter(x=t, y=np.full(len(t), kv["capacity_blocks"] * per_block), mode="lines",
                        line_dash="dash", name=f"{role}: HBM KV capacity")
        host = it["kv_host_used_blocks"][rows] if "kv_host_used_blocks" in it else np.zeros(len(t))
        fig.add_scatter(x=t, y=host * per_block, mode="lines", name=f"{role}: KV in host memory (swapped)")
        if "spill_tier" in kv and "kv_spill_used_blocks" in it:  # --kv-offload spill: live KV in the lower tier
            fig.add_scatter(x=t, y=it["kv_spill_used_blocks"][rows] * per_block, mode="lines",
                            name=f"{role}: KV spilled to {esc(str(kv['spill_tier']))}")
    fig.update_layout(xaxis_title="simulated time (s)", yaxis_title="GB (all devices of the pool)", height=380)
    return fig


def breakdown_rows(metrics: dict) -> list[dict]:
    """One row per (replica, part) of ``metrics['iteration_time']``: seconds of the run and share of the parts."""
    rows = []
    for name, b in metrics.get("iteration_time", {}).items():
        total = sum(v for v in b["parts_s"].values() if v > 0)
        for part, v in b["parts_s"].items():
            if v != 0:
                rows.append({"pool": name, "part": part, "seconds": float(v),
                             "share %": float(100 * v / total) if total > 0 else 0.0})
    return rows


def _breakdown_figure(rows: list[dict]) -> go.Figure:
    fig = go.Figure()
    for pool in dict.fromkeys(r["pool"] for r in rows):
        sel = [r for r in rows if r["pool"] == pool]
        fig.add_bar(x=[r["seconds"] for r in sel], y=[r["part"] for r in sel], orientation="h", name=pool)
    fig.update_layout(barmode="group", xaxis_title="seconds of the run (the rank setting each iteration's time)", yaxis_autorange="reversed",
                      height=max(300, 40 * len(rows)), margin=dict(l=200))
    return fig


def _intro(m: dict) -> str:
    c, r, th, g = m["config"], m["requests"], m["throughput"], m["goodput"]
    num = lambda x, f: "n/a" if x is None else format(x, f)  # noqa: E731
    return (ERROR_HOOK + f"<p>{esc(str(c['model']))} on {esc(str(c['system']))} ({esc(str(c['num_devices']))} x "
            f"{esc(str(c['device']))}); requests: {esc(str(c['requests_source']))}; routing "
            f"{esc(str(c.get('routing', '')))} {esc(str(c.get('trace') or ''))}.</p>"
            f"<p><b>{r['finished']} of {r['total']}</b> requests served ({r['rejected']} rejected, {r['unfinished']} "
            f"unfinished) in {num(th['duration_s'], '.4g')} s simulated; {num(th['input_tokens_per_s'], ',.0f')} input "
            f"and {num(th['output_tokens_per_s'], ',.0f')} output tokens/s "
            f"({num(th['output_tokens_per_s_per_device'], ',.1f')} per device); goodput "
            f"{num(g['requests_per_s'], '.3g')} req/s (TTFT &le; {g['slo_ttft_s']:g} s, TPOT &le; "
            f"{g['slo_tpot_s']:g} s).</p>")


def _latency_table(m: dict) -> str:
    rows = [{"metric": k, **{q: ("" if v[q] is None else v[q] / MS) for q in ("mean", "p50", "p90", "p99")},
             "requests": v["count"]} for k, v in m["latency_s"].items()]
    return table_html(rows) + definitions_html({
        "ttft": "time to first token: first token - arrival (ms)",
        "tpot": "time per output token after the first: (finish - first token) / (output - 1) (ms)",
        "e2e": "end to end: finish - arrival (ms)", "queue": "first admission - arrival (ms)"})


def _config_table(m: dict) -> str:
    rows = [{"pool": name, **{k: ("" if v is None else v) for k, v in pool.items()}}
            for name, pool in m["config"]["pools"].items()]
    sched = [{"setting": k, "value": str(v)} for k, v in m["config"]["scheduler"].items()]
    return table_html(rows) + table_html(sched)


def _breakdown_html(m: dict, rows: list[dict]) -> str:
    notes = "".join(_breakdown_note(name, b) for name, b in m.get("iteration_time", {}).items())
    if not rows:
        return "<p>(no part-by-part timing in this run)</p>"
    return notes + table_html(rows) + definitions_html(PART_DEFS)


def _breakdown_note(name: str, b: dict) -> str:
    if b.get("parts_from") == "recorded":
        return (f"<p>{esc(name)}: the parts of all {b['iterations']} iterations as the engine timed them (per-request "
                f"routing: each batch's own dispatch, experts, combine and expert fetches; with two-batch overlap the "
                f"two micro-batches' parts one after the other, shared experts whole, and the time their overlap "
                f"saves); simulated busy time {b['simulated_busy_s']:.4g} s (the parts add up to it).</p>")
    return (f"<p>{esc(name)}: {b['sampled_iterations']} of {b['iterations']} iterations timed part by part "
            f"and scaled; simulated busy time {b['simulated_busy_s']:.4g} s (the parts add up to it within "
            "the interpolation of the linear layers; the split is estimated from the timed iterations).</p>")


def _cache_table(caches: dict) -> str:
    rows = [{"pool": name, "policy": c["policy"], "capacity (experts)": c["capacity_experts_per_device"],
             "backing tier": c["backing_tier"], "hit rate %": "" if c["hit_rate"] is None else 100 * c["hit_rate"],
             "stall (s)": c["stall_s"],
             **{f"{path} (GB)": v / GB for path, v in c["bytes_by_path_per_device"].items()}}
            for name, c in caches.items()]
    return table_html(rows) + definitions_html({
        "hit rate %": "expert accesses (layer, expert, iteration) whose weights were in HBM",
        "stall (s)": "time iterations waited for fetched expert weights over the run (one rank)"})


def _spill_table(kvs: dict) -> str:
    rows = [{"pool": name, "spill tier": o["spill_tier"], "spilled tokens": o["spilled_tokens"],
             "read tokens": o["read_tokens"], "wait (s)": o["wait_s"],
             "peak % of spill tier": 100 * kv["spill_peak_fraction"],
             **{f"{path} (GB)": v / GB for path, v in o["bytes_by_path_per_device"].items()}}
            for name, kv in kvs.items() if (o := kv.get("offload"))]
    return table_html(rows) + definitions_html({
        "spilled tokens": "KV tokens moved out of HBM when it was full (all ranks)",
        "read tokens": "spilled KV tokens read back over the link by the iterations attending over them (all ranks)",
        "wait (s)": "time the iterations waited beyond their compute for those transfers",
        "GB": "bytes per tier path, mean per device"})


def write_serve_report(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Write the report of the serve run in ``run_dir`` to ``path`` (default RUN_DIR/report.html)."""
    m, req, it = load_run(run_dir)
    path = Path(path) if path is not None else Path(run_dir) / "report.html"
    finished = np.isfinite(req["e2e_s"])
    rows = breakdown_rows(m)
    sections: list = [("Latency (ms)", _latency_table(m))]
    sections += [(f"{label}: cumulative distribution", _cdf_figure(req[col][finished], label))
                 for col, label in LATENCIES]
    sections += [("Throughput over time", _throughput_figure(it)),
                 ("KV memory per tier over time", _memory_figure(m, it))]
    if rows:
        sections.append(("Where the iterations' time goes", _breakdown_figure(rows)))
    if any("offload" in kv for kv in m["kv"].values()):
        sections.append(("Live KV spill (--kv-offload spill)", _spill_table(m["kv"])))
    if m.get("expert_cache"):
        sections.append(("Expert cache (routed experts in HBM, per device)", _cache_table(m["expert_cache"])))
    sections += [("Where the iterations' time goes (table)", _breakdown_html(m, rows)),
                 ("Configuration", _config_table(m) + STATUS_SCRIPT)]
    title = f"moesim serve: {m['config']['model']} on {m['config']['system']}"
    return _write_html(path, title, sections, _intro(m))
