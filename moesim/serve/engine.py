"""The serving simulation: requests arrive, replicas run iterations, tokens come out.

An event-driven simulation at iteration level. Each replica (:class:`Replica`) has a clock: the start
of its next iteration, and ``ranks`` data-parallel ranks, each with its own queues and KV blocks; an
arriving request joins the rank with the fewest requests, and the ranks iterate in lock step. The loop always advances the replica with the earliest next event (its clock
when it has work, else the arrival of its next request): it takes in the requests that have arrived
by then, plans one iteration (:func:`moesim.serve.scheduler.plan`), times it with the replica's
iteration cost (:class:`moesim.serve.cost.IterationCost`, or any object with ``iteration_s(BatchWork)``
and, for several ranks, ``ranks_iteration_s([BatchWork])``) and applies it at its end. Requests arriving during an iteration join at the next one.

- Colocated: one replica serves prefill and decode.
- Disaggregated (``prefill`` and ``decode`` replicas): a request runs its prefill on the prefill replica
  (which samples its first token), then its KV (``kv_bytes_per_token_model`` x prompt tokens) moves over
  the link between the pools (``bytes / bandwidth + latency``; transfers do not contend) and it joins the
  decode replica's queue with that KV in place. A preempted request recomputes where it is.

Live KV spill (``SchedulerConfig.kv_offload = "spill"``, a replica with a ``spill`` tier,
:class:`moesim.serve.kv.SpillTier`): each rank also has blocks in the tier behind HBM; a rank's iteration moves the
KV its plan spills and reads the spilled KV its batch attends over across the tiers' channel, overlapping its
compute: the rank takes ``max(compute, spill.transfer_s(spilled + read tokens))``; the lock-step iteration the
slowest rank's. ``spill_wait_s`` logs what the transfer adds beyond that rank's compute.

SRAM above the KV tier (a replica with an ``sram`` tier, ``--kv-sram-gib``, :class:`moesim.serve.kv.SramTier`): each
rank keeps the newest KV blocks of its running requests in SRAM (:class:`moesim.serve.kv.SramBlocks`; every block a
request starts writing enters, the block that entered first moves down to HBM when SRAM is full; blocks keep their
home in the HBM pool, so admission and preemption are unchanged). The batch's KV tokens in SRAM go to the cost as
``BatchWork.kv_tokens_read_sram`` (attention reads them at the SRAM's bandwidth); the blocks moved down take
``sram.transfer_s(tokens)`` over the SRAM-HBM channel, overlapping compute as the spill does (the rank takes the
max of compute and each transfer; ``spill_wait_s`` holds the excess). Optional columns ``kv_sram_used_blocks``,
``sram_out_tokens``, ``kv_tokens_read_sram`` and ``slowest_rank_kv_tokens_read_sram`` are logged only then.

A request whose KV at its end (``prompt + output - 1`` tokens; ``prompt`` on a prefill replica) exceeds the
whole KV capacity of one rank of a replica it would use can never run: it is rejected at arrival and counted, never
silently dropped.

:func:`simulate` returns a :class:`ServeResult`: per-request times and counts, and one row per iteration.
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass, field

import numpy as np

from moesim.serve.cost import BatchWork, part_column
from moesim.serve.kv import KVBlocks, SpillTier, SramBlocks, SramTier
from workloads.requests import Requests
from moesim.serve.scheduler import Plan, ReplicaState, SchedulerConfig, plan

ITERATION_COLUMNS = ("replica", "start_s", "duration_s", "tokens", "prefill_tokens", "decode_tokens", "sequences",
                     "sampled", "kv_used_blocks", "kv_capacity_blocks", "kv_rank_used_max_blocks", "running",
                     "waiting", "preempted", "swap_out_tokens", "swap_in_tokens", "kv_host_used_blocks",
                     "attention_pairs", "kv_tokens_read", "slowest_rank", "slowest_rank_tokens",
                     "slowest_rank_sampled", "slowest_rank_attention_pairs", "slowest_rank_kv_tokens_read",
                     "slowest_rank_swap_tokens", "spill_out_tokens", "spill_read_tokens", "kv_spill_used_blocks",
                     "spill_wait_s")


@dataclass
class Rank:
    """One data-parallel rank of a replica: its queues (``state``), HBM KV blocks, host blocks and spill-tier blocks."""

    state: ReplicaState
    kv: KVBlocks
    host: KVBlocks | None
    spill: KVBlocks | None = None
    sram: SramBlocks | None = None


@dataclass
class Replica:
    """One pool of devices running ``ranks`` data-parallel schedulers in lock step. ``kv`` and ``host``: the
    KV blocks of one rank (copied per rank). ``role``: ``colocated``, ``prefill`` or ``decode``. ``cost``:
    ``iteration_s(BatchWork)`` for one rank, and ``ranks_iteration_s([BatchWork])`` when ``ranks > 1``."""

    name: str
    cost: object
    kv: KVBlocks
    role: str = "colocated"
    host: KVBlocks | None = None  # host-memory blocks for swapped-out KV (preemption "swap")
    ranks: int = 1
    spill: SpillTier | None = None  # the tier live KV spills to (kv_offload "spill"), per rank
    sram: SramTier | None = None  # SRAM above the KV tier holding the newest KV blocks (--kv-sram-gib), per rank
    clock_s: float = 0.0
    incoming: list = field(default_factory=list)  # heap of (time_s, seq, request)
    parts: list = field(default_factory=list)

    def busy(self) -> bool:
        return any(len(p.state.running) or p.state.waiting for p in self.parts)


@dataclass(frozen=True, eq=False)
class ServeResult:
    """``requests``: the input; per-request arrays [n] (NaN where it never happened): ``scheduled_at_s`` (first
    admitted), ``first_token_at_s``, ``finished_at_s``, ``preemptions``, ``evicted_tokens``, ``rejected``
    (bool), ``swapped_tokens`` (KV tokens swapped out to host, in total), ``rank`` (the data-parallel rank
    of its last replica); ``iterations``: dict of arrays, one row per iteration (:data:`ITERATION_COLUMNS`;
    KV columns summed over ranks, and the fullest rank's; ``kv_host_used_blocks``: host blocks holding swapped
    KV once the iteration's swaps are planned; ``attention_pairs``, ``kv_tokens_read``: the batch's attention work; ``slowest_rank`` and its work
    (``slowest_rank_*``): the rank whose time set the lock-step iteration, when the cost has ``rank_s``; with
    one scheduler, the cost's ``rank_share`` of the batch when it pools ranks); under per-request routing also
    that rank's parts as the cost computed them (``part_*_s``, :func:`moesim.serve.cost.part_column`; NaN in rows
    of a replica that recorded none; absent when no replica did))."""

    requests: Requests
    scheduled_at_s: np.ndarray
    first_token_at_s: np.ndarray
    finished_at_s: np.ndarray
    preemptions: np.ndarray
    evicted_tokens: np.ndarray
    swapped_tokens: np.ndarray
    rejected: np.ndarray
    generated: np.ndarray
    rank: np.ndarray
    iterations: dict
    replicas: dict
    transfer_s: np.ndarray | None = None


class _Log:
    def __init__(self):
        self.rows = {c: [] for c in ITERATION_COLUMNS}
        self.parts: dict[str, list] = {}  # part column -> one value per row (NaN where not recorded)
        self.extra: dict[str, list] = {}  # optional column -> one value per row

    def add(self, *values):
        for c, v in zip(ITERATION_COLUMNS, values):
            self.rows[c].append(v)

    def add_parts(self, parts: dict | None) -> None:
        """The parts of the row just added (seconds by part name), or None: NaN in every part column."""
        n = len(self.rows["replica"])
        for k in parts or ():
            self.parts.setdefault(part_column(k), [np.nan] * (n - 1))
        for c, v in self.parts.items():
            v.append(np.nan)
        for k, x in (parts or {}).items():
            self.parts[part_column(k)][-1] = float(x)

    def add_extra(self, values: dict) -> None:
        """Optional columns of the row just added (SRAM KV); rows without them read 0."""
        n = len(self.rows["replica"])
        for k, x in values.items():
            col = self.extra.setdefault(k, [])
            col.extend([0] * (n - 1 - len(col)))
            col.append(x)

    def arrays(self) -> dict:
        n = len(self.rows["replica"])
        extra = {k: v + [0] * (n - len(v)) for k, v in self.extra.items()}
        return {c: np.array(v) for c, v in (self.rows | self.parts | extra).items()}


class _Sim:
    def __init__(self, req: Requests, replicas: list[Replica], sched: SchedulerConfig, transfer=None, progress=None):
        n = len(req)
        self.req, self.replicas, self.cfg, self.progress = req, replicas, sched, progress
        self.transfer = transfer  # (bytes_per_token, bandwidth_bytes_per_s, latency_s) for disaggregation
        self.times = {k: np.full(n, np.nan) for k in ("scheduled", "first", "finished", "transfer")}
        self.rejected = np.zeros(n, dtype=bool)
        self.rank = np.full(n, -1, dtype=np.int64)
        self.shared: dict = {}
        for rep in replicas:
            if rep.ranks < 1:
                raise ValueError(f"replica {rep.name}: ranks must be >= 1, got {rep.ranks}")
            if sched.kv_offload == "spill" and rep.spill is None:
                raise ValueError(f"replica {rep.name}: --kv-offload spill needs the tier KV spills to")
            target = np.ones(n, dtype=np.int64) if rep.role == "prefill" else req.output_tokens
            rep.parts = [self._rank(rep, target) for _ in range(rep.ranks)]
            routing = getattr(rep.cost, "request_routing", None)
            if routing is not None and len(routing.starts) != n:
                routing.bind(n)
        self.log, self.seq, self.done = _Log(), 0, 0

    def _rank(self, rep: Replica, target: np.ndarray) -> Rank:
        st = ReplicaState(self.req.prompt_tokens, target, self.shared)
        host = dataclasses.replace(rep.host, used_blocks=0, peak_blocks=0) if rep.host is not None else None
        st.host = host
        spill = None
        if self.cfg.kv_offload == "spill":
            spill = st.spill = KVBlocks(rep.spill.capacity_blocks, rep.kv.block_size)
        sram = SramBlocks(rep.sram.capacity_blocks) if rep.sram is not None else None
        return Rank(st, dataclasses.replace(rep.kv, used_blocks=0, peak_blocks=0), host, spill, sram)

    def count_done(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, len(self.req))

    def push(self, rep: Replica, t: float, r: int) -> None:
        heapq.heappush(rep.incoming, (t, self.seq, r))
        self.seq += 1

    def next_time(self, rep: Replica) -> float:
        if rep.busy():
            return rep.clock_s
        return max(rep.clock_s, rep.incoming[0][0]) if rep.incoming else np.inf

    def run(self) -> None:
        first = self.replicas[0]
        for r in range(len(self.req)):
            self.push(first, float(self.req.arrival_s[r]), r)
        while True:
            rep = min(self.replicas, key=self.next_time)
            t = self.next_time(rep)
            if t == np.inf:
                break
            rep.clock_s = t
            self.ingest(rep)
            self.iterate(rep)

    def ingest(self, rep: Replica) -> None:
        """Arrived requests join the rank with the fewest requests (running and waiting; lowest index on ties)."""
        while rep.incoming and rep.incoming[0][0] <= rep.clock_s:
            _, _, r = heapq.heappop(rep.incoming)
            if rep.role != "decode" and not self.fits(r):
                self.rejected[r] = True
                self.count_done(1)
                continue
            k = min(range(len(rep.parts)), key=lambda i: (len(rep.parts[i].state.running)
                                                          + len(rep.parts[i].state.waiting), i))
            rep.parts[k].state.waiting.append(r)
            self.rank[r] = k

    def fits(self, r: int) -> bool:
        """Whether request ``r`` fits the KV capacity of one rank of every replica it would use."""
        p, o = int(self.req.prompt_tokens[r]), int(self.req.output_tokens[r])
        for rep in self.replicas:
            tokens = p if rep.role == "prefill" else p + o - 1
            if (rep.role != "decode" or o > 1) and rep.kv.blocks_for(tokens) > rep.kv.capacity_blocks:
                return False
        return True

    def iterate(self, rep: Replica) -> None:
        plans = [plan(part.state, part.kv, self.cfg) for part in rep.parts]
        for part, p in zip(rep.parts, plans):
            st = part.state
            if not len(p.ids) and st.waiting and not len(st.running) and not p.preempted:
                raise RuntimeError(f"replica {rep.name}: request {st.waiting[0]} cannot be admitted into an empty "
                                   "KV cache (rejection at arrival should have caught it)")
        if not any(len(p.ids) for p in plans):
            return
        works = [_work(p) for p in plans]
        sram_out = [_place_sram(part, p, rep.kv.block_size) for part, p in zip(rep.parts, plans)]
        works = [dataclasses.replace(w, kv_tokens_read_sram=s[1]) for w, s in zip(works, sram_out)]
        routing = getattr(rep.cost, "request_routing", None)
        if routing is not None:  # per-request routing: every rank's work carries all ranks' token rows (one EP group)
            rows = routing.rows(np.concatenate([p.ids for p in plans]), np.concatenate([p.context for p in plans]),
                                np.concatenate([p.tokens for p in plans]))
            ends = np.cumsum([w.tokens for w in works])  # rank i's tokens are rows[ends[i] - tokens : ends[i]]
            works = [dataclasses.replace(w, routing_rows=rows, rank=i, rank_rows=rows[e - w.tokens:e])
                     for i, (w, e) in enumerate(zip(works, ends))]
        dt, slow, slow_work, wait, parts = self.iteration_time(rep, plans, works, [s[0] for s in sram_out])
        if not dt > 0:
            raise ValueError(f"iteration time {dt} s is not positive: check the system spec's bandwidths and peaks")
        self.record(rep, plans, works, dt, slow, slow_work, wait)
        self.log.add_parts(parts)
        if rep.sram is not None:
            self.log.add_extra({"kv_sram_used_blocks": sum(part.sram.used_blocks for part in rep.parts),
                                "sram_out_tokens": sum(s[0] for s in sram_out),
                                "kv_tokens_read_sram": sum(s[1] for s in sram_out),
                                "slowest_rank_kv_tokens_read_sram": slow_work.kv_tokens_read_sram})
        rep.clock_s += dt
        for part, p in zip(rep.parts, plans):
            self.apply(rep, part, p)

    def iteration_time(self, rep: Replica, plans: list[Plan], works: list[BatchWork], sram_out=None):
        """(seconds, slowest rank, its work, seconds the KV spill transfers add beyond its compute, its parts) of one
        lock-step iteration; each rank takes max(compute, its spill transfer) when KV spills (module docstring).
        The parts (the cost's ``rank_parts_s``, adding up to the rank's compute) only under per-request routing,
        else None (``moesim.serve.metrics.time_breakdown`` rebuilds them from the logged work)."""
        spill = None
        if self.cfg.kv_offload == "spill":
            spill = [rep.spill.transfer_s(p.spill_out_tokens + p.spill_read_tokens) for p in plans]
        if rep.sram is not None:  # blocks moving down from SRAM overlap compute on their own channel too
            down = [rep.sram.transfer_s(t) for t in sram_out]
            spill = down if spill is None else [max(a, b) for a, b in zip(spill, down)]
        parted = works[0].routing_rows is not None and hasattr(rep.cost, "rank_parts_s")
        slow, slow_work, parts = 0, works[0], None
        if len(works) == 1:  # one scheduler: the cost may pool the batch over its ranks (rank_share)
            if hasattr(rep.cost, "rank_share"):
                slow_work = rep.cost.rank_share(works[0])
            if parted:
                parts = rep.cost.rank_parts_s(slow_work)
                dt = float(sum(parts.values()))
            else:
                dt = float(rep.cost.iteration_s(works[0]))
        elif hasattr(rep.cost, "rank_s"):  # per-rank times: the slowest rank sets the lock-step iteration
            ranks = [rep.cost.rank_parts_s(w) for w in works] if parted else None
            times = [sum(r.values()) for r in ranks] if parted else [rep.cost.rank_s(w) for w in works]
            total = times if spill is None else [max(c, s) for c, s in zip(times, spill)]
            slow = int(np.argmax(total))
            return (float(total[slow]), slow, works[slow], float(total[slow] - times[slow]),
                    ranks[slow] if parted else None)
        else:
            dt = float(rep.cost.ranks_iteration_s(works))
        if spill is None:
            return dt, slow, slow_work, 0.0, parts
        total = max(dt, max(spill))  # one plan per rank: one scheduler's is spill[0]
        return total, slow, slow_work, total - dt, parts

    def record(self, rep: Replica, plans: list[Plan], works: list[BatchWork], dt: float, slow: int,
               sw: BatchWork, wait: float) -> None:
        st = rep.parts[0].state  # per-request arrays are shared by every rank
        decode = 0
        for p in plans:
            for r in p.admitted:
                if np.isnan(self.times["scheduled"][r]):
                    self.times["scheduled"][r] = rep.clock_s
            # decode tokens: positions past the prompt (generated tokens fed back, recomputed ones included)
            decode += int(np.sum(np.maximum(0, p.context + p.tokens - np.maximum(p.context, st.prompt[p.ids]))))
        tokens = sum(w.tokens for w in works)
        used = [part.kv.used_blocks for part in rep.parts]
        self.log.add(rep.name, rep.clock_s, dt, tokens, tokens - decode, decode, sum(len(p.ids) for p in plans),
                     sum(w.sampled for w in works), sum(used), rep.kv.capacity_blocks * len(rep.parts), max(used),
                     sum(len(part.state.running) for part in rep.parts),
                     sum(len(part.state.waiting) for part in rep.parts), sum(len(p.preempted) for p in plans),
                     sum(p.swap_out_tokens for p in plans), sum(p.swap_in_tokens for p in plans),
                     sum(part.host.used_blocks for part in rep.parts if part.host is not None),
                     sum(w.attention_pairs for w in works), sum(w.kv_tokens_read for w in works), slow,
                     sw.tokens, sw.sampled, sw.attention_pairs, sw.kv_tokens_read, sw.swap_tokens,
                     sum(p.spill_out_tokens for p in plans), sum(p.spill_read_tokens for p in plans),
                     sum(part.spill.used_blocks for part in rep.parts if part.spill is not None), wait)

    def apply(self, rep: Replica, part: Rank, p: Plan) -> None:
        st, end = part.state, rep.clock_s
        st.computed[p.ids] += p.tokens
        g = p.ids[p.samples]
        st.generated[g] += 1
        new = g[st.generated[g] == 1]
        self.times["first"][new] = end
        fin = g[st.generated[g] >= st.target[g]]
        if part.sram is not None:
            part.sram.release(np.concatenate([fin, np.asarray(p.preempted, dtype=np.int64)]))
        if len(fin):
            part.kv.release(int(st.held[fin].sum()))
            st.held[fin] = 0
            if part.spill is not None:
                part.spill.release(int(st.spilled[fin].sum()))
                st.spilled[fin] = 0
            st.running = st.running[~np.isin(st.running, fin)]
            if rep.role == "prefill":
                self.hand_over(fin, end)
            else:
                self.times["finished"][fin] = end
                self.count_done(len(fin))

    def hand_over(self, fin: np.ndarray, end: float) -> None:
        """Prefill finished: keep the KV's token count, send the request to the decode replica."""
        bytes_per_token, bw, lat = self.transfer
        dec = self.replicas[1]
        prompt, generated = self.req.prompt_tokens, self.shared["generated"]
        for r in fin.tolist():
            if generated[r] >= self.req.output_tokens[r]:  # one-token outputs end on the prefill pool
                self.times["finished"][r] = end
                self.count_done(1)
                continue
            t = float(prompt[r]) * bytes_per_token / bw + lat
            self.times["transfer"][r] = t
            self.push(dec, end + t, r)


