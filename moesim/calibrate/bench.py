"""Micro-benchmarks of the operators of an MoE layer (torch, imported lazily: an optional extra).

Every op is timed after ``warmup`` calls, ``repeats`` times; a sample times ``inner`` back-to-back
calls (chosen so a sample lasts at least ``min_sample_s``, above timer noise) and is divided by
``inner``. CPU: ``time.perf_counter_ns`` around synchronous torch calls. CUDA: CUDA events around the
calls (``torch.cuda.Event(enable_timing=True)``), or ``triton.testing.do_bench`` when asked and
installed. The profile keeps median, min and max per shape.

The op implementations here (:func:`expert_ffn_loop`, :func:`router_topk`, :func:`permute`,
:func:`unpermute`) are the same code the end-to-end check (:mod:`moesim.calibrate.e2e`) runs.
"""

from __future__ import annotations

import datetime as _dt
import platform
import time
from typing import Callable

import numpy as np

from moebase.units import MS, NS

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("moesim calibrate needs torch (pip install 'moesim[capture]' or torch==2.13.0)") from exc
    return torch


def torch_dtype(dtype: str):
    torch = _torch()
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} for calibration; known: {', '.join(TORCH_DTYPES)}")
    return getattr(torch, TORCH_DTYPES[dtype])


# ----------------------------------------------------------------------------- op implementations


def expert_ffn_loop(x, offsets: list[int], w_up, w_down, out):
    """SwiGLU experts over rows grouped by expert: x [rows, h] (rows of expert e are
    x[offsets[e]:offsets[e+1]]), w_up [E, h, 2f], w_down [E, f, h]; writes out [rows, h]."""
    torch = _torch()
    f = w_down.shape[1]
    for e in range(len(offsets) - 1):
        s, t = offsets[e], offsets[e + 1]
        if t == s:
            continue
        gu = torch.mm(x[s:t], w_up[e])
        act = torch.nn.functional.silu(gu[:, :f]) * gu[:, f:]
        torch.mm(act, w_down[e], out=out[s:t])
    return out


def router_topk(x, w_gate, top_k: int):
    """Router: logits = x [T, h] @ w_gate [h, E], fp32 softmax, top-k -> (weights [T, k], ids [T, k])."""
    torch = _torch()
    probs = torch.softmax(torch.mm(x, w_gate).float(), dim=-1)
    return torch.topk(probs, top_k, dim=-1)


def permute(x, token_index, out):
    """Gather rows: out [T*k, h] = x [T, h][token_index [T*k]] (token_index lists tokens in expert order)."""
    torch = _torch()
    return torch.index_select(x, 0, token_index, out=out)


def unpermute(y, weights, token_index, scaled, out):
    """Weighted scatter-add: out [T, h] = sum over choices of weights [T*k] * y [T*k, h] at token_index."""
    torch = _torch()
    torch.mul(y, weights[:, None], out=scaled)
    out.zero_()
    out.index_add_(0, token_index, scaled)
    return out


def expert_order(choices: np.ndarray, num_experts: int):
    """From choices [T, k] (expert ids): token index [T*k] in expert order, offsets [E+1], choice order [T*k]."""
    flat = np.asarray(choices).ravel()
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=num_experts)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int).tolist()
    return order // choices.shape[1], offsets, order


# ----------------------------------------------------------------------------- building a benchmark


def _make_call(spec: dict, dev, dt, rng: np.random.Generator, cache: dict | None = None) -> Callable[[], object]:
    """A zero-argument callable running one op spec on preallocated tensors. ``cache`` shares big
    operands (expert weights, copy buffers) between specs of the same shape family."""
    torch = _torch()
    gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**31)))
    cache = {} if cache is None else cache

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=dev, dtype=dt)

    op, m, n, k = spec["op"], int(spec["m"]), int(spec["n"]), int(spec["k"])
    if op == "gemm":
        a, b, c = randn(m, k), randn(k, n), torch.empty(m, n, device=dev, dtype=dt)
        return lambda: torch.mm(a, b, out=c)
    if op == "grouped_ffn":
        tpe = np.asarray(spec["tokens_per_expert"], dtype=np.int64)
        e = len(tpe)
        offsets = np.concatenate([[0], np.cumsum(tpe)]).astype(int).tolist()
        x = randn(int(tpe.sum()), k)
        key = ("ffn", e, k, n)
        if key not in cache:
            cache[key] = (randn(e, k, 2 * n) * k**-0.5, randn(e, n, k) * n**-0.5)
        w_up, w_down = cache[key]
        out = torch.empty_like(x)
        return lambda: expert_ffn_loop(x, offsets, w_up, w_down, out)
    if op == "router":
        x, w = randn(m, k), randn(k, n)
        topk = int(spec["top_k"])
        return lambda: router_topk(x, w, topk)
    if op in ("permute", "unpermute"):
        from moesim.calibrate.grids import flame_routing

        topk = int(spec["top_k"])
        choices = flame_routing(m, 0, 64, topk)
        tok, _, _ = expert_order(choices, 64)
        tok_t = torch.as_tensor(tok, dtype=torch.int64, device=dev)
        if op == "permute":
            x, out = randn(m, k), torch.empty(m * topk, k, device=dev, dtype=dt)
            return lambda: permute(x, tok_t, out)
        y, w = randn(m * topk, k), randn(m * topk).abs()
        scaled, out = torch.empty_like(y), torch.empty(m, k, device=dev, dtype=dt)
        return lambda: unpermute(y, w, tok_t, scaled, out)
    if op.startswith("copy_"):
        kind = op[len("copy_"):]
        on_gpu = dev.type == "cuda"
        host = dict(device="cpu", pin_memory=on_gpu)
        key = ("copy", kind)
        if key not in cache or cache[key][0].numel() < m:
            cache[key] = (torch.empty(m, dtype=torch.uint8, **(host if kind == "h2d" else {"device": dev})).fill_(1),
                          torch.empty(m, dtype=torch.uint8, **(host if kind == "d2h" else {"device": dev})))
        src, dst = cache[key][0][:m], cache[key][1][:m]
        return lambda: dst.copy_(src)
    raise ValueError(f"unknown op {op!r} in the calibration grid")


