"""Iteration-level scheduling of one replica: continuous batching with a token budget and chunked prefill.

Each request ``r`` has a token sequence of length ``L = prompt + generated``; the replica holds KV for
``computed`` of them. An iteration gives ``r`` some ``n <= L - computed`` new tokens; if that reaches
``L`` the request samples a token (``generated += 1``). A prefill is ``L - computed > 1``, a decode
``L - computed == 1``: one rule for both, so a chunked prefill is several iterations of the first kind.

Per iteration (:func:`plan`), in this order:

1. running requests, decodes first, then unfinished prefills in admission order (Sarathi-Serve's
   stall-free batching: decodes never wait behind a prefill chunk), each taking
   ``min(L - computed, budget left)`` tokens of ``max_num_batched_tokens``;
2. if a running request needs a KV block and none is free, the youngest running request (last
   admitted) is preempted: all its HBM blocks are freed and it goes back to the head of the waiting queue
   (vLLM's policy); it may be the request itself. A preempted request that had been given tokens this
   iteration gives them back. ``preemption = "recompute"`` (vLLM's default) drops its KV (``computed``
   becomes 0); ``"swap"`` copies its ``computed`` tokens of KV to host memory (the replica's ``host``
   blocks; recomputation when they are full) and copies them back when it is admitted again;
3. if nothing was preempted, waiting requests are admitted first come first served while
   ``max_num_seqs``, the budget and free blocks allow (without ``chunked_prefill`` a prompt must fit the
   budget whole, or run alone).

With ``kv_offload = "spill"`` (live KV spill to the tier behind HBM, :class:`moesim.serve.kv.SpillTier`), step 2
first spills instead of preempting: the running requests' full blocks of already computed KV (oldest first: a
request's spilled blocks are always a prefix of its sequence) move to the rank's ``spill`` blocks, taken from the
least recently used request first (the iteration it last attended, a request already given tokens in this plan, or
the one asking, counting as used now; ties: the youngest first, the preemption order), exactly as many blocks as the
request asking for room lacks. Only when no running request has a full block left in HBM or the spill tier is full
does it preempt (recompute; the victim's spilled blocks are freed too). Spilled blocks stay in the lower tier until
their request finishes or is preempted; every iteration a request attends over them reads them over the tiers'
channel (the plan's ``spill_read_tokens``). Admission still needs free HBM blocks.

Recomputation redoes exactly the evicted KV: a re-admitted request re-prefills its ``L`` tokens, of which
the evicted ``computed`` were done before and the last one was due anyway. Swapping redoes nothing: the
plan reports the tokens swapped out and in, which the iteration cost charges as host-link transfers.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from moesim.serve.kv import DEFAULT_BLOCK_SIZE, KVBlocks

PREEMPTION = ("recompute", "swap")
KV_OFFLOAD = ("none", "spill")


@dataclass(frozen=True)
class SchedulerConfig:
    """``max_num_batched_tokens``: the token budget per iteration; ``max_num_seqs``: running requests at most
    (vLLM's default 256); ``block_size``: KV tokens per block."""

    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    block_size: int = DEFAULT_BLOCK_SIZE
    chunked_prefill: bool = True
    preemption: str = "recompute"
    kv_offload: str = "none"

    def __post_init__(self):
        for name in ("max_num_batched_tokens", "max_num_seqs", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.preemption not in PREEMPTION:
            raise ValueError(f"--preemption must be one of {', '.join(PREEMPTION)}, got {self.preemption!r}")
        if self.kv_offload not in KV_OFFLOAD:
            raise ValueError(f"--kv-offload must be one of {', '.join(KV_OFFLOAD)}, got {self.kv_offload!r}")
        if self.kv_offload == "spill" and self.preemption == "swap":
            raise ValueError("--kv-offload spill does not combine with --preemption swap (both move KV to the tier "
                             "behind HBM; spill preempts by recomputation when that tier is full)")


class ReplicaState:
    """Per-request state (arrays over all requests; a request lives on one replica at a time) and one
    replica's queues. ``target[r]``: tokens ``r`` generates here (its output length, or 1 on a prefill pool)."""

    def __init__(self, prompt: np.ndarray, target: np.ndarray, shared: dict | None = None):
        n = len(prompt)
        self.prompt, self.target = prompt, target
        s = shared if shared is not None else {}
        for name in ("computed", "generated", "held", "preemptions", "evicted_tokens", "swapped", "swapped_tokens",
                     "spilled", "spilled_blocks"):
            s.setdefault(name, np.zeros(n, dtype=np.int64))
        s.setdefault("last_used", np.full(n, -1, dtype=np.int64))
        s.setdefault("clock", np.zeros(1, dtype=np.int64))  # plans made by every rank of every replica (LRU clock)
        self.shared = s
        self.computed, self.generated, self.held = s["computed"], s["generated"], s["held"]
        self.preemptions, self.evicted_tokens = s["preemptions"], s["evicted_tokens"]
        self.swapped, self.swapped_tokens = s["swapped"], s["swapped_tokens"]  # KV tokens in host now; in total
        self.host: KVBlocks | None = None
        self.swap_out = self.swap_in = 0  # tokens moved by the plan being made
        # live KV spill: blocks of each request in the spill tier now, in total; the iteration it last attended
        self.spilled, self.spilled_blocks, self.last_used = s["spilled"], s["spilled_blocks"], s["last_used"]
        self.spill: KVBlocks | None = None  # this rank's blocks in the spill tier (kv_offload "spill")
        self.spill_out = 0  # tokens spilled by the plan being made
        self.clock = s["clock"]
        self.running = np.zeros(0, dtype=np.int64)
        self.waiting: deque[int] = deque()


@dataclass(frozen=True)
class Plan:
    """One iteration: requests ``ids`` [k] get ``tokens`` [k] new tokens after ``context`` [k] cached ones;
    ``samples`` [k] bool: the request samples a token; ``admitted``: ids admitted from the waiting queue;
    ``swap_out_tokens``/``swap_in_tokens``: KV tokens copied to/from host memory before the iteration;
    ``spill_out_tokens``: KV tokens moved to the spill tier by this plan; ``spill_read_tokens``: spilled KV tokens
    the batch attends over (read over the tiers' channel)."""

    ids: np.ndarray
    tokens: np.ndarray
    context: np.ndarray
    samples: np.ndarray
    admitted: list
    preempted: list
    swap_out_tokens: int = 0
    swap_in_tokens: int = 0
    spill_out_tokens: int = 0
    spill_read_tokens: int = 0


def plan(st: ReplicaState, kv: KVBlocks, cfg: SchedulerConfig) -> Plan:
    """The next iteration of the replica (see the module docstring); allocates its KV blocks."""
    st.swap_out = st.swap_in = st.spill_out = 0
    spilling = cfg.kv_offload == "spill" and st.spill is not None
    if spilling:
        st.clock[0] += 1
    r = st.running
    rem = st.prompt[r] + st.generated[r] - st.computed[r]
    order = np.concatenate([np.flatnonzero(rem == 1), np.flatnonzero(rem != 1)])
    ids, rem = r[order], rem[order]
    n = np.clip(cfg.max_num_batched_tokens - (np.cumsum(rem) - rem), 0, rem)
    need = np.where(n > 0, kv.blocks_for(st.computed[ids] + n) - st.held[ids] - st.spilled[ids], 0)
    preempted: list[int] = []
    if need.sum() <= kv.free_blocks:
        keep = n > 0
        ids, n, need = ids[keep], n[keep], need[keep]
        kv.allocate(int(need.sum()))
        st.held[ids] += need
        sched = list(zip(ids.tolist(), n.tolist()))
    else:
        sched = _plan_with_preemption(st, kv, cfg, ids.tolist(), rem.tolist(), preempted)
    budget = cfg.max_num_batched_tokens - sum(k for _, k in sched)
    admitted = [] if preempted else _admit(st, kv, cfg, budget, sched)
    if sched:
        ids = np.fromiter((i for i, _ in sched), dtype=np.int64, count=len(sched))
        n = np.fromiter((k for _, k in sched), dtype=np.int64, count=len(sched))
    else:
        ids = n = np.zeros(0, dtype=np.int64)
    ctx = st.computed[ids]
    read = 0
    if spilling:
        st.last_used[ids] = st.clock[0]
        read = int(st.spilled[ids].sum()) * kv.block_size
    return Plan(ids, n, ctx, ctx + n == st.prompt[ids] + st.generated[ids], admitted, preempted, st.swap_out,
                st.swap_in, st.spill_out, read)


def _preempt(st: ReplicaState, kv: KVBlocks, victim: int, mode: str) -> None:
    kv.release(int(st.held[victim]))
    st.held[victim] = 0
    if st.spilled[victim]:  # live-spilled blocks go too (spill preempts by recomputation only)
        st.spill.release(int(st.spilled[victim]))
        st.spilled[victim] = 0
    tokens = int(st.computed[victim])
    host = st.host
    if mode == "swap" and host is not None and host.blocks_for(tokens) <= host.free_blocks:
        host.allocate(host.blocks_for(tokens))
        st.swapped[victim] = tokens
        st.swapped_tokens[victim] += tokens
        st.swap_out += tokens
    else:
        st.evicted_tokens[victim] += tokens
        st.computed[victim] = 0
    st.preemptions[victim] += 1
    st.running = st.running[st.running != victim]
    st.waiting.appendleft(victim)


def _plan_with_preemption(st, kv, cfg, ids: list, rem: list, preempted: list) -> list:
    """The slow path of :func:`plan` when the running requests' next blocks do not fit."""
    budget = cfg.max_num_batched_tokens
    sched: dict[int, int] = {}
    gone: set[int] = set()
    for r, want in zip(ids, rem):
        if r in gone:
            continue
        k = min(want, budget)
        if k <= 0:
            break
        need = int(kv.blocks_for(int(st.computed[r]) + k) - st.held[r] - st.spilled[r])
        while need > kv.free_blocks:
            if cfg.kv_offload == "spill" and st.spill is not None and _spill(st, kv, need - kv.free_blocks,
                                                                             set(sched) | {r}):
                continue
            victim = int(st.running[-1])
            _preempt(st, kv, victim, cfg.preemption)
            preempted.append(victim)
            gone.add(victim)
            if victim in sched:
                budget += sched.pop(victim)
            if victim == r:
                break
        if r in gone:
            continue
        kv.allocate(need)
        st.held[r] += need
        sched[r] = k
        budget -= k
    return list(sched.items())


def _spill(st: ReplicaState, kv: KVBlocks, blocks: int, now: set) -> int:
    """Move up to ``blocks`` full blocks of computed KV from HBM to the spill tier, least recently used request
    first (``now``: requests counting as used in this plan; ties: the youngest first); returns the blocks moved."""
    run = st.running
    spillable = st.computed[run] // kv.block_size - st.spilled[run]
    recent = np.where(np.isin(run, np.fromiter(now, dtype=np.int64, count=len(now))), st.clock[0], st.last_used[run])
    moved = 0
    for i in np.lexsort((-np.arange(len(run)), recent)):
        k = int(min(spillable[i], blocks - moved, st.spill.free_blocks))
        if k <= 0:
            if moved >= blocks or not st.spill.free_blocks:
                break
            continue
        x = int(run[i])
        kv.release(k)
        st.spill.allocate(k)
        st.held[x] -= k
        st.spilled[x] += k
        st.spilled_blocks[x] += k
        moved += k
    st.spill_out += moved * kv.block_size
    return moved


def _admit(st: ReplicaState, kv: KVBlocks, cfg: SchedulerConfig, budget: int, sched: list) -> list:
    admitted = []
    while st.waiting and budget > 0 and len(st.running) < cfg.max_num_seqs:
        r = st.waiting[0]
        rem = int(st.prompt[r] + st.generated[r] - st.computed[r])
        k = min(rem, budget)
        if k < rem and not cfg.chunked_prefill:
            if sched:
                break
            k = rem  # an unchunked prompt longer than the budget runs alone
        need = int(kv.blocks_for(int(st.computed[r]) + k) - st.held[r])
        if need > kv.free_blocks:
            break
        st.waiting.popleft()
        if st.swapped[r]:
            st.host.release(st.host.blocks_for(int(st.swapped[r])))
            st.swap_in += int(st.swapped[r])
            st.swapped[r] = 0
        kv.allocate(need)
        st.held[r] += need
        st.running = np.append(st.running, r)
        sched.append((r, k))
        admitted.append(r)
        budget -= k
    return admitted
