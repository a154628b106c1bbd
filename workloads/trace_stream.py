"""Traces larger than memory: Parquet written one step per row group and read back one step at a time.

A streamed trace is an ordinary trace file (``read_parquet`` reads it whole) with two additions:
every row group holds exactly one step (steps ascending), and the file's key-value metadata holds,
under :data:`ROW_GROUPS_KEY`, each row group's step, row count and SHA-256 (``columns_sha256`` of
its columns), so a reader verifies each step as it reads it, without a pass over the whole file.

:class:`TraceStream` yields the steps of any trace file as :class:`workloads.trace.Trace` objects,
validated like ``read_parquet`` validates a whole trace (no lossy casts, ranges, distinct ranks and
experts, layer coverage per step). A file written by ``write_parquet`` (row groups not aligned with
steps) is read in record batches cut at step boundaries; its whole-file ``columns_sha256`` is then
verified first, in one pass reading one column at a time. Peak memory is one step's rows plus one
batch, whatever the file's size.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from moebase.limits import check_alloc
from moebase.units import MiB
from workloads.trace import (META_KEY, PARTIAL_NOTE, REQUIRED, Trace, TraceError, TraceMeta, cast_column,
                             columns_checksum, layer_coverage_problem, validate)

ROW_GROUPS_KEY = b"moesim.trace.row_groups"
STREAM_MIN_FILE_BYTES = 16 * MiB  # `moesim simulate` streams .parquet traces at least this large (~35x in memory)
BATCH_ROWS = 1 << 20  # rows per record batch when a file's row groups are not steps


def write_stream(trace: Trace, path: str | Path) -> Path:
    """Write an in-memory trace one step per row group, with the whole-file checksum too (so
    ``read_parquet`` verifies it as well). Rows are written grouped by step (stable order within one)."""
    step = trace.columns["step"]
    if np.any(step[1:] < step[:-1]):
        trace = trace.select(np.argsort(step, kind="stable"))  # the checksum covers the rows as written
    return write_steps(path, trace.meta, split_steps(trace), columns_sha256=columns_checksum(trace.columns))


def split_steps(trace: Trace) -> Iterator[Trace]:
    """The trace's steps, in ascending order, as traces of one step each."""
    step = trace.columns["step"]
    order = np.argsort(step, kind="stable")
    sorted_step = step[order]
    cuts = np.flatnonzero(sorted_step[1:] != sorted_step[:-1]) + 1
    for rows in np.split(order, cuts):
        yield replace(trace, columns={k: v[rows] for k, v in trace.columns.items()}, notes=())


def write_steps(path: str | Path, meta: TraceMeta, steps: Iterable[Trace | dict[str, np.ndarray]], *,
                columns_sha256: str | None = None) -> Path:
    """Write steps (each a Trace or a dict of columns holding one step, steps ascending) as one row
    group each, atomically (a temp file renamed into place). Each step is validated as written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    header = json.loads(meta.to_json())
    if columns_sha256 is not None:
        header["columns_sha256"] = columns_sha256
    tmp = path.with_name(path.name + ".tmp")
    index: dict[str, list] = {"steps": [], "rows": [], "sha256": []}
    writer = None
    try:
        for chunk in steps:
            cols = chunk.columns if isinstance(chunk, Trace) else chunk
            step_trace = _checked_step(cols, meta, index["steps"][-1] if index["steps"] else None, "step to write")
            table = pa.table({k: pa.array(v) for k, v in step_trace.columns.items()})
            if writer is None:
                schema = table.schema.with_metadata({META_KEY: json.dumps(header, sort_keys=True).encode()})
                writer = pq.ParquetWriter(tmp, schema, compression="zstd")
            elif table.schema != writer.schema.remove_metadata():
                raise TraceError(f"{path}: step {int(cols['step'][0])} has columns {table.schema.names} of other "
                                 f"types than the first step's {writer.schema.names}")
            writer.write_table(table.replace_schema_metadata(writer.schema.metadata), row_group_size=len(table))
            index["steps"].append(int(step_trace.columns["step"][0]))
            index["rows"].append(len(step_trace))
            index["sha256"].append(columns_checksum(step_trace.columns))
        if writer is None:
            raise TraceError(f"{path}: no steps to write")
        writer.add_key_value_metadata({ROW_GROUPS_KEY: json.dumps(index)})
        writer.close()
        writer = None
        tmp.replace(path)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return path


def _checked_step(cols: dict[str, np.ndarray], meta: TraceMeta, previous: int | None, what: str,
                  allow_partial: bool = True) -> Trace:
    """One step's columns cast without loss and validated; its step must be above ``previous``."""
    cols = {k: (cast_column(k, v) if k in REQUIRED else np.asarray(v)) for k, v in cols.items()}
    step = cols.get("step")
    if step is not None and len(step):  # order first: a step split in two would look like missing layers
        if step[0] != step.max() or step[0] != step.min():
            raise TraceError(f"a {what} holds several steps ({int(step.min())}..{int(step.max())}); one step each")
        if previous is not None and int(step[0]) <= previous:
            raise TraceError(f"steps must ascend: step {int(step[0])} comes after step {previous} "
                             "(sort the trace by step)")
    trace = Trace(columns=cols, meta=meta)
    validate(trace, allow_partial=allow_partial)
    return trace


