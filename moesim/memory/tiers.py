"""Memory tiers as simulated SimPy resources, with a processor-sharing (fair) link model.

Contract of a transfer of ``nbytes`` over a :class:`SharedLink` with bandwidth ``B`` and latency ``L``:

- alone on the link it takes exactly ``nbytes / B + L`` seconds (latency first, then the bytes);
- while ``n`` transfers are in their byte phase on one link, each progresses at ``B / n`` bytes/s
  (processor sharing, not a FIFO lock): two equal transfers started together each take
  ``2 * nbytes / B + L``, i.e. twice as long when ``L = 0``.

A :class:`MemoryHierarchy` names the tiers of one device (fastest first, e.g. ``sram``, ``hbm``,
``ddr``) plus the host memory behind the host link (PCIe) as tier ``host``. A transfer between two
tiers runs on one *channel*, the bottleneck of its path:

- device tier <-> device tier: the port of the slower tier (e.g. DDR->HBM and DDR->SRAM both use the
  ``ddr`` port, so concurrent reads of DDR share its bandwidth); latency = sum of both tiers' latencies;
- host <-> device tier: the ``host_link`` channel (bandwidth min(host link, host memory, tier));
  latency = host-link latency + both tiers' latencies.

Transfers on different channels do not slow each other (a documented simplification). Compute is a
separate resource, so transfers overlap with compute unless the caller waits for them.

No globals, no file I/O: everything is built from a :class:`hwmodels.specs.System` or explicit tiers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import simpy

from hwmodels.specs import MemoryTier, System
from moebase.units import GB

HOST = "host"
#: a transfer counts as finished when its remaining bytes would take less than this at its share of
#: the bandwidth (absorbs floating-point rounding of the processor-sharing bookkeeping)
FINISH_TOLERANCE_S = 1e-12


class MemoryError_(ValueError):
    """Bad input to the memory model (a ValueError, so the CLI prints it as one line)."""


def transfer_time_s(nbytes: float, bandwidth_bytes_per_s: float, latency_s: float) -> float:
    """Closed form of one transfer alone on a link: ``nbytes / bandwidth_bytes_per_s + latency_s``."""
    if bandwidth_bytes_per_s <= 0:
        raise MemoryError_(f"bandwidth must be > 0 bytes/s, got {bandwidth_bytes_per_s}")
    if nbytes < 0:
        raise MemoryError_(f"transfer size must be >= 0 bytes, got {nbytes}")
    return nbytes / bandwidth_bytes_per_s + latency_s


class SharedLink:
    """A link whose bandwidth is shared fairly by the transfers in flight (processor sharing).

    ``transfer(nbytes)`` returns a SimPy event that fires when the transfer is done. Every change in
    the set of active transfers re-divides the bandwidth: each active transfer gets
    ``bandwidth_bytes_per_s / n_active``.
    """

    def __init__(self, env: simpy.Environment, name: str, bandwidth_bytes_per_s: float, latency_s: float = 0.0):
        if not bandwidth_bytes_per_s > 0:
            raise MemoryError_(f"link {name!r}: bandwidth must be > 0 bytes/s, got {bandwidth_bytes_per_s} "
                               f"(a tier or link with zero bandwidth can never move data)")
        if latency_s < 0:
            raise MemoryError_(f"link {name!r}: latency must be >= 0 s, got {latency_s}")
        self.env, self.name = env, name
        self.bandwidth_bytes_per_s = float(bandwidth_bytes_per_s)
        self.latency_s = float(latency_s)
        self._active: dict[int, list] = {}  # id -> [remaining_bytes, done_event]
        self._last_at_s = 0.0
        self._generation = 0
        self._next_id = 0
        self.bytes_moved = 0.0
        self.busy_s = 0.0  # time with at least one transfer in its byte phase

    def transfer(self, nbytes: float) -> simpy.Event:
        if nbytes < 0:
            raise MemoryError_(f"link {self.name!r}: transfer size must be >= 0 bytes, got {nbytes}")
        done = self.env.event()
        self.env.process(self._run(float(nbytes), done))
        return done

    def _run(self, nbytes: float, done: simpy.Event):
        if self.latency_s > 0:
            yield self.env.timeout(self.latency_s)
        if nbytes == 0:
            done.succeed()
            return
        self._advance()
        tid = self._next_id
        self._next_id += 1
        self._active[tid] = [nbytes, done]
        self.bytes_moved += nbytes
        self._reschedule()

    def _advance(self) -> None:
        """Charge the bytes moved since the last change to every active transfer."""
        now = self.env.now
        elapsed = now - self._last_at_s
        if self._active and elapsed > 0:
            share = self.bandwidth_bytes_per_s / len(self._active)
            for item in self._active.values():
                item[0] -= elapsed * share
            self.busy_s += elapsed
        self._last_at_s = now

    def _reschedule(self) -> None:
        self._generation += 1
        if not self._active:
            return
        share = self.bandwidth_bytes_per_s / len(self._active)
        soonest = min(item[0] for item in self._active.values())
        gen = self._generation
        ev = self.env.timeout(max(soonest, 0.0) / share)
        ev.callbacks.append(lambda _e, gen=gen: self._on_timer(gen))

    def _on_timer(self, gen: int) -> None:
        if gen != self._generation:
            return  # stale: the active set changed since this timer was set
        self._advance()
        share = self.bandwidth_bytes_per_s / max(len(self._active), 1)
        eps = share * FINISH_TOLERANCE_S
        finished = [tid for tid, item in self._active.items() if item[0] <= eps]
        for tid in finished:
            _, ev = self._active.pop(tid)
            ev.succeed()
        self._reschedule()


@dataclass(frozen=True)
class Channel:
    name: str
    bandwidth_bytes_per_s: float
    latency_s: float


@dataclass(frozen=True)
class MemoryHierarchy:
    """The tiers of one device (fastest first) and the host memory, with capacities in bytes.

    tiers: name -> MemoryTier (device tiers plus ``host`` when built from a System).
    host_link_bandwidth_bytes_per_s / host_link_latency_s: the device's link to host memory.
    """

    tiers: dict[str, MemoryTier]
    host_link_bandwidth_bytes_per_s: float | None = None
    host_link_latency_s: float = 0.0
    name: str = ""
    order: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if not self.tiers:
            raise MemoryError_("a memory hierarchy needs at least one tier")
        for t in self.tiers.values():
            if not t.bandwidth_bytes_per_s > 0:
                raise MemoryError_(f"tier {t.name!r}: bandwidth must be > 0 bytes/s, got {t.bandwidth_bytes_per_s}")
            if not t.capacity_bytes > 0:
                raise MemoryError_(f"tier {t.name!r}: capacity must be > 0 bytes, got {t.capacity_bytes}")
            if t.latency_s < 0:
                raise MemoryError_(f"tier {t.name!r}: latency must be >= 0 s, got {t.latency_s}")
        if HOST in self.tiers and not (self.host_link_bandwidth_bytes_per_s or 0) > 0:
            raise MemoryError_(f"hierarchy {self.name!r}: host link bandwidth must be > 0 bytes/s")
        if not self.order:
            object.__setattr__(self, "order", tuple(self.tiers))

    @classmethod
    def from_system(cls, system: System, *, include_host: bool = True) -> "MemoryHierarchy":
        """Device tiers of ``system`` (as listed, fastest first) plus ``host`` behind its host link."""
        tiers = {t.name: t for t in system.device.memory}
        if include_host:
            h = system.host_memory
            tiers[HOST] = MemoryTier(name=HOST, capacity_bytes=h.capacity_bytes,
                                     bandwidth_bytes_per_s=h.bandwidth_bytes_per_s, latency_s=h.latency_s,
                                     sources=h.sources)
        return cls(tiers=tiers, host_link_bandwidth_bytes_per_s=system.host_link.bandwidth_bytes_per_s,
                   host_link_latency_s=system.host_link.latency_s, name=system.name)

    def tier(self, name: str) -> MemoryTier:
        if name not in self.tiers:
            raise MemoryError_(f"unknown memory tier {name!r} in {self.name or 'hierarchy'} (has {list(self.tiers)})")
        return self.tiers[name]

    def channel(self, src: str, dst: str) -> Channel:
        """The bottleneck channel a ``src -> dst`` transfer runs on (see the module docstring)."""
        a, b = self.tier(src), self.tier(dst)
        if src == dst:
            raise MemoryError_(f"a transfer needs two different tiers, got {src!r} -> {dst!r}")
        if HOST in (src, dst):
            bw = min(self.host_link_bandwidth_bytes_per_s, a.bandwidth_bytes_per_s, b.bandwidth_bytes_per_s)
            return Channel("host_link", bw, self.host_link_latency_s + a.latency_s + b.latency_s)
        slow = a if a.bandwidth_bytes_per_s <= b.bandwidth_bytes_per_s else b
        return Channel(f"{slow.name}-port", slow.bandwidth_bytes_per_s, a.latency_s + b.latency_s)

    def transfer_time_s(self, nbytes: float, src: str, dst: str) -> float:
        """Closed form of one transfer alone: bytes / channel bandwidth + channel latency."""
        ch = self.channel(src, dst)
        return transfer_time_s(nbytes, ch.bandwidth_bytes_per_s, ch.latency_s)

    def backing_tier(self, cache_tier: str) -> str:
        """The tier a cache in ``cache_tier`` fetches misses from: the tier listed right after it (tiers
        are listed fastest first, e.g. ``ddr`` behind ``hbm`` on an SN40L), which is ``host`` memory
        behind the host link when the cache tier is the device's last (e.g. HBM on a GPU)."""
        order = self.order
        self.tier(cache_tier)
        at = order.index(cache_tier)
        if at + 1 >= len(order):
            raise MemoryError_(f"tier {cache_tier!r} of {self.name or 'the hierarchy'} has no slower tier behind it")
        return order[at + 1]

    def stream_tier(self, cache_tier: str) -> str | None:
        """The tier compute streams weights into from ``cache_tier``: the fastest tier (e.g. SRAM on an
        SN40L) when it is not the cache tier itself, else None (compute reads the cache tier)."""
        first = self.order[0]
        return None if first in (cache_tier, HOST) else first

    def largest_tier(self) -> MemoryTier:
        return max(self.tiers.values(), key=lambda t: t.capacity_bytes)

    def check_fits(self, nbytes: float, what: str) -> None:
        """Raise a clear error when ``nbytes`` is larger than every tier."""
        biggest = self.largest_tier()
        if nbytes > biggest.capacity_bytes:
            raise MemoryError_(f"{what} needs {nbytes / GB:.3g} GB, larger than every memory tier of "
                               f"{self.name or 'the hierarchy'} (largest: {biggest.name}, "
                               f"{biggest.capacity_bytes / GB:.3g} GB)")

    def with_tier(self, name: str, **changes) -> "MemoryHierarchy":
        """A copy with one tier's capacity_bytes / bandwidth_bytes_per_s / latency_s changed (for sweeps)."""
        import dataclasses
        t = self.tier(name)
        tiers = dict(self.tiers)
        tiers[name] = dataclasses.replace(t, **changes)
        return dataclasses.replace(self, tiers=tiers)


