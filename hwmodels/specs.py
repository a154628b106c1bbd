"""Hardware specs: frozen dataclasses loaded from TOML files with a source on every number.

A quantity in a spec file is written as an inline table with a unit in its key name::

    hbm_bandwidth_bytes_per_s = { value = "3.35 TB/s", source = "NVIDIA H100 datasheet" }

``value`` is a number in the key's base unit or a string with a unit (see
:mod:`moebase.units`). A missing source, an unknown key or a negative quantity raises
``ValueError`` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moebase.units import GFLOPS, KB, PFLOPS, TB, parse_quantity, unit_suffix

SPEC_DIR = Path(__file__).parent / "specs"
#: plausible ranges (base units) by key suffix: a typo like 1e-300 bytes/s would make every transfer take
#: forever ("inf us"), 1e30 FLOP/s would make compute free
PLAUSIBLE = {"_bytes_per_s": (1 * KB, 10_000 * TB), "_flops_per_s": (GFLOPS, 1e6 * PFLOPS), "latency_s": (0.0, 1.0)}
#: published kernel figures (DeepGEMM, DeepEP) that ``moesim validate --published`` compares the roofline with
PUBLISHED_KERNELS_PATH = Path(__file__).parent / "published" / "kernels.toml"


@dataclass(frozen=True)
class Quantity:
    """A number in its base unit with where it came from."""

    value: float
    source: str


@dataclass(frozen=True)
class MemoryTier:
    """One level of a device's memory (e.g. SRAM, HBM, DDR)."""

    name: str
    capacity_bytes: float
    bandwidth_bytes_per_s: float
    latency_s: float
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Device:
    """An accelerator: compute peaks per dtype and its memory tiers, fastest first."""

    name: str
    kind: str  # "gpu" | "rdu" | "cpu"
    peak_flops_per_s: dict[str, float]  # dtype -> FLOP/s (dense)
    launch_latency_s: float
    memory: tuple[MemoryTier, ...]
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    gpu_fit: str | None = None  # stem of a fitted-parameter file in hwmodels/gpu_fits/ (hwmodels.gpu_cost)

    def tier(self, name: str) -> MemoryTier:
        for t in self.memory:
            if t.name == name:
                return t
        raise KeyError(f"device {self.name!r} has no memory tier {name!r} (has {[t.name for t in self.memory]})")

    @property
    def main_memory(self) -> MemoryTier:
        """The tier that holds weights in normal operation: HBM if present, else the first tier."""
        for t in self.memory:
            if t.name == "hbm":
                return t
        return self.memory[0]

    def peak(self, dtype: str) -> float:
        try:
            return self.peak_flops_per_s[dtype]
        except KeyError:
            raise KeyError(f"device {self.name!r} has no peak for dtype {dtype!r} (has {sorted(self.peak_flops_per_s)})") from None


@dataclass(frozen=True)
class Link:
    """A point-to-point link class: bandwidth per direction and one-way latency."""

    kind: str  # "nvlink" | "infiniband" | "pcie" | "rdu-peer" | ...
    bandwidth_bytes_per_s: float
    latency_s: float
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class System:
    """A machine: ``num_nodes`` nodes of ``devices_per_node`` identical devices.

    ``scale_up`` connects devices inside a node through a switch (NVLink/NVSwitch, RDU
    peer links); ``scale_out`` connects each device's NIC to the inter-node network;
    ``host_link`` connects each device to its host (PCIe).
    """

    name: str
    device: Device
    num_nodes: int
    devices_per_node: int
    scale_up: Link
    scale_out: Link | None
    host_link: Link
    host_memory: MemoryTier
    price_per_hour_usd: float | None = None
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def num_devices(self) -> int:
        return self.num_nodes * self.devices_per_node

    def node_of(self, device_index: int) -> int:
        return device_index // self.devices_per_node

    def with_nodes(self, num_nodes: int) -> "System":
        """The same machine scaled to ``num_nodes`` nodes (needs a scale-out link when > 1)."""
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        if num_nodes > 1 and self.scale_out is None:
            raise ValueError(f"system {self.name!r} has no scale_out link, so it cannot span {num_nodes} nodes")
        name = self.name if num_nodes == self.num_nodes else f"{self.name}x{num_nodes}"
        return dataclasses.replace(self, name=name, num_nodes=num_nodes)


