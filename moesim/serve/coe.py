"""Composition of Experts (CoE) on the serving engine: whole-model switching as shared-bandwidth transfers.

A CoE node serves ``num_experts`` expert models of one architecture (Samba-CoE: Llama-2-7B-class experts)
one at a time on all its ``tp`` devices. Requests arrive (:mod:`workloads.requests`) and are routed in
two steps, prompt -> category -> expert (:func:`moesim.memory.coe.two_step_route`). The node's HBM holds
``slots`` models; every model lives in the capacity tier behind HBM (``ddr`` on an SN40L socket, ``host``
memory behind PCIe on a GPU: :meth:`moesim.memory.tiers.MemoryHierarchy.backing_tier`, chosen by
:meth:`moesim.memory.coe.Deployment.from_system`).

The server loop (a SimPy process, :func:`serve_coe`):

1. pick the expert of the oldest pending request (FIFO); its batch is its first ``max_batch`` pending
   requests (static batching per model: requests arriving later wait for the next batch);
2. if the model is not in HBM, *switch*: copy its per-device shard (``IterationCost.weight_bytes_per_device``)
   store -> HBM on the tier model (:class:`moesim.memory.tiers.SimMemory`: a transfer alone takes
   ``bytes / bandwidth + latency`` of its channel; concurrent transfers on one channel share its bandwidth);
   every device copies its own shard over its own channel at the same time, so one device is simulated.
   The least recently used resident model not needed now is evicted; a model being loaded holds its slot;
3. with ``overlap`` on, the models of the next ``prefetch`` distinct pending experts (if not resident) start
   loading *before* the batch computes, when a slot can be had without evicting the running model or
   another target, so their copies overlap compute (and share their channel's bandwidth with each other)
   (copy engines and DMA run beside compute on both GPUs and RDUs; HBM bandwidth taken by the copy from the
   compute is not modelled);
4. the batch runs prefill and decode on the serving engine (:func:`moesim.serve.engine.simulate`, one
   replica with the whole-model :class:`moesim.serve.cost.IterationCost`: the training engine's layers,
   tensor-parallel collectives on the scale-up link), all requests of the batch admitted at its start.

Values in, values out: no file I/O; the RNG is passed in.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
import simpy

from hwmodels.specs import System
from moesim.memory.coe import Deployment, zipf_route
from moesim.memory.tiers import MemoryHierarchy, SimMemory
from moesim.serve.cost import IterationCost, ServeError, ServeLayout, pool_system
from moesim.serve.engine import Replica, simulate
from moesim.serve.kv import KVBlocks
from workloads.requests import Requests
from moesim.serve.scheduler import SchedulerConfig
from workloads.hf_config import ModelConfig


@dataclass(frozen=True, eq=False)
class CoENode:
    """One deployment of the composition: ``cost`` (per-iteration time of one expert on ``tp`` devices),
    ``hierarchy`` (the tiers of one device), ``store_tier`` -> ``hbm_tier`` (where switches copy from and to),
    ``shard_bytes`` (weights of one expert per device), ``slots`` (experts HBM holds at once), ``store_slots``
    (experts the store tier holds) and ``replicas_per_node`` (such deployments one node of the system holds)."""

    name: str
    cost: IterationCost
    hierarchy: MemoryHierarchy
    store_tier: str
    hbm_tier: str
    shard_bytes: float
    slots: int
    store_slots: int
    replicas_per_node: int = 1

    def switch_closed_form_s(self) -> float:
        """One switch alone: shard bytes / channel bandwidth + channel latency."""
        return self.hierarchy.transfer_time_s(self.shard_bytes, self.store_tier, self.hbm_tier)


def coe_node(cfg: ModelConfig, system: System, *, tp: int, kv_reserve_tokens: int, cost=None,
             dtype: str = "bf16") -> CoENode:
    """A CoE deployment of expert ``cfg`` on ``tp`` devices of ``system`` (one node's devices at most).
    ``kv_reserve_tokens``: KV tokens kept free in HBM for the running batch (it lowers ``slots``)."""
    if tp < 1 or tp > system.devices_per_node:
        raise ServeError(f"--tp {tp} must lie in 1..{system.devices_per_node} (one node of {system.name!r})")
    pool = system if tp == system.num_devices else pool_system(system, tp)
    ic = IterationCost(cfg, pool, ServeLayout(tp=tp), cost, dtype=dtype)
    dep = Deployment.from_system(system, tp=tp, dtype=dtype)
    shard = ic.weight_bytes_per_device
    free = ic.hbm_budget_bytes - kv_reserve_tokens * ic.kv_bytes_per_token
    slots = int(free // shard)
    if slots < 1:
        raise ServeError(f"one {cfg.name} shard ({shard:.4g} bytes) and {kv_reserve_tokens} KV tokens do not fit "
                         f"the HBM of {system.name!r}; raise --tp")
    store_slots = int(dep.hierarchy.tier(dep.store_tier).capacity_bytes // shard)
    return CoENode(name=f"{system.name} tp{tp}", cost=ic, hierarchy=dep.hierarchy, store_tier=dep.store_tier,
                   hbm_tier=dep.hbm_tier, shard_bytes=shard, slots=slots, store_slots=store_slots,
                   replicas_per_node=system.devices_per_node // tp)


def nodes_to_hold(num_experts: int, experts_per_node: int) -> int:
    """Machines needed to hold ``num_experts`` models at ``experts_per_node`` each (ceil)."""
    if experts_per_node < 1:
        raise ServeError(f"a node must hold at least one expert, got {experts_per_node}")
    return -(-num_experts // experts_per_node)


def route_experts(n: int, num_experts: int, rng: np.random.Generator, *, zipf_s: float = 1.0,
                  num_categories: int | None = None, category_to_expert: np.ndarray | None = None) -> np.ndarray:
    """Expert id [n] per request: step 1 draws a category with Zipf(``zipf_s``) popularity (popular categories
    are a random permutation, not the low ids), step 2 maps it through ``category_to_expert`` (default
    category c -> expert c mod num_experts): the experts of :func:`moesim.memory.coe.zipf_route`."""
    if n < 0 or num_experts < 1:
        raise ServeError(f"need n >= 0 requests and num_experts >= 1, got {n}, {num_experts}")
    return zipf_route(n, num_experts, rng, zipf_s=zipf_s, num_categories=num_categories,
                      category_to_expert=category_to_expert)[1]


@dataclass(frozen=True)
class CoEOptions:
    """``max_batch``: requests of one model served together; ``overlap``: prefetch the models of the next
    ``prefetch`` distinct pending experts during compute (their copies share the channel); ``preload``: HBM
    starts holding experts 0..slots-1 (else empty)."""

    max_batch: int = 8
    overlap: bool = True
    prefetch: int = 1
    preload: bool = False
    sched: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass(frozen=True, eq=False)
class CoEResult:
    """Per request [n] (NaN where it never happened): ``experts``, ``batch`` (index of the batch that served
    it), ``first_token_at_s``, ``finished_at_s``. ``batches``: one dict per batch (start_s, expert, size,
    wait_s = time compute waited for the model's copy, compute_s). ``switches``: copies started (prefetches
    included); ``switch_wait_s``: compute idle on copies in total; ``bytes_by_path``: bytes per tier path of
    one device; ``peak_hbm_models``: most models in HBM or being copied there at once (at most ``slots``)."""

    requests: Requests
    experts: np.ndarray
    batch: np.ndarray
    first_token_at_s: np.ndarray
    finished_at_s: np.ndarray
    batches: list
    switches: int
    switch_wait_s: float
    compute_s: float
    makespan_s: float
    bytes_by_path: dict
    peak_hbm_models: int = 0

    def summary(self) -> dict:
        arr = self.requests.arrival_s
        lat = self.finished_at_s - arr
        ttft = self.first_token_at_s - arr
        out_tokens = float(np.sum(self.requests.output_tokens))
        return {"requests": len(arr), "served": int(np.sum(np.isfinite(self.finished_at_s))),
                "batches": len(self.batches), "switches": self.switches, "switch_wait_s": self.switch_wait_s,
                "compute_s": self.compute_s, "makespan_s": self.makespan_s,
                "mean_latency_s": float(np.mean(lat)) if len(lat) else 0.0,
                "p99_latency_s": float(np.percentile(lat, 99)) if len(lat) else 0.0,
                "mean_ttft_s": float(np.mean(ttft)) if len(ttft) else 0.0,
                "output_tokens_per_s": out_tokens / self.makespan_s if self.makespan_s > 0 else 0.0}


class _BatchTimer:
    """Per-request first-token and finish offsets of one batch on the serving engine (memoized by lengths)."""

    def __init__(self, node: CoENode, sched: SchedulerConfig):
        self.node, self.sched, self.memo = node, sched, {}

    def __call__(self, prompts: np.ndarray, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key = (tuple(prompts.tolist()), tuple(outputs.tolist()))
        got = self.memo.get(key)
        if got is None:
            ic = self.node.cost
            rep = Replica("coe", ic, KVBlocks(ic.kv_capacity_blocks(self.sched.block_size), self.sched.block_size))
            res = simulate(Requests(np.zeros(len(prompts)), prompts, outputs), [rep], self.sched)
            if np.any(res.rejected) or not np.all(np.isfinite(res.finished_at_s)):
                raise ServeError(f"a batch of {len(prompts)} requests does not fit the KV cache of {self.node.name}")
            got = self.memo[key] = (res.first_token_at_s.copy(), res.finished_at_s.copy())
        return got


class _CoESim:
    """The SimPy model of :func:`serve_coe` (see the module docstring)."""

    def __init__(self, req: Requests, experts: np.ndarray, node: CoENode, opts: CoEOptions):
        n = len(req)
        self.req, self.experts, self.node, self.opts = req, experts, node, opts
        self.env = simpy.Environment()
        self.mem = SimMemory(self.env, node.hierarchy)
        self.timer = _BatchTimer(node, opts.sched)
        self.resident: OrderedDict = OrderedDict()  # expert -> None, least recently used first
        self.loading: dict = {}  # expert -> SimPy process of its copy
        self.pending: deque = deque()  # request ids in arrival order
        self.wake = self.env.event()
        self.batch = np.full(n, -1, dtype=np.int64)
        self.first = np.full(n, np.nan)
        self.finished = np.full(n, np.nan)
        self.batches: list = []
        self.switches = self.served = self.peak_models = 0
        self.wait_s = self.compute_s = 0.0
        if opts.preload:
            for e in range(min(node.slots, int(experts.max()) + 1 if n else 0)):
                self.resident[e] = None

    def arrivals(self):
        for r in range(len(self.req)):
            dt = float(self.req.arrival_s[r]) - self.env.now
            if dt > 0:
                yield self.env.timeout(dt)
            self.pending.append(r)
            if not self.wake.triggered:
                self.wake.succeed()

    def _evict_for(self, keep: set) -> bool:
        """Free a slot (LRU resident not in ``keep``); False when none can go."""
        if len(self.resident) + len(self.loading) < self.node.slots:
            return True
        victim = next((e for e in self.resident if e not in keep), None)
        if victim is None:
            return False
        del self.resident[victim]
        return True

    def _load(self, e: int) -> simpy.Process:
        """Start copying model ``e`` store -> HBM (it holds a slot from now on)."""
        node = self.node
        proc = self.mem.transfer(node.shard_bytes, node.store_tier, node.hbm_tier)
        self.loading[e] = proc
        self.switches += 1
        self.peak_models = max(self.peak_models, len(self.resident) + len(self.loading))

        def arrived(_ev, e=e):
            del self.loading[e]
            self.resident[e] = None

        proc.callbacks.append(arrived)
        return proc

    def _ensure(self, e: int):
        """Wait until model ``e`` is in HBM (starting its copy if needed); returns the seconds waited."""
        t0 = self.env.now
        if e not in self.resident:
            proc = self.loading.get(e)
            if proc is None:
                if not self._evict_for(keep=set()):  # every slot is loading: wait for one copy
                    yield self.env.any_of(list(self.loading.values()))
                    self._evict_for(keep={e})
                proc = self._load(e)
            yield proc
        self.resident.move_to_end(e)
        return self.env.now - t0

    def _prefetch(self, running: int) -> None:
        """Start copying the models of the next ``prefetch`` distinct pending experts (not the running one)."""
        targets: list[int] = []
        for r in self.pending:
            e = int(self.experts[r])
            if e != running and e not in targets:
                targets.append(e)
                if len(targets) == self.opts.prefetch:
                    break
        keep = {running, *targets}
        for e in targets:
            if e in self.resident or e in self.loading:
                continue
            if not self._evict_for(keep=keep):
                return
            self._load(e)

    def server(self):
        while True:
            if not self.pending:
                if self.served == len(self.req):
                    return
                self.wake = self.env.event()
                yield self.wake
            e = int(self.experts[self.pending[0]])
            ids = [r for r in self.pending if int(self.experts[r]) == e][:self.opts.max_batch]
            for r in ids:
                self.pending.remove(r)
            wait = yield from self._ensure(e)
            if self.opts.overlap:
                self._prefetch(e)
            first, fin = self.timer(self.req.prompt_tokens[ids], self.req.output_tokens[ids])
            start = self.env.now
            dur = float(np.max(fin))
            yield self.env.timeout(dur)
            self.first[ids], self.finished[ids] = start + first, start + fin
            self.batch[ids] = len(self.batches)
            self.served += len(ids)
            self.batches.append({"start_s": start, "expert": e, "size": len(ids), "wait_s": wait, "compute_s": dur})
            self.wait_s += wait
            self.compute_s += dur


def serve_coe(requests: Requests, experts: np.ndarray, node: CoENode, opts: CoEOptions = CoEOptions()) -> CoEResult:
    """Serve ``requests`` (routed to ``experts`` [n], ids 0..) on ``node`` (see the module docstring)."""
    experts = np.asarray(experts, dtype=np.int64)
    if len(experts) != len(requests):
        raise ServeError(f"{len(requests)} requests but {len(experts)} expert ids")
    if len(experts) and experts.min() < 0:
        raise ServeError(f"expert ids must be >= 0, got {int(experts.min())}")
    if len(experts) and experts.max() >= node.store_slots:
        raise ServeError(f"{int(experts.max()) + 1} experts do not fit the {node.store_tier} tier of {node.name} "
                         f"({node.store_slots} models)")
    if opts.max_batch < 1 or opts.prefetch < 0:
        raise ServeError(f"--max-batch must be >= 1 and --prefetch >= 0, got {opts.max_batch}, {opts.prefetch}")
    sim = _CoESim(requests, experts, node, opts)
    if len(requests):
        sim.env.process(sim.arrivals())
        sim.env.process(sim.server())
        sim.env.run()
    return CoEResult(requests=requests, experts=experts, batch=sim.batch, first_token_at_s=sim.first,
                     finished_at_s=sim.finished, batches=sim.batches, switches=sim.switches,
                     switch_wait_s=sim.wait_s, compute_s=sim.compute_s,
                     makespan_s=float(np.nanmax(sim.finished)) if len(requests) else 0.0,
                     bytes_by_path=dict(sim.mem.bytes_by_path),
                     peak_hbm_models=max(sim.peak_models, len(sim.resident)))


def serve_coe_replicas(requests: Requests, experts: np.ndarray, node: CoENode, replicas: int,
                       opts: CoEOptions = CoEOptions()) -> list[CoEResult]:
    """``replicas`` independent copies of ``node`` (e.g. the 8 GPUs of a DGX serving one expert each, with
    their own PCIe links): expert ``e`` is served by replica ``e mod replicas``; one result per replica."""
    if replicas < 1:
        raise ServeError(f"replicas must be >= 1, got {replicas}")
    experts = np.asarray(experts, dtype=np.int64)
    if len(experts) and experts.max() >= node.store_slots:  # the store tier (host memory) is the node's, shared
        raise ServeError(f"{int(experts.max()) + 1} experts do not fit the {node.store_tier} tier of {node.name} "
                         f"({node.store_slots} models)")
    out = []
    for k in range(replicas):
        sel = np.flatnonzero(experts % replicas == k)
        sub = Requests(requests.arrival_s[sel], requests.prompt_tokens[sel], requests.output_tokens[sel],
                       source=requests.source)
        out.append(serve_coe(sub, experts[sel] // replicas, node, opts))
    return out
