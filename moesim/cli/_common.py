"""Helpers shared by CLI commands (app layer: I/O and progress bars live here, not in the core).

``int_in``/``float_in`` are argparse ``type=`` functions with a range, so a bad number is one line
(``argument --nodes: must be in [1, 4096], got 0``); ``check_writable`` checks an output path
before the work starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def progress_bar(desc: str, total: int | None = None, unit: str = "it"):
    """A tqdm bar that appears only when the work lasts over a second; yields ``update(done, total)``."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, delay=1.0, file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(done: int, total_now: int | None = None) -> None:
        if total_now is not None and bar.total != total_now:
            bar.total = total_now
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def _number_in(convert, lo, hi, what: str, open_lo: bool = False, open_hi: bool = False):
    """An argparse ``type=`` converting with ``convert`` that refuses values outside the range."""

    def parse(text: str):
        try:
            value = convert(text)
        except (TypeError, ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        below = lo is not None and (value <= lo if open_lo else value < lo)
        above = hi is not None and (value >= hi if open_hi else value > hi)
        if below or above:
            left = "(" if open_lo else "["
            right = ")" if open_hi else "]"
            span = f"{left}{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}{right}"
            raise argparse.ArgumentTypeError(f"must be in {span}, got {text}")
        return value

    parse.__name__ = what
    return parse


def int_in(lo: int | None = None, hi: int | None = None):
    """argparse type: an integer in [lo, hi] (None: unbounded), e.g. ``type=int_in(1, 4096)``."""
    return _number_in(lambda t: int(t, 10), lo, hi, "an integer")


def float_in(lo: float | None = None, hi: float | None = None, *, open_lo: bool = False, open_hi: bool = False):
    """argparse type: a finite float in [lo, hi]; ``open_lo``/``open_hi`` exclude the bound."""
    return _number_in(float, lo, hi, "a number", open_lo, open_hi)


def check_writable(path: str | Path, *, flag: str = "--out", directory: bool = False) -> Path:
    """Raise ValueError (naming ``flag``) unless ``path`` can be written: as a file (``directory``
    False: not an existing directory) or as a directory (not an existing file). The nearest existing
    folder is probed by creating and removing a temporary file, so read-only mounts are caught too
    (``os.access`` says yes to root). Call it before the work, not after."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a directory")
    if not directory and path.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; give a file path")
    probe = path if directory and path.is_dir() else path.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{flag} {path}: {probe} is a file, not a directory")
    try:
        fd, name = tempfile.mkstemp(prefix=".moesim-write-check-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot write in {probe} ({exc.strerror or exc})") from None
    return path


def floats_in(lo: float, hi: float, *, open_lo: bool = False):
    """argparse type for a comma-separated list of numbers, each finite and in [lo, hi] (``open_lo``:
    above lo). Returns the text unchanged (commands parse it later), so defaults stay strings."""
    one = float_in(lo, hi, open_lo=open_lo)

    def parse(text: str) -> str:
        for part in (p for p in text.split(",") if p.strip()):
            try:
                one(part.strip())
            except argparse.ArgumentTypeError as exc:
                raise argparse.ArgumentTypeError(f"{part.strip()!r} in {text!r}: {exc}") from None
        return text

    parse.__name__ = "a comma-separated list of numbers"
    return parse


def load_model_config(spec: str, prog: str):
    """The model config ``spec`` (``workloads.hf_config.load_config``), each warning it raises printed as one
    line ``<prog>: warning: ...`` instead of a Python warning."""
    import warnings

    from workloads.hf_config import ConfigWarning, load_config

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        cfg = load_config(spec)
    for w in caught:
        print(f"{prog}: warning: {w.message}")
    return cfg


def load_system_nodes(name: str, nodes: int | None):
    """The system spec ``name``, scaled to ``nodes`` nodes when given (``--nodes``; None or 0: as specified)."""
    from hwmodels.specs import load_system

    system = load_system(name)
    return system.with_nodes(nodes) if nodes else system


def add_model_system_flags(p) -> None:
    """``--model`` (a whole-model config), ``--system`` and ``--nodes``: the flags ``train`` and ``serve`` share;
    read them with :func:`load_model_config` and :func:`load_system_nodes`."""
    p.add_argument("--model", required=True, help="shipped config name (workloads/configs) or a config.json path")
    p.add_argument("--system", default="dgx-h100", help="system spec name or a .toml path")
    p.add_argument("--nodes", type=int_in(1, 4096), default=None, help="scale the system to this many nodes")