class TraceStream:
    """A trace file read one step at a time; duck-types the parts of :class:`Trace` that describe a
    whole trace (``meta``, ``notes``; after :meth:`steps` has run: ``num_tokens``, ``num_steps``,
    ``tokens_per_step()``, ``expert_load()``)."""

    def __init__(self, path: str | Path, *, allow_partial: bool = False):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.allow_partial = allow_partial
        if not self.path.exists():
            raise TraceError(f"{self.path}: no such trace file")
        try:
            self._file = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as exc:
            raise TraceError(f"{self.path}: not a readable Parquet file (empty, truncated or damaged?): {exc}") from None
        kv = self._file.metadata.metadata or {}
        raw = (self._file.schema_arrow.metadata or {}).get(META_KEY, kv.get(META_KEY))
        if raw is None:
            raise TraceError(f"{self.path}: Parquet file has no moesim trace metadata; is it a moesim trace?")
        try:
            header = json.loads(raw.decode())
            self.meta = TraceMeta.from_json(raw.decode())
            index = json.loads(kv[ROW_GROUPS_KEY].decode()) if ROW_GROUPS_KEY in kv else None
        except TraceError as exc:
            raise TraceError(f"{self.path}: {exc}") from None
        except (KeyError, ValueError, TypeError) as exc:
            raise TraceError(f"{self.path}: trace metadata is unreadable: {exc}") from None
        missing = [c for c in REQUIRED if c not in self._file.schema_arrow.names]
        if missing:
            raise TraceError(f"{self.path}: trace is missing column(s) {missing}; required: {list(REQUIRED)}")
        self._index = _check_index(self.path, index, self._file.metadata.num_row_groups)
        self.columns_sha256 = header.get("columns_sha256")
        self.num_rows = self._file.metadata.num_rows
        self._notes: list[str] = []
        if self._index is None and self.columns_sha256 is None:
            self._notes.append(f"{self.path.name} has no column checksum (written before moesim wrote one); "
                               "its body is not verified")
        self._stats: dict | None = None

    @property
    def expected_steps(self) -> int | None:
        """Steps the file holds when its row-group index says so (before reading them), else None."""
        return len(self._index["steps"]) if self._index is not None else None

    @property
    def notes(self) -> tuple[str, ...]:
        """What a user must hear: no checksum; steps lacking layers (once steps() has run)."""
        partial = self._stats["partial"] if self._stats else []
        return tuple(self._notes) + ((f"{PARTIAL_NOTE} ({self.path.name}): {len(partial)} of {self.num_steps} "
                                      f"step(s) lack layers (first: step {partial[0]})",) if partial else ())

    def steps(self) -> Iterator[Trace]:
        """Yield each step as a validated Trace, in ascending step order (a damaged row group, a step
        out of order or split across the file raises TraceError naming the file)."""
        self._stats = None
        check_alloc("the expert-load table (layers x experts)", (self.meta.num_layers, self.meta.num_experts), 8)
        stats = {"tokens": {}, "load": np.zeros((self.meta.num_layers, self.meta.num_experts), dtype=np.int64),
                 "partial": [], "distinct": 0}
        source = self._by_row_group() if self._index is not None else self._by_batches()
        previous = None
        for i, cols in source:
            try:
                trace = _checked_step(cols, self.meta, previous, "row group" if self._index else "step",
                                      self.allow_partial)
            except TraceError as exc:
                raise TraceError(f"{self.path}: {i}: {exc}") from None
            previous = int(trace.columns["step"][0])
            token = trace.columns["token"]
            stats["tokens"][previous] = int(token.max()) + 1  # as Trace.tokens_per_step, for one step
            stats["distinct"] += _distinct(token)
            stats["load"] += trace.expert_load()
            if self.allow_partial and layer_coverage_problem(trace):  # (else validate refused it)
                stats["partial"].append(previous)
            yield trace
            del trace, cols, token  # before the next step is read: one step in memory, not two
        self._stats = stats

    def _by_row_group(self) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        import pyarrow as pa

        width = len(self._file.schema_arrow.names)
        for i in range(self._file.metadata.num_row_groups):
            where = f"row group {i} (step {self._index['steps'][i]})"
            check_alloc(f"{self.path}: {where}", (self._file.metadata.row_group(i).num_rows, width), 8,
                        hint="write the trace with fewer tokens per step")
            try:
                table = self._file.read_row_group(i)
            except (pa.ArrowException, OSError) as exc:
                raise TraceError(f"{self.path}: {where} is unreadable (truncated or damaged?): {exc}") from None
            cols = {name: table.column(name).to_numpy() for name in table.column_names}
            del table
            if len(cols["step"]) != self._index["rows"][i] or columns_checksum(cols) != self._index["sha256"][i]:
                raise TraceError(f"{self.path}: {where} does not match its checksum (the file was damaged or "
                                 "edited after it was written)")
            yield where, cols
            del cols

    def _by_batches(self) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """Steps cut from record batches; rows must be grouped by step, steps ascending."""
        if self.columns_sha256 is not None:
            self._verify_whole_file()
        self._check_step_order()
        pending: list[dict[str, np.ndarray]] = []
        for batch in self._batches(self._file.schema_arrow.names):
            step = batch["step"]
            cuts = np.flatnonzero(step[1:] != step[:-1]) + 1
            for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(step)]])):
                part = {k: v[lo:hi] for k, v in batch.items()}
                if pending and pending[0]["step"][0] != part["step"][0]:
                    yield f"step {int(pending[0]['step'][0])}", _concat(pending)
                    pending = []
                pending.append(part)
        if pending:
            yield f"step {int(pending[0]['step'][0])}", _concat(pending)

    def _batches(self, names: list[str]) -> Iterator[dict[str, np.ndarray]]:
        import pyarrow as pa

        try:
            for batch in self._file.iter_batches(batch_size=BATCH_ROWS, columns=names):
                yield {n: batch.column(n).to_numpy(zero_copy_only=False) for n in names}
        except (pa.ArrowException, OSError) as exc:
            raise TraceError(f"{self.path}: unreadable (truncated or damaged?): {exc}") from None

    def _check_step_order(self) -> None:
        """Rows grouped by step, steps ascending (one pass over the step column), so no step is cut in two."""
        last, row = None, 0
        for batch in self._batches(["step"]):
            step = batch["step"]
            if not len(step):
                continue
            joined = step if last is None else np.concatenate([[last], step])
            first_row = row if last is None else row - 1  # the file row of joined[0]
            back = np.flatnonzero(joined[1:] < joined[:-1])
            if len(back):
                i = int(back[0]) + 1
                raise TraceError(f"{self.path}: rows are not sorted by step: row {first_row + i} has step "
                                 f"{int(joined[i])} after step {int(joined[i - 1])} (sort the trace by step)")
            row += len(step)
            last = step[-1]

    def _verify_whole_file(self) -> None:
        """``columns_sha256`` of the whole file, one column at a time (the format of columns_checksum)."""
        h = hashlib.sha256()
        for name in sorted(self._file.schema_arrow.names):
            first = True
            for batch in self._batches([name]):
                v = np.ascontiguousarray(batch[name])
                if first:
                    h.update(f"{name}:{v.dtype.str}:{self.num_rows}\n".encode())
                if v.dtype == object:
                    h.update(("" if first else "\x00").encode() + "\x00".join(map(str, v)).encode())
                else:
                    h.update(v.tobytes())
                first = False
        if h.hexdigest() != self.columns_sha256:
            raise TraceError(f"{self.path}: the columns do not match the checksum in the metadata (the file was "
                             "damaged or edited after it was written)")

    def copy_to(self, dest: Path) -> dict:
        """Copy the file to ``dest`` (a run directory's trace copy); return {"trace_sha256": ...} when the
        file carries a whole-file checksum, else {}."""
        import shutil

        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(self.path, tmp)
        tmp.replace(dest)
        return {"trace_sha256": self.columns_sha256} if self.columns_sha256 else {}

    def _done(self) -> dict:
        if self._stats is None:
            raise TraceError(f"{self.path}: whole-trace figures are known once steps() has been read to the end")
        return self._stats

    @property
    def num_steps(self) -> int:
        return len(self._done()["tokens"])

    @property
    def num_tokens(self) -> int:
        """Distinct (step, token) pairs, as :attr:`Trace.num_tokens`."""
        return self._done()["distinct"]

    def tokens_per_step(self) -> dict[int, int]:
        return dict(self._done()["tokens"])

    def expert_load(self) -> np.ndarray:
        return self._done()["load"].copy()


