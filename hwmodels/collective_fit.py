"""Fit and validate the collective models (:mod:`hwmodels.collectives`) on Vidur's NCCL timings, and check them
against DeepEP's published all-to-all figures (``hwmodels/published/kernels.toml``).

Held-out sets: every third message size (fit on the other two thirds), and each participant count in turn
(fit on the other counts). DeepEP is predicted, never fitted: H800 NVLink = the H100 fit's efficiency carried to
H800's spec NVLink bandwidth; RDMA = the spec InfiniBand line rate (no InfiniBand measurement is available).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from hwmodels.collectives import FABRIC_SYSTEMS as SYSTEM_SPECS
from hwmodels.collectives import (AllReduceParams, a2a_payload_bytes, all_reduce_time_s, all_to_all_time_s,
                                  fit_all_reduce, fit_send_recv, scale_to_link, send_recv_time_s)
from hwmodels.gpu_data import vidur_collectives
from hwmodels.specs import System, load_system
from moebase.units import GB, US


def _summary(name: str, err_pct, **extra) -> dict:
    a = np.abs(np.asarray(err_pct, dtype=float))
    return {"set": name, "rows": int(a.size), "mape_pct": float(a.mean()), "median_ape_pct": float(np.median(a)),
            "worst_pct": float(a.max()), **extra}


def _err(pred, meas) -> np.ndarray:
    return (np.asarray(pred, dtype=float) / np.asarray(meas, dtype=float) - 1) * 100


def validate_all_reduce(data: pd.DataFrame) -> tuple[AllReduceParams, pd.DataFrame]:
    """Fit on all rows, and report fitted and held-out errors. Returns (params fitted on all, summary rows)."""
    rows = []
    sizes = np.sort(data["size_bytes"].unique())
    held_sizes = set(sizes[1::3])
    held = data["size_bytes"].isin(held_sizes).to_numpy()
    p, fit_mape = fit_all_reduce(data["size_bytes"][~held], data["num_workers"][~held], data["time_s"][~held])
    test = data[held]
    rows.append(_summary("fit rows (2/3 of sizes)", _err(all_reduce_time_s(
        data["size_bytes"][~held], data["num_workers"][~held], p), data["time_s"][~held]), kind="fitted"))
    rows.append(_summary("held-out sizes (every 3rd)", _err(all_reduce_time_s(
        test["size_bytes"], test["num_workers"], p), test["time_s"]), kind="held out"))
    for n in sorted(data["num_workers"].unique()):
        tr, te = data[data["num_workers"] != n], data[data["num_workers"] == n]
        if tr["num_workers"].nunique() < 2:
            continue
        pn, _ = fit_all_reduce(tr["size_bytes"], tr["num_workers"], tr["time_s"])
        rows.append(_summary(f"held-out {n} GPUs", _err(all_reduce_time_s(te["size_bytes"], n, pn), te["time_s"]),
                             kind="held out"))
    full, full_mape = fit_all_reduce(data["size_bytes"], data["num_workers"], data["time_s"])
    rows.append(_summary("all rows (shipped fit)", _err(all_reduce_time_s(
        data["size_bytes"], data["num_workers"], full), data["time_s"]), kind="fitted"))
    return full, pd.DataFrame(rows)


def validate_send_recv(data: pd.DataFrame) -> tuple[object, pd.DataFrame]:
    sizes = np.sort(data["size_bytes"].unique())
    held = data["size_bytes"].isin(set(sizes[1::3])).to_numpy()
    p, _ = fit_send_recv(data["size_bytes"][~held], data["time_s"][~held])
    rows = [_summary("fit rows (2/3 of sizes)", _err(send_recv_time_s(data["size_bytes"][~held], p),
                                                     data["time_s"][~held]), kind="fitted"),
            _summary("held-out sizes (every 3rd)", _err(send_recv_time_s(data["size_bytes"][held], p),
                                                        data["time_s"][held]), kind="held out")]
    full, _ = fit_send_recv(data["size_bytes"], data["time_s"])
    return full, pd.DataFrame(rows)


def collective_report(data_dir: str | Path) -> dict:
    """Per Vidur system: fitted all-reduce and send/recv parameters and their error tables."""
    out = {}
    for system in SYSTEM_SPECS:
        ar_all = vidur_collectives(data_dir, system, "all_reduce")
        sr_all = vidur_collectives(data_dir, system, "send_recv")
        for fabric, mask_ar, mask_sr in (("intra-node", ar_all["nodes"] == 1, sr_all["nodes"] == 1),
                                         ("inter-node", ar_all["nodes"] > 1, sr_all["nodes"] > 1)):
            res = {}
            ar, sr = ar_all[mask_ar], sr_all[mask_sr]
            if ar["num_workers"].nunique() >= 2:
                res["all_reduce"], res["all_reduce_rows"] = validate_all_reduce(ar.reset_index(drop=True))
            if len(sr) >= 6:
                res["send_recv"], res["send_recv_rows"] = validate_send_recv(sr.reset_index(drop=True))
            if res:
                out[f"{system} {fabric}"] = res
    return out


def deepep_checks(h100_all_reduce: AllReduceParams, doc: dict, target: System | None = None) -> pd.DataFrame:
    """DeepEP's H800 figures (normal-kernel bottleneck bandwidths, low-latency microseconds) predicted from the
    H100 NCCL fit carried to ``target``'s NVLink (default ``hgx-h800``) and its spec InfiniBand rate."""
    target = target or load_system("hgx-h800")
    ref = load_system(SYSTEM_SPECS["h100_dgx"])
    nvl = scale_to_link(h100_all_reduce, ref.scale_up.bandwidth_bytes_per_s, target.scale_up.bandwidth_bytes_per_s)
    rdma_bw = target.scale_out.bandwidth_bytes_per_s
    per_node = target.devices_per_node
    rows = []
    for e in doc.get("all_to_all", []):
        ep, dtype = int(e["ep"]), ("fp8" if e["op"] == "dispatch" else "bf16")
        size = a2a_payload_bytes(4096 * 8, 7168, dtype)  # DeepEP normal setting: 4096 tokens, top-8, hidden 7168
        if ep <= per_node:
            t = float(all_to_all_time_s(size, ep, nvl))
            pred, model = size * (ep - 1) / ep / t / GB, "H100 NCCL fit carried to H800 NVLink"
        else:
            pred, model = rdma_bw / GB, "spec InfiniBand line rate (no RDMA measurement)"
        rows.append({"check": f"normal {e['op']} EP{ep}", "unit": "GB/s", "published": float(e["value_gb_per_s"]),
                     "predicted": pred, "error_pct": (pred / e["value_gb_per_s"] - 1) * 100, "model": model})
    for e in doc.get("low_latency", []):
        ep, dtype = int(e["ep"]), ("fp8" if e["op"] == "dispatch" else "bf16")
        size = a2a_payload_bytes(e["tokens"] * e["top_k"], e["hidden"], dtype)
        local = min(per_node, ep) / ep
        t = (nvl.simple.latency_s + max(size * local / nvl.simple.bus_bandwidth_bytes_per_s,
                                        size * (1 - local) / rdma_bw))
        rows.append({"check": f"low-latency {e['op']} EP{ep}", "unit": "us", "published": float(e["value_us"]),
                     "predicted": t / US, "error_pct": (t / US / e["value_us"] - 1) * 100,
                     "model": "NCCL-fitted latency + NVLink (fit) / InfiniBand (spec) bytes"})
    return pd.DataFrame(rows)


