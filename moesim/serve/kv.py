"""The KV cache of one replica in HBM, as fixed-size blocks (PagedAttention's layout, vLLM's default 16 tokens).

A request holding ``t`` tokens of KV holds ``ceil(t / block_size)`` blocks. The pool only counts blocks;
which request holds how many is the replica state's per-request ``held``. Allocation beyond the
capacity or a release of more than is used raises (an engine bug, never a user error).
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class SpillTier:
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

    def transfer_s(self, tokens: float) -> float:
        """Seconds to move ``tokens`` tokens of KV over the channel, alone on it (0 for none): the tier model's
        closed form ``bytes / bandwidth + latency`` (:func:`moesim.memory.tiers.transfer_time_s`)."""
        from moesim.memory.tiers import transfer_time_s

        if tokens <= 0:
            return 0.0
        return transfer_time_s(tokens * self.bytes_per_token, self.bandwidth_bytes_per_s, self.latency_s)


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
    blocks = int(capacity // bytes_per_token) // block_size if bytes_per_token > 0 else 0
    return SpillTier(tier, blocks, bytes_per_token, ch.bandwidth_bytes_per_s, ch.latency_s, kv_tier)