def _work(p: Plan) -> BatchWork:
    n = p.tokens.astype(float)
    return BatchWork(tokens=int(p.tokens.sum()), sampled=int(p.samples.sum()),
                     attention_pairs=float(np.sum(n * p.context + 0.5 * n * n)),
                     kv_tokens_read=float(np.sum(p.context + n)), swap_tokens=p.swap_out_tokens + p.swap_in_tokens)


def _place_sram(part: Rank, p: Plan, block_size: int) -> tuple[int, float]:
    """(KV tokens moved down from SRAM, KV tokens the batch reads from SRAM) of one rank's plan: the blocks its
    requests start writing enter SRAM (:meth:`SramBlocks.write`); preempted requests' SRAM blocks go first.
    (0, 0.0) without SRAM. Spilled blocks (a prefix of a request) are never read from SRAM."""
    sram = part.sram
    if sram is None:
        return 0, 0.0
    sram.release(p.preempted)
    end = p.context + p.tokens
    new = -(-end // block_size) - (-(-p.context // block_size))
    moved = sram.write([r for r, k in zip(p.ids.tolist(), new.tolist()) for _ in range(k)])
    st = part.state
    read = sum(min(sram.tokens(r, e, block_size), e - int(st.spilled[r]) * block_size)
               for r, e in zip(p.ids.tolist(), end.tolist()))
    return moved * block_size, float(read)


def simulate(requests: Requests, replicas: list[Replica], sched: SchedulerConfig, *,
             transfer: tuple[float, float, float] | None = None, progress=None) -> ServeResult:
    """Serve ``requests`` on ``replicas`` (one colocated replica, or [prefill, decode] with ``transfer`` =
    (KV bytes per token, link bytes/s, link latency s)); see the module docstring."""
    roles = [r.role for r in replicas]
    if roles not in (["colocated"], ["prefill", "decode"]):
        raise ValueError(f"replicas must be one colocated or a prefill and a decode replica, got {roles}")
    if roles == ["prefill", "decode"] and transfer is None:
        raise ValueError("disaggregated serving needs the KV transfer link")
    sim = _Sim(requests, replicas, sched, transfer, progress)
    sim.run()
    sh = sim.shared
    return ServeResult(requests=requests, scheduled_at_s=sim.times["scheduled"], first_token_at_s=sim.times["first"],
                       finished_at_s=sim.times["finished"], preemptions=sh["preemptions"].copy(),
                       evicted_tokens=sh["evicted_tokens"].copy(), swapped_tokens=sh["swapped_tokens"].copy(),
                       rejected=sim.rejected, generated=sh["generated"].copy(), rank=sim.rank,
                       iterations=sim.log.arrays(), replicas={r.name: _replica_info(r) for r in replicas},
                       transfer_s=sim.times["transfer"] if transfer is not None else None)


def _replica_info(rep: Replica) -> dict:
    hosts = [p.host for p in rep.parts if p.host is not None]
    spills = [p.spill for p in rep.parts if p.spill is not None]
    spill = {} if not spills else {
        "spill_tier": rep.spill.name, "kv_tier": rep.spill.kv_tier,
        "spill_capacity_blocks_per_rank": rep.spill.capacity_blocks,
        "spill_peak_blocks_per_rank": max(s.peak_blocks for s in spills),
        "spill_bytes_per_token_per_device": rep.spill.bytes_per_token}
    srams = [p.sram for p in rep.parts if p.sram is not None]
    if srams:
        spill.update({"sram_tier": rep.sram.name, "sram_capacity_blocks_per_rank": rep.sram.capacity_blocks,
                      "sram_peak_blocks_per_rank": max(s.peak_blocks for s in srams),
                      "sram_bytes_per_token_per_device": rep.sram.bytes_per_token})
    return {**spill, "role": rep.role, "ranks": len(rep.parts), "kv_block_size": rep.kv.block_size,
            "kv_capacity_blocks_per_rank": rep.kv.capacity_blocks,
            "kv_peak_blocks_per_rank": max(p.kv.peak_blocks for p in rep.parts),
            "host_capacity_blocks_per_rank": rep.host.capacity_blocks if rep.host is not None else 0,
            "host_peak_blocks_per_rank": max((h.peak_blocks for h in hosts), default=0)}
