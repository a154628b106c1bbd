"""The access stream of an expert cache: which (layer, expert) weight sets a trace uses, in execution order.

Tokens are cut into batches of ``batch_tokens`` consecutive tokens; for each batch, layers run in order
and, inside a layer, the experts the batch routes to are computed one after another (ascending expert
id). One access = one (layer, expert) weight set used by one batch. Keys are
``layer * num_experts + expert``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moesim.memory.tiers import MemoryError_
from workloads.trace import Trace


@dataclass(frozen=True, eq=False)
class AccessStream:
    """The expert accesses of a trace, in execution order.

    keys [N] int64: ``layer * num_experts + expert``; group [N] int64: index of the (batch, layer)
    group the access belongs to (non-decreasing); tokens [N] int64: tokens of the batch routed to the
    expert; group_batch [G], group_layer [G]: batch and layer of each group; num_experts, num_layers;
    num_tokens: tokens in the stream.
    """

    keys: np.ndarray
    group: np.ndarray
    tokens: np.ndarray
    group_batch: np.ndarray
    group_layer: np.ndarray
    num_experts: int
    num_layers: int
    num_tokens: int
    group_start: np.ndarray = field(default=None)  # [G + 1] first access index of each group

    def __post_init__(self):
        if self.group_start is None:
            g = len(self.group_batch)
            start = np.searchsorted(self.group, np.arange(g + 1), side="left")
            object.__setattr__(self, "group_start", start.astype(np.int64))

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_groups(self) -> int:
        return len(self.group_batch)

    def group_keys(self, g: int) -> np.ndarray:
        return self.keys[self.group_start[g]:self.group_start[g + 1]]

    def group_of(self, batch: int, layer: int) -> int | None:
        """Index of group (batch, layer) or None when it has no accesses / does not exist."""
        g = batch * self.num_layers + layer
        if 0 <= layer < self.num_layers and g < self.num_groups and self.group_batch[g] == batch:
            return g
        return None


def access_stream(trace: Trace, batch_tokens: int = 1, max_tokens: int | None = None) -> AccessStream:
    """Cut ``trace`` into batches of ``batch_tokens`` consecutive tokens (over steps in order) and list
    the expert accesses per (batch, layer). ``max_tokens`` keeps only the first tokens."""
    if batch_tokens < 1:
        raise MemoryError_(f"batch_tokens must be >= 1, got {batch_tokens}")
    c = trace.columns
    e_count, l_count = trace.meta.num_experts, trace.meta.num_layers
    step, token = c["step"].astype(np.int64), c["token"].astype(np.int64)
    span = int(token.max(initial=0)) + 1
    uniq, tok_idx = np.unique(step * span + token, return_inverse=True)
    keep = slice(None)
    n_tokens = len(uniq)
    if max_tokens is not None:
        if max_tokens < 1:
            raise MemoryError_(f"max_tokens must be >= 1, got {max_tokens}")
        keep = tok_idx < max_tokens
        tok_idx = tok_idx[keep]
        n_tokens = min(max_tokens, len(uniq))
    layer, expert = c["layer"][keep].astype(np.int64), c["expert"][keep].astype(np.int64)
    if len(expert) and (expert.min() < 0 or expert.max() >= e_count):
        raise MemoryError_(f"trace routes to expert {int(expert.max())}, outside 0..{e_count - 1}")
    n_batches = -(-n_tokens // batch_tokens)
    g = (tok_idx // batch_tokens) * l_count + layer
    counts = np.bincount(g * e_count + expert, minlength=n_batches * l_count * e_count)
    nz = np.flatnonzero(counts)  # sorted: by group, then expert
    group = nz // e_count
    return AccessStream(keys=((group % l_count) * e_count + nz % e_count).astype(np.int64),
                        group=group.astype(np.int64), tokens=counts[nz].astype(np.int64),
                        group_batch=np.repeat(np.arange(n_batches), l_count),
                        group_layer=np.tile(np.arange(l_count), n_batches),
                        num_experts=e_count, num_layers=l_count, num_tokens=n_tokens)


def stream_from_keys(keys, group=None, num_experts: int | None = None) -> AccessStream:
    """A stream from a plain key sequence (tests, synthetic studies); one group per access by default."""
    keys = np.asarray(keys, dtype=np.int64)
    if keys.ndim != 1 or (len(keys) and keys.min() < 0):
        raise MemoryError_("keys must be a 1-D sequence of non-negative integers")
    group = np.arange(len(keys), dtype=np.int64) if group is None else np.asarray(group, dtype=np.int64)
    e = int(num_experts if num_experts is not None else (keys.max(initial=0) + 1))
    g_count = int(group.max(initial=-1)) + 1
    return AccessStream(keys=keys, group=group, tokens=np.ones(len(keys), dtype=np.int64),
                        group_batch=np.arange(g_count), group_layer=np.zeros(g_count, dtype=np.int64),
                        num_experts=e, num_layers=1, num_tokens=len(keys))


def select_accesses(stream: AccessStream, keep: np.ndarray) -> AccessStream:
    """The accesses of ``stream`` where ``keep`` [N] bool is True (e.g. the experts one device holds);
    groups keep their indices (a group may become empty)."""
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (len(stream),):
        raise MemoryError_(f"keep mask has shape {keep.shape}, the stream has {len(stream)} accesses")
    return AccessStream(keys=stream.keys[keep], group=stream.group[keep], tokens=stream.tokens[keep],
                        group_batch=stream.group_batch, group_layer=stream.group_layer,
                        num_experts=stream.num_experts, num_layers=stream.num_layers, num_tokens=stream.num_tokens)
