"""SN40L Composition-of-Experts study on the serving engine (moesim/serve/coe.py).

Question: from the shipped hardware specs alone, how much faster does one SN40L node switch between
Llama-2-7B experts than a DGX H100 / DGX A100, how much faster does it serve a batch, and how many
machines hold 850 experts? Paper: Prabhakar et al., arXiv:2405.07518 (MICRO 2024).

Run from the repository root:

    .venv/bin/python -m studies.sn40l_coe.run [--prompt-tokens 128] [--seed 0] [--json out.json]

Nothing is fitted to the paper: hardware numbers come from hwmodels/specs/*.toml (each with its source),
the expert from its Hugging Face config (llama-2-7b.json), the workload from SETUP below; parameters
without a source are swept (SWEEPS) and the README shows the range of answers they allow. The old
spec-number model (studies/sn40l_coe/spec_model.py) is printed beside the new engine's numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from hwmodels.specs import System, load_system
from moebase.units import GB, MS, US
from moesim.serve.coe import CoENode, CoEOptions, coe_node, nodes_to_hold, route_experts, serve_coe, serve_coe_replicas
from workloads.requests import Requests
from studies.sn40l_coe import spec_model
from workloads.hf_config import load_config

PAPER = spec_model.PAPER
CONFIG_PATH = Path(__file__).parent / "llama-2-7b.json"

SETUP = {
    "batch": 8,  # paper's CoE comparison setting (as read by the earlier study)
    "output_tokens": 20,  # paper's CoE comparison setting (as read by the earlier study)
    "prompt_tokens": 128,  # NOT given in the paper: swept below
    "sn40l_tp": 8,  # one expert runs tensor-parallel on the node's 8 sockets (paper: one node serves the CoE)
    "dgx_tp": 1,  # a 7B expert fits one 80 GB GPU; NOT given in the paper: swept below
    # None = the spec value (sn40l-node.toml / sn40l.toml, marked "uncertain; parameter"); swept below
    "sn40l_peer_latency_s": None,
    "sn40l_peer_bandwidth_bytes_per_s": None,
    "sn40l_launch_latency_s": None,
    # achievable share of the nominal PCIe bandwidth of a DGX host-to-GPU copy: the spec's nominal figure
    # (1.0) is used; no measured fraction with a source was available; swept below
    "dgx_pcie_fraction": 1.0,
    "experts_footprint": 850,  # paper: 850 Llama-2-7B-sized experts on one SN40L node
    "experts_coe": 150,  # paper: Samba-CoE, 150 experts
    # Poisson stream (a serving scenario beyond the paper's figures; none of its numbers is compared)
    "stream_rate_per_s": 4.0,
    "stream_requests": 2000,
    "stream_zipf_s": 1.0,
}

#: parameters without a published source and the values swept (others at their spec/SETUP value)
SWEEPS = {
    "sn40l_peer_latency_s": [0.0, 0.5 * US, 1 * US, 2 * US, 3 * US, 5 * US],
    "sn40l_peer_bandwidth_bytes_per_s": [50 * GB, 100 * GB, 200 * GB, 400 * GB],
    "sn40l_launch_latency_s": [0.0, 1 * US, 2 * US, 5 * US],
    "prompt_tokens": [32, 128, 512],
    "dgx_tp": [1, 8],
    "dgx_pcie_fraction": [0.7, 0.8, 0.9, 1.0],
}
RATIOS = ("switch_vs_h100", "switch_vs_a100", "overall_vs_h100", "overall_vs_a100", "footprint")
PAPER_OF = dict(zip(RATIOS, PAPER.values()))


def expert_config():
    return dataclasses.replace(load_config(CONFIG_PATH), name="llama-2-7b")


def sn40l_system(peer_latency_s: float | None = None, peer_bandwidth_bytes_per_s: float | None = None,
                 launch_latency_s: float | None = None) -> System:
    """The sn40l-node spec with the unsourced peer-link and launch parameters replaced where given."""
    s = load_system("sn40l-node")
    up = s.scale_up
    up = dataclasses.replace(up, latency_s=up.latency_s if peer_latency_s is None else peer_latency_s,
                             bandwidth_bytes_per_s=up.bandwidth_bytes_per_s if peer_bandwidth_bytes_per_s is None
                             else peer_bandwidth_bytes_per_s)
    dev = s.device if launch_latency_s is None else dataclasses.replace(s.device, launch_latency_s=launch_latency_s)
    return dataclasses.replace(s, scale_up=up, device=dev)


def dgx_system(name: str, pcie_fraction: float) -> System:
    """A DGX spec whose host link carries ``pcie_fraction`` of its nominal bandwidth."""
    if not 0 < pcie_fraction <= 1:
        raise ValueError(f"dgx_pcie_fraction must lie in (0, 1], got {pcie_fraction}")
    s = load_system(name)
    link = dataclasses.replace(s.host_link, bandwidth_bytes_per_s=s.host_link.bandwidth_bytes_per_s * pcie_fraction)
    return dataclasses.replace(s, host_link=link)


def _node(system: System, tp: int, p: dict) -> CoENode:
    return coe_node(expert_config(), system, tp=tp, kv_reserve_tokens=p["batch"] * (p["prompt_tokens"] + p["output_tokens"]))


def cold_batch(node: CoENode, p: dict) -> dict:
    """One batch of ``batch`` requests for a model not in HBM, all arriving at 0: switch, then serve."""
    b = p["batch"]
    req = Requests(np.zeros(b), np.full(b, p["prompt_tokens"]), np.full(b, p["output_tokens"]))
    res = serve_coe(req, np.zeros(b, dtype=np.int64), node, CoEOptions(max_batch=b, overlap=True, preload=False))
    first = float(np.max(res.first_token_at_s))
    return {"deployment": node.name, "slots": node.slots, "switch_s": res.switch_wait_s,
            "switch_closed_form_s": node.switch_closed_form_s(), "prefill_s": first - res.switch_wait_s,
            "decode_s": res.makespan_s - first, "total_s": res.makespan_s,
            "hbm_experts_per_node": node.slots * node.replicas_per_node, "store_experts_per_node": node.store_slots}


def _row(p: dict, which: str, cache: dict | None) -> dict:
    """The cold-batch row of ``which`` (``sn40l-node``, ``dgx-h100``, ``dgx-a100``) under setup ``p``,
    memoized in ``cache`` by the parameters that reach that deployment."""
    sn = which == "sn40l-node"
    knobs = ("sn40l_peer_latency_s", "sn40l_peer_bandwidth_bytes_per_s", "sn40l_launch_latency_s", "sn40l_tp") \
        if sn else ("dgx_pcie_fraction", "dgx_tp")
    key = (which, p["prompt_tokens"], p["batch"], p["output_tokens"], *(p[k] for k in knobs))
    row = None if cache is None else cache.get(key)
    if row is None:
        if sn:
            system = sn40l_system(p["sn40l_peer_latency_s"], p["sn40l_peer_bandwidth_bytes_per_s"],
                                  p["sn40l_launch_latency_s"])
            row = cold_batch(_node(system, p["sn40l_tp"], p), p)
        else:
            row = cold_batch(_node(dgx_system(which, p["dgx_pcie_fraction"]), p["dgx_tp"], p), p)
        if cache is not None:
            cache[key] = row
    return row


def ratios(p: dict, cache: dict | None = None) -> dict:
    """The five ratios and each deployment's cold-batch terms for setup ``p`` (``cache``: rows by deployment
    parameters, so a sweep builds each deployment once)."""
    sn_row, h, a = (_row(p, which, cache) for which in ("sn40l-node", "dgx-h100", "dgx-a100"))
    n = p["experts_footprint"]
    sn_nodes = nodes_to_hold(n, sn_row["store_experts_per_node"])  # every expert in the node's DDR
    dgx_nodes = nodes_to_hold(n, h["hbm_experts_per_node"])  # every expert resident in HBM (no switching)
    out = {"switch_vs_h100": h["switch_s"] / sn_row["switch_s"], "switch_vs_a100": a["switch_s"] / sn_row["switch_s"],
           "overall_vs_h100": h["total_s"] / sn_row["total_s"], "overall_vs_a100": a["total_s"] / sn_row["total_s"],
           "footprint": dgx_nodes / sn_nodes}
    return {"ratios": out, "terms": [sn_row, h, a], "footprint_nodes": {"sn40l": sn_nodes, "dgx_h100": dgx_nodes}}


def old_engine(prompt_tokens: int) -> dict:
    """The five ratios of the spec-number model (studies/sn40l_coe/spec_model.py), in RATIOS order."""
    comps = spec_model.run(prompt_tokens)["comparisons"]
    return dict(zip(RATIOS, (c["simulated"] for c in comps)))


def sweeps(p: dict) -> dict:
    """One-at-a-time sweeps of the unsourced parameters, and the min/max of every ratio over their full grid."""
    cache: dict = {}
    one = {key: [{"value": v, **ratios(dict(p, **{key: v}), cache)["ratios"]} for v in values]
           for key, values in SWEEPS.items()}
    grid = []
    for values in itertools.product(*SWEEPS.values()):
        q = dict(p, **dict(zip(SWEEPS, values)))
        grid.append((q["dgx_tp"], ratios(q, cache)["ratios"]))

    def span(rows):
        return {k: (min(g[k] for g in rows), max(g[k] for g in rows)) for k in RATIOS}

    by_tp = {tp: span([g for t, g in grid if t == tp]) for tp in SWEEPS["dgx_tp"]}
    return {"one_at_a_time": one, "grid_points": len(grid), "grid_range": span([g for _, g in grid]),
            "grid_range_by_dgx_tp": by_tp, "latency_within_20pct": latency_band(p, cache)}


#: peer-link latencies [s] scanned for the band where both overall ratios land within +-20 % of the paper
LATENCY_SCAN_S = [i * 0.1 * US for i in range(51)]


def latency_band(p: dict, cache: dict) -> dict:
    """The peer-link latencies (0-5 us, 0.1 us steps; other parameters at spec) whose overall ratios lie
    within +-20 % of the paper's, per ratio: (lowest, highest) or None."""
    rows = [(lat, ratios(dict(p, sn40l_peer_latency_s=lat), cache)["ratios"]) for lat in LATENCY_SCAN_S]
    out = {}
    for k in ("overall_vs_h100", "overall_vs_a100"):
        ok = [lat for lat, r in rows if abs(r[k] / PAPER_OF[k] - 1.0) <= 0.2]
        out[k] = (min(ok), max(ok)) if ok else None
    return out


