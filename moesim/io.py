"""File I/O of the app layer (never imported by the core modules): run directories and placements.

A run directory written by ``moesim simulate`` holds ``summary.json``, ``ops.parquet``,
``link_bytes.parquet``, ``tokens.parquet``, ``device_tokens.npy``, ``expert_load.npy``
(layer x expert selections of the replayed trace) and ``trace.parquet``, a copy of the replayed
trace (its checksum is in summary.json as ``trace_sha256``), so ``moesim report`` never mixes a
changed trace file's statistics with old results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from moebase.limits import check_alloc
from moesim.placement import Placement, PlacementError
from moesim.sim import Result


RUN_TRACE = "trace.parquet"


def write_run(result: Result, out_dir: str | Path, expert_load: np.ndarray, extra: dict | None = None,
              trace=None) -> Path:
    """Write a run directory; ``extra`` (e.g. the trace spec) is merged into summary.json; ``trace``
    (a workloads Trace) is copied in as trace.parquet with its checksum in summary.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if trace is not None:
        from workloads.trace import write_parquet_checksummed

        _, checksum = write_parquet_checksummed(trace, out / RUN_TRACE)
        extra = {**(extra or {}), "trace_sha256": checksum}
    result.ops.to_parquet(out / "ops.parquet", index=False)
    result.link_bytes.to_parquet(out / "link_bytes.parquet", index=False)
    result.tokens.to_parquet(out / "tokens.parquet", index=False)
    np.save(out / "device_tokens.npy", result.device_tokens)
    np.save(out / "expert_load.npy", expert_load)
    (out / "summary.json").write_text(json.dumps({**result.summary(), **(extra or {})}, indent=2, default=float))
    return out


@dataclass(frozen=True)
class Run:
    """A run directory read back."""

    path: Path
    summary: dict
    ops: pd.DataFrame
    link_bytes: pd.DataFrame
    tokens: pd.DataFrame
    device_tokens: np.ndarray
    expert_load: np.ndarray


def read_run(run_dir: str | Path) -> Run:
    """Read a run directory back; a missing or damaged part raises ValueError naming the file."""
    path = Path(run_dir)
    if not (path / "summary.json").is_file():
        raise FileNotFoundError(f"{path} is not a moesim run directory (no summary.json); run 'moesim simulate --out {path}' first")
    summary = _read_part(path / "summary.json", lambda p: json.loads(p.read_text()))
    if not isinstance(summary, dict):
        raise ValueError(f"{path / 'summary.json'}: expected a JSON object, got {type(summary).__name__}")
    return Run(path=path, summary=summary,
               ops=_read_part(path / "ops.parquet", pd.read_parquet),
               link_bytes=_read_part(path / "link_bytes.parquet", pd.read_parquet),
               tokens=_read_part(path / "tokens.parquet", pd.read_parquet),
               device_tokens=_read_part(path / "device_tokens.npy", lambda p: np.load(p, allow_pickle=False)),
               expert_load=_read_part(path / "expert_load.npy", lambda p: np.load(p, allow_pickle=False)))


def _read_part(path: Path, read):
    try:
        return read(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing from the run directory (re-run 'moesim simulate')") from None
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: damaged or unreadable ({type(exc).__name__}: {exc})") from None


def read_run_trace(run: Run):
    """The trace the run replayed: the copy in the run directory, verified against ``trace_sha256``.
    Returns (trace or None, a note for the report)."""
    from workloads.trace import TraceError, columns_checksum, read_parquet

    copy = run.path / RUN_TRACE
    if not copy.exists():
        return None, (f"this run directory has no copy of its trace ({RUN_TRACE}; written by an older moesim): "
                      "trace statistics are left out rather than read from a file that may have changed")
    try:
        trace = read_parquet(copy, allow_partial=True)
    except TraceError as exc:
        return None, f"the run's trace copy could not be read: {exc}"
    expected = run.summary.get("trace_sha256")
    if expected is not None and columns_checksum(trace.columns) != expected:
        raise ValueError(f"{copy}: the trace copy does not match the checksum in summary.json (edited or damaged "
                         "after the run); re-run 'moesim simulate'")
    return trace, ""


def save_placement(placement: Placement, path: str | Path, extra: dict | None = None) -> Path:
    """Write a placement as JSON (slot_to_expert per layer plus shape) -- the arrays are small."""
    path = Path(path)
    doc = {"format": "moesim.placement/1", "name": placement.name, "num_experts": placement.num_experts,
           "slots_per_device": placement.slots_per_device, "num_devices": placement.num_devices,
           "slot_to_expert": placement.slot_to_expert.tolist(), "replica_count": placement.replica_count.tolist(),
           **({"extra": extra} if extra else {})}
    path.write_text(json.dumps(doc))
    return path


def load_placement(path: str | Path) -> Placement:
    """Read a placement JSON; anything malformed (a list, nulls, a zero count, a ragged table)
    raises PlacementError naming the file and the key."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlacementError(f"{path}: not a readable placement JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PlacementError(f"{path}: a placement JSON is an object, got a {type(doc).__name__}")
    if doc.get("format") != "moesim.placement/1":
        raise PlacementError(f"{path}: not a moesim placement file (format {doc.get('format')!r})")
    counts = {}
    for key in ("num_experts", "slots_per_device"):
        v = doc.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PlacementError(f"{path}: key {key!r} must be a positive integer, got {v!r}")
        counts[key] = v
    table = doc.get("slot_to_expert")
    if (not isinstance(table, list) or not table or not all(isinstance(r, list) for r in table)
            or len({len(r) for r in table}) != 1):
        raise PlacementError(f"{path}: key 'slot_to_expert' must be a non-empty list of equal-length lists")
    top = counts["num_experts"]
    for i, row in enumerate(table):
        bad = next((v for v in row if isinstance(v, bool) or not isinstance(v, int) or not -1 <= v < top), False)
        if bad is not False:
            raise PlacementError(f"{path}: key 'slot_to_expert' layer {i} holds {bad!r}; a slot holds an expert id "
                                 f"0..{top - 1} or -1 (empty)")
    check_alloc(f"{path}: the expert-to-slot map (layers x num_experts x replicas)",
                (len(table), counts["num_experts"], 2), 4)
    return Placement.from_slot_to_expert(np.asarray(table, dtype=np.int64), counts["num_experts"],
                                         counts["slots_per_device"], name=str(doc.get("name", path.stem)))
