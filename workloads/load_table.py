"""Expert-load tables as a workload: ``{"logical_count": [layers][experts]}`` (JSON, optionally gzip).

A load table holds, for every layer of a model, how many tokens were routed to each expert over a
recorded run (aggregates only: no token order, no per-token choices). The SGLang team published such
tables for DeepSeek-V3 serving to initialise EPLB (see ``shared/data/traces/README.md``); rows are the
model's transformer blocks, 0-based, so DeepSeek-V3's dense blocks 0-2 are all-zero rows.

- :func:`read_load_table` reads and validates a file (size-checked before reading; ragged, negative,
  fractional or non-finite counts raise ValueError naming the file). The MoE layers are the table
  rows with a non-zero total; ``top_k`` and the model name come from the caller, else from the one
  catalog model whose shape matches (same number of blocks and experts, same MoE blocks).
- :func:`table_stats` gives the table's own per-layer statistics (max/mean etc.).
- :func:`expand` turns a table into a :class:`~workloads.trace.Trace`: ``tokens`` tokens per step,
  each with ``top_k`` distinct experts per MoE layer, whose per-layer expert loads equal the table
  (scaled to ``tokens`` by :func:`apportion`; exactly the table at its own token count).

Expansion of one layer (:func:`expand_layer`), given counts ``c[e]`` with ``sum c = T * k`` and every
``c[e] <= T``: list the expert ids, each repeated ``c[e]`` times, experts in a seeded random order, and
fill a ``T x k`` matrix column-major (position p -> row ``p % T``, column ``p // T``). The ``c[e] <= T``
copies of an expert occupy consecutive positions, hence ``c[e]`` distinct rows: every token gets k
distinct experts and every expert exactly ``c[e]`` tokens. The rows are then shuffled (seeded). Layers
are expanded independently: the trace carries the table's loads, not any inter-layer affinity or
co-activation of the real run (which the table does not record); gate weights are 1/k.

Scaling (:func:`apportion`): a layer with total ``S`` is brought to ``N = tokens * k`` selections by
largest remainders (Hamilton): expert e gets ``floor(c[e] * N / S)``, and the ``N - sum floor`` left
over go one each to the largest remainders ``c[e] * N mod S`` (ties: lower expert id). Integer
arithmetic throughout; ``c[e] <= S / k`` implies the result is ``<= tokens``, so expansion stays valid.

Inconsistent tables (MoE layers whose totals differ, e.g. the four ``prefill_in*out*`` files of the
DeepSeek-V3 set) are accepted with an :class:`InconsistentTableWarning` naming the layers: the table's
own token count is then ``ceil(max total / k)`` and every layer is apportioned to it (a relative change
of at most (max - min) / max of a layer's counts, 0.04% on the shipped files).
"""

from __future__ import annotations

import gzip
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moebase.units import MiB
from workloads.trace import Trace, TraceMeta

TABLE_KEY = "logical_count"
MAX_TABLE_BYTES = 16 * MiB  # a table file, compressed or not, and its decompressed text
MAX_LAYERS = 4096
MAX_EXPERTS = 65536
MAX_COUNT = 2**53  # counts above this are not exact in JSON floats
MAX_EXPANDED_ROWS = 16_000_000  # trace rows (tokens x steps x MoE layers x top-k) an expansion may allocate
GZIP_MAGIC = b"\x1f\x8b"


class InconsistentTableWarning(UserWarning):
    """A load table whose MoE layers record different numbers of selections."""