def stream(p: dict, seed: int) -> dict:
    """A Poisson stream routed over the composition's experts: the SN40L node against a DGX whose GPUs each
    serve the experts ``e mod 8`` (own PCIe link; the node's host memory holds the models)."""
    sn = sn40l_system(p["sn40l_peer_latency_s"], p["sn40l_peer_bandwidth_bytes_per_s"], p["sn40l_launch_latency_s"])
    nodes = {"sn40l-node": _node(sn, p["sn40l_tp"], p),
             **{k: _node(dgx_system(k, p["dgx_pcie_fraction"]), 1, p) for k in ("dgx-h100", "dgx-a100")}}
    experts = min([p["experts_coe"]] + [nd.store_slots for nd in nodes.values()])
    rng = np.random.default_rng(seed)
    n = p["stream_requests"]
    arrivals = np.cumsum(rng.exponential(1.0 / p["stream_rate_per_s"], size=n))
    req = Requests(arrivals, np.full(n, p["prompt_tokens"]), np.full(n, p["output_tokens"]), source="poisson")
    ex = route_experts(n, experts, rng, zipf_s=p["stream_zipf_s"])
    out = {"experts": experts, "requests": n, "rate_per_s": p["stream_rate_per_s"], "rows": []}
    for name, nd in nodes.items():
        for overlap in (False, True):
            opts = CoEOptions(max_batch=p["batch"], overlap=overlap)
            parts = serve_coe_replicas(req, ex, nd, nd.replicas_per_node, opts)
            out["rows"].append({"deployment": name, "overlap": overlap, **_merge(parts)})
    return out


