"""The routing-trace format: a columnar table with one row per (step, layer, token, rank).

Columns (required): ``step`` (int32: training/generation step), ``layer`` (int32: MoE-layer
ordinal, 0..num_layers-1), ``token`` (int64: token index inside its step), ``rank`` (int16:
0 for the top choice), ``expert`` (int32: 0..num_experts-1), ``weight`` (float32: gate weight).
Optional columns such as ``sequence``, ``position``, ``token_id`` are carried along.
Metadata (model, num_experts, top_k, num_layers, source, ...) is stored as JSON in the
Parquet schema metadata under ``moesim.trace``, with ``format_version`` (a reader refuses newer
versions) and ``columns_sha256``, a checksum of the columns written on write and verified on read
(a damaged body is refused; a trace written without one is accepted with a note in ``Trace.notes``).

Reading never casts lossily: a float expert id 5.7, an int64 id beyond int32 or ``num_experts = 64.9``
is an error naming the column (or key) and row. Every step must cover every layer the metadata
declares; a trace with layers missing is refused unless the reader allows partial traces, and then
it carries a note saying which layers are missing.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from moebase.limits import check_alloc

REQUIRED = {"step": np.int32, "layer": np.int32, "token": np.int64, "rank": np.int16, "expert": np.int32,
            "weight": np.float32}
META_KEY = b"moesim.trace"
FORMAT_VERSION = 1
PARTIAL_NOTE = "PARTIAL TRACE"  # notes that start so say layers are missing (see validate's allow_partial)


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
        """Parse the metadata JSON; refuse a newer ``format_version`` and non-integral counts."""
        d = json.loads(text)
        if not isinstance(d, dict):
            raise TraceError(f"trace metadata must be a JSON object, got {type(d).__name__}")
        version = d.get("format_version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise TraceError(f"trace metadata: format_version must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise TraceError(f"trace format_version {version} is newer than this moesim reads ({FORMAT_VERSION}); "
                             "upgrade moesim")
        for key in ("model", "source"):
            if not isinstance(d.get(key), str):
                raise TraceError(f"trace metadata: key {key!r} must be a string, got {d.get(key)!r}")
        extra = d.get("extra", {})
        if not isinstance(extra, dict):
            raise TraceError(f"trace metadata: key 'extra' must be an object, got {type(extra).__name__}")
        return cls(model=d["model"], num_experts=_meta_int(d, "num_experts"), top_k=_meta_int(d, "top_k"),
                   num_layers=_meta_int(d, "num_layers"), source=d["source"], extra=extra)


def _meta_int(d: dict, key: str) -> int:
    """An integer metadata value: 64 or 64.0, never 64.9 (no silent truncation)."""
    value = d.get(key)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TraceError(f"trace metadata: key {key!r} must be an integer, got {value!r}")
    return value


@dataclass(frozen=True, eq=False)
class Trace:
    """A routing trace held as numpy columns (all of equal length), rows sorted by step, layer, token, rank."""

    columns: dict[str, np.ndarray]
    meta: TraceMeta
    notes: tuple[str, ...] = ()  # what a reader accepted but a user should hear (no checksum, partial layers)

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
        """Step -> tokens in it (its largest token index + 1)."""
        steps, inv = np.unique(self.columns["step"], return_inverse=True)
        n = np.zeros(len(steps), dtype=np.int64)
        np.maximum.at(n, inv.ravel(), self.columns["token"].astype(np.int64) + 1)
        return {int(k): int(v) for k, v in zip(steps, n)}

    @property
    def num_tokens(self) -> int:
        """Distinct (step, token) pairs."""
        key = self.columns["step"].astype(np.int64) * (int(self.columns["token"].max(initial=0)) + 1) + self.columns["token"]
        return int(np.unique(key).size)

    def expert_load(self) -> np.ndarray:
        """Selections per expert per layer, shape [num_layers, num_experts] (int64)."""
        m = self.meta
        check_alloc("the expert-load table (layers x experts)", (m.num_layers, m.num_experts), 8)
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
        "step": cast_column("step", step[tidx]),
        "layer": grid_l.ravel()[order].astype(np.int32),
        "token": cast_column("token", token[tidx]),
        "rank": grid_r.ravel()[order].astype(np.int16),
        "expert": cast_column("expert", expert_ids.ravel()[order]),
        "weight": cast_column("weight", weights.ravel()[order]),
    }
    for name, values in (extra or {}).items():
        cols[name] = np.asarray(values)[tidx]
    trace = Trace(columns=cols, meta=meta)
    validate(trace)
    return trace


def cast_column(name: str, values: np.ndarray) -> np.ndarray:
    """``values`` as the dtype REQUIRED gives column ``name``, refusing lossy casts (a float id 5.7, an
    int64 id beyond int32, a weight beyond float32) with the column and row named."""
    values = np.asarray(values)
    dtype = np.dtype(REQUIRED[name])
    if values.dtype == dtype:
        return values
    if values.dtype == bool or not np.issubdtype(values.dtype, np.number):
        raise TraceError(f"column {name!r} must be numeric ({dtype}), got {values.dtype}")
    if np.issubdtype(dtype, np.integer):
        if np.issubdtype(values.dtype, np.floating):
            bad = ~np.isfinite(values) | (values != np.floor(values))
            if bad.any():
                row = int(np.argmax(bad))
                raise TraceError(f"column {name!r} row {row}: {values[row].item()!r} is not an integer "
                                 f"(ids are never rounded)")
        info = np.iinfo(dtype)
        bad = (values < info.min) | (values > info.max)
    else:
        bad = np.isfinite(values) & (np.abs(values) > np.finfo(dtype).max)
    if bad.any():
        row = int(np.argmax(bad))
        raise TraceError(f"column {name!r} row {row}: {values[row].item()!r} does not fit {dtype} "
                         "(it would wrap or overflow)")
    return values.astype(dtype)


def validate(trace: Trace, *, allow_partial: bool = False) -> None:
    """Raise TraceError naming the first problem: columns, ranges, distinct ranks, finite weights, and
    (unless ``allow_partial``) a step without rows for some layer the metadata declares."""
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
    _check_distinct(cols)
    problem = layer_coverage_problem(trace)
    if problem and not allow_partial:
        raise TraceError(f"{problem}; a missing layer would be simulated as free (allow partial traces to "
                         "accept it with a warning)")


def _check_distinct(cols: dict[str, np.ndarray]) -> None:
    """Ranks distinct and experts distinct per (step, layer, token): one packed int64 key per row when
    the ids fit (checked in Python integers, so no overflow), else a sort comparing neighbours."""
    step, layer, token = cols["step"], cols["layer"], cols["token"]
    for name in ("rank", "expert"):
        spans = [int(c.max()) + 1 for c in (step, layer, token, cols[name])]
        if math.prod(spans) < 2**63:
            key = ((step.astype(np.int64) * spans[1] + layer) * spans[2] + token) * spans[3] + cols[name]
            order = np.argsort(key, kind="stable")
            same = key[order][1:] == key[order][:-1]
        else:
            order = np.lexsort((cols[name], token, layer, step))
            same = np.ones(len(order) - 1, dtype=bool)
            for col in (cols[name], token, layer, step):
                v = col[order]
                same &= v[1:] == v[:-1]
        if same.any():
            row = int(order[int(np.argmax(same))])
            raise TraceError(f"{name}s repeat for one token: step {int(step[row])}, layer "
                             f"{int(layer[row])}, token {int(token[row])}")


def layer_coverage_problem(trace: Trace) -> str | None:
    """None when every step has rows for every layer 0..num_layers-1; else one sentence naming the
    incomplete steps and the missing layers of the first of them."""
    step, layer = trace.columns["step"], trace.columns["layer"]
    num_layers = trace.meta.num_layers
    order = np.lexsort((layer, step))
    s, lay = step[order], layer[order]
    new = np.concatenate([[True], (s[1:] != s[:-1]) | (lay[1:] != lay[:-1])])
    pair_step, pair_layer = s[new], lay[new]
    steps, counts = np.unique(pair_step, return_counts=True)
    short = counts < num_layers
    if not short.any():
        return None
    first = steps[int(np.argmax(short))]
    present = pair_layer[pair_step == first]
    gaps = np.flatnonzero(present != np.arange(len(present)))
    first_missing = int(gaps[0]) if len(gaps) else len(present)
    shown = [int(x) for x in np.setdiff1d(np.arange(first_missing, min(num_layers, first_missing + 64)), present)[:8]]
    more = num_layers - len(present) - len(shown)
    listing = ", ".join(map(str, shown)) + (f" and {more} more" if more > 0 else "")
    return (f"{int(short.sum())} of {len(steps)} step(s) lack layers: step {int(first)} has no rows for layer(s) "
            f"{listing} of num_layers={num_layers}")


def columns_checksum(columns: dict[str, np.ndarray]) -> str:
    """SHA-256 over the columns (sorted by name; name, dtype and bytes of each), hex."""
    h = hashlib.sha256()
    for name in sorted(columns):
        v = np.ascontiguousarray(columns[name])
        h.update(f"{name}:{v.dtype.str}:{len(v)}\n".encode())
        h.update("\x00".join(map(str, v)).encode() if v.dtype == object else v.tobytes())
    return h.hexdigest()


def write_parquet(trace: Trace, path: str | Path) -> Path:
    """Write a validated trace to Parquet (atomically: a temp file renamed into place), with a checksum
    of its columns in the metadata."""
    return write_parquet_checksummed(trace, path)[0]


def write_parquet_checksummed(trace: Trace, path: str | Path) -> tuple[Path, str]:
    """:func:`write_parquet`, also returning the columns checksum it wrote (for a caller that records it)."""
    import pyarrow as pa

    from moebase.parquet_io import write_with_header

    validate(trace, allow_partial=True)
    table = pa.table({k: pa.array(v) for k, v in trace.columns.items()})
    checksum = columns_checksum(trace.columns)
    header = {**json.loads(trace.meta.to_json()), "columns_sha256": checksum}
    return write_with_header(table, path, META_KEY, json.dumps(header, sort_keys=True)), checksum


def read_parquet(path: str | Path, *, allow_partial: bool = False) -> Trace:
    """Read and validate a Parquet trace; a damaged or foreign file raises TraceError naming it.

    The checksum is verified (a trace without one gets a note); columns are cast without loss; a step
    that lacks layers is an error unless ``allow_partial`` (then a note says which)."""
    from moebase.parquet_io import read_with_header

    path = Path(path)
    table, meta_raw = read_with_header(path, META_KEY, TraceError, "trace", "trace metadata")
    try:
        header = json.loads(meta_raw.decode())
        meta = TraceMeta.from_json(meta_raw.decode())
    except TraceError as exc:
        raise TraceError(f"{path}: {exc}") from None
    except (KeyError, ValueError, TypeError) as exc:
        raise TraceError(f"{path}: trace metadata is unreadable: {exc}") from None
    columns = {name: table.column(name).to_numpy() for name in table.column_names}
    notes = _verify_checksum(path, header, columns)
    try:
        for name in REQUIRED:
            if name in columns and np.issubdtype(columns[name].dtype, np.number):
                columns[name] = cast_column(name, columns[name])
        trace = Trace(columns=columns, meta=meta)
        validate(trace, allow_partial=allow_partial)
    except TraceError as exc:
        raise TraceError(f"{path}: {exc}") from None
    problem = layer_coverage_problem(trace)
    if problem:
        notes.append(f"{PARTIAL_NOTE} ({path.name}): {problem}")
    return replace(trace, notes=tuple(notes))


def _verify_checksum(path: Path, header: dict, columns: dict[str, np.ndarray]) -> list[str]:
    expected = header.get("columns_sha256")
    if expected is None:
        return [f"{path.name} has no column checksum (written before moesim wrote one); its body is not verified"]
    if columns_checksum(columns) != expected:
        raise TraceError(f"{path}: the columns do not match the checksum in the metadata (the file was damaged or "
                         "edited after it was written)")
    return []


def concat(traces: list[Trace], *, allow_partial: bool = False) -> Trace:
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
    notes = [n for n in dict.fromkeys(n for t in traces for n in t.notes) if not n.startswith(PARTIAL_NOTE)]
    trace = Trace(columns=cols, meta=replace(m0, top_k=top_k))
    order = np.lexsort((cols["rank"], cols["token"], cols["layer"], cols["step"]))
    trace = trace.select(order)
    validate(trace, allow_partial=allow_partial)
    problem = layer_coverage_problem(trace)
    if problem:
        notes.append(f"{PARTIAL_NOTE}: {problem}")
    return replace(trace, notes=tuple(notes))
