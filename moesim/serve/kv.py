"""The KV cache of one replica in HBM, as fixed-size blocks (PagedAttention's layout, vLLM's default 16 tokens).

A request holding ``t`` tokens of KV holds ``ceil(t / block_size)`` blocks. The pool only counts blocks;
which request holds how many is the replica state's per-request ``held``. Allocation beyond the
capacity or a release of more than is used raises (an engine bug, never a user error). Beside it: the tier live KV
spills to (:class:`SpillTier`) and on-chip SRAM holding the newest blocks (:class:`SramTier`, :class:`SramBlocks`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

DEFAULT_BLOCK_SIZE = 16


@dataclass
class KVBlocks:
    capacity_blocks: int
    block_size: int = DEFAULT_BLOCK_SIZE
    used_blocks: int = 0
    peak_blocks: int = 0

    def __post_init__(self):
        if self.capacity_blocks < 1 or self.block_size < 1:
            raise ValueError(f"KV capacity ({self.capacity_blocks} blocks) and block size ({self.block_size}) "
                             "must be >= 1")

    @property
    def free_blocks(self) -> int:
        return self.capacity_blocks - self.used_blocks

    def blocks_for(self, tokens):
        """Blocks holding ``tokens`` tokens (int or int array)."""
        return -(-tokens // self.block_size)

    def allocate(self, blocks: int) -> None:
        if blocks < 0 or blocks > self.free_blocks:
            raise RuntimeError(f"KV allocation of {blocks} blocks with {self.free_blocks} free")
        self.used_blocks += blocks
        self.peak_blocks = max(self.peak_blocks, self.used_blocks)

    def release(self, blocks: int) -> None:
        if blocks < 0 or blocks > self.used_blocks:
            raise RuntimeError(f"KV release of {blocks} blocks with {self.used_blocks} used")
        self.used_blocks -= blocks


class _KVChannel:
    """What the KV tiers beside the KV's own share: moving tokens of KV over their channel (``bytes_per_token``,
    ``bandwidth_bytes_per_s``, ``latency_s`` of the dataclass)."""

    def transfer_s(self, tokens: float) -> float:
        """Seconds to move ``tokens`` tokens of KV over the channel, alone on it (0 for none): the tier model's
        closed form ``bytes / bandwidth + latency`` (:func:`moesim.memory.tiers.transfer_time_s`)."""
        from moesim.memory.tiers import transfer_time_s

        if tokens <= 0:
            return 0.0
        return transfer_time_s(tokens * self.bytes_per_token, self.bandwidth_bytes_per_s, self.latency_s)


def _blocks_in(capacity_bytes: float, bytes_per_token: float, block_size: int) -> int:
    """Whole KV blocks of ``block_size`` tokens in ``capacity_bytes`` (0 when a token takes no bytes)."""
    return int(capacity_bytes // bytes_per_token) // block_size if bytes_per_token > 0 else 0


@dataclass(frozen=True)
class SpillTier(_KVChannel):
    """The memory tier live KV spills to when HBM is full (``--kv-offload spill``), for one data-parallel rank.

    ``name``: the tier (the one listed after the KV's tier in the device's memory, fastest first; ``host`` memory
    behind the host link when the KV's tier is the device's last); ``capacity_blocks``: blocks of one rank it may
    hold; ``bytes_per_token``: KV bytes of one token on one device (every device of a rank moves its own shard at
    once); ``bandwidth_bytes_per_s``, ``latency_s``: the channel between the two tiers
    (:meth:`moesim.memory.tiers.MemoryHierarchy.channel`)."""

    name: str
    capacity_blocks: int
    bytes_per_token: float
    bandwidth_bytes_per_s: float
    latency_s: float
    kv_tier: str = "hbm"

    def __post_init__(self):
        if self.capacity_blocks < 1:
            raise ValueError(f"--kv-offload spill: the {self.name} tier holds no KV block ({self.capacity_blocks})")
        if not self.bandwidth_bytes_per_s > 0 or self.bytes_per_token < 0 or self.latency_s < 0:
            raise ValueError(f"--kv-offload spill: bad {self.kv_tier}->{self.name} channel or KV size")



def spill_tier(system, bytes_per_token: float, block_size: int, limit_bytes: float | None = None) -> SpillTier:
    """The :class:`SpillTier` of ``system``: the tier behind the one holding weights and KV
    (``system.device.main_memory``) in the tier model's order (:meth:`MemoryHierarchy.backing_tier`); host memory
    is shared by a node's devices (capacity / devices per node each), a device tier is the device's own. At most
    ``limit_bytes`` per device when given."""
    from moesim.memory.tiers import HOST, MemoryHierarchy

    h = MemoryHierarchy.from_system(system)
    kv_tier = system.device.main_memory.name
    tier = h.backing_tier(kv_tier)
    capacity = h.tier(tier).capacity_bytes / (system.devices_per_node if tier == HOST else 1)
    if limit_bytes is not None:
        capacity = min(capacity, limit_bytes)
    ch = h.channel(kv_tier, tier)
    blocks = _blocks_in(capacity, bytes_per_token, block_size)
    return SpillTier(tier, blocks, bytes_per_token, ch.bandwidth_bytes_per_s, ch.latency_s, kv_tier)


@dataclass(frozen=True)
class SramTier(_KVChannel):
    """On-chip SRAM reserved for KV above the KV's tier (``--kv-sram-gib``), per device.

    ``name``: the tier (the fastest one, listed above the KV's tier: :meth:`MemoryHierarchy.stream_tier`);
    ``capacity_blocks``: blocks of one rank it holds; ``bytes_per_token``: KV bytes of one token on one device;
    ``read_bandwidth_bytes_per_s``: the SRAM's own bandwidth (attention reads its KV at it);
    ``bandwidth_bytes_per_s``, ``latency_s``: the channel SRAM -> KV tier blocks move down over."""

    name: str
    capacity_blocks: int
    bytes_per_token: float
    read_bandwidth_bytes_per_s: float
    bandwidth_bytes_per_s: float
    latency_s: float
    kv_tier: str = "hbm"

    def __post_init__(self):
        if self.capacity_blocks < 1:
            raise ValueError(f"--kv-sram-gib: the {self.name} tier holds no KV block ({self.capacity_blocks})")
        if not (self.bandwidth_bytes_per_s > 0 and self.read_bandwidth_bytes_per_s > 0) or self.bytes_per_token < 0 \
                or self.latency_s < 0:
            raise ValueError(f"--kv-sram-gib: bad {self.name}->{self.kv_tier} channel or KV size")


def tier_above_kv(system, hierarchy=None):
    """The memory tier above the one holding weights and KV (``system.device.main_memory``) in the tier model's
    order, the fastest (:meth:`MemoryHierarchy.stream_tier`: SRAM on an SN40L), or None (a GPU's HBM is its first);
    ``hierarchy``: the system's tier model when the caller has built it."""
    from moesim.memory.tiers import MemoryHierarchy

    h = hierarchy if hierarchy is not None else MemoryHierarchy.from_system(system)
    name = h.stream_tier(system.device.main_memory.name)
    return None if name is None else h.tier(name)


def sram_tier(system, bytes_per_token: float, block_size: int, reserve_bytes: float) -> SramTier:
    """The :class:`SramTier` of ``system`` holding ``reserve_bytes`` of KV per device: the tier listed above the one
    holding weights and KV (``system.device.main_memory``) in the tier model's order; a ValueError naming
    ``--kv-sram-gib`` when the device has none or it is smaller than ``reserve_bytes``."""
    from moebase.units import GiB
    from moesim.memory.tiers import MemoryHierarchy

    kv_tier = system.device.main_memory.name
    h = MemoryHierarchy.from_system(system)
    tier = tier_above_kv(system, h)
    if tier is None:
        raise ValueError(f"--kv-sram-gib: {system.name} has no memory tier above {kv_tier}")
    name = tier.name
    if reserve_bytes > tier.capacity_bytes:
        raise ValueError(f"--kv-sram-gib {reserve_bytes / GiB:g} exceeds the {tier.capacity_bytes / GiB:g} GiB of "
                         f"{name} per device of {system.name}")
    blocks = _blocks_in(reserve_bytes, bytes_per_token, block_size)
    if blocks < 1:
        raise ValueError(f"--kv-sram-gib {reserve_bytes / GiB:g} holds no KV block of {block_size} tokens")
    ch = h.channel(name, kv_tier)
    return SramTier(name, blocks, bytes_per_token, tier.bandwidth_bytes_per_s, ch.bandwidth_bytes_per_s,
                    ch.latency_s, kv_tier)


class SramBlocks:
    """The KV blocks of one rank in SRAM: the most recently written blocks of running requests.

    Every block a request starts writing enters SRAM; when SRAM is full the block that entered first moves down to
    the KV tier (a request's SRAM blocks are therefore always the newest of its sequence). Blocks keep their home in
    the KV tier's pool (:class:`KVBlocks` accounting is unchanged). ``order``: request ids, one per resident block, in
    the order they entered; ``count``: resident blocks per request; ``peak_blocks``: most resident at once."""

    def __init__(self, capacity_blocks: int):
        if capacity_blocks < 1:
            raise ValueError(f"SRAM KV capacity must be >= 1 block, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self.order: deque[int] = deque()
        self.count: dict[int, int] = {}
        self.peak_blocks = 0

    @property
    def used_blocks(self) -> int:
        return len(self.order)

    def write(self, new_blocks: list[int]) -> int:
        """Requests ``new_blocks`` (one id per block started, in writing order) enter; returns the blocks moved down
        (blocks displaced by later ones of the same call are written to the KV tier directly, never moved)."""
        new = new_blocks[-self.capacity_blocks:] if new_blocks else []
        moved = max(0, len(self.order) + len(new) - self.capacity_blocks)
        for _ in range(moved):
            self._drop_oldest()
        for r in new:
            self.order.append(r)
            self.count[r] = self.count.get(r, 0) + 1
        self.peak_blocks = max(self.peak_blocks, len(self.order))
        return moved

    def _drop_oldest(self) -> None:
        r = self.order.popleft()
        self.count[r] -= 1
        if not self.count[r]:
            del self.count[r]

    def release(self, requests) -> None:
        """Free every SRAM block of ``requests`` (finished or preempted)."""
        gone = {int(r) for r in requests if int(r) in self.count}
        if gone:
            self.order = deque(r for r in self.order if r not in gone)
            for r in gone:
                del self.count[r]

    def tokens(self, r: int, total_tokens: int, block_size: int) -> int:
        """KV tokens of request ``r`` (``total_tokens`` in all) in SRAM: its newest ``count`` blocks' tokens."""
        s = self.count.get(int(r), 0)
        if not s:
            return 0
        blocks = -(-total_tokens // block_size)
        return max(0, total_tokens - (blocks - s) * block_size)
