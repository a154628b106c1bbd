"""Kernel-timing profiles: the Parquet format written by ``moesim calibrate`` and read by the
calibrated cost model (:mod:`hwmodels.calibrated`).

A profile is a table with one row per measured operator shape (columns :data:`COLUMNS`) and a JSON
header in the Parquet schema metadata under ``moesim.profile`` (device name and kind, library
versions, dtype, timer, warm-up and repeat counts, ...).

Operators (``op``) and what ``m``, ``n``, ``k`` mean for each:

=============  =====================================================================================
``gemm``       ``[m, k] x [k, n]`` dense matrix product
``grouped_ffn`` SwiGLU expert FFN over ``tokens_per_expert`` (sum = ``m`` rows), hidden ``k``,
               intermediate ``n``: per active expert gate+up GEMM, SiLU*mul, down GEMM
``router``     ``m`` tokens, hidden ``k``, ``n`` experts: GEMM + fp32 softmax + top-``top_k``
``permute``    gather ``m`` tokens x ``top_k`` choices of width ``k`` into expert order
``unpermute``  weighted scatter-add of ``m * top_k`` rows of width ``k`` back to ``m`` tokens
``copy_d2d``   copy of ``m`` bytes inside device memory (also ``copy_h2d``, ``copy_d2h``)
=============  =====================================================================================

:func:`op_kernels` decomposes every row into kernels with FLOPs and bytes; the fitted roofline is
``launches * launch_s + sum over kernels of max(flops / peak, bytes / bandwidth)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hwmodels.roofline import DTYPE_BYTES, gemm_bytes, gemm_flops, softmax_topk_bytes
from moebase.parquet_io import read_with_header, write_with_header

META_KEY = b"moesim.profile"
FORMAT_VERSION = 1
OPS = ("gemm", "grouped_ffn", "router", "permute", "unpermute", "copy_d2d", "copy_h2d", "copy_d2h")
COPY_OPS = ("copy_d2d", "copy_h2d", "copy_d2h")
COLUMNS = ["op", "shape", "dist", "m", "n", "k", "num_experts", "top_k", "tokens_per_expert", "dtype", "flops",
           "bytes", "launches", "median_s", "min_s", "max_s", "repeats"]
META_REQUIRED = ("device_name", "device_kind", "dtype", "timer")


class ProfileError(ValueError):
    """A profile that cannot be used, with a message naming the file and the problem."""


@dataclass(frozen=True)
class Profile:
    """A measured kernel-timing profile: ``rows`` (DataFrame, columns :data:`COLUMNS`, times in seconds)
    and ``meta`` (device_name, device_kind, dtype, timer, library versions, ...)."""

    rows: pd.DataFrame
    meta: dict[str, Any]
    path: str = field(default="<memory>")

    @property
    def device_name(self) -> str:
        return str(self.meta["device_name"])

    @property
    def dtype(self) -> str:
        return str(self.meta["dtype"])

    def op_rows(self, op: str) -> pd.DataFrame:
        return self.rows[self.rows["op"] == op].reset_index(drop=True)

    def select(self, mask) -> "Profile":
        return Profile(rows=self.rows[np.asarray(mask)].reset_index(drop=True), meta=self.meta, path=self.path)


# ----------------------------------------------------------------------------- work of one op


@dataclass(frozen=True)
class Kernels:
    """Kernels of a batch of op rows, flattened.

    row [K] (int): which op row each kernel belongs to; flops [K] (FLOP) and bytes [K] (B) per kernel;
    launches [R] (count) per op row.
    """

    row: np.ndarray
    flops: np.ndarray
    bytes: np.ndarray
    launches: np.ndarray


#: bytes of one int64 row index (permute / unpermute read one per moved row)
INDEX_BYTES = 8


def _gemm(m, n, k, b):
    """(FLOPs, bytes) of [m, k] x [k, n]: the roofline's formulas, in floats."""
    m, n, k = (np.asarray(x, dtype=float) for x in (m, n, k))
    return gemm_flops(m, n, k), gemm_bytes(m, n, k, b)