def _merge(parts: list) -> dict:
    lat = np.concatenate([r.finished_at_s - r.requests.arrival_s for r in parts])
    ttft = np.concatenate([r.first_token_at_s - r.requests.arrival_s for r in parts])
    return {"served": int(sum(np.isfinite(r.finished_at_s).sum() for r in parts)),
            "switches": sum(r.switches for r in parts), "switch_wait_s": sum(r.switch_wait_s for r in parts),
            "mean_latency_s": float(lat.mean()), "p99_latency_s": float(np.percentile(lat, 99)),
            "mean_ttft_s": float(ttft.mean()), "makespan_s": max(r.makespan_s for r in parts)}


def run(prompt_tokens: int | None = None, seed: int = 0, with_sweeps: bool = True) -> dict:
    p = dict(SETUP)
    if prompt_tokens is not None:
        p["prompt_tokens"] = prompt_tokens
    main = ratios(p)
    old = old_engine(p["prompt_tokens"])
    comparisons = [{"metric": k, "paper": PAPER_OF[k], "old_engine": old[k], "serving_engine": main["ratios"][k],
                    "serving/paper": main["ratios"][k] / PAPER_OF[k],
                    "within_20pct": abs(main["ratios"][k] / PAPER_OF[k] - 1.0) <= 0.2} for k in RATIOS]
    res = {"setup": p, "seed": seed, "comparisons": comparisons, "terms": main["terms"],
           "footprint_nodes": main["footprint_nodes"], "stream": stream(p, seed)}
    if with_sweeps:
        res["sweeps"] = sweeps(p)
    return res


