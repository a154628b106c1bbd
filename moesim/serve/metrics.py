"""Serving metrics from a :class:`moesim.serve.engine.ServeResult`, as a JSON-ready dict with stable names.

Per finished request: TTFT = first token - arrival; TPOT = (finish - first token) / (output - 1) (requests
of one output token have none); end-to-end = finish - arrival; queue = first admission - arrival. Each as
mean, p50, p90, p99 (``latency_s``). Throughput over ``duration_s`` = last finish - first arrival: finished
requests' prompt tokens (input) and output tokens per second, in all and per device and per node. Goodput:
finished requests per second meeting both SLOs (TTFT <= ``slo_ttft_s`` and, for outputs over one token,
TPOT <= ``slo_tpot_s``), and their fraction of all requests. KV per replica: ranks, capacity (per rank and
in all), the fullest rank's peak (``peak_fraction``), mean use, host blocks for swapped KV, and the use
over time (all ranks, and the fullest rank; at most ``kv_points`` iteration rows, evenly picked). With live KV
spill (``--kv-offload spill``) also the spill tier's capacity, peak and use over time and ``offload``: tokens
spilled and read back, bytes per tier path per device (mean over the pool's devices) and the seconds the spill
transfers added beyond compute. With SRAM for KV (``--kv-sram-gib``) also the SRAM's capacity and peak in blocks
and tokens per rank, the KV tokens in SRAM over time (all ranks), the KV moved down from SRAM to HBM (tokens, and
bytes per device) and the KV tokens attention read from SRAM (and their fraction of all KV tokens read).
Preemption: count, requests hit, evicted (recomputed) tokens and swapped-out tokens.
"""

from __future__ import annotations

import numpy as np

SCHEMA = "moesim.serve.metrics/1"
QUANTILES = (("p50", 50), ("p90", 90), ("p99", 99))


def stats(values: np.ndarray) -> dict:
    """mean, p50, p90, p99 of ``values`` (None for each when empty)."""
    v = np.asarray(values, dtype=float)
    if not len(v):
        return {"mean": None, **{k: None for k, _ in QUANTILES}, "count": 0}
    return {"mean": float(v.mean()), **{k: float(np.percentile(v, q)) for k, q in QUANTILES}, "count": int(len(v))}


def per_request(result) -> dict[str, np.ndarray]:
    """TTFT, TPOT, end-to-end and queueing seconds of each request (NaN where undefined)."""
    req = result.requests
    ttft = result.first_token_at_s - req.arrival_s
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(req.output_tokens > 1, (result.finished_at_s - result.first_token_at_s)
                        / (req.output_tokens - 1), np.nan)
    return {"ttft_s": ttft, "tpot_s": tpot, "e2e_s": result.finished_at_s - req.arrival_s,
            "queue_s": result.scheduled_at_s - req.arrival_s}


def summarise(result, *, num_devices: int, num_nodes: int, slo_ttft_s: float, slo_tpot_s: float,
              kv_points: int = 500) -> dict:
    """The metrics dict (see the module docstring)."""
    req = result.requests
    done = ~np.isnan(result.finished_at_s)
    pr = per_request(result)
    start = float(req.arrival_s.min()) if len(req) else 0.0
    duration = float(np.nanmax(result.finished_at_s)) - start if done.any() else 0.0
    rate = (lambda x: x / duration if duration > 0 else None)  # noqa: E731
    inp, out = float(req.prompt_tokens[done].sum()), float(req.output_tokens[done].sum())
    tpot_ok = np.where(req.output_tokens > 1, pr["tpot_s"] <= slo_tpot_s, True)
    good = done & (pr["ttft_s"] <= slo_ttft_s) & tpot_ok
    return {
        "schema": SCHEMA,
        "requests": {"total": int(len(req)), "finished": int(done.sum()), "rejected": int(result.rejected.sum()),
                     "unfinished": int(len(req) - done.sum() - result.rejected.sum())},
        "latency_s": {k[:-2]: stats(v[done & ~np.isnan(v)]) for k, v in pr.items()},
        "throughput": {"duration_s": duration, "requests_per_s": rate(float(done.sum())),
                       "input_tokens_per_s": rate(inp), "output_tokens_per_s": rate(out),
                       "input_tokens_per_s_per_device": _div(rate(inp), num_devices),
                       "output_tokens_per_s_per_device": _div(rate(out), num_devices),
                       "input_tokens_per_s_per_node": _div(rate(inp), num_nodes),
                       "output_tokens_per_s_per_node": _div(rate(out), num_nodes),
                       "num_devices": num_devices, "num_nodes": num_nodes},
        "goodput": {"slo_ttft_s": slo_ttft_s, "slo_tpot_s": slo_tpot_s, "requests_per_s": rate(float(good.sum())),
                    "fraction": float(good.sum() / len(req)) if len(req) else None},
        "kv": _kv(result, kv_points),
        "preemption": {"count": int(result.preemptions.sum()), "requests": int((result.preemptions > 0).sum()),
                       "evicted_tokens": int(result.evicted_tokens.sum()),
                       "swapped_tokens": int(result.swapped_tokens.sum())},
        "iterations": _iterations(result.iterations),
    }


