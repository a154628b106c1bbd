"""Run a study: every configuration evaluated once, results in ``<study>/results.parquet``.

Executors: ``serial`` (in this process), ``process`` (a local process pool; the default) and Dask
(``dask="tcp://host:8786"`` for a running scheduler, ``dask="local"`` to start a LocalCluster).
Every configuration is evaluated with the study's seed, so the rows do not depend on the executor
(tested). Resumable: finished rows are flushed to ``<study>/results.parts/`` as they arrive; a new
run skips every configuration whose ``config_id`` is already in ``results.parquet`` or a part file,
and at the end all rows are merged into ``results.parquet`` in study order.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Iterable

import pandas as pd

from moesim.study.evaluate import evaluate
from moesim.study.spec import Study, config_id

EXECUTORS = ("serial", "process", "dask")
FLUSH_EVERY_S = 5.0


def _evaluate_task(args: tuple[dict, str, int]) -> dict:
    return evaluate(*args)


def finished_rows(study: Study) -> pd.DataFrame:
    """Rows already computed for ``study`` (results.parquet plus flushed parts), one per config_id."""
    frames = []
    if study.results_path.exists():
        frames.append(pd.read_parquet(study.results_path))
    parts = study.path / "results.parts"
    if parts.is_dir():
        frames += [pd.read_parquet(p) for p in sorted(parts.glob("*.parquet"))]
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    return df.drop_duplicates("config_id", keep="last")


def connect_dask(address: str, workers: int, fallback_local: bool = False):
    """A ``distributed.Client``: ``local`` starts a LocalCluster of ``workers`` single-threaded workers
    (threads, not processes); otherwise connect to ``address``. An unreachable scheduler is a
    ValueError, unless ``fallback_local`` (then a LocalCluster is started instead, with a warning)."""
    from distributed import Client, LocalCluster

    if address == "local":
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=False, dashboard_address=None)
        return Client(cluster)
    try:
        return Client(address, timeout="3s")
    except (OSError, TimeoutError) as exc:
        if fallback_local:
            import warnings
            warnings.warn(f"Dask scheduler {address} unreachable ({exc}); running on a local cluster instead")
            return connect_dask("local", workers)
        raise ValueError(f"cannot reach the Dask scheduler at {address!r} ({type(exc).__name__}: {exc}); start it "
                         f"('dask scheduler'), use '--dask local', or add '--fallback-local' to run locally") from None


def _iter_results(todo: list[tuple[dict, str, int]], executor: str, workers: int, dask: str | None,
                  fallback_local: bool) -> Iterable[dict]:
    if executor == "serial" or (executor == "process" and workers <= 1):
        for t in todo:
            yield _evaluate_task(t)
    elif executor == "process":
        import multiprocessing as mp
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
            futures = [pool.submit(_evaluate_task, t) for t in todo]
            for f in as_completed(futures):
                yield f.result()
    elif executor == "dask":
        from distributed import as_completed as dask_completed
        client = connect_dask(dask or "local", workers, fallback_local)
        try:
            futures = client.map(_evaluate_task, todo, pure=False)
            for f in dask_completed(futures):
                yield f.result()
        finally:
            cluster = getattr(client, "cluster", None)
            client.close()
            if dask == "local" and cluster is not None:
                cluster.close()
    else:
        raise ValueError(f"unknown executor {executor!r}; known: {', '.join(EXECUTORS)}")


def run_study(study: Study, *, executor: str = "process", workers: int | None = None, dask: str | None = None,
              fallback_local: bool = False, limit: int | None = None,
              progress: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """Evaluate the configurations of ``study`` not yet finished and write ``results.parquet``.

    ``limit`` evaluates at most that many new configurations (then stops, resumable later).
    ``progress(done, total)`` counts configurations, finished ones included. Returns all rows.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; known: {', '.join(EXECUTORS)}")
    workers = workers or min(os.cpu_count() or 1, 8)
    done_df = finished_rows(study)
    done_ids = set(done_df["config_id"]) if len(done_df) else set()
    ids = [config_id(c, study.engine, study.seed) for c in study.configs]
    todo = [(c, study.engine, study.seed) for c, i in zip(study.configs, ids) if i not in done_ids]
    if limit is not None:
        todo = todo[:limit]
    total = len(study.configs)
    done = total - sum(1 for i in ids if i not in done_ids)
    if progress is not None:
        progress(done, total)
    parts = study.path / "results.parts"
    pending: list[dict] = []
    last_flush = time.monotonic()

    def flush():
        nonlocal pending, last_flush
        if pending:
            parts.mkdir(exist_ok=True)
            name = parts / f"part-{time.time_ns()}-{os.getpid()}.parquet"
            tmp = name.with_suffix(".tmp")
            pd.DataFrame(pending).to_parquet(tmp, index=False)
            tmp.replace(name)
            pending = []
        last_flush = time.monotonic()

    try:
        for row in _iter_results(todo, executor, workers, dask, fallback_local):
            pending.append(row)
            done += 1
            if progress is not None:
                progress(done, total)
            if time.monotonic() - last_flush > FLUSH_EVERY_S:
                flush()
    finally:
        flush()
    rows = finished_rows(study)
    if len(rows):
        order = {i: n for n, i in enumerate(ids)}
        rows = rows[rows["config_id"].isin(order)]
        rows = rows.assign(_order=rows["config_id"].map(order)).sort_values("_order").drop(columns="_order")
        rows = rows.reset_index(drop=True)
        tmp = study.results_path.with_suffix(".parquet.tmp")
        rows.to_parquet(tmp, index=False)
        tmp.replace(study.results_path)
        if parts.is_dir():
            for p in parts.glob("*.parquet"):
                p.unlink()
            parts.rmdir()
    return rows
