"""Record the routing decisions of a PyTorch MoE model while it trains or generates (needs ``moesim[capture]``).

Usage::

    with moesim.capture(model, "traces/run1/", optimizer=opt) as cap:
        for batch in data:
            loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()
    trace = workloads.importers.load_trace("traces/run1/")

What is recorded, per MoE layer and token: ``step``, ``layer`` (ordinal of the router among the model's
routers), ``token`` (index inside its step, counting over every micro-batch of the step), ``rank``,
``expert``, ``weight`` (the gate weight the model used), ``sequence`` (batch row, numbered across the
micro-batches of a step), ``position`` (``position_ids``/``cache_position`` of the forward call if given, else
0..S-1), ``microbatch`` (forward call inside the step); optionally ``token_id`` (``record_token_ids=True``,
from ``input_ids``) and the full router logits (``record_logits=True``; written as ``logits-*.npz`` shards:
``step``, ``layer``, ``token`` [R] and ``logits`` [R, E] float32, read back with :func:`read_logits`).

Routers. Hugging Face routers are found automatically: every module whose class name ends in ``TopKRouter``
/ ``TopkRouter`` (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, ... in transformers 5.x) returns
``(logits, weights, indices)``; the hook reads the *output* (indices and weights as the model uses them), so
DeepSeek-V3's biased group-limited routing is recorded as taken, not recomputed. For a custom model pass
``router=`` (a module-name glob, e.g. ``"blocks.*.moe.gate"``, or a predicate ``(name, module) -> bool``)
and ``adapter=(module, inputs, output) -> (indices [N, k], weights [N, k], logits [N, E] | None)``.

Steps. ``steps="forward"`` (default without an optimizer): every forward call of ``model`` is one step (a
generation pass: prefill is step 0, each decode call the next step). ``steps="optimizer"`` (default when
``optimizer=`` is given): the step advances after each ``optimizer.step()``, so all micro-batches of a
gradient-accumulation step share a step number. ``steps="manual"``: call ``cap.step()`` yourself. Forward
passes re-run inside backward (activation checkpointing) are not recorded twice.

Overhead and memory. The hook only keeps the (small) index/weight tensors on the model's device; every
``flush_tokens`` recorded token-layers they are concatenated and copied to the host in one batch
(non-blocking into pinned memory on CUDA) and handed to a background thread that writes one Parquet shard
per ``shard_rows`` rows. The hand-off queue is bounded (``max_pending`` batches), so a slow disk slows the
run down instead of growing memory.

Crash safety. A shard is written to ``*.tmp`` and renamed; ``manifest.json`` is rewritten the same way
after every shard and lists only complete shards, so a run killed mid-way leaves a readable prefix
(``workloads.importers.load_trace(dir)`` reads the shards the manifest lists). A directory that already
holds files is refused. If writing fails (disk full, permissions), the error is warned about at once,
capture stops, training continues, ``cap.error`` holds the exception and the manifest says ``failed``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import queue
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from workloads.trace import Trace, TraceMeta, validate, write_parquet

MANIFEST = "manifest.json"
FORMAT = "moesim-capture"
STEP_MODES = ("forward", "optimizer", "manual")


class CaptureError(RuntimeError):
    """Capture could not write its trace (the run itself is not affected)."""


def hf_router_adapter(module, inputs, output):
    """Adapter for transformers 5.x ``*TopKRouter`` modules returning ``(logits, weights, indices)``."""
    logits, weights, indices = output
    return indices, weights, logits


def _is_hf_router(name: str, module) -> bool:
    cls = type(module).__name__
    return cls.endswith("TopKRouter") or cls.endswith("TopkRouter")


def find_routers(model, router: str | Callable | None = None) -> list[tuple[str, Any]]:
    """The router modules that will be hooked, in model order, as (qualified name, module)."""
    if router is None:
        pred = _is_hf_router
    elif isinstance(router, str):
        pattern = router
        pred = lambda name, module: fnmatch.fnmatchcase(name, pattern)  # noqa: E731
    elif callable(router):
        pred = router
    else:
        raise ValueError(f"router must be a module-name glob, a predicate or None, got {type(router).__name__}")
    found = [(n, m) for n, m in model.named_modules() if n and pred(n, m)]
    if not found:
        what = (f"modules whose name matches {router!r}" if isinstance(router, str) else
                "modules accepted by the router predicate" if router is not None else
                "Hugging Face MoE routers (module classes named *TopKRouter / *TopkRouter, e.g. MixtralTopKRouter, "
                "OlmoeTopKRouter, Qwen2MoeTopKRouter, Qwen3MoeTopKRouter, DeepseekV3TopkRouter)")
        n_mod = sum(1 for _ in model.named_modules())
        raise ValueError(f"no MoE layers found in {type(model).__name__}: searched its {n_mod} modules for {what}; "
                         f"pass router='<module name glob>' and adapter=... for a custom model")
    return found


@dataclass
class _Pending:
    step: int
    layer: int
    token0: int
    seq0: int
    microbatch: int
    batch: int
    seqlen: int
    indices: Any
    weights: Any
    positions: Any
    token_ids: Any
    logits: Any


class Capture:
    """Context manager returned by :func:`capture` (see the module docstring)."""

    def __init__(self, model, out_dir, *, router=None, adapter=None, optimizer=None, steps: str | None = None,
                 record_logits: bool = False, record_token_ids: bool = False, model_name: str | None = None,
                 flush_tokens: int = 65536, shard_rows: int = 1_000_000, max_pending: int = 4,
                 num_experts: int | None = None):
        import torch  # noqa: F401  (fail early with ImportError if the extra is missing)

        self.model = model
        self.out_dir = Path(out_dir)
        self.routers = find_routers(model, router)
        if router is not None and adapter is None:
            adapter = hf_router_adapter
        self.adapter = adapter or hf_router_adapter
        self.optimizer = optimizer
        self.mode = steps or ("optimizer" if optimizer is not None else "forward")
        if self.mode not in STEP_MODES:
            raise ValueError(f"steps must be one of {STEP_MODES}, got {steps!r}")
        if self.mode == "optimizer" and optimizer is None:
            raise ValueError("steps='optimizer' needs optimizer=<the torch optimizer>")
        for name, v in (("flush_tokens", flush_tokens), ("shard_rows", shard_rows), ("max_pending", max_pending)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.record_logits = record_logits
        self.record_token_ids = record_token_ids
        cfg = getattr(model, "config", None)
        self.model_name = model_name or getattr(cfg, "model_type", None) or type(model).__name__
        self.num_experts = num_experts
        self.flush_tokens = int(flush_tokens)
        self.shard_rows = int(shard_rows)
        self.max_pending = int(max_pending)
        self.run_id = uuid.uuid4().hex
        self.error: BaseException | None = None
        self.step_index = 0
        self._layer_of = {id(m): i for i, (_, m) in enumerate(self.routers)}
        self._handles: list = []
        self._pending: list[_Pending] = []
        self._pending_tokens = 0
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._ctx: dict | None = None
        self._mb_in_step = 0
        self._tokens_in_step = 0
        self._seqs_in_step = 0
        self._shards: list[str] = []
        self._logit_shards: list[str] = []
        self._rows_written = 0
        self._top_k = 0
        self._variable = False
        self._lock = threading.Lock()
        self._active = False

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Capture":
        self._prepare_dir()
        self._queue = queue.Queue(maxsize=self.max_pending)
        self._thread = threading.Thread(target=self._writer, name="moesim-capture-writer", daemon=True)
        self._thread.start()
        self._install()
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(status="interrupted" if exc_type is not None else "complete")

    def close(self, status: str = "complete") -> None:
        """Remove hooks, flush what is pending, wait for the writer, finalise the manifest."""
        if not self._active:
            return
        self._active = False
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._flush()
        assert self._queue is not None and self._thread is not None
        self._queue.put(None)
        self._thread.join()
        final = "failed" if self.error is not None else status
        try:
            self._write_manifest(final)
        except OSError as exc:
            self._fail(exc)
        if self.error is not None:
            warnings.warn(f"moesim.capture: trace in {self.out_dir} is incomplete: {self.error}", RuntimeWarning,
                          stacklevel=2)

    def step(self) -> None:
        """Advance the step counter (the only way in ``steps='manual'``; allowed in every mode)."""
        self.step_index += 1
        self._mb_in_step = self._tokens_in_step = self._seqs_in_step = 0
        self._ctx = None

    # ------------------------------------------------------------ directory and manifest
    def _prepare_dir(self) -> None:
        d = self.out_dir
        if d.exists():
            if not d.is_dir():
                raise ValueError(f"trace directory {d} exists and is not a directory")
            existing = sorted(p.name for p in d.iterdir())
            if existing:
                other = ""
                if MANIFEST in existing:
                    try:
                        other = f" (run {json.loads((d / MANIFEST).read_text()).get('run_id', '?')})"
                    except (OSError, ValueError):
                        other = " (unreadable manifest)"
                raise ValueError(f"trace directory {d} already holds another run's data{other}: "
                                 f"{', '.join(existing[:5])}{' ...' if len(existing) > 5 else ''}; "
                                 f"refusing to overwrite it, choose a new directory")
        try:
            d.mkdir(parents=True, exist_ok=True)
            self._write_manifest("running")
        except OSError as exc:
            raise ValueError(f"cannot write capture trace directory {d}: {exc}") from exc

    def _write_manifest(self, status: str) -> None:
        doc = {"format": FORMAT, "version": 1, "run_id": self.run_id, "model": self.model_name, "status": status,
               "steps": self.mode, "routers": [n for n, _ in self.routers], "shards": list(self._shards),
               "logit_shards": list(self._logit_shards), "rows": self._rows_written,
               "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if self.error is not None:
            doc["error"] = f"{type(self.error).__name__}: {self.error}"
        tmp = self.out_dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.out_dir / MANIFEST)

    # ------------------------------------------------------------ hooks
    def _install(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        for _, m in self.routers:
            self._handles.append(m.register_forward_hook(self._router_hook))
        if self.mode == "optimizer":
            self._handles.append(self.optimizer.register_step_post_hook(lambda opt, a, kw: self.step()))

    def _model_pre(self, module, args, kwargs):
        if self.error is not None or _in_backward():
            return None
        if self.mode == "forward" and self._ctx is not None:
            self.step()
        torch = _torch()
        first = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(first, torch.Tensor):
            first = kwargs.get("inputs_embeds")
        ids = first if isinstance(first, torch.Tensor) and not first.is_floating_point() else None
        # token layout: integer ids [B, S] (or [S]); float inputs [B, S, H] / [N, H] (hidden size last)
        shape = () if not isinstance(first, torch.Tensor) else tuple(first.shape if ids is not None else first.shape[:-1])
        if len(shape) >= 2:
            batch, seqlen = int(shape[0]), int(np.prod(shape[1:]))
        else:
            batch, seqlen = 1, int(shape[0]) if shape else 0
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = kwargs.get("cache_position")
        if self._ctx is not None and self.mode != "forward":
            self._mb_in_step += 1
            self._tokens_in_step += self._ctx["tokens"]
            self._seqs_in_step += self._ctx["batch"]
        self._ctx = {"batch": batch, "seqlen": seqlen, "tokens": batch * seqlen, "positions": pos,
                     "token_ids": ids if (self.record_token_ids and ids is not None and ids.dim() == 2) else None,
                     "seen": set()}
        return None

    def _router_hook(self, module, inputs, output):
        if self.error is not None or _in_backward():
            return
        layer = self._layer_of[id(module)]
        idx, w, logits = self.adapter(module, inputs, output)
        idx = idx.detach()
        n, k = (int(idx.shape[0]), int(idx.shape[1])) if idx.dim() == 2 else (int(idx.numel()), 1)
        idx = idx.reshape(n, k)
        ctx = self._ctx
        if ctx is None or ctx["tokens"] != n or layer in ctx["seen"]:
            # router called outside a model forward we saw (or with another token count, or twice): new context
            if ctx is not None and self.mode != "forward":
                self._mb_in_step += 1
                self._tokens_in_step += ctx["tokens"]
                self._seqs_in_step += ctx["batch"]
            elif ctx is not None:
                self.step()
            ctx = self._ctx = {"batch": 1, "seqlen": n, "tokens": n, "positions": None, "token_ids": None, "seen": set()}
        ctx["seen"].add(layer)
        if self.num_experts is None and logits is not None:
            self.num_experts = int(logits.shape[-1])
        elif self.num_experts is None:
            self.num_experts = int(getattr(module, "num_experts", 0)) or None
        w = w.detach().reshape(n, k).float().clone() if w is not None else None
        self._top_k = max(self._top_k, k)
        self._pending.append(_Pending(
            step=self.step_index, layer=layer, token0=self._tokens_in_step, seq0=self._seqs_in_step,
            microbatch=self._mb_in_step, batch=ctx["batch"], seqlen=ctx["seqlen"],
            indices=idx.to(dtype=_torch().int32), weights=w, positions=ctx["positions"],
            token_ids=ctx["token_ids"],
            logits=logits.detach().reshape(n, -1).float().clone() if (self.record_logits and logits is not None) else None))
        self._pending_tokens += n
        if self._pending_tokens >= self.flush_tokens:
            self._flush()

    # ------------------------------------------------------------ batching and writing
    def _flush(self) -> None:
        if not self._pending or self.error is not None:
            self._pending.clear()
            self._pending_tokens = 0
            return
        torch = _torch()
        batch, self._pending, self._pending_tokens = self._pending, [], 0
        # one device->host copy per tensor kind for the whole batch
        idx = torch.cat([p.indices for p in batch])
        host = {"indices": _to_host(idx)}
        if all(p.weights is not None for p in batch):
            host["weights"] = _to_host(torch.cat([p.weights for p in batch]))
        if self.record_logits and all(p.logits is not None for p in batch):
            host["logits"] = _to_host(torch.cat([p.logits for p in batch]))
        for p in batch:
            p.indices = p.weights = p.logits = None
            if p.positions is not None:
                p.positions = _to_host(p.positions.detach())
            if p.token_ids is not None:
                p.token_ids = _to_host(p.token_ids.detach())
        self._queue.put((batch, host))

    def _writer(self) -> None:
        rows: list[dict[str, np.ndarray]] = []
        n_rows = 0
        logit_parts: list[dict[str, np.ndarray]] = []
        while True:
            item = self._queue.get()
            if item is None:
                break
            if self.error is not None:
                continue
            try:
                cols, lg = self._columns(*item)
                rows.append(cols)
                n_rows += len(cols["expert"])
                if lg is not None:
                    logit_parts.append(lg)
                if n_rows >= self.shard_rows:
                    self._write_shard(rows, logit_parts)
                    rows, logit_parts, n_rows = [], [], 0
            except BaseException as exc:  # noqa: BLE001  (never let the writer kill training)
                self._fail(exc)
        if rows and self.error is None:
            try:
                self._write_shard(rows, logit_parts)
            except BaseException as exc:  # noqa: BLE001
                self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
            warnings.warn(f"moesim.capture: writing the trace to {self.out_dir} failed ({type(exc).__name__}: {exc}); "
                          f"capture stopped, the run continues", RuntimeWarning, stacklevel=2)

    def _columns(self, batch: list[_Pending], host: dict) -> tuple[dict, dict | None]:
        ids = host["indices"].numpy()
        w = host["weights"].numpy() if "weights" in host else np.ones(ids.shape, dtype=np.float32)
        k = ids.shape[1]
        parts = {c: [] for c in ("step", "layer", "token", "sequence", "position", "microbatch")}
        tid_parts = []
        off = 0
        lg = {"step": [], "layer": [], "token": []}
        for p in batch:
            n = p.batch * p.seqlen
            local = np.arange(n)
            parts["step"].append(np.full(n, p.step, np.int32))
            parts["layer"].append(np.full(n, p.layer, np.int32))
            parts["token"].append((p.token0 + local).astype(np.int64))
            parts["sequence"].append((p.seq0 + local // max(p.seqlen, 1)).astype(np.int32))
            if p.positions is not None:
                pos = p.positions.numpy().astype(np.int64)
                pos = np.broadcast_to(pos.reshape(-1, pos.shape[-1]) if pos.ndim > 1 else pos[None, :],
                                      (p.batch, p.seqlen)).ravel() if pos.size in (p.seqlen, n) else local % p.seqlen
            else:
                pos = local % max(p.seqlen, 1)
            parts["position"].append(np.asarray(pos, dtype=np.int32))
            parts["microbatch"].append(np.full(n, p.microbatch, np.int16))
            if self.record_token_ids:
                tid_parts.append(p.token_ids.numpy().reshape(-1).astype(np.int32) if p.token_ids is not None
                                 else np.full(n, -1, np.int32))
            if "logits" in host:
                lg["step"].append(parts["step"][-1])
                lg["layer"].append(parts["layer"][-1])
                lg["token"].append(parts["token"][-1])
            off += n
        tok_cols = {c: np.concatenate(v) for c, v in parts.items()}
        if self.record_token_ids:
            tok_cols["token_id"] = np.concatenate(tid_parts)
        cols = {c: np.repeat(v, k) for c, v in tok_cols.items()}
        cols["rank"] = np.tile(np.arange(k, dtype=np.int16), len(ids))
        cols["expert"] = ids.reshape(-1).astype(np.int32)
        cols["weight"] = w.reshape(-1).astype(np.float32)
        logits = None
        if "logits" in host:
            logits = {c: np.concatenate(v) for c, v in lg.items()}
            logits["logits"] = host["logits"].numpy().astype(np.float32)
        return cols, logits

    def _write_shard(self, rows: list[dict], logit_parts: list[dict]) -> None:
        cols = {c: np.concatenate([r[c] for r in rows]) for c in rows[0]}
        order = np.lexsort((cols["rank"], cols["token"], cols["layer"], cols["step"]))
        cols = {c: v[order] for c, v in cols.items()}
        num_experts = self.num_experts or int(cols["expert"].max()) + 1
        meta = TraceMeta(model=self.model_name, num_experts=num_experts, top_k=max(self._top_k, 1),
                         num_layers=len(self.routers), source=f"moesim.capture run {self.run_id}",
                         extra={"run_id": self.run_id, "steps": self.mode, "routers": [n for n, _ in self.routers]})
        trace = Trace(columns=cols, meta=meta)
        validate(trace, allow_partial=True)  # a shard may end inside a step; the concatenated trace is checked
        i = len(self._shards)
        name = f"shard-{i:05d}.parquet"
        write_parquet(trace, self.out_dir / name)
        if logit_parts:
            lname = f"logits-{i:05d}.npz"
            lg = {c: np.concatenate([p[c] for p in logit_parts]) for c in logit_parts[0]}
            tmp = self.out_dir / (lname + ".tmp")
            with open(tmp, "wb") as fh:
                np.savez(fh, **lg)
            os.replace(tmp, self.out_dir / lname)
            self._logit_shards.append(lname)
        self._shards.append(name)
        self._rows_written += len(cols["expert"])
        self._write_manifest("running")


def _torch():
    import torch

    return torch


def _in_backward() -> bool:
    torch = _torch()
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn is not None and fn() != -1


def _to_host(t):
    if t.device.type == "cpu":
        return t
    out = _torch().empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    _torch().cuda.current_stream(t.device).synchronize()  # the writer thread reads it; one sync per batch
    return out


def capture(model, out_dir, **kwargs) -> Capture:
    """Record ``model``'s routing into ``out_dir`` (see the module docstring for every option)."""
    return Capture(model, out_dir, **kwargs)


