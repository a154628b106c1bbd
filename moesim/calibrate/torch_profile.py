"""Calibrate from a PyTorch-profiler (Kineto) Chrome-trace JSON: map its kernels to moesim's operators and write a
calibration profile (:mod:`hwmodels.calib_profile`) from the ones with known shapes.

Timed units: GPU kernels (``cat`` ``kernel``, plus ``gpu_memcpy``) when the trace has any, else CPU operators
(``cat`` ``cpu_op``; a CPU-only trace). Each is classified by name (:data:`CATEGORIES`, first match wins) into
gemm, grouped_gemm, attention, all_to_all_dispatch, all_to_all_combine, all_to_all, all_reduce, collective,
cast, memcpy. Shapes come from ``record_shapes`` (the ``Input Dims`` of the CPU operator, linked to its kernels
through ``External id``), else from a model config the user gives (:class:`ShapeHints`: dense-layer GEMMs
qkv, o, gate+up, down assigned in that order to the unshaped GEMM kernels).

Rows written: ``gemm`` (m, n, k known) and ``copy_*`` (bytes known); times per shape are the median, min and
max over its occurrences. Everything else (attention, collectives, casts, grouped GEMMs, and unclassified
kernels) is summarised in the profile header (``torch_profile``: count and time per category, and the
unmapped kernel names): listed, never dropped silently.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moebase.files import read_text_bounded
from moebase.units import MiB, US

MAX_TRACE_BYTES = 512 * MiB
CATEGORIES = (
    ("all_to_all_dispatch", r"(all_?to_?all|deep_?ep|intranode|internode|low_latency).*dispatch"
                            r"|dispatch.*(all_?to_?all)"),
    ("all_to_all_combine", r"(all_?to_?all|deep_?ep|intranode|internode|low_latency).*combine"
                           r"|combine.*(all_?to_?all)"),
    ("all_to_all", r"all_?to_?all|alltoall"),
    ("all_reduce", r"all_?reduce"),
    ("collective", r"nccl|all_?gather|reduce_?scatter|sendrecv|send_recv|broadcast"),
    ("attention", r"flash|fmha|attention|sdpa|scaled_dot_product|paged_attn"),
    ("grouped_gemm", r"grouped|group_gemm|moe_gemm|_grouped_mm|m_grouped"),
    ("gemm", r"gemm|xmma|s16816|s1688|wgmma|cutlass|^aten::(mm|addmm|bmm)$|cublas|matmul_kernel"),
    ("cast", r"cast|to_copy|convert|^aten::_to_copy$"),
    ("memcpy", r"^memcpy|^memset"),
)
"""(category, regex on the lower-cased kernel or operator name), first match wins."""
CAST_PARENTS = ("aten::to", "aten::_to_copy", "aten::type_as")
TORCH_DTYPES = {"float": "fp32", "c10::BFloat16": "bf16", "c10::Half": "fp16", "c10::Float8_e4m3fn": "fp8",
                "c10::Float8_e5m2": "fp8"}
COPY_KINDS = {"htod": "copy_h2d", "dtoh": "copy_d2h", "dtod": "copy_d2d"}


@dataclass(frozen=True)
class ShapeHints:
    """A dense model config and layout for GEMM kernels the trace gives no shapes for.

    tokens: rows per GEMM (batch x sequence on one GPU); tp: tensor-parallel degree.
    """

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    tokens: int
    tp: int = 1

    @classmethod
    def from_config(cls, path: str | Path, tokens: int, tp: int = 1) -> "ShapeHints":
        """From a Hugging Face ``config.json`` (keys hidden_size, intermediate_size, num_attention_heads,
        num_key_value_heads; MoE configs' moe_intermediate_size is used when present)."""
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
            inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
            heads = int(cfg["num_attention_heads"])
            hints = cls(int(cfg["hidden_size"]), int(inter), heads, int(cfg.get("num_key_value_heads", heads)),
                        int(tokens), int(tp))
        except (OSError, ValueError) as exc:
            raise ValueError(f"--shapes {path}: not a readable JSON model config: {exc}") from None
        except KeyError as exc:
            raise ValueError(f"--shapes {path}: model config lacks key {exc.args[0]!r}") from None
        if min(hints.hidden_size, hints.tokens, hints.tp) < 1:
            raise ValueError(f"--shapes {path}: hidden_size, tokens and tp must be >= 1")
        return hints

    def layer_gemms(self) -> list[tuple[int, int, int]]:
        """(m, n, k) of a dense decoder layer's GEMMs in execution order: qkv, o, gate+up, down."""
        h, i, tp = self.hidden_size, self.intermediate_size, self.tp
        head = h // self.num_attention_heads
        qkv = (self.num_attention_heads + 2 * self.num_key_value_heads) * head // tp
        return [(self.tokens, qkv, h), (self.tokens, h, h // tp), (self.tokens, 2 * i // tp, h),
                (self.tokens, h, i // tp)]


def load_trace(path: str | Path, max_bytes: int = MAX_TRACE_BYTES) -> dict:
    """Read a Chrome-trace JSON after checking its size; ValueError naming the file otherwise."""
    path = Path(path)
    text = read_text_bounded(path, max_bytes, "--from-torch-profile trace",
                             hint="profile fewer steps (torch.profiler schedule) or split the trace")
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--from-torch-profile {path}: not a JSON trace: {exc}") from None
    events = doc.get("traceEvents") if isinstance(doc, dict) else doc if isinstance(doc, list) else None
    if not isinstance(events, list):
        raise ValueError(f"--from-torch-profile {path}: no 'traceEvents' list (is it a torch.profiler Chrome trace?)")
    return {"events": [e for e in events if isinstance(e, dict)],
            "meta": doc if isinstance(doc, dict) else {}}


def classify(name: str) -> str | None:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return None


def _gemm_shape(op_name: str, dims) -> tuple[int, int, int] | None:
    """(m, n, k) from an ATen op's Input Dims: mm [[m,k],[k,n]], addmm [bias,[m,k],[k,n]], linear [[..,k],[n,k]]."""
    try:
        if op_name == "aten::mm":
            (m, k), (_, n) = dims[0], dims[1]
        elif op_name == "aten::addmm":
            (m, k), (_, n) = dims[1], dims[2]
        elif op_name == "aten::linear":
            m, k, n = int(np.prod(dims[0][:-1])), dims[0][-1], dims[1][0]
        else:
            return None
        return int(m), int(n), int(k)
    except (TypeError, ValueError, IndexError):
        return None


def _dtype_of(args: dict) -> str | None:
    types = args.get("Input type") or []
    return next((TORCH_DTYPES[t] for t in types if t in TORCH_DTYPES), None)


def _units(events: list[dict]) -> tuple[list[dict], dict[int, dict], bool]:
    """(timed events, cpu_op by External id, on_gpu)."""
    cpu_ops = [e for e in events if e.get("cat") == "cpu_op" and e.get("ph") == "X"]
    by_ext = {}
    for e in cpu_ops:
        ext = (e.get("args") or {}).get("External id")
        if ext is not None:
            by_ext.setdefault(ext, e)
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("ph") == "X"]
    return (gpu, by_ext, True) if gpu else (cpu_ops, by_ext, False)


def _cpu_unmapped_roots(cpu_ops: list[dict], mapped_ids: set[int]) -> list[dict]:
    """Top-level CPU operators (per thread, by time nesting) that contain no mapped operator."""
    from bisect import bisect_left

    out = []
    per_thread = defaultdict(list)
    for e in cpu_ops:
        per_thread[(e.get("pid"), e.get("tid"))].append(e)
    for evs in per_thread.values():
        evs.sort(key=lambda e: (float(e.get("ts", 0)), -float(e.get("dur", 0))))
        starts = sorted(float(e.get("ts", 0)) for e in evs if id(e) in mapped_ids)
        root_end = -np.inf
        for e in evs:
            start = float(e.get("ts", 0))
            if start < root_end:
                continue  # nested in the current root
            end = start + float(e.get("dur", 0))
            root_end = end
            j = bisect_left(starts, start)
            if not (j < len(starts) and starts[j] <= end):
                out.append(e)
    return out


@dataclass
class TraceSummary:
    """What a trace held: per category (count, total_s); unmapped names -> (count, total_s); rows skipped and why."""

    categories: dict
    unmapped: dict
    skipped: dict
    on_gpu: bool

    def as_meta(self, limit: int = 500) -> dict:
        top = sorted(self.unmapped.items(), key=lambda kv: -kv[1][1])[:limit]
        return {"timed_units": "gpu kernels" if self.on_gpu else "cpu operators",
                "categories": {k: {"count": c, "total_s": t} for k, (c, t) in sorted(self.categories.items())},
                "unmapped": [{"name": n, "count": c, "total_s": t} for n, (c, t) in top],
                "unmapped_names_total": len(self.unmapped), "skipped": dict(self.skipped)}


def _category(e: dict, parent: dict | None) -> str | None:
    if e.get("cat") in ("gpu_memcpy", "gpu_memset"):
        return "memcpy"
    cat = classify(str(e.get("name", "")))
    if cat is None and parent is not None and parent.get("name") in CAST_PARENTS:
        return "cast"
    return cat


def _add(table: dict, key, dur_s: float) -> None:
    c, t = table.get(key, (0, 0.0))
    table[key] = (c + 1, t + dur_s)


def _row_key(e: dict, cat: str, parent: dict | None, on_gpu: bool, hints: ShapeHints | None, counters: dict):
    """(op, m, n, k, dtype) of a timed unit, or (None, reason)."""
    if cat == "memcpy":
        kind = next((v for k, v in COPY_KINDS.items() if k in str(e.get("name", "")).lower().replace(" ", "")), None)
        nbytes = (e.get("args") or {}).get("bytes")
        if kind is None or not nbytes:
            return None, "memcpy without direction or bytes"
        return (kind, int(nbytes), 0, 0, None), None
    if cat != "gemm":
        return None, None
    op = parent if on_gpu else e
    shape = _gemm_shape(op.get("name", ""), (op.get("args") or {}).get("Input Dims")) if op is not None else None
    dtype = _dtype_of(op.get("args") or {}) if op is not None else None
    if shape is None and hints is not None:
        seq = hints.layer_gemms()
        shape = seq[counters["hinted"] % len(seq)]
        counters["hinted"] += 1
    if shape is None:
        return None, "gemm without shapes (record with record_shapes=True or give --shapes)"
    return ("gemm", *shape, dtype), None


def summarise_trace(trace: dict, hints: ShapeHints | None = None) -> tuple[dict, TraceSummary]:
    """Group timed units into profile keys: {(op, m, n, k, dtype): [durations s]} and a :class:`TraceSummary`."""
    units, by_ext, on_gpu = _units(trace["events"])
    groups, cats, unmapped, skipped = defaultdict(list), {}, {}, {}
    counters = {"hinted": 0}
    mapped_ids = set()
    for e in units:
        dur_s = float(e.get("dur", 0) or 0) * US
        parent = by_ext.get((e.get("args") or {}).get("External id")) if on_gpu else None
        cat = _category(e, parent)
        if cat is None:
            if on_gpu:
                _add(unmapped, str(e.get("name", "")), dur_s)
            continue
        mapped_ids.add(id(e))
        _add(cats, cat, dur_s)
        key, why = _row_key(e, cat, parent, on_gpu, hints, counters)
        if why:
            _add(skipped, why, dur_s)
        elif key is not None and dur_s > 0:
            groups[key].append(dur_s)
    if not on_gpu:
        for e in _cpu_unmapped_roots(units, mapped_ids):
            _add(unmapped, str(e.get("name", "")), float(e.get("dur", 0) or 0) * US)
    return groups, TraceSummary(cats, unmapped, skipped, on_gpu)


def profile_from_trace(trace: dict, *, source: str, hints: ShapeHints | None = None, dtype: str | None = None,
                       device_name: str | None = None):
    """(rows, meta, summary) of a calibration profile from a loaded trace (see :func:`load_trace`).

    ``dtype``: the profile's dtype (default: the most common GEMM input dtype in the trace, else bf16); rows of
    another dtype are counted under ``skipped``.
    """
    from hwmodels.calib_profile import make_rows

    groups, summary = summarise_trace(trace, hints)
    found = [k[4] for k in groups if k[0] == "gemm" and k[4]]
    dtype = dtype or (max(set(found), key=found.count) if found else "bf16")
    records = []
    for (op, m, n, k, dt), times in sorted(groups.items(), key=lambda kv: kv[0][:4]):
        if dt is not None and dt != dtype:
            _add(summary.skipped, f"gemm in {dt} (profile dtype {dtype})", float(np.sum(times)))
            continue
        t = np.asarray(times)
        records.append({"op": op, "shape": f"{m}x{n}x{k}" if op == "gemm" else f"{m}B", "m": m, "n": n, "k": k,
                        "dtype": dtype, "median_s": float(np.median(t)), "min_s": float(t.min()),
                        "max_s": float(t.max()), "repeats": int(t.size)})
    if not records:
        raise ValueError(f"--from-torch-profile {source}: no GEMM with known shapes and no sized memcpy in the trace "
                         f"(categories found: {sorted(summary.categories) or 'none'}); record with "
                         "record_shapes=True or give --shapes CONFIG.json --tokens N")
    props = trace["meta"].get("deviceProperties") or []
    gpu_name = props[0].get("name") if summary.on_gpu and props and isinstance(props[0], dict) else None
    meta = {"device_name": device_name or gpu_name or "cpu (torch.profiler trace)",
            "device_kind": "gpu" if summary.on_gpu else "cpu", "dtype": dtype,
            "timer": "torch.profiler (Kineto Chrome trace)", "source": source, "warmup": 0,
            "torch_profile": summary.as_meta()}
    return make_rows(records), meta, summary