def open_if_large(spec: str, *, allow_partial: bool = False) -> TraceStream | None:
    """A TraceStream of ``spec`` when it names a ``.parquet`` file of at least STREAM_MIN_FILE_BYTES, else None
    (the caller loads the trace in memory)."""
    path = Path(spec)
    if path.suffix != ".parquet" or not path.is_file() or path.stat().st_size < STREAM_MIN_FILE_BYTES:
        return None
    return TraceStream(path, allow_partial=allow_partial)


def _check_index(path: Path, index, num_row_groups: int) -> dict | None:
    if index is None:
        return None
    ok = isinstance(index, dict) and all(isinstance(index.get(k), list) and len(index[k]) == num_row_groups
                                         for k in ("steps", "rows", "sha256"))
    if not ok:
        raise TraceError(f"{path}: the row-group index ({ROW_GROUPS_KEY.decode()}) does not list the file's "
                         f"{num_row_groups} row groups (damaged or edited file)")
    return index


def _distinct(token: np.ndarray) -> int:
    """Distinct token ids of one step (Trace.num_tokens for one step), without a sort when ids are dense."""
    top = int(token.max()) + 1
    if top <= 4 * len(token):
        return int(np.count_nonzero(np.bincount(token, minlength=top)))
    return int(np.unique(token).size)


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