def _sample(fn, inner: int, on_gpu: bool) -> float:
    """One sample: seconds per call over ``inner`` back-to-back calls."""
    torch = _torch()
    if on_gpu:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * MS / inner  # CUDA events count milliseconds
    a = time.perf_counter_ns()
    for _ in range(inner):
        fn()
    return (time.perf_counter_ns() - a) * NS / inner


def _inner_count(fn, warmup: int, min_sample_s: float, on_gpu: bool) -> int:
    """Warm ``fn`` up and choose how many calls one sample needs to last ``min_sample_s``."""
    torch = _torch()
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    for _ in range(max(warmup, 1)):
        fn()
    sync()
    t0 = time.perf_counter_ns()
    fn()
    sync()
    est_s = max((time.perf_counter_ns() - t0) * NS, NS)  # at least the clock's 1 ns
    return int(min(max(np.ceil(min_sample_s / est_s), 1), 10_000))


def time_call(fn: Callable[[], object], *, on_gpu: bool, warmup: int, repeats: int, min_sample_s: float,
              use_triton: bool = False) -> np.ndarray:
    """Per-call times [repeats] (s) of one callable; see the module docstring for the method."""
    if on_gpu and use_triton:
        try:
            from triton.testing import do_bench

            ms = do_bench(fn, warmup=25, rep=100, return_mode="all")
            return np.asarray(ms, dtype=float) * MS
        except ImportError:
            pass
    inner = _inner_count(fn, warmup, min_sample_s, on_gpu)
    return np.array([_sample(fn, inner, on_gpu) for _ in range(repeats)])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str, dtype: str, threads: int | None) -> dict:
    """Profile header: device name and kind, library versions, threads, dtype."""
    import sys

    torch = _torch()
    meta = {"dtype": dtype, "torch_version": torch.__version__, "numpy_version": np.__version__,
            "python_version": sys.version.split()[0], "platform": platform.platform(),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "grouped_impl": "loop over experts (torch.mm per expert)"}
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device here (use --device cpu)")
        props = torch.cuda.get_device_properties(0)
        meta.update(device_name=torch.cuda.get_device_name(0), device_kind="gpu", timer="cuda-events",
                    cuda_version=torch.version.cuda, cudnn_version=torch.backends.cudnn.version(),
                    gpu_memory_bytes=int(props.total_memory), sm_count=int(props.multi_processor_count))
        try:
            import subprocess

            meta["driver_version"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            meta["driver_version"] = "unknown"
        try:
            import triton

            meta["triton_version"] = triton.__version__
        except ImportError:
            pass
    elif device == "cpu":
        n = threads or torch.get_num_threads()
        meta.update(device_name=f"{cpu_name()} ({n} threads)", device_kind="cpu", timer="perf_counter_ns",
                    num_threads=n)
    else:
        raise ValueError(f"unknown calibration device {device!r}; use cpu or cuda")
    return meta


def run_suite(specs: list[dict], *, device: str = "cpu", dtype: str = "fp32", warmup: int = 3, repeats: int = 15,
              threads: int | None = None, min_sample_s: float = 2e-4, seed: int = 0, use_triton: bool = False,
              progress: Callable[[int, int], None] | None = None):
    """Time every op spec; returns (rows DataFrame in the profile format, header dict)."""
    from hwmodels.calib_profile import make_rows

    torch = _torch()
    if repeats < 3:
        raise ValueError(f"repeats must be >= 3 for a median, got {repeats}")
    old_threads = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        meta = environment(device, dtype, threads)
        meta.update(warmup=warmup, repeats=repeats, min_sample_s=min_sample_s, seed=seed)
        dev = torch.device("cuda" if device == "cuda" else "cpu")
        dt = torch_dtype(dtype)
        rng = np.random.default_rng(seed)
        records = []
        on_gpu = device == "cuda"
        with torch.inference_mode():
            # specs of one op family are timed interleaved, round after round, so a burst of load from
            # other processes spreads over all shapes instead of biasing one
            for op in dict.fromkeys(sp["op"] for sp in specs):
                group = [sp for sp in specs if sp["op"] == op]
                cache: dict = {}
                calls = [_make_call(sp, dev, dt, rng, cache) for sp in group]
                if on_gpu and use_triton:
                    samples = [time_call(fn, on_gpu=True, warmup=warmup, repeats=repeats, min_sample_s=min_sample_s,
                                         use_triton=True) for fn in calls]
                else:
                    inners = [_inner_count(fn, warmup, min_sample_s, on_gpu) for fn in calls]
                    samples = [np.empty(repeats) for _ in calls]
                    for r in range(repeats):
                        for j, fn in enumerate(calls):
                            samples[j][r] = _sample(fn, inners[j], on_gpu)
                for sp, t in zip(group, samples):
                    records.append({**sp, "dtype": dtype, "median_s": float(np.median(t)), "min_s": float(t.min()),
                                    "max_s": float(t.max()), "repeats": len(t)})
                    if progress is not None:
                        progress(len(records), len(specs))
                del calls, cache
    finally:
        torch.set_num_threads(old_threads)
    for r in records:
        from hwmodels.calib_profile import launches_of

        r["launches"] = launches_of(r["op"], int((np.asarray(r.get("tokens_per_expert") or []) > 0).sum()))
    return make_rows(records), meta
