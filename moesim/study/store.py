"""The results of a study folder on disk: append-only, crash-safe, one writer at a time.

Files in ``<study>/``:

- ``results.parquet``: one row per configuration of the current ``study.toml``, in study order;
  ``status`` is ``ok`` or ``failed`` (then ``error`` holds the one-line error and the outputs are empty);
- ``results.retired.parquet``: rows of configurations that are no longer in ``study.toml`` (the file
  was edited). They are kept, never deleted unless the run is given ``prune``; a configuration that
  comes back into the grid gets its row back without being recomputed;
- ``results.parts/part-*.parquet``: rows flushed while a run is in progress (merged at the end);
  a part that cannot be read (empty, truncated) is renamed ``*.corrupt`` and its configurations are
  computed again;
- ``.study.lock``: held (``fcntl.flock``) by the one ``study run`` working on the folder.

App layer: every file access of the study runner lives here.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Callable

import pandas as pd

LOCK_NAME = ".study.lock"
RETIRED_NAME = "results.retired.parquet"
PARTS_NAME = "results.parts"
STATUS_OK, STATUS_FAILED = "ok", "failed"


def retired_path(folder: Path) -> Path:
    return Path(folder) / RETIRED_NAME


def _set_aside(path: Path, exc: Exception, note: Callable[[str], None]) -> None:
    """Rename an unreadable results file to ``*.corrupt`` (kept for inspection) and say so."""
    target = path.with_name(path.name + ".corrupt")
    if target.exists():
        target = path.with_name(f"{path.name}.{time.time_ns()}.corrupt")
    path.replace(target)
    note(f"{path}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
         f"moved to {target.name}; configurations with no other row are computed again")


def _read(path: Path, note: Callable[[str], None]) -> pd.DataFrame | None:
    import pyarrow as pa

    try:
        df = pd.read_parquet(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        _set_aside(path, exc, note)
        return None
    if "config_id" not in df.columns:
        _set_aside(path, ValueError("no config_id column"), note)
        return None
    return df


def read_rows(folder: Path, note: Callable[[str], None]) -> pd.DataFrame:
    """Every row stored for the study in ``folder`` (retired, results, parts in write order), one per
    config_id (the latest wins). Rows written before ``status`` existed are ``ok``."""
    folder = Path(folder)
    paths = [retired_path(folder), folder / "results.parquet"]
    parts = folder / PARTS_NAME
    if parts.is_dir():
        paths += sorted(parts.glob("part-*.parquet"))
    frames = [df for p in paths if p.exists() for df in [_read(p, note)] if df is not None and len(df)]
    if not frames:
        return pd.DataFrame({"config_id": pd.Series(dtype=str), "status": pd.Series(dtype=str)})
    df = pd.concat(frames, ignore_index=True)
    if "status" not in df.columns:
        df["status"] = STATUS_OK
    if "error" not in df.columns:
        df["error"] = ""
    df["status"] = df["status"].fillna(STATUS_OK)
    df["error"] = df["error"].fillna("")
    return df.drop_duplicates("config_id", keep="last").reset_index(drop=True)


def write_part(folder: Path, rows: list[dict]) -> None:
    """Flush ``rows`` to a new part file (temp file renamed into place)."""
    if not rows:
        return
    parts = Path(folder) / PARTS_NAME
    parts.mkdir(exist_ok=True)
    name = parts / f"part-{time.time_ns()}-{os.getpid()}.parquet"
    tmp = name.with_suffix(".tmp")
    pd.DataFrame(rows).to_parquet(tmp, index=False)
    tmp.replace(name)


def _write(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(path)


def merge(folder: Path, ids: list[str], prune: bool, note: Callable[[str], None]) -> tuple[pd.DataFrame, int]:
    """Merge every stored row: the configurations in ``ids`` (study order) into ``results.parquet``, the
    others into ``results.retired.parquet`` (deleted instead when ``prune``), then remove the parts.
    Each write only drops rows that another file already holds, so stopping at any point loses no row.
    Returns (rows of ``ids``, number of rows outside them that are kept, or were pruned)."""
    folder = Path(folder)
    rows = read_rows(folder, note)
    order = {i: n for n, i in enumerate(ids)}
    inside = rows["config_id"].isin(order)
    outside = rows[~inside].reset_index(drop=True)
    current = rows[inside]
    current = current.assign(_order=current["config_id"].map(order)).sort_values("_order")
    current = current.drop(columns="_order").reset_index(drop=True)
    retired, results = retired_path(folder), folder / "results.parquet"
    if not prune:
        was_retired = set(pd.read_parquet(retired, columns=["config_id"])["config_id"]) if retired.exists() else set()
        back = current["config_id"].isin(was_retired)
        if len(outside) or back.any():  # first a superset: rows coming back stay here until results has them
            _write(pd.concat([outside, current[back]], ignore_index=True), retired)
    if len(current):
        _write(current, results)
    elif results.exists():
        results.unlink()  # all its rows are in the retired file now (or pruned)
    if prune or not len(outside):
        retired.unlink(missing_ok=True)
    elif back.any():
        _write(outside, retired)
    parts = folder / PARTS_NAME
    if parts.is_dir():
        for p in list(parts.glob("part-*.parquet")) + list(parts.glob("part-*.tmp")):
            p.unlink()  # *.tmp: a write cut short by a crash; its rows were never flushed
        if not any(parts.iterdir()):
            parts.rmdir()
    return current, len(outside)


class StudyLock:
    """An exclusive ``fcntl.flock`` on ``<folder>/.study.lock`` (holds the owner's pid). ``wait``: block
    until the other run ends; otherwise a second run is a ValueError naming the folder and the pid."""

    def __init__(self, folder: Path, wait: bool = False, note: Callable[[str], None] | None = None):
        self.path = Path(folder) / LOCK_NAME
        self.wait = wait
        self.note = note or (lambda msg: None)
        self.fd: int | None = None

    def __enter__(self) -> "StudyLock":
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                if not self.wait:
                    os.close(fd)
                    raise ValueError(f"{self.path.parent}: another 'moesim study run' (pid {holder}) is working on "
                                     f"this study; wait for it to finish or pass --wait") from None
                self.note(f"waiting for the other 'moesim study run' on {self.path.parent} (pid {holder}) to finish")
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # the holder before us removes the file on release: lock the file that is on disk now
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None