def _fmt_value(key: str, v) -> str:
    if key.endswith("_latency_s"):
        return f"{v / US:g} us"
    if key.endswith("_bytes_per_s"):
        return f"{v / GB:g} GB/s"
    return str(v)


def _print(res: dict) -> None:
    p = res["setup"]
    print(f"SN40L CoE on the serving engine: Llama-2-7B experts (bf16), batch {p['batch']}, {p['prompt_tokens']} "
          f"prompt tokens (assumed), {p['output_tokens']} output tokens; SN40L tp{p['sn40l_tp']}, DGX tp{p['dgx_tp']}")
    print("\nCold batch (model not in HBM, all requests at t = 0) [ms]:")
    print(f"  {'deployment':16s} {'switch':>8s} {'(closed)':>9s} {'prefill':>8s} {'decode':>8s} {'total':>8s} "
          f"{'HBM slots':>9s}")
    for r in res["terms"]:
        print(f"  {r['deployment']:16s} {r['switch_s'] / MS:8.2f} {r['switch_closed_form_s'] / MS:9.2f} "
              f"{r['prefill_s'] / MS:8.2f} {r['decode_s'] / MS:8.2f} {r['total_s'] / MS:8.2f} {r['slots']:9d}")
    print("\nPaper vs old engine (spec_model.py) vs serving engine:")
    print(f"  {'ratio':16s} {'paper':>6s} {'old':>6s} {'new':>6s} {'new/paper':>9s}")
    for c in res["comparisons"]:
        flag = "" if c["within_20pct"] else "   <- outside +-20%"
        print(f"  {c['metric']:16s} {c['paper']:6.1f} {c['old_engine']:6.2f} {c['serving_engine']:6.2f} "
              f"{c['serving/paper']:9.2f}{flag}")
    f = res["footprint_nodes"]
    print(f"  footprint: {p['experts_footprint']} experts need {f['dgx_h100']} DGX H100 nodes (all in HBM) vs "
          f"{f['sn40l']} SN40L node(s) (all in DDR)")
    sw = res.get("sweeps")
    if sw:
        print("\nUnsourced parameters, one at a time (others at spec / SETUP):")
        for key, rows in sw["one_at_a_time"].items():
            for r in rows:
                vals = " ".join(f"{r[k]:6.2f}" for k in RATIOS)
                print(f"  {key:34s} {_fmt_value(key, r['value']):>10s}  {vals}")
        lo_hi = " ".join(f"{k} {lo:.2f}-{hi:.2f}" for k, (lo, hi) in sw["grid_range"].items())
        print(f"  full grid ({sw['grid_points']} points): {lo_hi}")
        for tp, rng in sw["grid_range_by_dgx_tp"].items():
            print(f"  grid with DGX tp{tp}: " + " ".join(f"{k} {lo:.2f}-{hi:.2f}" for k, (lo, hi) in rng.items()))
        for k, band in sw["latency_within_20pct"].items():
            text = "none" if band is None else f"{band[0] / US:.1f}-{band[1] / US:.1f} us"
            print(f"  peer-link latency keeping {k} within +-20% of the paper (0-5 us scanned): {text}")
    st = res["stream"]
    print(f"\nPoisson stream: {st['requests']} requests at {st['rate_per_s']:g}/s over {st['experts']} experts "
          f"(Zipf routing), seed {res['seed']}:")
    for r in st["rows"]:
        print(f"  {r['deployment']:11s} overlap={str(r['overlap']):5s} switches {r['switches']:5d}  wait "
              f"{r['switch_wait_s']:7.2f} s  mean latency {r['mean_latency_s'] / MS:8.1f} ms  p99 "
              f"{r['p99_latency_s'] / MS:8.1f} ms  TTFT {r['mean_ttft_s'] / MS:8.1f} ms")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=None, help="prompt length per request (paper does not give it)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the Poisson stream")
    ap.add_argument("--no-sweeps", action="store_true", help="skip the parameter sweeps")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if args.prompt_tokens is not None and args.prompt_tokens < 1:
        print(f"error: --prompt-tokens must be >= 1, got {args.prompt_tokens}", file=sys.stderr)
        return 2
    try:
        res = run(args.prompt_tokens, args.seed, not args.no_sweeps)
    except ValueError as exc:  # ServeError and spec errors: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print(res)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