class SimMemory:
    """A MemoryHierarchy instantiated in a SimPy environment: one SharedLink per channel."""

    def __init__(self, env: simpy.Environment, hierarchy: MemoryHierarchy):
        self.env, self.hierarchy = env, hierarchy
        self.links: dict[str, SharedLink] = {}
        self.bytes_by_path: dict[str, float] = {}

    def link_for(self, src: str, dst: str) -> SharedLink:
        ch = self.hierarchy.channel(src, dst)
        if ch.name not in self.links:
            # latency is applied per transfer below (it depends on the pair), so the link itself has none
            self.links[ch.name] = SharedLink(self.env, ch.name, ch.bandwidth_bytes_per_s, 0.0)
        return self.links[ch.name]

    def transfer(self, nbytes: float, src: str, dst: str) -> simpy.Process:
        """A process that moves ``nbytes`` from ``src`` to ``dst``: pair latency, then shared bytes phase."""
        ch = self.hierarchy.channel(src, dst)
        link = self.link_for(src, dst)
        key = f"{src}->{dst}"
        self.bytes_by_path[key] = self.bytes_by_path.get(key, 0.0) + float(nbytes)

        def run():
            if ch.latency_s > 0:
                yield self.env.timeout(ch.latency_s)
            yield link.transfer(nbytes)

        return self.env.process(run())
