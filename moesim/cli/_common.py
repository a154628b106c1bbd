"""Helpers shared by CLI commands (app layer: I/O and progress bars live here, not in the core)."""

from __future__ import annotations

import sys
from contextlib import contextmanager


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