def time_breakdown(result, costs: dict, samples: int = 200) -> dict:
    """Where the iterations' time goes, per replica whose cost has ``breakdown_s`` (:class:`IterationCost`), for
    the rank that set each lock-step iteration's time; ``parts_s`` (seconds of the run) add up to
    ``simulated_busy_s``. Under per-request routing the engine recorded every iteration's parts as it timed them
    (``iterations`` columns ``part_*_s``): their sums (``parts_from`` ``"recorded"``). Else (static routing) the
    parts of up to ``samples`` evenly picked iterations are rebuilt from the logged work, scaled to all its
    iterations by the ratio of all iterations' simulated time to the picked ones' (within the interpolation of
    ``linear``). With live KV spill, ``KV spill wait`` is the logged time the spill transfers added."""
    it, out = result.iterations, {}
    for name, cost in costs.items():
        rows = np.flatnonzero(it["replica"] == name) if len(it["replica"]) else np.zeros(0, dtype=int)
        if not hasattr(cost, "breakdown_s") or not len(rows):
            continue
        busy = float(it["duration_s"][rows].sum())
        info = result.replicas.get(name, {})
        spill = "spill_tier" in info or "sram_tier" in info
        # the spill (and SRAM move-down) transfers' time beyond compute is known per iteration; the parts share the rest
        wait = it["spill_wait_s"] if spill else np.zeros(len(it["duration_s"]))
        recorded = _recorded_parts(it, rows)
        if recorded is not None:
            parts, picked, how = recorded, len(rows), {"parts_from": "recorded"}
        else:
            pick = rows[np.unique(np.linspace(0, len(rows) - 1, min(samples, len(rows))).astype(int))]
            scale = (busy - float(wait[rows].sum())) / float((it["duration_s"][pick] - wait[pick]).sum())
            parts, picked, how = _rebuilt_parts(it, pick, cost, scale), len(pick), {}
        if spill:
            parts["KV spill wait" if "spill_tier" in info else "KV SRAM move-down wait"] = float(wait[rows].sum())
        out[name] = {"iterations": int(len(rows)), "sampled_iterations": int(picked), **how,
                     "parts_s": parts, "simulated_busy_s": busy}
    return out


def _recorded_parts(it: dict, rows: np.ndarray) -> dict | None:
    """The engine's recorded parts summed over ``rows`` (seconds by part name), or None unless every row has them."""
    from moesim.serve.cost import BREAKDOWN_PARTS, part_column

    cols = {k: part_column(k) for k in BREAKDOWN_PARTS if part_column(k) in it}
    if not cols or any(np.isnan(it[c][rows].astype(float)).any() for c in cols.values()):
        return None
    return {k: float(it[c][rows].sum()) for k, c in cols.items()}


def _rebuilt_parts(it: dict, pick: np.ndarray, cost, scale: float) -> dict:
    """The cost's ``breakdown_s`` of the slowest rank's logged work in the ``pick`` rows, summed and scaled."""
    from moesim.serve.cost import BatchWork

    acc: dict[str, float] = {}
    sram = it.get("slowest_rank_kv_tokens_read_sram")  # --kv-sram-gib: the KV tokens read from SRAM
    for r in pick:
        w = BatchWork(int(it["slowest_rank_tokens"][r]), int(it["slowest_rank_sampled"][r]),
                      float(it["slowest_rank_attention_pairs"][r]), float(it["slowest_rank_kv_tokens_read"][r]),
                      int(it["slowest_rank_swap_tokens"][r]),
                      kv_tokens_read_sram=float(sram[r]) if sram is not None else 0.0)
        for k, v in cost.breakdown_s(w).items():
            acc[k] = acc.get(k, 0.0) + v
    return {k: v * scale for k, v in acc.items()}


def _div(x, n):
    return None if x is None else x / n


