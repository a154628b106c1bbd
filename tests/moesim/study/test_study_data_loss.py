"""Studies lose no result: an edited study.toml, a failing configuration in a process pool, a damaged
part file, two runs on one folder (issue 11, data loss)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

import pandas as pd
import pytest

from moesim.cli import main as cli_main
from moesim.study import store
from moesim.study.runner import finished_rows, run_study
from moesim.study.spec import load_study

GRID4 = "[base]\ntokens = 256\n[grid]\nnodes = [1, 2]\nmicro_batches = [1, 2]\n"
GRID2 = "[base]\ntokens = 256\n[grid]\nnodes = [1]\nmicro_batches = [1, 2]\n"


def make(tmp_path, text, name="s"):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    (d / "study.toml").write_text(text)
    return d


def test_rows_that_leave_the_grid_are_kept_until_prune(tmp_path, capsys):
    d = make(tmp_path, GRID4)
    first = run_study(load_study(d), executor="serial")
    assert len(first) == 4 and (first["status"] == "ok").all()
    wall = first.set_index("config_id")["eval_wall_s"]
    make(tmp_path, GRID2)  # the user edits study.toml: the nodes = 2 configurations leave the grid
    assert cli_main(["study", "run", str(d), "--serial"]) == 0
    out = capsys.readouterr().out
    assert "kept 2 rows of configurations no longer in study.toml" in out and "--prune deletes them" in out
    now = pd.read_parquet(d / "results.parquet")
    retired = pd.read_parquet(d / store.RETIRED_NAME)
    assert sorted(now["nodes"]) == [1, 1] and sorted(retired["nodes"]) == [2, 2]
    assert set(now["config_id"]) | set(retired["config_id"]) == set(wall.index)  # no row lost
    # the configurations come back: their rows return without being recomputed (same wall time)
    make(tmp_path, GRID4)
    back = run_study(load_study(d), executor="serial")
    assert len(back) == 4 and not (d / store.RETIRED_NAME).exists()
    assert (back.set_index("config_id")["eval_wall_s"] == wall).all()
    # --prune is the one way to delete them
    make(tmp_path, GRID2)
    assert cli_main(["study", "run", str(d), "--serial", "--prune"]) == 0
    assert "deleted 2 rows of configurations no longer in study.toml (--prune)" in capsys.readouterr().out
    assert not (d / store.RETIRED_NAME).exists() and len(finished_rows(load_study(d))) == 2


def test_a_failing_configuration_in_a_pool_keeps_the_others(tmp_path, capsys):
    d = make(tmp_path, "[base]\ntokens = 256\n[grid]\nnodes = [1, 2]\ncache_policy = ['lru', 'fifo']\n")
    assert cli_main(["study", "run", str(d), "--workers", "2"]) == 1
    cap = capsys.readouterr()
    assert "2 of 4 configurations done, 2 failed" in cap.out
    assert "error: 2 configurations failed (first: nodes=1, cache_policy=fifo: ValueError: cache_policy 'fifo' is " \
           "unknown" in cap.err and "Traceback" not in cap.err
    rows = pd.read_parquet(d / "results.parquet")
    assert len(rows) == 4
    ok, bad = rows[rows["status"] == "ok"], rows[rows["status"] == "failed"]
    assert (ok["cache_policy"] == "lru").all() and (ok["throughput_tokens_per_s"] > 0).all() and len(ok) == 2
    assert (bad["cache_policy"] == "fifo").all() and bad["error"].str.contains("cache_policy 'fifo' is unknown").all()
    assert bad["throughput_tokens_per_s"].isna().all()
    assert (ok["error"] == "").all()
    # the report shows the finished configurations only
    assert cli_main(["study", "report", str(d)]) == 0
    # fixing study.toml retries the failed ones; the finished ones are not recomputed
    wall = ok.set_index("config_id")["eval_wall_s"]
    make(tmp_path, "[base]\ntokens = 256\n[grid]\nnodes = [1, 2]\ncache_policy = ['lru', 'lfu']\n")
    rows = run_study(load_study(d), executor="process", workers=2)
    assert (rows["status"] == "ok").all() and len(rows) == 4
    assert (rows.set_index("config_id").loc[wall.index, "eval_wall_s"] == wall).all()
    assert sorted(pd.read_parquet(d / store.RETIRED_NAME)["cache_policy"]) == ["fifo", "fifo"]  # failed rows kept too


def _die_on_two_nodes(task):
    from moesim.study.runner import evaluate

    if task[0]["nodes"] == 2:
        os._exit(9)  # the worker process vanishes (as if killed by the OOM killer)
    return {**evaluate(*task), "status": "ok", "error": ""}


def test_a_worker_process_that_dies_is_a_failed_row(tmp_path, monkeypatch):
    from moesim.study import runner

    real = runner._evaluate_task
    monkeypatch.setattr(runner, "_evaluate_task", _die_on_two_nodes)
    d = make(tmp_path, GRID4)
    rows = run_study(load_study(d), executor="process", workers=2)
    assert len(rows) == 4 and (rows["status"] == "failed").any()
    assert rows.loc[rows["status"] == "failed", "error"].str.startswith("BrokenProcessPool").all()
    monkeypatch.setattr(runner, "_evaluate_task", real)
    assert (run_study(load_study(d), executor="process", workers=2)["status"] == "ok").all()


@pytest.mark.parametrize("damage", ["empty", "truncated", "foreign"])
def test_damaged_part_file_is_set_aside_and_recomputed(tmp_path, damage, capsys):
    d = make(tmp_path, GRID4)
    study = load_study(d)
    run_study(study, executor="serial", limit=1)
    good = pd.read_parquet(d / "results.parquet")
    parts = d / store.PARTS_NAME
    parts.mkdir()
    bad = parts / "part-1-1.parquet"  # the only copy of that row, damaged (a crash, a full disk)
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "truncated":
        bad.write_bytes((d / "results.parquet").read_bytes()[:200])
    else:
        pd.DataFrame({"x": [1]}).to_parquet(bad)
    (d / "results.parquet").unlink()
    assert cli_main(["study", "run", str(d), "--serial"]) == 0
    err = capsys.readouterr().err
    assert f"{bad}: unreadable" in err and "moved to part-1-1.parquet.corrupt" in err
    assert (parts / "part-1-1.parquet.corrupt").exists() and not bad.exists()
    rows = pd.read_parquet(d / "results.parquet")
    assert len(rows) == 4 and (rows["status"] == "ok").all()
    assert good["config_id"][0] in set(rows["config_id"])


def test_second_run_on_a_folder_refuses_or_waits(tmp_path, capsys):
    d = make(tmp_path, GRID2)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(d / store.LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode())\n"
        "print('locked', flush=True); sys.stdin.readline()\n"
        f"os.unlink({str(d / store.LOCK_NAME)!r})\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli_main(["study", "run", str(d), "--serial"]) == 2
        err = capsys.readouterr().err
        assert err.strip() == (f"moesim study: error: {d}: another 'moesim study run' (pid {holder.pid}) is working on "
                               f"this study; wait for it to finish or pass --wait")
        assert not (d / "results.parquet").exists()
        with pytest.raises(ValueError, match="another 'moesim study run'"):
            run_study(load_study(d), executor="serial")
        notes = []
        holder.stdin.write("go\n")  # the holder finishes a moment later; --wait waits for it
        holder.stdin.flush()
        rows = run_study(load_study(d), executor="serial", wait=True, note=notes.append)
        assert len(rows) == 2 and (rows["status"] == "ok").all()
    finally:
        holder.kill()
        holder.wait()
    assert not (d / store.LOCK_NAME).exists()  # released and removed


def test_lock_is_exclusive_between_processes(tmp_path):
    """flock excludes a second holder; two real `study run --wait` processes on one folder both succeed."""
    d = make(tmp_path, GRID4)
    lock = store.StudyLock(d)
    with lock:
        fd = os.open(d / store.LOCK_NAME, os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "moesim", "study", "run", str(d), "--serial", "--wait"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    rows = pd.read_parquet(d / "results.parquet")
    assert len(rows) == 4 and (rows["status"] == "ok").all() and rows["config_id"].is_unique
    assert sum("4 of 4 configurations done" in o for o, _ in outs) == 2


def test_damaged_results_file_is_set_aside_and_recomputed(tmp_path, capsys):
    d = make(tmp_path, GRID2)
    first = run_study(load_study(d), executor="serial")
    data = (d / "results.parquet").read_bytes()
    (d / "results.parquet").write_bytes(data[: len(data) // 2])  # cut short (a copy interrupted, a bad disk)
    assert cli_main(["study", "run", str(d), "--serial"]) == 0
    assert "results.parquet: unreadable" in capsys.readouterr().err
    assert (d / "results.parquet.corrupt").read_bytes() == data[: len(data) // 2]  # kept for inspection
    rows = pd.read_parquet(d / "results.parquet")
    assert list(rows["config_id"]) == list(first["config_id"]) and (rows["status"] == "ok").all()