# ----------------------------------------------------------------------------- loading


class _Reader:
    """Reads one TOML table, tracking which keys were used so unknown ones are errors."""

    def __init__(self, path: Path, table: dict[str, Any], where: str):
        self.path, self.table, self.where = path, table, where
        self.used: set[str] = set()
        self.sources: dict[str, str] = {}

    def _err(self, key: str, msg: str) -> ValueError:
        return ValueError(f"{self.path}: key '{self.where}{key}': {msg}")

    def _present(self, key: str, absent_ok: bool, what: str = "missing") -> bool:
        """Mark ``key`` used; True when the table has it, False when it is absent and that is allowed."""
        self.used.add(key)
        if key in self.table:
            return True
        if absent_ok:
            return False
        raise self._err(key, what)

    def text(self, key: str, default: str | None = None) -> str:
        if not self._present(key, default is not None):
            return default
        value = self.table[key]
        if not isinstance(value, str):
            raise self._err(key, f"expected a string, got {type(value).__name__}")
        return value

    def integer(self, key: str, default: int | None = None) -> int:
        if not self._present(key, default is not None):
            return default
        value = self.table[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self._err(key, f"expected a positive integer, got {value!r}")
        return value

    def quantity(self, key: str, *, optional: bool = False, positive: bool = False) -> float | None:
        if not self._present(key, optional):
            return None
        if unit_suffix(key) is None:
            raise self._err(key, "a quantity's key must end in a unit suffix such as _bytes, _s, _bytes_per_s, _flops_per_s")
        raw = self.table[key]
        if not isinstance(raw, dict):
            raise self._err(key, 'write it as { value = ..., source = "..." }: every number needs a source')
        extra = set(raw) - {"value", "source", "note"}
        if extra:
            raise self._err(key, f"unknown field(s) {sorted(extra)} (allowed: value, source, note)")
        if "value" not in raw:
            raise self._err(key, "missing 'value'")
        source = raw.get("source")
        if not isinstance(source, str) or not source.strip():
            raise self._err(key, "missing 'source' (a datasheet, paper or stated assumption)")
        try:
            value = parse_quantity(key, raw["value"])
        except ValueError as exc:
            raise self._err(key, str(exc)) from None
        if value != value or value in (float("inf"), float("-inf")):
            raise self._err(key, f"value must be finite, got {raw['value']!r}")
        if value < 0:
            raise self._err(key, f"negative quantity {raw['value']!r}")
        if positive and value == 0:
            raise self._err(key, f"must be > 0, got {raw['value']!r}")
        for suffix, (lo, hi) in PLAUSIBLE.items():
            if key.endswith(suffix) and value and not lo <= value <= hi:
                raise self._err(key, f"implausible value {raw['value']!r} ({value:g} in base units; plausible: "
                                     f"{lo:g} to {hi:g})")
        self.sources[key] = source
        return value

    def sub(self, key: str, *, optional: bool = False) -> "_Reader | None":
        if not self._present(key, optional, "missing table"):
            return None
        value = self.table[key]
        if not isinstance(value, dict):
            raise self._err(key, "expected a table")
        return _Reader(self.path, value, f"{self.where}{key}.")

    def subs(self, key: str) -> list["_Reader"]:
        self.used.add(key)
        value = self.table.get(key)
        if not isinstance(value, list) or not value:
            raise self._err(key, "expected a non-empty array of tables ([[...]])")
        return [_Reader(self.path, v, f"{self.where}{key}[{i}].") for i, v in enumerate(value)]

    def finish(self) -> dict[str, str]:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self._err(unknown[0], f"unknown key (known here: {sorted(self.used)})")
        return self.sources


def _read_toml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a TOML spec file")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None


def _memory_tier(r: _Reader) -> MemoryTier:
    tier = MemoryTier(
        name=r.text("name"),
        capacity_bytes=r.quantity("capacity_bytes", positive=True),
        bandwidth_bytes_per_s=r.quantity("bandwidth_bytes_per_s", positive=True),
        latency_s=r.quantity("latency_s"),
    )
    return dataclasses.replace(tier, sources=r.finish())


def _link(r: _Reader) -> Link:
    link = Link(
        kind=r.text("kind"),
        bandwidth_bytes_per_s=r.quantity("bandwidth_bytes_per_s", positive=True),
        latency_s=r.quantity("latency_s"),
    )
    return dataclasses.replace(link, sources=r.finish())


def load_device(path: str | Path) -> Device:
    """Load a device spec (a file with a ``[device]`` table and ``[[device.memory]]`` tiers)."""
    path = Path(path)
    top = _Reader(path, _read_toml(path), "")
    r = top.sub("device")
    name, kind = r.text("name"), r.text("kind")
    peaks = {}
    for key in list(r.table):
        if key.startswith("peak_") and key.endswith("_flops_per_s"):
            dtype = key[len("peak_"):-len("_flops_per_s")]
            peaks[dtype] = r.quantity(key, positive=True)
    if not peaks:
        raise ValueError(f"{path}: key 'device.peak_<dtype>_flops_per_s': at least one compute peak is required")
    launch = r.quantity("launch_latency_s")
    gpu_fit = r.text("gpu_fit", default="") or None
    tiers = tuple(_memory_tier(t) for t in r.subs("memory"))
    sources = r.finish()
    top.finish()
    return Device(name=name, kind=kind, peak_flops_per_s=peaks, launch_latency_s=launch, memory=tiers, sources=sources,
                  gpu_fit=gpu_fit)


def available_systems(spec_dir: Path = SPEC_DIR) -> list[str]:
    return sorted(p.stem for p in spec_dir.glob("*.toml") if "system" in _read_toml(p))


def available_devices(spec_dir: Path = SPEC_DIR) -> list[str]:
    return sorted(p.stem for p in spec_dir.glob("*.toml") if "device" in _read_toml(p))


def load_system(name_or_path: str | Path, spec_dir: Path = SPEC_DIR) -> System:
    """Load a system by shipped name (``dgx-h100``) or by path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = spec_dir / f"{name_or_path}.toml"
        if not path.exists() or "system" not in _read_toml(path):  # sn40l.toml is a device, not a system
            from moebase.names import unknown_name
            raise ValueError(unknown_name("system", str(name_or_path), available_systems(spec_dir)))
    elif not path.exists():
        raise ValueError(f"system spec file {path} does not exist")
    top = _Reader(path, _read_toml(path), "")
    r = top.sub("system")
    name = r.text("name")
    device_ref = r.text("device")
    device_path = Path(device_ref) if device_ref.endswith(".toml") else spec_dir / f"{device_ref}.toml"
    if not device_path.is_absolute() and device_ref.endswith(".toml"):
        device_path = path.parent / device_path
    if not device_path.exists():
        raise ValueError(f"{path}: key 'system.device': unknown device {device_ref!r}; known devices: {', '.join(available_devices(spec_dir))}")
    device = load_device(device_path)
    num_nodes = r.integer("num_nodes")
    per_node = r.integer("devices_per_node")
    scale_up = _link(r.sub("scale_up"))
    so = r.sub("scale_out", optional=True)
    scale_out = _link(so) if so is not None else None
    host_link = _link(r.sub("host_link"))
    host_memory = _memory_tier(r.sub("host_memory"))
    price = r.quantity("price_per_hour_usd", optional=True)
    sources = r.finish()
    top.finish()
    if num_nodes > 1 and scale_out is None:
        raise ValueError(f"{path}: key 'system.scale_out': required when num_nodes > 1")
    return System(name=name, device=device, num_nodes=num_nodes, devices_per_node=per_node, scale_up=scale_up,
                  scale_out=scale_out, host_link=host_link, host_memory=host_memory, price_per_hour_usd=price,
                  sources=sources)