def read_manifest(out_dir) -> dict:
    """The manifest of a capture directory (``shards``, ``logit_shards``, ``status``, ``run_id``, ...)."""
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        raise ValueError(f"{out_dir}: no {MANIFEST}; not a capture directory")
    try:
        man = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a valid capture manifest (bad JSON: {exc})") from None
    if not isinstance(man, dict):
        raise ValueError(f"{path}: not a valid capture manifest (a JSON object was expected)")
    return man


def shard_paths(out_dir, key: str = "shards", manifest: dict | None = None) -> list[Path]:
    """The files the manifest of ``out_dir`` lists under ``key`` (``shards`` or ``logit_shards``). Each
    must be a plain file name inside the capture directory: a name that leads out of it (``../x.parquet``,
    an absolute path, a link pointing elsewhere) is a ValueError naming the manifest and the entry."""
    out = Path(out_dir)
    man = read_manifest(out) if manifest is None else manifest
    names = man.get(key, [])
    if not isinstance(names, list):
        raise ValueError(f"{out / MANIFEST}: key {key!r} must be a list of file names, got {type(names).__name__}")
    root = out.resolve()
    paths = []
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise ValueError(f"{out / MANIFEST}: {key}[{i}] must be a file name, got {name!r}")
        path = (out / name).resolve()
        if Path(name).is_absolute() or not path.is_relative_to(root) or path == root:
            raise ValueError(f"{out / MANIFEST}: {key}[{i}] = {name!r} leads outside the capture directory "
                             f"{out}; refusing to read it")
        paths.append(path)
    return paths


def read_logits(out_dir) -> dict[str, np.ndarray]:
    """Router logits recorded with ``record_logits=True``: ``step``, ``layer``, ``token`` [R] and ``logits`` [R, E]."""
    parts = [np.load(p, allow_pickle=False) for p in shard_paths(out_dir, "logit_shards")]
    if not parts:
        raise ValueError(f"{out_dir}: no router logits recorded (capture with record_logits=True)")
    return {c: np.concatenate([p[c] for p in parts]) for c in ("step", "layer", "token", "logits")}
