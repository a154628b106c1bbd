"""Studies on Dask: connect with a bound on every remote step, and collect results without hanging.

- Connecting: ``tcp://`` addresses are first probed with a plain socket: the scheduler must send its
  handshake (a Dask message of a few dozen bytes) within ``timeout_s``. A port that accepts and never
  answers, or a service that is not Dask (whose first bytes would announce a message of exabytes), is
  a ValueError naming the address, before ``distributed`` reads from it. The client is then created
  with the same timeout, and creating it is abandoned after ``2 * timeout_s`` whatever happens.
- Collecting: results are fetched with ``timeout_s`` each; the run stops with a ValueError (finished
  rows are kept by the caller) when the scheduler is lost for ``timeout_s`` or the cluster has had
  no worker for ``NO_WORKER_FACTOR * timeout_s``. A configuration whose workers keep dying
  (``KilledWorker``) is a failed row; a worker killed once only moves its tasks to the others.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
import warnings
from concurrent.futures import CancelledError
from typing import Callable, Iterable
from urllib.parse import urlsplit

from moebase.units import KiB

#: seconds for each remote step (connect, handshake, fetching one result)
DEFAULT_TIMEOUT_S = 10.0
#: the scheduler's handshake is a small message; a first length beyond this is not Dask
MAX_HANDSHAKE_BYTES = 64 * KiB
NO_WORKER_FACTOR = 6
POLL_S = 0.2


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the connection was closed")
        buf += chunk
    return bytes(buf)


def probe_scheduler(address: str, timeout_s: float) -> None:
    """Check that a Dask scheduler answers at ``tcp://host:port``: read its handshake (8-byte length,
    then that many bytes of Dask frames) with ``timeout_s`` per step. OSError/TimeoutError when
    nothing answers; ValueError when what answers is not Dask."""
    from distributed.protocol import loads
    from distributed.protocol.utils import unpack_frames

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"Dask scheduler address {address!r} must be 'tcp://host:port'")
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s) as sock:
        sock.settimeout(timeout_s)
        try:
            (n,) = struct.unpack("<Q", _recv_exact(sock, 8))
        except TimeoutError:
            raise TimeoutError(f"the port accepts connections but sent no Dask handshake within {timeout_s:g} s") \
                from None
        if not 0 < n <= MAX_HANDSHAKE_BYTES:
            raise ValueError(f"{address} is not a Dask scheduler (its first message would be {n} bytes; "
                             f"a scheduler's handshake is under {MAX_HANDSHAKE_BYTES // KiB} KiB)")
        try:
            msg = loads(unpack_frames(_recv_exact(sock, n)))
        except (TimeoutError, ConnectionError):
            raise
        except Exception as exc:  # noqa: BLE001 -- anything undecodable means: not Dask
            raise ValueError(f"{address} is not a Dask scheduler (undecodable handshake: {type(exc).__name__})") \
                from None
        if not isinstance(msg, dict) or "python" not in msg:
            raise ValueError(f"{address} is not a Dask scheduler (unexpected handshake {str(msg)[:80]!r})")


def _client_within(address: str, timeout_s: float):
    """``distributed.Client(address)``, abandoned with a TimeoutError after ``2 * timeout_s``."""
    from distributed import Client

    box: dict = {}

    def make() -> None:
        try:
            box["client"] = Client(address, timeout=timeout_s, set_as_default=False)
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller's thread
            box["error"] = exc

    t = threading.Thread(target=make, daemon=True, name="moesim-dask-connect")
    t.start()
    t.join(2 * timeout_s)
    if t.is_alive():
        raise TimeoutError(f"the Dask client did not connect within {2 * timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["client"]


def connect_dask(address: str, workers: int, fallback_local: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S):
    """A ``distributed.Client``: ``local`` starts a LocalCluster of ``workers`` single-threaded workers
    (threads, not processes); otherwise connect to ``address`` (probed first, see the module docstring).
    A scheduler that cannot be used is a ValueError, unless ``fallback_local`` (then a LocalCluster is
    started instead, with a warning)."""
    from distributed import Client, LocalCluster

    if address == "local":
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=False, dashboard_address=None)
        return Client(cluster, set_as_default=False)
    try:
        if urlsplit(address if "://" in address else f"tcp://{address}").scheme == "tcp":
            probe_scheduler(address, timeout_s)
        return _client_within(address, timeout_s)
    except (OSError, TimeoutError, ValueError) as exc:
        if fallback_local:
            warnings.warn(f"Dask scheduler {address} unreachable ({type(exc).__name__}: {exc}); running on a local "
                          f"cluster instead")
            return connect_dask("local", workers)
        if isinstance(exc, ValueError):
            raise ValueError(f"{exc}; check the address, use '--dask local', or add '--fallback-local' to run "
                             f"locally") from None
        detail = str(exc) or f"no answer within {timeout_s:g} s"
        raise ValueError(f"cannot reach the Dask scheduler at {address!r} ({type(exc).__name__}: {detail}); start it "
                         f"('dask scheduler'), use '--dask local', or add '--fallback-local' to run locally") from None


def _check_health(client, address: str, since: dict, timeout_s: float, left: int) -> None:
    """Raise ValueError when the scheduler is lost for ``timeout_s`` or no worker is there for long."""
    now = time.monotonic()
    if client.status != "running":
        since.setdefault("lost", now)
        if now - since["lost"] > timeout_s:
            raise ValueError(f"lost the Dask scheduler at {address} for over {timeout_s:g} s; {left} configurations "
                             f"not done (finished rows are kept: run again to resume)")
        return
    since.pop("lost", None)
    if client.scheduler_info().get("workers"):
        since.pop("no_workers", None)
        return
    since.setdefault("no_workers", now)
    if now - since["no_workers"] > NO_WORKER_FACTOR * timeout_s:
        raise ValueError(f"the Dask scheduler at {address} has had no workers for {NO_WORKER_FACTOR * timeout_s:g} s; "
                         f"{left} configurations not done (finished rows are kept: start workers and run again)")


def iter_dask(fn: Callable, todo: list, failed_row: Callable[[tuple, str], dict], address: str, workers: int,
              fallback_local: bool, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterable[dict]:
    """Rows of ``fn(task)`` for every task of ``todo`` on Dask, in completion order."""
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    client = connect_dask(address, workers, fallback_local, timeout_s)
    try:
        futures = client.map(fn, todo, pure=False)
        task_of = {f.key: t for f, t in zip(futures, todo)}
        queue, left, since = as_completed(futures, loop=client.loop), len(futures), {}
        while left:
            batch = queue.next_batch(block=False)
            if not batch:
                _check_health(client, address, since, timeout_s, left)
                time.sleep(POLL_S)
                continue
            for f in batch:
                left -= 1
                try:
                    row = f.result(timeout=timeout_s)
                except KilledWorker as exc:
                    row = failed_row(task_of[f.key], f"KilledWorker: Dask workers died running it ({exc})")
                except CancelledError:  # the client cancels every future when it loses the scheduler
                    raise ValueError(f"lost the Dask scheduler at {address} (the client cancelled its tasks); "
                                     f"{left + 1} configurations not done (finished rows are kept: run again to "
                                     f"resume)") from None
                except OSError as exc:  # TimeoutError (after timeout_s), CommClosedError (a peer went away)
                    raise ValueError(f"Dask cluster at {address}: a finished result could not be fetched "
                                     f"({type(exc).__name__}: {exc}; bound {timeout_s:g} s); {left + 1} configurations "
                                     f"not done (finished rows are kept: run again to resume)") from None
                finally:
                    f.release()
                yield row
    finally:
        cluster = getattr(client, "cluster", None)
        client.close(timeout=timeout_s)
        if cluster is not None:
            cluster.close()