def ffn_expert_kernels(tokens_per_expert: np.ndarray, hidden_size: int, intermediate_size: int, dtype_bytes: int):
    """Per active expert three kernels: gate+up GEMM [n,h]x[h,2f], SiLU*mul (reads 2f, writes f per row),
    down GEMM [n,f]x[f,h]. Returns (flops [3A], bytes [3A]) for the A experts with tokens > 0."""
    n = np.asarray(tokens_per_expert, dtype=float)
    n = n[n > 0]
    h, f = float(hidden_size), float(intermediate_size)
    fu, bu = _gemm(n, 2 * f, h, dtype_bytes)
    fa, ba = 4.0 * n * f, 3.0 * n * f * dtype_bytes
    fd, bd = _gemm(n, h, f, dtype_bytes)
    return np.stack([fu, fa, fd], axis=1).ravel(), np.stack([bu, ba, bd], axis=1).ravel()


def router_kernels(tokens: float, hidden_size: float, num_experts: float, dtype_bytes: int):
    """GEMM, then softmax + top-k over fp32 logits (reads and writes them once each)."""
    fg, bg = _gemm(tokens, num_experts, hidden_size, dtype_bytes)
    sm_bytes = softmax_topk_bytes(tokens, num_experts)
    return np.array([float(fg), 5.0 * tokens * num_experts]), np.array([float(bg), sm_bytes])


def permute_kernels(tokens: float, hidden_size: float, top_k: float, dtype_bytes: int):
    """Gather: reads and writes tokens*top_k rows of hidden_size, plus int64 indices."""
    rows = tokens * top_k
    return np.array([0.0]), np.array([2.0 * rows * hidden_size * dtype_bytes + INDEX_BYTES * rows])


def unpermute_kernels(tokens: float, hidden_size: float, top_k: float, dtype_bytes: int):
    """Weighted scatter-add: scale rows (read+write), zero + accumulate into tokens rows."""
    rows = tokens * top_k
    scale_b = 2.0 * rows * hidden_size * dtype_bytes
    add_b = (rows * hidden_size + 2.0 * tokens * hidden_size) * dtype_bytes + INDEX_BYTES * rows
    return np.array([rows * hidden_size, rows * hidden_size]), np.array([scale_b, add_b])


def copy_kernels(nbytes: float):
    return np.array([0.0]), np.array([float(nbytes)])


def launches_of(op: str, active_experts: int) -> int:
    """Kernel launches (framework calls) the benchmark makes for one op instance."""
    return {"gemm": 1, "grouped_ffn": 3 * active_experts, "router": 3, "permute": 1, "unpermute": 3}.get(op, 1)


