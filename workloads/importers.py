"""Importers for the real routing data in ``shared/data/traces`` (see its README for provenance).

- FLAME-MoE-290M (CMU-FLAME/FLAME-MoE-Traces, Apache-2.0): 2048 tokens x 8 MoE layers x top-6.
- google/switch-base-8 (captured by Labeeb2339/stratamoe-lab, Apache-2.0): 215 tokens x 6 layers x top-1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from workloads.trace import Trace, TraceError, TraceMeta, from_dense, read_parquet

DEFAULT_TRACE_PATH = Path(__file__).parent / "data" / "flame_moe_290m.parquet"
FLAME_NPZ = "flame-moe-290m/flame_moe_290m_iter5473_2048tok_8layers_top6.npz"
SWITCH_JSON = "switch-base-8/router-trace.v2.json"

FLAME_SOURCE = ("CMU-FLAME/FLAME-MoE-Traces actives/flame-moe-290m/31066/5473 (Apache-2.0), via "
                "Akash-N-Pai/DynaNDE-Simulator f274466; converted to npz for moesim")
SWITCH_SOURCE = ("google/switch-base-8 rev 92fe2d2, captured by Labeeb2339/stratamoe-lab 08bfd80 "
                 "evidence/switch-base-8/router-trace.v2.json (Apache-2.0)")


def find_shared_traces(start: Path | None = None) -> Path | None:
    """Locate ``shared/data/traces``: $MOESIM_SHARED_TRACES, else ``shared/`` or ``../shared/`` above ``start``."""
    env = os.environ.get("MOESIM_SHARED_TRACES")
    if env:
        return Path(env) if Path(env).is_dir() else None
    here = (start or Path.cwd()).resolve()
    for base in (here, *here.parents):
        for cand in (base / "shared" / "data" / "traces", base.parent / "shared" / "data" / "traces"):
            if cand.is_dir():
                return cand
    pkg = Path(__file__).resolve().parent.parent
    cand = pkg.parent / "shared" / "data" / "traces"
    return cand if cand.is_dir() else None


def import_flame_npz(path: str | Path) -> Trace:
    path = Path(path)
    try:
        z = np.load(path, allow_pickle=False)
        ids, scores, token_ids = z["expert_ids"], z["scores"], z["token_ids"]
        layer_index = [int(x) for x in z["moe_layer_index"]]
        seq_len, num_experts, top_k = int(z["seq_len"]), int(z["num_experts"]), int(z["top_k"])
    except (OSError, KeyError, ValueError) as exc:
        raise TraceError(f"{path}: not a FLAME-MoE npz trace: {exc}") from None
    t_count = ids.shape[0]
    meta = TraceMeta(model="flame-moe-290m", num_experts=num_experts, top_k=top_k, num_layers=ids.shape[1],
                     source=FLAME_SOURCE,
                     extra={"model_layer_index_1based": layer_index, "seq_len": seq_len,
                            "note": "forward pass over a fixed token stream (prefill-like); 2 shared experts not logged"})
    pos = np.arange(t_count)
    return from_dense(ids.astype(np.int32), scores.astype(np.float32), meta,
                      extra={"sequence": (pos // seq_len).astype(np.int32), "position": (pos % seq_len).astype(np.int32),
                             "token_id": token_ids.astype(np.int32)})


def import_switch_json(path: str | Path) -> Trace:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        sel = np.asarray(raw["selections"], dtype=np.int32)
        num_experts, top_k = int(raw["expertsPerLayer"]), int(raw["topK"])
    except (OSError, KeyError, ValueError) as exc:
        raise TraceError(f"{path}: not a switch-base-8 router-trace JSON: {exc}") from None
    if sel.ndim != 3:
        raise TraceError(f"{path}: selections must be [token][layer][rank], got shape {sel.shape}")
    sequence = np.zeros(sel.shape[0], dtype=np.int32)
    position = np.arange(sel.shape[0], dtype=np.int32)
    meta_path = path.with_name("capture-metadata.json")
    if meta_path.exists():
        spans = json.loads(meta_path.read_text()).get("prompt_spans", [])
        for i, span in enumerate(spans):
            a, b = span["token_start"], span["token_end_exclusive"]
            sequence[a:b] = i
            position[a:b] = np.arange(b - a)
    meta = TraceMeta(model="switch-base-8", num_experts=num_experts, top_k=top_k, num_layers=sel.shape[1],
                     source=SWITCH_SOURCE,
                     extra={"note": "gate weights were not recorded; weight is 1.0 (top-1)",
                            "model_layer_index_0based": [1, 3, 5, 7, 9, 11]})
    return from_dense(sel, None, meta, extra={"sequence": sequence, "position": position})


def load_table_spec(spec: str) -> tuple[Path | None, dict]:
    """(path, options) when ``spec`` names an expert-load table (``workloads.load_table``), else (None, {}):
    a file path, or a path relative to shared/data/traces (``.json.gz`` may be left off), optionally followed
    by ``:tokens=N,seed=S,steps=N,top_k=K``."""
    from workloads.load_table import is_load_table_file, split_spec

    name, opts = split_spec(spec)
    path = Path(name)
    if not path.exists():
        shared = find_shared_traces()
        cands = [] if shared is None else [shared / name, shared / f"{name}.json.gz"]
        path = next((c for c in cands if c.is_file()), path)
    if not is_load_table_file(path):
        if opts:
            raise TraceError(f"trace {spec!r}: options after ':' apply to expert-load tables only, and {name!r} "
                             f"is not one (a JSON object with key 'logical_count')")
        return None, {}
    return path, opts


def load_trace(spec: str | Path, *, allow_partial: bool = False) -> Trace:
    """A trace by name or path: ``default`` (embedded FLAME-MoE-290M), ``flame``, ``switch``,
    a ``.parquet`` trace, a FLAME ``.npz``, a switch ``.json``, or an expert-load table
    (``.json``/``.json.gz`` with ``logical_count``; see :func:`load_table_spec`)."""
    spec_s = str(spec)
    if spec_s in ("default", "flame-moe-290m"):
        return read_parquet(DEFAULT_TRACE_PATH)
    if spec_s in ("flame", "switch", "switch-base-8"):
        shared = find_shared_traces()
        if shared is None:
            raise TraceError(f"trace {spec_s!r} needs shared/data/traces; set MOESIM_SHARED_TRACES")
        return import_flame_npz(shared / FLAME_NPZ) if spec_s == "flame" else import_switch_json(shared / SWITCH_JSON)
    table_path, opts = load_table_spec(spec_s)
    if table_path is not None:
        from workloads.load_table import trace_from_table
        return trace_from_table(table_path, **opts)
    path = Path(spec_s)
    if path.is_dir():
        manifest = path / "manifest.json"
        if manifest.exists():
            # a capture directory: concatenate its shards (see workloads.capture)
            from workloads.capture import shard_paths
            from workloads.trace import concat
            return concat([read_parquet(p, allow_partial=True) for p in shard_paths(path)], allow_partial=allow_partial)
        raise TraceError(f"{path}: a directory, but no manifest.json of a capture run in it")
    if not path.exists():
        from moebase.names import closest
        guess = closest(spec_s, ("default", "flame", "switch", "flame-moe-290m", "switch-base-8"))
        hint = f"did you mean {guess!r}? " if guess else ""
        raise TraceError(f"no trace named or found at {spec_s!r} ({hint}try 'default', 'flame', 'switch' or a .parquet path)")
    if path.suffix == ".npz":
        return import_flame_npz(path)
    if path.suffix == ".json":
        return import_switch_json(path)
    return read_parquet(path, allow_partial=allow_partial)
