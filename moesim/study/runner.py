"""Run a study: every configuration evaluated once, results in ``<study>/results.parquet``.

Executors: ``serial`` (in this process), ``process`` (a local process pool; the default) and Dask
(``dask="tcp://host:8786"`` for a running scheduler, ``dask="local"`` to start a LocalCluster; see
:mod:`moesim.study.remote` for its timeouts). Every configuration is evaluated with the study's seed,
so the rows do not depend on the executor (tested).

No result is lost (files in :mod:`moesim.study.store`):

- resumable: finished rows are flushed to ``<study>/results.parts/`` as they arrive; a new run skips
  every configuration with an ``ok`` row, and at the end all rows are merged into ``results.parquet``
  in study order. A part that cannot be read is set aside (``*.corrupt``) and recomputed;
- a configuration that raises is a row with ``status = "failed"`` and its ``error``; the others go on,
  and the next run tries the failed ones again;
- rows of configurations that left ``study.toml`` move to ``results.retired.parquet`` (``prune=True``
  deletes them);
- one run per study folder at a time (a lock file; ``wait=True`` waits for the other run).
"""

from __future__ import annotations

import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable

import pandas as pd

from moesim.study import store
from moesim.study.evaluate import SCHEMA_VERSION, evaluate
from moesim.study.remote import DEFAULT_TIMEOUT_S, connect_dask, iter_dask
from moesim.study.spec import PARAMETERS, Study, config_id

EXECUTORS = ("serial", "process", "dask")
FLUSH_EVERY_S = 5.0
__all__ = ["EXECUTORS", "connect_dask", "finished_rows", "run_study"]


def failed_row(task: tuple[dict, str, int], error: str) -> dict:
    """The row of a configuration that could not be evaluated: its parameters, status and error."""
    config, engine, seed = task
    return {"config_id": config_id(config, engine, seed), **{k: config[k] for k in PARAMETERS}, "engine": engine,
            "seed": seed, "status": store.STATUS_FAILED, "error": error, "schema_version": SCHEMA_VERSION}


def _evaluate_task(task: tuple[dict, str, int]) -> dict:
    """One configuration -> its row; an exception becomes a failed row (runs in the workers)."""
    try:
        row = evaluate(*task)
    except Exception as exc:  # noqa: BLE001 -- recorded in the row, the study goes on
        msg = " ".join(str(exc).split())
        return failed_row(task, f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__)
    return {**row, "status": store.STATUS_OK, "error": ""}


def _warn(msg: str) -> None:
    warnings.warn(msg, stacklevel=2)


def finished_rows(study: Study, note: Callable[[str], None] = _warn) -> pd.DataFrame:
    """Every row stored for ``study`` (results, retired rows, flushed parts), one per config_id."""
    return store.read_rows(study.path, note)


def _iter_pool(todo: list[tuple[dict, str, int]], workers: int) -> Iterable[dict]:
    import multiprocessing as mp
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
        futures = {pool.submit(_evaluate_task, t): t for t in todo}
        for f in as_completed(futures):
            try:
                row = f.result()
            except BrokenProcessPool as exc:  # a worker process died (killed, out of memory)
                row = failed_row(futures[f], f"BrokenProcessPool: a worker process died ({exc})")
            except Exception as exc:  # noqa: BLE001 -- the pool could not run it (e.g. an argument does not pickle)
                row = failed_row(futures[f], f"{type(exc).__name__}: {exc}")
            yield row


def _iter_results(todo: list[tuple[dict, str, int]], executor: str, workers: int, dask: str | None,
                  fallback_local: bool, dask_timeout_s: float) -> Iterable[dict]:
    if executor == "serial" or (executor == "process" and workers <= 1):
        for t in todo:
            yield _evaluate_task(t)
    elif executor == "process":
        yield from _iter_pool(todo, workers)
    elif executor == "dask":
        yield from iter_dask(_evaluate_task, todo, failed_row, dask or "local", workers, fallback_local,
                             dask_timeout_s)
    else:
        raise ValueError(f"unknown executor {executor!r}; known: {', '.join(EXECUTORS)}")


def run_study(study: Study, *, executor: str = "process", workers: int | None = None, dask: str | None = None,
              fallback_local: bool = False, limit: int | None = None,
              progress: Callable[[int, int], None] | None = None, prune: bool = False, wait: bool = False,
              dask_timeout_s: float = DEFAULT_TIMEOUT_S, note: Callable[[str], None] = _warn) -> pd.DataFrame:
    """Evaluate the configurations of ``study`` without an ``ok`` row and write ``results.parquet``.

    ``limit`` evaluates at most that many configurations (then stops, resumable later).
    ``progress(done, total)`` counts configurations, finished ones included. ``prune`` deletes the rows
    of configurations no longer in the study (kept in ``results.retired.parquet`` otherwise). ``wait``
    waits for another run on the same folder instead of refusing. ``note(msg)`` receives what the user
    should know (rows set aside, waiting). Returns the rows of the study's configurations in study
    order (``status`` ok or failed); ``rows.attrs["outside"]`` counts the rows kept (or pruned) outside it.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; known: {', '.join(EXECUTORS)}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if not dask_timeout_s > 0:
        raise ValueError(f"dask_timeout_s must be > 0, got {dask_timeout_s}")
    workers = workers or min(os.cpu_count() or 1, 8)
    with store.StudyLock(study.path, wait=wait, note=note):
        done_df = finished_rows(study, note)
        ok_ids = set(done_df.loc[done_df["status"] == store.STATUS_OK, "config_id"])
        ids = [config_id(c, study.engine, study.seed) for c in study.configs]
        todo = [(c, study.engine, study.seed) for c, i in zip(study.configs, ids) if i not in ok_ids]
        total = len(ids)
        done = total - len(todo)
        todo = todo if limit is None else todo[:limit]
        if progress is not None:
            progress(done, total)
        pending: list[dict] = []
        last_flush = time.monotonic()
        try:
            for row in _iter_results(todo, executor, workers, dask, fallback_local, dask_timeout_s):
                pending.append(row)
                done += 1
                if progress is not None:
                    progress(done, total)
                if time.monotonic() - last_flush > FLUSH_EVERY_S:
                    store.write_part(study.path, pending)
                    pending, last_flush = [], time.monotonic()
        finally:
            store.write_part(study.path, pending)
        rows, outside = store.merge(study.path, ids, prune, note)
    rows.attrs["outside"] = outside
    return rows