def _kv(result, points: int) -> dict:
    it = result.iterations
    out = {}
    for name, info in result.replicas.items():
        rows = np.flatnonzero(it["replica"] == name) if len(it["replica"]) else np.zeros(0, dtype=int)
        per_rank, ranks = info["kv_capacity_blocks_per_rank"], info["ranks"]
        used = it["kv_used_blocks"][rows].astype(float) / (per_rank * ranks)
        pick = rows[np.unique(np.linspace(0, len(rows) - 1, min(points, len(rows))).astype(int))] if len(rows) else rows
        out[name] = {"role": info["role"], "ranks": ranks, "block_size": info["kv_block_size"],
                     "capacity_blocks_per_rank": per_rank, "capacity_blocks": per_rank * ranks,
                     "peak_blocks_per_rank": info["kv_peak_blocks_per_rank"],
                     "peak_fraction": info["kv_peak_blocks_per_rank"] / per_rank,
                     "mean_fraction": float(used.mean()) if len(used) else 0.0,
                     "host_capacity_blocks_per_rank": info["host_capacity_blocks_per_rank"],
                     "host_peak_blocks_per_rank": info["host_peak_blocks_per_rank"],
                     "over_time": {"time_s": it["start_s"][pick].astype(float).tolist(),
                                   "used_fraction": (it["kv_used_blocks"][pick] / (per_rank * ranks)).astype(float)
                                   .tolist(),
                                   "fullest_rank_fraction": (it["kv_rank_used_max_blocks"][pick] / per_rank)
                                   .astype(float).tolist()}}
        if "spill_tier" in info:
            out[name].update(_spill(it, rows, pick, info))
        if "sram_tier" in info:
            out[name].update(_sram(it, rows, pick, info))
    return out


def _sram(it: dict, rows: np.ndarray, pick: np.ndarray, info: dict) -> dict:
    """The SRAM KV tier's part of ``kv`` for one replica (``--kv-sram-gib``; see the module docstring)."""
    cap, ranks, block = info["sram_capacity_blocks_per_rank"], info["ranks"], info["kv_block_size"]
    moved = int(it["sram_out_tokens"][rows].sum())
    read = float(it["kv_tokens_read_sram"][rows].sum())
    return {"sram_tier": info["sram_tier"], "sram_capacity_blocks_per_rank": cap,
            "sram_capacity_tokens_per_rank": cap * block,
            "sram_peak_blocks_per_rank": info["sram_peak_blocks_per_rank"],
            "sram_peak_tokens_per_rank": info["sram_peak_blocks_per_rank"] * block,
            "sram_over_time": {"time_s": it["start_s"][pick].astype(float).tolist(),
                               "used_tokens": (it["kv_sram_used_blocks"][pick] * block).astype(int).tolist()},
            "sram_moved_down_tokens": moved,
            "sram_moved_down_bytes_per_device": moved * info["sram_bytes_per_token_per_device"] / ranks,
            "sram_read_tokens": read,
            "sram_read_fraction": read / max(1.0, float(it["kv_tokens_read"][rows].sum()))}


def _spill(it: dict, rows: np.ndarray, pick: np.ndarray, info: dict) -> dict:
    """The spill tier's part of ``kv`` for one replica (see the module docstring)."""
    cap, ranks = info["spill_capacity_blocks_per_rank"], info["ranks"]
    per_token = info["spill_bytes_per_token_per_device"]
    out_tokens, read_tokens = int(it["spill_out_tokens"][rows].sum()), int(it["spill_read_tokens"][rows].sum())
    kv_tier, tier = info["kv_tier"], info["spill_tier"]
    return {"spill_tier": tier, "spill_capacity_blocks_per_rank": cap, "spill_capacity_blocks": cap * ranks,
            "spill_peak_blocks_per_rank": info["spill_peak_blocks_per_rank"],
            "spill_peak_fraction": info["spill_peak_blocks_per_rank"] / cap,
            "spill_over_time": {"time_s": it["start_s"][pick].astype(float).tolist(),
                                "used_blocks": it["kv_spill_used_blocks"][pick].astype(int).tolist()},
            "offload": {"policy": "spill", "kv_tier": kv_tier, "spill_tier": tier, "spilled_tokens": out_tokens,
                        "read_tokens": read_tokens, "wait_s": float(it["spill_wait_s"][rows].sum()),
                        "bytes_by_path_per_device": {f"{kv_tier}->{tier}": out_tokens * per_token / ranks,
                                                     f"{tier}->{kv_tier}": read_tokens * per_token / ranks}}}


def _iterations(it: dict) -> dict:
    n = len(it["start_s"])
    if not n:
        return {"count": 0}
    return {"count": n, "mean_duration_s": float(it["duration_s"].mean()), "mean_tokens": float(it["tokens"].mean()),
            "prefill_tokens": int(it["prefill_tokens"].sum()), "decode_tokens": int(it["decode_tokens"].sum()),
            "busy_s": float(it["duration_s"].sum())}
