"""The one place where human units (GB, GiB, TFLOPS, us, ...) meet the code.

Inside moesim every quantity is held in base units and its name carries the unit:
``_bytes``, ``_s``, ``_flops``, ``_flops_per_s``, ``_bytes_per_s``, ``_at_s`` (an instant).
Human units appear only when parsing specs (:func:`parse_quantity`) and when labelling
plots (:func:`format_quantity`). Decimal prefixes are decimal (GB = 1e9) and binary
prefixes are binary (GiB = 2**30); FLOP/s prefixes are always decimal.
"""

from __future__ import annotations

import math
import re

KB = 10**3
MB = 10**6
GB = 10**9
TB = 10**12
KiB = 2**10
MiB = 2**20
GiB = 2**30
TiB = 2**40

GFLOPS = 1e9
TFLOPS = 1e12
PFLOPS = 1e15

NS = 1e-9
US = 1e-6
MS = 1e-3

#: bytes per element of each compute / activation / weight dtype
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
#: the dtype weights and activations are held in when a caller names none (simulate, studies, memory)
DEFAULT_DTYPE = "bf16"

_BYTES = {"B": 1, "KB": KB, "MB": MB, "GB": GB, "TB": TB, "KiB": KiB, "MiB": MiB, "GiB": GiB, "TiB": TiB}
_BITS = {"b": 1 / 8, "Kb": KB / 8, "Mb": MB / 8, "Gb": GB / 8, "Tb": TB / 8}
_TIME = {"s": 1.0, "ms": MS, "us": US, "µs": US, "ns": NS}
_FLOPS = {"FLOPS": 1.0, "GFLOPS": GFLOPS, "TFLOPS": TFLOPS, "PFLOPS": PFLOPS}

# suffix of a key name -> {unit text -> factor to the base unit}
_DIMENSIONS: dict[str, dict[str, float]] = {
    "_bytes_per_s": {**{f"{u}/s": f for u, f in _BYTES.items()}, **{f"{u}/s": f for u, f in _BITS.items()},
                     **{f"{u}ps": f for u, f in _BITS.items()}},
    "_flops_per_s": _FLOPS,
    "_bytes": _BYTES,
    "_at_s": _TIME,
    "_s": _TIME,
    "_flops": {"FLOP": 1.0, "GFLOP": GFLOPS, "TFLOP": TFLOPS, "PFLOP": PFLOPS},
    "_w": {"W": 1.0, "kW": 1e3},
    "_usd": {"USD": 1.0, "$": 1.0},
    "_per_hour_usd": {"USD/h": 1.0, "$/h": 1.0},
}

_NUMBER_UNIT = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([^\s\d].*)?\s*$")


def unit_suffix(key: str) -> str | None:
    """The unit suffix a key name ends with (longest match), or None."""
    for suffix in sorted(_DIMENSIONS, key=len, reverse=True):
        if key.endswith(suffix):
            return suffix
    return None


def parse_quantity(key: str, value: object) -> float:
    """Convert ``value`` to the base unit named by ``key``'s suffix.

    ``value`` may be a plain number (already in the base unit) or a string such as
    ``"3.35 TB/s"``, ``"80 GiB"``, ``"400 Gb/s"``, ``"989 TFLOPS"`` or ``"5 us"``.
    Raises ValueError when the unit does not fit the key's dimension.
    """
    if isinstance(value, bool):
        raise ValueError(f"{key}: expected a quantity, got a boolean")
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected a number or a string with a unit, got {type(value).__name__}")
    match = _NUMBER_UNIT.match(value)
    if not match:
        raise ValueError(f"{key}: cannot read quantity {value!r}")
    number = float(match.group(1))
    unit = (match.group(2) or "").strip()
    if not unit:
        return number
    suffix = unit_suffix(key)
    if suffix is None:
        raise ValueError(f"{key}: the key has no unit suffix, so {value!r} cannot carry a unit")
    table = _DIMENSIONS[suffix]
    if unit not in table:
        raise ValueError(f"{key}: unit {unit!r} does not fit a '{suffix}' quantity (use one of {sorted(table)})")
    return number * table[unit]


def format_quantity(value: float, kind: str) -> str:
    """A label for plots and tables: kind is 'bytes', 'bytes_per_s', 'flops_per_s' or 's'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if kind == "bytes":
        steps = [(TB, "TB"), (GB, "GB"), (MB, "MB"), (KB, "KB"), (1, "B")]
    elif kind == "bytes_per_s":
        steps = [(TB, "TB/s"), (GB, "GB/s"), (MB, "MB/s"), (KB, "KB/s"), (1, "B/s")]
    elif kind == "flops_per_s":
        steps = [(PFLOPS, "PFLOP/s"), (TFLOPS, "TFLOP/s"), (GFLOPS, "GFLOP/s"), (1, "FLOP/s")]
    elif kind == "s":
        steps = [(1.0, "s"), (MS, "ms"), (US, "us"), (NS, "ns")]
    else:
        raise ValueError(f"unknown quantity kind {kind!r}")
    for factor, label in steps:
        if abs(value) >= factor:
            return f"{value / factor:.3g} {label}"
    factor, label = steps[-1]
    return f"{value / factor:.3g} {label}"


def to_us(seconds: float) -> float:
    """Seconds to microseconds (Chrome trace JSON counts in microseconds)."""
    return seconds / US
