"""Size checks before large allocations: a tiny input (``num_experts = 10**9``, one token id of
10**12, a spec with 100,000 nodes) must be refused with the size it would need, not run the
machine out of memory.

The budget is ``MAX_ARRAY_BYTES`` (8 GiB), or ``$MOESIM_MAX_ARRAY_BYTES`` where a user has a
bigger machine.
"""

from __future__ import annotations

import math
import os

from moebase.units import GB, GiB

MAX_ARRAY_BYTES = 8 * GiB


class TooLargeError(ValueError):
    """An allocation the input asks for is over the budget."""


def max_array_bytes() -> int:
    """The per-array budget: $MOESIM_MAX_ARRAY_BYTES if set (an integer), else MAX_ARRAY_BYTES."""
    raw = os.environ.get("MOESIM_MAX_ARRAY_BYTES")
    if not raw:
        return MAX_ARRAY_BYTES
    try:
        return int(float(raw))
    except ValueError:
        raise TooLargeError(f"$MOESIM_MAX_ARRAY_BYTES must be a number of bytes, got {raw!r}") from None


def check_alloc(what: str, shape: tuple[int, ...], itemsize: int, *, hint: str = "") -> int:
    """Raise TooLargeError naming ``what`` and the bytes it would need when an array of ``shape`` and
    ``itemsize`` exceeds the budget; return the bytes otherwise. Python ints: no overflow."""
    count = math.prod(int(s) for s in shape)
    need = count * int(itemsize)
    limit = max_array_bytes()
    if need > limit:
        dims = " x ".join(f"{int(s):,}" for s in shape)
        raise TooLargeError(f"{what} would need an array of {dims} = {need / GB:,.1f} GB (limit "
                            f"{limit / GB:,.1f} GB, $MOESIM_MAX_ARRAY_BYTES){'; ' + hint if hint else ''}")
    return need
