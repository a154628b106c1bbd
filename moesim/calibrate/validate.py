"""Held-out validation of the calibrated cost model, and checks against published kernel figures.

:func:`holdout` fits on a training subset of a profile's shapes and predicts the held-out ones; it
returns one row per held-out shape with measured and predicted times (fitted roofline and table mode)
and :func:`mape_table` sums that up per op. :func:`published_checks` compares the spec roofline with
published DeepGEMM / DeepEP numbers (``hwmodels/published/kernels.toml``).
"""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from hwmodels.calib_profile import Profile
from hwmodels.calibrated import CalibratedCost, CalibrationWarning, op_features
from hwmodels.specs import PUBLISHED_KERNELS_PATH


def split_holdout(profile: Profile, fraction: float = 0.3, seed: int = 0) -> np.ndarray:
    """Boolean mask [rows]: True = held out. Per op, ``fraction`` of the shapes that are interior
    (not the smallest or largest in any shape feature) are drawn with ``np.random.default_rng(seed)``,
    so every held-out shape lies inside the range the training shapes cover."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    held = np.zeros(len(profile.rows), dtype=bool)
    for op in sorted(set(profile.rows["op"])):
        idx = np.flatnonzero(profile.rows["op"].to_numpy() == op)
        feats = op_features(op, profile.rows.iloc[idx])
        # a value at a feature's min or max is kept for training unless another shape shares it
        interior = np.ones(len(idx), dtype=bool)
        for j in range(feats.shape[1]):
            col = feats[:, j]
            extreme = (col == col.min()) | (col == col.max())
            shared = np.array([(col == v).sum() > 1 for v in col])
            interior &= ~extreme | shared
        cand = idx[interior]
        n = int(round(fraction * len(idx)))
        n = min(n, len(cand), len(idx) - 2)
        if n > 0:
            held[rng.choice(cand, size=n, replace=False)] = True
    return held


def holdout(profile: Profile, fraction: float = 0.3, seed: int = 0, stat: str = "median") -> pd.DataFrame:
    """Fit on the training shapes, predict the held-out ones.

    Returns a DataFrame: op, shape, dist, measured_s, roofline_s, table_s, roofline_err_pct, table_err_pct
    (signed relative errors, %) and flops, bytes.
    """
    held = split_holdout(profile, fraction, seed)
    train, test = profile.select(~held), profile.select(held)
    roof = CalibratedCost.fit(train, mode="roofline", fold_permute=False, stat=stat)
    table = CalibratedCost.fit(train, mode="auto", fold_permute=False, stat=stat)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        for row in test.rows.to_dict("records"):
            meas = float(row[f"{stat}_s"])
            r, t = roof.predict_row(row["op"], row), table.predict_row(row["op"], row)
            out.append({"op": row["op"], "shape": row["shape"], "dist": row["dist"], "measured_s": meas,
                        "roofline_s": r, "table_s": t, "roofline_err_pct": (r / meas - 1) * 100,
                        "table_err_pct": (t / meas - 1) * 100, "flops": float(row["flops"]),
                        "bytes": float(row["bytes"])})
    return pd.DataFrame(out, columns=["op", "shape", "dist", "measured_s", "roofline_s", "table_s",
                                      "roofline_err_pct", "table_err_pct", "flops", "bytes"])


def mape_table(pred: pd.DataFrame) -> pd.DataFrame:
    """Per op: held-out shapes, MAPE (%) of the fitted roofline and of the table mode, worst |error| (%)."""
    g = pred.assign(r=pred["roofline_err_pct"].abs(), t=pred["table_err_pct"].abs()).groupby("op")
    return pd.DataFrame({"held_out": g.size(), "roofline_mape_pct": g["r"].mean(), "table_mape_pct": g["t"].mean(),
                         "table_worst_pct": g["t"].max()}).reset_index()


def published_checks(path: str | Path = PUBLISHED_KERNELS_PATH) -> pd.DataFrame:
    """The spec roofline against published figures: one row per entry with published and predicted
    values (TFLOPS for grouped GEMMs, GB/s for all-to-all bottleneck bandwidth), error (%) and source.

    ``path``: the figures' TOML; the bundled one is :data:`hwmodels.specs.PUBLISHED_KERNELS_PATH`. This
    module is app layer (the calibration runner): it reads that file and the device specs it names."""
    from hwmodels.cost import RooflineCost
    from hwmodels.specs import SPEC_DIR, load_device, load_system
    from moebase.units import GB, TFLOPS

    path = Path(path)
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read published figures: {exc}") from None
    rows = []
    cost = RooflineCost()
    for e in doc.get("grouped_gemm", []):
        dev = load_device(SPEC_DIR / f"{e['device']}.toml")
        g, m, n, k = e["groups"], e["m_per_group"], e["n"], e["k"]
        t = sum(cost.gemm(dev, m, n, k, e["dtype"]).time_s for _ in range(g)) - (g - 1) * dev.launch_latency_s
        pred = 2.0 * g * m * n * k / t / TFLOPS
        label = f"DeepGEMM {e.get('layout', 'contiguous')} {g}x{m} n={n} k={k} {e['dtype']}"
        rows.append({"check": label, "unit": "TFLOPS",
                     "published": float(e["value_tflops"]), "predicted": pred,
                     "error_pct": (pred / e["value_tflops"] - 1) * 100, "model": f"spec roofline ({dev.name})",
                     "source": e["source"]})
    links = doc.get("links", {})
    for e in doc.get("all_to_all", []):
        ref = e["link"]
        if ref in links:
            bw, model = links[ref]["bandwidth_gb_per_s"] * GB, f"link {ref} ({links[ref]['source']})"
        else:
            sys_name, _, attr = ref.partition(":")
            link = getattr(load_system(sys_name), attr)
            bw, model = link.bandwidth_bytes_per_s, f"{sys_name} {attr} spec ({link.kind})"
        pred = bw / GB
        rows.append({"check": f"DeepEP {e['op']} EP{e['ep']}", "unit": "GB/s", "published": float(e["value_gb_per_s"]),
                     "predicted": pred, "error_pct": (pred / e["value_gb_per_s"] - 1) * 100, "model": model,
                     "source": e["source"]})
    if not rows:
        raise ValueError(f"{path}: no [[grouped_gemm]] or [[all_to_all]] entries")
    return pd.DataFrame(rows)
