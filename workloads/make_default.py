"""Regenerate the embedded default trace from shared/data/traces: ``python -m workloads.make_default``."""

from workloads.importers import DEFAULT_TRACE_PATH, FLAME_NPZ, find_shared_traces, import_flame_npz
from workloads.trace import write_parquet


def main() -> None:
    shared = find_shared_traces()
    if shared is None:
        raise SystemExit("shared/data/traces not found; set MOESIM_SHARED_TRACES")
    trace = import_flame_npz(shared / FLAME_NPZ)
    write_parquet(trace, DEFAULT_TRACE_PATH)
    print(f"wrote {DEFAULT_TRACE_PATH} ({len(trace)} rows)")


if __name__ == "__main__":
    main()
