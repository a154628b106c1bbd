"""Studies on a real Dask cluster: scheduler and workers started as separate processes (the `dask`
CLIs of this environment) on 127.0.0.1; a worker killed mid-study; a lost scheduler; ports that
accept and never answer, or answer but are not Dask (issue 11, hangs). No wall-clock assertions:
every wait below is a generous bound that only turns a hang into a failure."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("distributed")

from moesim.cli import main as cli_main  # noqa: E402
from moesim.study.runner import finished_rows, run_study  # noqa: E402
from moesim.study.spec import load_study  # noqa: E402

DASK = Path(sys.executable).parent / "dask"
START_S = 120.0  # bound on a process starting on a loaded machine
STUDY = "[study]\nseed = 2\n[base]\ntokens = 256\n[grid]\nnodes = [1, 2]\nmicro_batches = [1, 2, 4]\n" \
        "placement = ['contiguous', 'round-robin']\n"
OUTPUTS = ["config_id", "total_time_s", "throughput_tokens_per_s", "hbm_hit_rate", "drill_device_tokens"]

pytestmark = pytest.mark.skipif(not DASK.exists(), reason=f"no dask CLI at {DASK}")


def _wait_for(what: str, ok, limit_s: float = START_S):
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        value = ok()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _start_scheduler(d: Path) -> tuple[subprocess.Popen, str]:
    file = d / "scheduler.json"
    log = open(d / "scheduler.log", "w")
    proc = subprocess.Popen([str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                             "--scheduler-file", str(file)], stdout=log, stderr=subprocess.STDOUT)
    _wait_for("the scheduler file", lambda: file.exists() and file.stat().st_size > 0)
    return proc, json.loads(file.read_text())["address"]


def _start_worker(d: Path, address: str, name: str) -> subprocess.Popen:
    log = open(d / f"{name}.log", "w")
    return subprocess.Popen([str(DASK), "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--no-nanny",
                             "--no-dashboard", "--name", name, "--death-timeout", "60"],
                            stdout=log, stderr=subprocess.STDOUT)


def _count_workers(address: str) -> int:
    from distributed import Client

    with Client(address, timeout=30, set_as_default=False) as c:
        return len(c.scheduler_info()["workers"])


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("dask")
    sched, address = _start_scheduler(d)
    workers = [_start_worker(d, address, f"w{i}") for i in range(2)]
    try:
        _wait_for("2 workers", lambda: _count_workers(address) >= 2)
        yield d, address
    finally:
        _stop(*workers, sched)


def _study(tmp_path, name="s", text=STUDY):
    d = tmp_path / name
    d.mkdir()
    (d / "study.toml").write_text(text)
    return load_study(d)


def test_real_cluster_rows_equal_serial_and_a_killed_worker_loses_nothing(cluster, tmp_path):
    from distributed import Client

    d, address = cluster
    serial = run_study(_study(tmp_path, "serial"), executor="serial")
    extra = _start_worker(d, address, "doomed")
    try:
        _wait_for("3 workers", lambda: _count_workers(address) >= 3)
        at_kill = []
        with Client(address, timeout=30, set_as_default=False) as watcher:
            doomed = next(a for a, w in watcher.scheduler_info()["workers"].items() if w["name"] == "doomed")

            def progress(done, total):
                # once results come in, kill the extra worker while it is running configurations
                if done >= 1 and not at_kill and len(watcher.processing().get(doomed, ())) > 0:
                    at_kill.append((done, total))
                    os.kill(extra.pid, signal.SIGKILL)

            rows = run_study(_study(tmp_path), executor="dask", dask=address, progress=progress, dask_timeout_s=30)
    finally:
        _stop(extra)
    assert at_kill and at_kill[0][0] < at_kill[0][1], "the worker was not killed mid-study"
    assert extra.returncode == -signal.SIGKILL
    assert len(rows) == 12 and (rows["status"] == "ok").all()
    pd.testing.assert_frame_equal(rows[OUTPUTS], serial[OUTPUTS])


def test_no_workers_or_lost_scheduler_stop_with_one_line_and_keep_rows(tmp_path):
    d = tmp_path / "cluster"
    d.mkdir()
    sched, address = _start_scheduler(d)
    worker = None
    try:
        study = _study(tmp_path)
        with pytest.raises(ValueError, match=f"the Dask scheduler at {address} has had no workers for 6 s; "
                                             f"12 configurations not done"):
            run_study(study, executor="dask", dask=address, dask_timeout_s=1)
        worker = _start_worker(d, address, "w")
        _wait_for("1 worker", lambda: _count_workers(address) >= 1)

        def progress(done, total):
            if done >= 2 and sched.poll() is None:
                sched.kill()
                sched.wait(timeout=60)

        # which one-line error depends on what notices first: the client (lost scheduler) or a result fetch
        with pytest.raises(ValueError, match=f"lost the Dask scheduler at {address}|Dask cluster at {address}: a "
                                             f"finished result could not be fetched"):
            run_study(study, executor="dask", dask=address, progress=progress, dask_timeout_s=3)
    finally:
        _stop(*[p for p in (worker, sched) if p is not None])
    kept = finished_rows(study)
    assert len(kept) >= 2 and (kept["status"] == "ok").all()  # the rows finished before the loss were flushed
    wall = kept.set_index("config_id")["eval_wall_s"]
    rows = run_study(study, executor="serial")
    assert len(rows) == 12 and (rows.set_index("config_id").loc[wall.index, "eval_wall_s"] == wall).all()


class _FakeServer:
    """A TCP port on 127.0.0.1 that accepts and then says nothing, or sends an SSH banner."""

    def __init__(self, banner: bytes | None):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"
        self.banner, self.conns = banner, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            if self.banner:
                c.sendall(self.banner)

    def close(self):
        for c in self.conns:
            c.close()
        self.sock.close()


def _handshake_only() -> bytes:
    """A Dask handshake (as a scheduler sends on accepting), from a server that then says nothing more."""
    import struct

    from distributed.protocol import dumps
    from distributed.protocol.utils import pack_frames

    payload = pack_frames(dumps({"compression": None, "python": list(sys.version_info[:3]), "pickle-protocol": 5}))
    return struct.pack("<Q", len(payload)) + payload


@pytest.mark.parametrize("banner,message", [
    (None, "the port accepts connections but sent no Dask handshake within 1 s"),
    (b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n", "is not a Dask scheduler (its first message would be "),
    (_handshake_only(), "(TimeoutError: no answer within 1 s); start it"),
])
def test_silent_or_foreign_port_is_a_one_line_error(tmp_path, capsys, banner, message):
    server = _FakeServer(banner)
    study = _study(tmp_path)
    try:
        done = {}
        t = threading.Thread(target=lambda: done.update(rc=cli_main(
            ["study", "run", str(study.path), "--dask", server.address, "--dask-timeout", "1"])), daemon=True)
        t.start()
        t.join(START_S)  # a hang fails the test instead of hanging the suite
        assert not t.is_alive(), "study run hung on a port that does not speak Dask"
    finally:
        server.close()
    err = capsys.readouterr().err
    assert done["rc"] == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not study.results_path.exists()