def params_table(p: AllReduceParams) -> dict:
    return {"ll": asdict(p.ll), "simple": asdict(p.simple)}


def write_collective_fits(report: dict, out_dir: Path, command: str) -> Path:
    """``<out_dir>/nccl-vidur.toml``: every fitted fabric's parameters with its errors (small, shipped)."""
    lines = [f"# NCCL collective parameters fitted to Vidur's measurements; written by: {command}",
             "# Source: microsoft/vidur@7d47513363ec447a741ac5e47241580b47724fbf data/profiling/network/*/ "
             "(MIT, see LICENSE-vidur). Times: latency_s + hop_s * steps + bytes / bus_bandwidth_bytes_per_s."]
    for fabric, res in report.items():
        key = fabric.replace(" ", ".")
        for kind in ("all_reduce", "send_recv"):
            if kind not in res:
                continue
            p = res[kind]
            groups = params_table(p) if kind == "all_reduce" else {"p2p": asdict(p)}
            for proto, vals in groups.items():
                lines.append(f"\n[{key}.{kind}.{proto}]")
                lines += [f"{k} = {float(v)!r}" for k, v in vals.items()]
            lines.append(f"\n[{key}.{kind}.validation]")
            for r in res[f"{kind}_rows"].to_dict("records"):
                lines.append(f'"{r["set"]}" = {{ kind = "{r["kind"]}", rows = {r["rows"]}, mape_pct = '
                             f'{r["mape_pct"]:.2f}, worst_pct = {r["worst_pct"]:.1f} }}')
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "nccl-vidur.toml"
    path.write_text("\n".join(lines) + "\n")
    return path
