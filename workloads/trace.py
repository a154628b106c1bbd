"""The routing-trace format: a columnar table with one row per (step, layer, token, rank).

Columns (required): ``step`` (int32: training/generation step), ``layer`` (int32: MoE-layer
ordinal, 0..num_layers-1), ``token`` (int64: token index inside its step), ``rank`` (int16:
0 for the top choice), ``expert`` (int32: 0..num_experts-1), ``weight`` (float32: gate weight).
Optional columns such as ``sequence``, ``position``, ``token_id`` are carried along.
Metadata (model, num_experts, top_k, num_layers, source, ...) is stored as JSON in the
Parquet schema metadata under ``moesim.trace``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

REQUIRED = {"step": np.int32, "layer": np.int32, "token": np.int64, "rank": np.int16, "expert": np.int32,
            "weight": np.float32}
META_KEY = b"moesim.trace"
FORMAT_VERSION = 1


class TraceError(ValueError):
    """A trace that is not valid, with a message that says what is wrong."""


@dataclass(frozen=True)
class TraceMeta:
    model: str
    num_experts: int
    top_k: int
    num_layers: int
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, "model": self.model, "num_experts": self.num_experts,
                           "top_k": self.top_k, "num_layers": self.num_layers, "source": self.source,
                           "extra": self.extra}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TraceMeta":
        d = json.loads(text)
        return cls(model=d["model"], num_experts=int(d["num_experts"]), top_k=int(d["top_k"]),
                   num_layers=int(d["num_layers"]), source=d["source"], extra=d.get("extra", {}))


@dataclass(frozen=True, eq=False)
class Trace:
    """A routing trace held as numpy columns (all of equal length), rows sorted by step, layer, token, rank."""

    columns: dict[str, np.ndarray]
    meta: TraceMeta

    def __getattr__(self, name: str) -> np.ndarray:
        cols = object.__getattribute__(self, "columns")
        if name in cols:
            return cols[name]
        raise AttributeError(name)

    def __len__(self) -> int:
        return len(self.columns["expert"])

    @property
    def num_steps(self) -> int:
        return int(np.unique(self.columns["step"]).size)

    def tokens_per_step(self) -> dict[int, int]:
        s, t = self.columns["step"], self.columns["token"]
        return {int(k): int(t[s == k].max()) + 1 for k in np.unique(s)}

    @property
    def num_tokens(self) -> int:
        """Distinct (step, token) pairs."""
        key = self.columns["step"].astype(np.int64) * (int(self.columns["token"].max(initial=0)) + 1) + self.columns["token"]
        return int(np.unique(key).size)

    def expert_load(self) -> np.ndarray:
        """Selections per expert per layer, shape [num_layers, num_experts] (int64)."""
        m = self.meta
        flat = self.columns["layer"].astype(np.int64) * m.num_experts + self.columns["expert"]
        return np.bincount(flat, minlength=m.num_layers * m.num_experts).reshape(m.num_layers, m.num_experts)

    def select(self, mask: np.ndarray) -> "Trace":
        return replace(self, columns={k: v[mask] for k, v in self.columns.items()})

    def split_tokens(self, fraction: float) -> tuple["Trace", "Trace"]:
        """Split every step's tokens into a first part (``fraction`` of them) and the rest (held out,
        tokens renumbered from 0 in each step)."""
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        tok, step = self.columns["token"], self.columns["step"]
        first = np.zeros(len(self), dtype=bool)
        for s, n in self.tokens_per_step().items():
            cut = int(round(n * fraction))
            first |= (step == s) & (tok < cut)
        return self.select(first), self.select(~first).renumber_tokens()

    def renumber_tokens(self) -> "Trace":
        """The trace with each step's tokens renumbered 0..n-1 in order. The simulator shards a step's
        tokens over devices by token index, so a part cut from a trace (ids 1024..2047, say) must be
        renumbered to spread over all devices."""
        c = self.columns
        width = int(c["token"].max()) + 1
        key = c["step"].astype(np.int64) * width + c["token"]
        uniq, inv = np.unique(key, return_inverse=True)
        step_of = uniq // width
        first = np.searchsorted(step_of, step_of)  # index of each step's first token in uniq
        new_token = (np.arange(len(uniq)) - first)[inv]
        return replace(self, columns={**c, "token": new_token.astype(c["token"].dtype)})

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        """Experts and weights as dense arrays [tokens, layers, top_k] over (step, token) in order.

        Raises TraceError when some token/layer has fewer than top_k choices (e.g. after top-p routing).
        """
        m = self.meta
        n = len(self)
        per = m.num_layers * m.top_k
        if n % per:
            raise TraceError("trace is not dense: rows are not tokens x layers x top_k")
        order = np.lexsort((self.columns["rank"], self.columns["layer"], self.columns["token"], self.columns["step"]))
        e = self.columns["expert"][order].reshape(-1, m.num_layers, m.top_k)
        w = self.columns["weight"][order].reshape(-1, m.num_layers, m.top_k)
        return e, w


def from_dense(expert_ids: np.ndarray, weights: np.ndarray | None, meta: TraceMeta, *, step: np.ndarray | None = None,
               token: np.ndarray | None = None, extra: dict[str, np.ndarray] | None = None) -> Trace:
    """Build a trace from dense arrays [tokens, layers, k]; ``extra`` holds per-token columns [tokens]."""
    expert_ids = np.asarray(expert_ids)
    if expert_ids.ndim != 3:
        raise TraceError(f"expert_ids must be [tokens, layers, k], got shape {expert_ids.shape}")
    t_count, l_count, k = expert_ids.shape
    if weights is None:
        weights = np.ones(expert_ids.shape, dtype=np.float32)
    weights = np.asarray(weights)
    if weights.shape != expert_ids.shape:
        raise TraceError(f"weights shape {weights.shape} != expert_ids shape {expert_ids.shape}")
    step = np.zeros(t_count, dtype=np.int32) if step is None else np.asarray(step)
    token = np.arange(t_count) if token is None else np.asarray(token)
    # rows ordered by step, layer, token, rank
    grid_t = np.broadcast_to(np.arange(t_count)[:, None, None], expert_ids.shape)
    grid_l = np.broadcast_to(np.arange(l_count)[None, :, None], expert_ids.shape)
    grid_r = np.broadcast_to(np.arange(k)[None, None, :], expert_ids.shape)
    order = np.lexsort((grid_r.ravel(), token[grid_t.ravel()], grid_l.ravel(), step[grid_t.ravel()]))
    tidx = grid_t.ravel()[order]
    cols = {
        "step": step[tidx].astype(np.int32),
        "layer": grid_l.ravel()[order].astype(np.int32),
        "token": token[tidx].astype(np.int64),
        "rank": grid_r.ravel()[order].astype(np.int16),
        "expert": expert_ids.ravel()[order].astype(np.int32),
        "weight": weights.ravel()[order].astype(np.float32),
    }
    for name, values in (extra or {}).items():
        cols[name] = np.asarray(values)[tidx]
    trace = Trace(columns=cols, meta=meta)
    validate(trace)
    return trace


def validate(trace: Trace) -> None:
    """Raise TraceError naming the first problem: columns, ranges, distinct ranks, finite weights."""
    cols, m = trace.columns, trace.meta
    missing = [c for c in REQUIRED if c not in cols]
    if missing:
        raise TraceError(f"trace is missing column(s) {missing}; required: {list(REQUIRED)}")
    n = len(cols["expert"])
    for name, values in cols.items():
        if len(values) != n:
            raise TraceError(f"column {name!r} has {len(values)} rows, expected {n}")
    if n == 0:
        raise TraceError("trace has no rows")
    if m.num_experts < 1 or m.top_k < 1 or m.num_layers < 1:
        raise TraceError(f"metadata must have num_experts, top_k, num_layers >= 1, got {m}")
    for name in ("step", "layer", "token", "rank", "expert"):
        if not np.issubdtype(cols[name].dtype, np.integer):
            raise TraceError(f"column {name!r} must be integer, got {cols[name].dtype}")
        if cols[name].min() < 0:
            bad = int(np.argmax(cols[name] < 0))
            raise TraceError(f"column {name!r} has a negative value {int(cols[name][bad])} at row {bad}")
    e = cols["expert"]
    if e.max() >= m.num_experts:
        bad = int(np.argmax(e >= m.num_experts))
        raise TraceError(f"expert id {int(e[bad])} at row {bad} (layer {int(cols['layer'][bad])}) is out of range: "
                         f"the trace declares num_experts={m.num_experts}")
    if cols["layer"].max() >= m.num_layers:
        raise TraceError(f"layer {int(cols['layer'].max())} is out of range: num_layers={m.num_layers}")
    if cols["rank"].max() >= m.top_k and not m.extra.get("variable_k", False):
        raise TraceError(f"rank {int(cols['rank'].max())} >= top_k={m.top_k} (set extra.variable_k for variable-k routing)")
    if not np.all(np.isfinite(cols["weight"])):
        bad = int(np.argmax(~np.isfinite(cols["weight"])))
        raise TraceError(f"weight at row {bad} is not finite ({cols['weight'][bad]})")
    # ranks distinct and experts distinct per (step, layer, token)
    key = ((cols["step"].astype(np.int64) * (m.num_layers) + cols["layer"]) * (int(cols["token"].max()) + 1)
           + cols["token"])
    for name in ("rank", "expert"):
        width = int(cols[name].max()) + 1
        full = key * width + cols[name]
        uniq, counts = np.unique(full, return_counts=True)
        if counts.max() > 1:
            dup = uniq[np.argmax(counts > 1)] // width
            row = int(np.argmax(key == dup))
            raise TraceError(f"{name}s repeat for one token: step {int(cols['step'][row])}, layer "
                             f"{int(cols['layer'][row])}, token {int(cols['token'][row])}")


def write_parquet(trace: Trace, path: str | Path) -> Path:
    """Write a validated trace to Parquet (atomically: a temp file renamed into place)."""
    import pyarrow as pa

    from moesim.parquet_io import write_with_header

    validate(trace)
    table = pa.table({k: pa.array(v) for k, v in trace.columns.items()})
    return write_with_header(table, path, META_KEY, trace.meta.to_json())


def read_parquet(path: str | Path) -> Trace:
    """Read and validate a Parquet trace; a damaged or foreign file raises TraceError naming it."""
    from moesim.parquet_io import read_with_header

    path = Path(path)
    table, meta_raw = read_with_header(path, META_KEY, TraceError, "trace", "trace metadata")
    try:
        meta = TraceMeta.from_json(meta_raw.decode())
    except (KeyError, ValueError, TypeError) as exc:
        raise TraceError(f"{path}: trace metadata is unreadable: {exc}") from None
    columns = {name: table.column(name).to_numpy() for name in table.column_names}
    for name, dtype in REQUIRED.items():
        if name in columns and np.issubdtype(columns[name].dtype, np.number):
            columns[name] = columns[name].astype(dtype, copy=False)
    trace = Trace(columns=columns, meta=meta)
    try:
        validate(trace)
    except TraceError as exc:
        raise TraceError(f"{path}: {exc}") from None
    return trace


def concat(traces: list[Trace]) -> Trace:
    """Concatenate traces of one model (e.g. capture shards); metadata must agree on shape."""
    if not traces:
        raise TraceError("nothing to concatenate")
    m0 = traces[0].meta
    for t in traces[1:]:
        if (t.meta.num_experts, t.meta.num_layers, t.meta.model) != (m0.num_experts, m0.num_layers, m0.model):
            raise TraceError(f"cannot concatenate traces of different models/shapes: {m0} vs {t.meta}")
    names = [c for c in traces[0].columns if all(c in t.columns for t in traces)]
    cols = {c: np.concatenate([t.columns[c] for t in traces]) for c in names}
    top_k = max(t.meta.top_k for t in traces)
    trace = Trace(columns=cols, meta=replace(m0, top_k=top_k))
    order = np.lexsort((cols["rank"], cols["token"], cols["layer"], cols["step"]))
    trace = trace.select(order)
    validate(trace)
    return trace