def row_kernels(op: str, row: dict, dtype_bytes: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(flops [K], bytes [K], launches) of one op instance described like a profile row."""
    m, n, k = row["m"], row["n"], row["k"]
    if op == "gemm":
        f, b = _gemm(m, n, k, dtype_bytes)
        return np.array([float(f)]), np.array([float(b)]), 1
    if op == "grouped_ffn":
        tpe = np.asarray(row["tokens_per_expert"])
        f, b = ffn_expert_kernels(tpe, k, n, dtype_bytes)
        return f, b, launches_of(op, int((tpe > 0).sum()))
    if op == "router":
        f, b = router_kernels(m, k, n, dtype_bytes)
        return f, b, launches_of(op, 0)
    if op == "permute":
        f, b = permute_kernels(m, k, row["top_k"], dtype_bytes)
        return f, b, 1
    if op == "unpermute":
        f, b = unpermute_kernels(m, k, row["top_k"], dtype_bytes)
        return f, b, launches_of(op, 0)
    if op in COPY_OPS:
        f, b = copy_kernels(m)
        return f, b, 1
    raise ProfileError(f"unknown op {op!r}; known ops: {', '.join(OPS)}")


def op_kernels(op: str, rows: pd.DataFrame, dtype_bytes: int) -> Kernels:
    """Kernels of every row of ``rows`` (all of one op), flattened (see :class:`Kernels`)."""
    ridx, fl, by, la = [], [], [], []
    for i, row in enumerate(rows.to_dict("records")):
        f, b, launches = row_kernels(op, row, dtype_bytes)
        ridx.append(np.full(len(f), i))
        fl.append(f)
        by.append(b)
        la.append(launches)
    if not ridx:
        z = np.zeros(0)
        return Kernels(z.astype(int), z, z, z)
    return Kernels(np.concatenate(ridx), np.concatenate(fl), np.concatenate(by), np.asarray(la, dtype=float))


def total_work(op: str, row: dict, dtype_bytes: int) -> tuple[float, float]:
    f, b, _ = row_kernels(op, row, dtype_bytes)
    return float(f.sum()), float(b.sum())


# ----------------------------------------------------------------------------- I/O


def make_rows(records: list[dict]) -> pd.DataFrame:
    """A profile table from dicts holding at least op, m, n, k, dtype and the times; fills the rest."""
    df = pd.DataFrame.from_records(records)
    defaults = {"shape": "", "dist": "", "num_experts": 0, "top_k": 0, "launches": 1, "repeats": 1}
    for col, val in defaults.items():
        df[col] = df[col].where(df[col].notna(), val) if col in df else val
    if "tokens_per_expert" not in df:
        df["tokens_per_expert"] = [[] for _ in range(len(df))]
    df["tokens_per_expert"] = [list(map(int, v)) if isinstance(v, (list, tuple, np.ndarray)) else []
                               for v in df["tokens_per_expert"]]
    for col in ("flops", "bytes"):
        if col not in df:
            work = [total_work(r["op"], r, DTYPE_BYTES[r["dtype"]]) for r in df.to_dict("records")]
            df["flops"] = [w[0] for w in work]
            df["bytes"] = [w[1] for w in work]
            break
    for col in ("min_s", "max_s"):
        if col not in df:
            df[col] = df["median_s"]
    for col in ("m", "n", "k", "num_experts", "top_k", "launches", "repeats"):
        df[col] = df[col].astype(np.int64)
    return df[COLUMNS]


def write_profile(rows: pd.DataFrame, meta: dict, path: str | Path) -> Path:
    """Write a profile (validated first) atomically to ``path``."""
    import pyarrow as pa

    prof = Profile(rows=rows, meta={"format_version": FORMAT_VERSION, **meta}, path=str(path))
    validate_profile(prof)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(rows[COLUMNS], preserve_index=False)
    return write_with_header(table, path, META_KEY, json.dumps(prof.meta, sort_keys=True, default=str))


def read_profile(path: str | Path) -> Profile:
    """Read and validate a profile; an empty, damaged or foreign Parquet file raises ProfileError naming it."""
    path = Path(path)
    table, raw = read_with_header(path, META_KEY, ProfileError, "profile", "profile header",
                                  missing_hint=f" (write one with 'moesim calibrate --out {path}')",
                                  foreign_hint="is it a profile written by 'moesim calibrate'? "
                                               "(a trace or another table is not a profile)")
    try:
        meta = json.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: profile header is unreadable: {exc}") from None
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ProfileError(f"{path}: profile lacks column(s) {missing}")
    rows = table.to_pandas()
    rows["tokens_per_expert"] = [list(map(int, v)) if v is not None else [] for v in rows["tokens_per_expert"]]
    rows["dist"] = rows["dist"].fillna("").astype(str)
    prof = Profile(rows=rows[COLUMNS], meta=meta, path=str(path))
    validate_profile(prof)
    return prof


def validate_profile(prof: Profile) -> None:
    where = prof.path
    if not isinstance(prof.meta, dict):
        raise ProfileError(f"{where}: profile header must be a JSON object")
    missing = [k for k in META_REQUIRED if k not in prof.meta]
    if missing:
        raise ProfileError(f"{where}: profile header lacks {missing}")
    if int(prof.meta.get("format_version", FORMAT_VERSION)) > FORMAT_VERSION:
        raise ProfileError(f"{where}: profile format {prof.meta['format_version']} is newer than this moesim "
                           f"reads ({FORMAT_VERSION})")
    rows = prof.rows
    if len(rows) == 0:
        raise ProfileError(f"{where}: profile has no measurements (empty table)")
    bad_ops = sorted(set(rows["op"]) - set(OPS))
    if bad_ops:
        raise ProfileError(f"{where}: unknown op(s) {bad_ops}; known ops: {', '.join(OPS)}")
    if prof.meta["dtype"] not in DTYPE_BYTES:
        raise ProfileError(f"{where}: unknown dtype {prof.meta['dtype']!r}")
    for col in ("median_s", "min_s", "max_s"):
        v = rows[col].to_numpy(dtype=float)
        if not np.all(np.isfinite(v)) or np.any(v <= 0):
            i = int(np.argmax(~np.isfinite(v) | (v <= 0)))
            raise ProfileError(f"{where}: column {col!r} must be finite and > 0; row {i} ({rows['op'].iloc[i]} "
                               f"{rows['shape'].iloc[i]}) has {v[i]!r}")
    for col in ("m", "n", "k"):
        v = rows[col].to_numpy()
        if np.any(v < 0):
            raise ProfileError(f"{where}: column {col!r} has a negative size")
