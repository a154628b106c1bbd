"""Messages for unknown names with a "did you mean" (``sn40l`` -> ``sn40l-node``)."""

from __future__ import annotations

import difflib
from typing import Iterable


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to ``name`` (a prefix match first, then difflib), or None."""
    known = sorted(known)
    prefixed = [k for k in known if k.lower().startswith(name.lower())] if name else []
    if len(prefixed) == 1:
        return prefixed[0]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_name(kind: str, name: str, known: Iterable[str]) -> str:
    """``unknown system 'sn40l'; did you mean 'sn40l-node'? known: a, b, c``."""
    known = sorted(known)
    guess = closest(name, known)
    hint = f"; did you mean {guess!r}?" if guess else ";"
    return f"unknown {kind} {name!r}{hint} known: {', '.join(known)}"
