"""Size-checked file reads: a file is measured before it is read whole, so a huge or wrong file is a one-line
ValueError naming it, never a memory blow-up or a traceback.

``checked_size`` refuses a missing file or one over a byte limit; ``read_text_bounded`` does that and returns
the UTF-8 text. ``what`` names the file's role in the messages (``"collective fit"``); ``error`` is the
ValueError subclass a caller raises (``ConfigError``); ``hint`` ends the message (what to do instead).
"""

from __future__ import annotations

from pathlib import Path


def checked_size(path: str | Path, max_bytes: int, what: str, *, error: type[ValueError] = ValueError,
                 hint: str = "") -> int:
    """The size of ``path`` in bytes; ``error`` naming the file when it does not exist or is over ``max_bytes``."""
    path = Path(path)
    tail = f" ({hint})" if hint else ""
    if not path.is_file():
        raise error(f"{path}: {what} does not exist{tail}")
    size = path.stat().st_size
    if size > max_bytes:
        raise error(f"{path}: {size} bytes is over the {max_bytes} byte limit for a {what}{tail}")
    return size


def read_text_bounded(path: str | Path, max_bytes: int, what: str, *, error: type[ValueError] = ValueError,
                      hint: str = "") -> str:
    """The UTF-8 text of ``path`` after :func:`checked_size`; ``error`` naming the file when it is not UTF-8."""
    checked_size(path, max_bytes, what, error=error, hint=hint)
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: {what} is not UTF-8 text ({exc})") from None
