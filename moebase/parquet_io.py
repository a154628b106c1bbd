"""Parquet tables with a JSON header in the schema metadata, written atomically (app-layer I/O
shared by traces and kernel-timing profiles)."""

from __future__ import annotations

from pathlib import Path


def write_with_header(table, path: str | Path, key: bytes, header_json: str) -> Path:
    """Write a pyarrow ``table`` to ``path`` with ``header_json`` under schema-metadata ``key``: a temp
    file renamed into place, so a reader never sees a half-written file."""
    import pyarrow.parquet as pq

    path = Path(path)
    table = table.replace_schema_metadata({key: header_json.encode()})
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)
    return path


def read_with_header(path: str | Path, key: bytes, error: type[Exception], what: str, header: str,
                     missing_hint: str = "", foreign_hint: str = ""):
    """Read a Parquet file and its raw header under ``key``. Raises ``error`` naming the file when it is
    missing, unreadable (empty, truncated, damaged) or has no such header (a foreign table).
    ``what`` names the kind of file ("trace"), ``header`` its header ("trace metadata").
    Returns (pyarrow table, header bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise error(f"{path}: no such {what} file{missing_hint}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise error(f"{path}: not a readable Parquet file (empty, truncated or damaged?): {exc}") from None
    raw = (table.schema.metadata or {}).get(key)
    if raw is None:
        raise error(f"{path}: Parquet file has no moesim {header}; {foreign_hint or f'is it a moesim {what}?'}")
    return table, raw
