"""File I/O of the app layer (never imported by the core modules): run directories and placements.

A run directory written by ``moesim simulate`` holds ``summary.json``, ``ops.parquet``,
``link_bytes.parquet``, ``tokens.parquet``, ``device_tokens.npy`` and ``expert_load.npy``
(layer x expert selections of the replayed trace).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from moesim.placement import Placement, PlacementError
from moesim.sim import Result


def write_run(result: Result, out_dir: str | Path, expert_load: np.ndarray, extra: dict | None = None) -> Path:
    """Write a run directory; ``extra`` (e.g. the trace spec) is merged into summary.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    path = Path(run_dir)
    if not (path / "summary.json").exists():
        raise FileNotFoundError(f"{path} is not a moesim run directory (no summary.json); run 'moesim simulate --out {path}' first")
    return Run(path=path, summary=json.loads((path / "summary.json").read_text()),
               ops=pd.read_parquet(path / "ops.parquet"), link_bytes=pd.read_parquet(path / "link_bytes.parquet"),
               tokens=pd.read_parquet(path / "tokens.parquet"), device_tokens=np.load(path / "device_tokens.npy"),
               expert_load=np.load(path / "expert_load.npy"))


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
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlacementError(f"{path}: not a readable placement JSON: {exc}") from None
    if doc.get("format") != "moesim.placement/1":
        raise PlacementError(f"{path}: not a moesim placement file (format {doc.get('format')!r})")
    return Placement.from_slot_to_expert(np.asarray(doc["slot_to_expert"]), int(doc["num_experts"]),
                                         int(doc["slots_per_device"]), name=doc.get("name", path.stem))