@dataclass(frozen=True, eq=False)
class LoadTable:
    """A validated load table.

    counts [table_layers, experts] int64: tokens routed to each expert of each table row (model block);
    moe_layers: the table rows that are MoE layers (non-zero total), in order; top_k: experts per token;
    model: model name (catalog name when one matches); source: where the table came from.
    """

    counts: np.ndarray
    moe_layers: tuple[int, ...]
    top_k: int
    model: str
    source: str
    extra: dict = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return self.counts.shape[1]

    @property
    def moe_counts(self) -> np.ndarray:
        """[MoE layers, experts] int64."""
        return self.counts[list(self.moe_layers)]

    @property
    def layer_totals(self) -> np.ndarray:
        """Selections recorded in each MoE layer [MoE layers] int64."""
        return self.moe_counts.sum(axis=1)

    @property
    def num_tokens(self) -> int:
        """The table's own token count: ``ceil(max layer total / top_k)``."""
        return -(-int(self.layer_totals.max()) // self.top_k)

    def inconsistent_layers(self) -> list[int]:
        """Table rows (model blocks) whose total is not ``num_tokens * top_k``."""
        want = self.num_tokens * self.top_k
        return [row for row, tot in zip(self.moe_layers, self.layer_totals) if int(tot) != want]


def _ranges(rows: list[int]) -> str:
    """'3-10, 12, 15-16' for sorted ints."""
    out, i = [], 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1:
            j += 1
        out.append(str(rows[i]) if i == j else f"{rows[i]}-{rows[j]}")
        i = j + 1
    return ", ".join(out)


def _open_maybe_gzip(path: Path):
    """``path`` opened for binary reading, through gzip when it starts with the gzip magic."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    return gzip.open(path, "rb") if head == GZIP_MAGIC else open(path, "rb")


def read_text_bounded(path: str | Path, limit_bytes: int = MAX_TABLE_BYTES) -> str:
    """The text of ``path`` (gunzipped when it starts with the gzip magic), refusing files or
    decompressed texts over ``limit_bytes`` before reading them whole."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limit_bytes:
            raise ValueError(f"{path}: {size} bytes is over the load-table limit of {limit_bytes} bytes")
        with _open_maybe_gzip(path) as fh:
            data = fh.read(limit_bytes + 1)
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read the file: {exc}") from None
    if len(data) > limit_bytes:
        raise ValueError(f"{path}: decompressed text is over the load-table limit of {limit_bytes} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text: {exc}") from None


def parse_counts(doc, where: str) -> np.ndarray:
    """Validate ``doc[TABLE_KEY]`` and return it as int64 [layers, experts]; ValueError naming ``where``."""
    if not isinstance(doc, dict) or TABLE_KEY not in doc:
        raise ValueError(f"{where}: not a load table: expected a JSON object with key {TABLE_KEY!r}")
    rows = doc[TABLE_KEY]
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise ValueError(f"{where}: {TABLE_KEY!r} must be a non-empty list of rows [layers][experts]")
    widths = {len(r) for r in rows}
    if len(widths) != 1 or 0 in widths:
        raise ValueError(f"{where}: {TABLE_KEY!r} is ragged: rows have {sorted(widths)} experts (all rows must "
                         f"have the same, non-zero length)")
    if len(rows) > MAX_LAYERS or rows and len(rows[0]) > MAX_EXPERTS:
        raise ValueError(f"{where}: {len(rows)} layers x {len(rows[0])} experts exceeds the limits "
                         f"({MAX_LAYERS} layers, {MAX_EXPERTS} experts)")
    bad = next(((i, j, v) for i, r in enumerate(rows) for j, v in enumerate(r)
                if isinstance(v, bool) or not isinstance(v, (int, float))), None)
    if bad is not None:
        raise ValueError(f"{where}: {TABLE_KEY}[{bad[0]}][{bad[1]}] = {bad[2]!r} is not a number")
    a = np.asarray(rows, dtype=np.float64)
    for test, what in ((~np.isfinite(a), "not finite"), (a < 0, "negative"), (a != np.floor(a), "not an integer"),
                       (a > MAX_COUNT, f"over {MAX_COUNT} (not exact)")):
        if test.any():
            i, j = np.argwhere(test)[0]
            raise ValueError(f"{where}: {TABLE_KEY}[{i}][{j}] = {rows[i][j]!r} is {what}; counts must be "
                             f"non-negative integers")
    return a.astype(np.int64)


def _match_catalog(counts: np.ndarray, moe_rows: tuple[int, ...]):
    """The one catalog model with as many blocks and experts as the table and the same MoE blocks."""
    from workloads.catalog import load_catalog

    hits = [m for m in load_catalog().values() if m.num_layers == counts.shape[0] and
            m.num_experts == counts.shape[1] and tuple(m.moe_layers) == moe_rows]
    return hits[0] if len(hits) == 1 else None


def load_table_from_counts(counts: np.ndarray, *, top_k: int | None = None, model: str | None = None,
                           source: str = "load table", where: str = "load table") -> LoadTable:
    """A :class:`LoadTable` from validated counts [layers, experts]; checks the totals against top_k and
    warns (:class:`InconsistentTableWarning`) when MoE layers' totals differ."""
    counts = np.asarray(counts, dtype=np.int64)
    totals = counts.sum(axis=1)
    moe_rows = tuple(int(r) for r in np.flatnonzero(totals > 0))
    if not moe_rows:
        raise ValueError(f"{where}: every layer's counts are zero (no MoE layer recorded)")
    match = _match_catalog(counts, moe_rows)
    if top_k is None:
        if match is None:
            raise ValueError(f"{where}: no catalog model has {counts.shape[0]} layers x {counts.shape[1]} experts "
                             f"with MoE layers {_ranges(list(moe_rows))}: give top_k (e.g. ':top_k=8')")
        top_k = match.num_experts_per_tok
    if top_k < 1 or top_k > counts.shape[1]:
        raise ValueError(f"{where}: top_k must be in 1..{counts.shape[1]}, got {top_k}")
    table = LoadTable(counts=counts, moe_layers=moe_rows, top_k=int(top_k),
                      model=model or (match.name if match is not None else "load-table"), source=source)
    over = [(r, int(counts[r].max()), int(totals[r])) for r in moe_rows if counts[r].max() * top_k > totals[r]]
    if over:
        r, mx, tot = over[0]
        raise ValueError(f"{where}: layer {r}: an expert has {mx} tokens, more than the layer's {tot} / top_k={top_k} "
                         f"tokens (a token picks each expert at most once)")
    bad = table.inconsistent_layers()
    if bad:
        warnings.warn(f"{where}: MoE layers {_ranges(bad)} (table rows) do not record {table.num_tokens} tokens x "
                      f"top-{top_k} = {table.num_tokens * top_k} selections (layer totals "
                      f"{int(table.layer_totals.min())}..{int(table.layer_totals.max())}); each layer is apportioned "
                      f"to the same token count", InconsistentTableWarning, stacklevel=2)
    return table


def read_load_table(path: str | Path, *, top_k: int | None = None, model: str | None = None) -> LoadTable:
    """Read and validate a load-table file (see the module docstring)."""
    path = Path(path)
    text = read_text_bounded(path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    counts = parse_counts(doc, str(path))
    return load_table_from_counts(counts, top_k=top_k, model=model, source=f"expert-load table {path.name}",
                                  where=str(path))


def is_load_table_file(path: str | Path) -> bool:
    """True when ``path`` is a JSON (or gzip JSON) file whose top-level object has the table key."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with _open_maybe_gzip(path) as fh:
            start = fh.read(4096).decode("utf-8", errors="replace").lstrip()
    except (OSError, EOFError):
        return False
    return start.startswith("{") and f'"{TABLE_KEY}"' in start


# ---------------------------------------------------------------- statistics

def table_stats(table: LoadTable) -> list[dict]:
    """One row per MoE layer: ``layer`` (MoE ordinal), ``model_layer`` (table row), ``selections``,
    ``tokens`` (selections / top_k), ``max_over_mean``, ``max_share_of_tokens`` (busiest expert's tokens /
    the layer's tokens), ``min_over_mean``, ``cv`` (std / mean), ``entropy_bits``, ``gini``, ``experts_unused``."""
    from workloads.stats import entropy_bits_of, gini_of, max_over_mean

    c = table.moe_counts.astype(np.float64)
    tot = c.sum(axis=1)
    mean = tot / table.num_experts
    ent = entropy_bits_of(c)
    g = gini_of(c)
    mom = max_over_mean(c)
    return [{"layer": i, "model_layer": row, "selections": int(tot[i]), "tokens": tot[i] / table.top_k,
             "max_over_mean": float(mom[i]), "max_share_of_tokens": float(c[i].max() * table.top_k / tot[i]),
             "min_over_mean": float(c[i].min() / mean[i]), "cv": float(c[i].std() / mean[i]),
             "entropy_bits": float(ent[i]), "gini": float(g[i]), "experts_unused": int((c[i] == 0).sum())}
            for i, row in enumerate(table.moe_layers)]


# ---------------------------------------------------------------- scaling and expansion

def apportion(counts: np.ndarray, total: int) -> np.ndarray:
    """Integer counts proportional to ``counts`` that sum to ``total`` (largest remainders, ties to the
    lower index; see the module docstring). ``counts`` int [E] with a positive sum."""
    c = [int(x) for x in np.asarray(counts).ravel()]
    s = sum(c)
    if s <= 0 or total < 0:
        raise ValueError(f"apportion: need a positive count sum and total >= 0, got sum {s}, total {total}")
    floor = [x * total // s for x in c]  # Python ints: exact for any size
    rem = [x * total % s for x in c]
    left = total - sum(floor)
    for e in sorted(range(len(c)), key=lambda i: (-rem[i], i))[:left]:
        floor[e] += 1
    return np.asarray(floor, dtype=np.int64)


def scaled_counts(table: LoadTable, tokens: int) -> np.ndarray:
    """[MoE layers, experts] int64: each layer apportioned to ``tokens * top_k`` selections (the table's
    own counts where a layer already has that total)."""
    want = tokens * table.top_k
    mc = table.moe_counts
    return np.stack([row if int(row.sum()) == want else apportion(row, want) for row in mc])


def expand_layer(counts: np.ndarray, tokens: int, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """[tokens, top_k] expert ids, distinct per row, with ``bincount == counts`` (module docstring).
    Needs ``counts.sum() == tokens * top_k`` and ``counts.max() <= tokens``."""
    counts = np.asarray(counts, dtype=np.int64)
    if int(counts.sum()) != tokens * top_k or int(counts.max(initial=0)) > tokens or counts.min(initial=0) < 0:
        raise ValueError(f"expand_layer: counts must be >= 0, sum to tokens x top_k = {tokens * top_k} and be "
                         f"<= tokens = {tokens}; got sum {int(counts.sum())}, max {int(counts.max(initial=0))}")
    order = rng.permutation(len(counts))
    ids = np.repeat(order, counts[order]).astype(np.int32)  # an expert's copies are consecutive
    grid = ids.reshape(top_k, tokens).T  # column-major: position p -> row p % tokens, column p // tokens
    return grid[rng.permutation(tokens)]


def expand(table: LoadTable, tokens: int | None = None, *, steps: int = 1, seed: int = 0) -> Trace:
    """A trace of ``steps`` steps of ``tokens`` tokens (default: the table's own count) whose every step
    has per-layer expert loads equal to :func:`scaled_counts` (the table itself at its own count)."""
    tokens = table.num_tokens if tokens is None else int(tokens)
    if tokens < 1 or steps < 1:
        raise ValueError(f"load table {table.source}: tokens and steps must be >= 1, got {tokens}, {steps}")
    n_l, k = len(table.moe_layers), table.top_k
    rows = tokens * steps * n_l * k
    if rows > MAX_EXPANDED_ROWS:
        raise ValueError(f"load table {table.source}: {tokens} tokens x {steps} steps x {n_l} layers x top-{k} = "
                         f"{rows} trace rows is over the limit of {MAX_EXPANDED_ROWS}; expand fewer tokens "
                         f"(option tokens, e.g. 'table.json.gz:tokens=4096')")
    target = scaled_counts(table, tokens)
    rng = np.random.default_rng(seed)
    ids = np.empty((steps * tokens, n_l, k), dtype=np.int32)
    for s in range(steps):
        for layer in range(n_l):
            ids[s * tokens:(s + 1) * tokens, layer] = expand_layer(target[layer], tokens, k, rng)
    meta = TraceMeta(model=table.model, num_experts=table.num_experts, top_k=k, num_layers=n_l,
                     source=f"{table.source}, expanded to {tokens} tokens per step (workloads.load_table, seed {seed})",
                     extra={"model_layer_index_0based": list(table.moe_layers), "load_table_tokens": table.num_tokens,
                            "seed": seed, "note": "per-layer loads equal the table; no inter-layer affinity "
                            "(layers expanded independently); weights 1/k", **table.extra})
    return dense_trace(ids, steps, tokens, meta)


def dense_trace(ids: np.ndarray, steps: int, tokens: int, meta: TraceMeta) -> Trace:
    """The trace :func:`workloads.trace.from_dense` builds from ``ids`` [steps * tokens, layers, k] (step
    ``g // tokens``, token ``g % tokens``, weights 1/k), column for column, without its sort and checks: rows
    in (step, layer, token, rank) order are a transpose of ``ids``, and :func:`expand_layer` guarantees
    distinct experts per token, every layer in every step and ids below the table's width (tested equal)."""
    n_l, k = ids.shape[1], ids.shape[2]
    shape = (steps, n_l, tokens, k)

    def grid(values: np.ndarray, axis: int, dtype) -> np.ndarray:
        view = [1, 1, 1, 1]
        view[axis] = len(values)
        return np.broadcast_to(values.astype(dtype).reshape(view), shape).ravel()

    cols = {"step": grid(np.arange(steps), 0, np.int32), "layer": grid(np.arange(n_l), 1, np.int32),
            "token": grid(np.arange(tokens), 2, np.int64), "rank": grid(np.arange(k), 3, np.int16),
            "expert": ids.reshape(steps, tokens, n_l, k).transpose(0, 2, 1, 3).ravel().astype(np.int32),
            "weight": np.full(ids.size, np.float32(1.0 / k), dtype=np.float32)}
    return Trace(columns=cols, meta=meta)


# ---------------------------------------------------------------- trace specs

SPEC_OPTIONS = {"tokens": int, "seed": int, "steps": int, "top_k": int}


def split_spec(spec: str) -> tuple[str, dict]:
    """``'file.json.gz:tokens=4096,seed=1'`` -> (``'file.json.gz'``, {'tokens': 4096, 'seed': 1}).
    Options: tokens, seed, steps, top_k (positive integers; seed >= 0)."""
    head, sep, tail = spec.rpartition(":")
    if not sep or "=" not in tail:
        return spec, {}
    opts = {}
    for part in tail.split(","):
        key, eq, value = part.partition("=")
        key = key.strip()
        if key not in SPEC_OPTIONS or not eq:
            raise ValueError(f"trace {spec!r}: unknown option {part!r} (known: {', '.join(SPEC_OPTIONS)})")
        try:
            opts[key] = SPEC_OPTIONS[key](value)
        except ValueError:
            raise ValueError(f"trace {spec!r}: option {key} must be an integer, got {value!r}") from None
        if opts[key] < (0 if key == "seed" else 1):
            raise ValueError(f"trace {spec!r}: option {key} must be >= {0 if key == 'seed' else 1}, got {value}")
    return head, opts


def trace_from_table(path: str | Path, *, tokens: int | None = None, seed: int = 0, steps: int = 1,
                     top_k: int | None = None) -> Trace:
    """Read a load table and expand it (the Python API behind ``--trace table.json.gz``)."""
    return expand(read_load_table(path, top_k=top_k), tokens, steps=steps, seed=seed)


def shipped_table_path(name: str, traces_dir: str | Path) -> Path:
    """``<traces_dir>/deepseek-v3-expert-loads/<name>.json.gz`` (the SGLang DeepSeek-V3 tables)."""
    return Path(traces_dir) / "deepseek-v3-expert-loads" / f"{name}.json.gz"


__all__ = ["InconsistentTableWarning", "LoadTable", "apportion", "expand", "expand_layer", "is_load_table_file",
           "load_table_from_counts", "parse_counts", "read_load_table",
           "read_text_bounded", "scaled_counts", "shipped_table_path", "split_spec", "table_stats", "trace_from_table"]
