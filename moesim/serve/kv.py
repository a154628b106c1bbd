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
