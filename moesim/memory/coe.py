"""Model switching for a Composition of Experts (CoE, SambaNova Samba-CoE style).

A stream of requests is routed in two steps, prompt -> category (a router model) -> expert model
(a fixed category -> expert table). All expert models live in a capacity tier (``ddr`` on an SN40L,
``host`` DDR behind PCIe on a DGX); ``slots`` of them fit in HBM at once. Serving a request whose
model is not in HBM first *switches*: its weights are copied from the store tier to HBM. One model
runs at a time on the whole deployment (tensor-parallel over ``tp`` devices, each device copying its
1/tp shard over its own link, concurrently), so

    switch_s = transfer_time(weight_bytes / tp, store -> hbm)  (bytes / bandwidth + latency; 0 if resident)
    service_s(batch) = prefill + output_tokens x decode step, each max(FLOPs / peak, weight bytes / HBM bw)
                       per device + tensor-parallel all-reduces over the scale-up link (ring; 0 for tp = 1),
                       plus ``overhead_s_per_token`` per decode step.

Schedulers are plain functions ``(ServeState) -> expert to serve next``, named in one dict,
:data:`SCHEDULERS`: ``fifo`` (arrival order, FIFO eviction), ``lru`` (arrival order, LRU eviction) and
``cpsat`` (OR-Tools CP-SAT: pins the most valuable models in HBM (a knapsack on request counts x switch
time) and orders/batches the pending requests by model to cut switches while meeting a latency bound
where it can). Adding one is one edit: write the function and name it in :data:`SCHEDULERS`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from hwmodels.collectives import ring_time_s
from hwmodels.specs import System
from moebase.units import DEFAULT_DTYPE, DTYPE_BYTES, GB
from moesim.memory.tiers import MemoryError_, MemoryHierarchy

#: FLOPs of one token through a dense model: one multiply-add (2 FLOPs) per parameter
FLOPS_PER_PARAM_PER_TOKEN = 2.0
DEFAULT_DTYPE_BYTES = DTYPE_BYTES[DEFAULT_DTYPE]


@dataclass(frozen=True)
class ExpertModel:
    """One expert model of the composition: weight bytes and parameters (FLOPs per token = 2 x params)."""

    name: str
    weight_bytes: float
    num_params: float
    num_layers: int = 0  # decoder layers (for tensor-parallel all-reduces; 0 = not modelled)
    hidden_size: int = 0
    dtype_bytes: int = DEFAULT_DTYPE_BYTES

    @classmethod
    def dense(cls, name: str, num_params: float, dtype_bytes: int = DEFAULT_DTYPE_BYTES, num_layers: int = 0,
              hidden_size: int = 0) -> "ExpertModel":
        return cls(name=name, weight_bytes=float(num_params) * dtype_bytes, num_params=float(num_params),
                   num_layers=num_layers, hidden_size=hidden_size, dtype_bytes=dtype_bytes)

    @classmethod
    def llama2_7b(cls, name: str = "llama-2-7b") -> "ExpertModel":
        """Llama-2-7B in bf16 (the base of Samba-CoE's experts)."""
        return cls.dense(name, LLAMA2_7B_PARAMS, DTYPE_BYTES["bf16"], num_layers=LLAMA2_7B_LAYERS,
                         hidden_size=LLAMA2_7B_HIDDEN_SIZE)


# Llama-2-7B: 6.74e9 parameters (Touvron et al. 2023, Table 1 "7B"; HF config: 32 layers, hidden 4096,
# intermediate 11008, vocab 32000 -> 6,738,415,616 parameters). Samba-CoE's experts derive from it.
LLAMA2_7B_PARAMS = 6_738_415_616
LLAMA2_7B_LAYERS = 32
LLAMA2_7B_HIDDEN_SIZE = 4096


@dataclass(frozen=True)
class Request:
    """One request: arrival instant, the category the router chose, the expert model it maps to."""

    id: int
    arrival_at_s: float
    category: int
    expert: int
    prompt_tokens: int
    output_tokens: int


def two_step_route(prompt_categories: np.ndarray, category_to_expert: np.ndarray, num_experts: int) -> np.ndarray:
    """Step 2 of the routing: category [R] -> expert [R] through ``category_to_expert`` [C].
    Raises ValueError for unknown categories or experts."""
    cats = np.asarray(prompt_categories, dtype=np.int64)
    table = np.asarray(category_to_expert, dtype=np.int64)
    if len(cats) and (cats.min() < 0 or cats.max() >= len(table)):
        raise MemoryError_(f"request for unknown category {int(cats.max() if cats.max() >= len(table) else cats.min())}"
                           f" (categories are 0..{len(table) - 1})")
    experts = table[cats]
    bad = (experts < 0) | (experts >= num_experts)
    if bad.any():
        raise MemoryError_(f"request routed to unknown expert {int(experts[bad][0])} "
                           f"(the composition has experts 0..{num_experts - 1})")
    return experts


def zipf_route(n: int, num_experts: int, rng: np.random.Generator, *, zipf_s: float = 1.0,
               num_categories: int | None = None,
               category_to_expert: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Category [n] and expert [n] of ``n`` requests. Step 1 draws categories with Zipf(``zipf_s``) popularity
    (the popular categories are a random permutation, not the low ids); step 2 maps them through
    ``category_to_expert`` (default: category c -> expert c mod num_experts) with :func:`two_step_route`."""
    c = num_categories or num_experts
    weights = 1.0 / np.arange(1, c + 1) ** zipf_s
    perm = rng.permutation(c)
    cats = perm[rng.choice(c, size=n, p=weights / weights.sum())]
    table = np.arange(c) % num_experts if category_to_expert is None else np.asarray(category_to_expert)
    return cats, two_step_route(cats, table, num_experts)


def make_requests(num_requests: int, num_experts: int, rng: np.random.Generator, *, num_categories: int | None = None,
                  rate_per_s: float = 20.0, zipf_s: float = 1.0, prompt_tokens: int = 128, output_tokens: int = 20,
                  category_to_expert: np.ndarray | None = None) -> list[Request]:
    """A Poisson stream of requests routed by :func:`zipf_route` (prompt -> category -> expert)."""
    if num_requests < 0 or num_experts < 1:
        raise MemoryError_(f"need num_requests >= 0 and num_experts >= 1, got {num_requests}, {num_experts}")
    if rate_per_s <= 0:
        raise MemoryError_(f"rate_per_s must be > 0, got {rate_per_s}")
    cats, experts = zipf_route(num_requests, num_experts, rng, zipf_s=zipf_s, num_categories=num_categories,
                               category_to_expert=category_to_expert)
    arrivals = np.cumsum(rng.exponential(1.0 / rate_per_s, size=num_requests))
    return [Request(i, float(arrivals[i]), int(cats[i]), int(experts[i]), prompt_tokens, output_tokens)
            for i in range(num_requests)]


@dataclass(frozen=True)
class Deployment:
    """Where the composition runs: ``tp`` devices of a hierarchy serve one model at a time.

    store_tier: where all models live (``ddr`` or ``host``); hbm_tier: where the running model must be.
    peak_flops_per_s: per device. hbm_reserve_fraction: part of HBM kept for KV cache/activations.
    overhead_s_per_token: fixed time per decode step (kernel launches etc.; 0 = pure roofline).
    """

    hierarchy: MemoryHierarchy
    tp: int
    peak_flops_per_s: float
    store_tier: str = "ddr"
    hbm_tier: str = "hbm"
    hbm_reserve_fraction: float = 0.0
    overhead_s_per_token: float = 0.0
    tp_link_bandwidth_bytes_per_s: float = 0.0  # scale-up link per device (0 = all-reduces not modelled)
    tp_link_latency_s: float = 0.0
    allreduces_per_layer: int = 2  # Megatron-style tensor parallelism: after attention and after the MLP
    name: str = ""

    def __post_init__(self):
        if self.tp < 1:
            raise MemoryError_(f"tp must be >= 1, got {self.tp}")
        if self.peak_flops_per_s <= 0:
            raise MemoryError_(f"peak_flops_per_s must be > 0, got {self.peak_flops_per_s}")
        if not 0.0 <= self.hbm_reserve_fraction < 1.0:
            raise MemoryError_(f"hbm_reserve_fraction must lie in [0, 1), got {self.hbm_reserve_fraction}")
        self.hierarchy.tier(self.store_tier), self.hierarchy.tier(self.hbm_tier)

    @classmethod
    def from_system(cls, system: System, *, tp: int | None = None, store_tier: str | None = None,
                    dtype: str = DEFAULT_DTYPE, **kw) -> "Deployment":
        """A deployment over ``tp`` devices of ``system`` (default: all of them). ``hbm_tier`` defaults to
        the device's main memory, ``store_tier`` to the tier behind it (:meth:`MemoryHierarchy.backing_tier`:
        ``ddr`` on an SN40L, ``host`` on a GPU)."""
        h = MemoryHierarchy.from_system(system)
        tp = tp or system.num_devices
        if tp > system.num_devices:
            raise MemoryError_(f"tp={tp} exceeds the {system.num_devices} devices of {system.name!r}")
        kw.setdefault("hbm_tier", system.device.main_memory.name)
        store = store_tier or h.backing_tier(kw["hbm_tier"])
        kw.setdefault("tp_link_bandwidth_bytes_per_s", system.scale_up.bandwidth_bytes_per_s)
        kw.setdefault("tp_link_latency_s", system.scale_up.latency_s)
        return cls(hierarchy=h, tp=tp, peak_flops_per_s=system.device.peak(dtype), store_tier=store,
                   name=f"{system.name} tp{tp}", **kw)

    def allreduce_s(self, model: ExpertModel, tokens: int) -> float:
        """Tensor-parallel all-reduces of one forward pass over ``tokens`` tokens: per layer
        ``allreduces_per_layer`` ring all-reduces of tokens x hidden x dtype bytes, each
        2 (p-1)/p x bytes / link bandwidth + 2 (p-1) x link latency. Zero for tp = 1 or when not modelled."""
        p = self.tp
        if p == 1 or self.tp_link_bandwidth_bytes_per_s <= 0 or model.num_layers == 0:
            return 0.0
        nbytes = tokens * model.hidden_size * model.dtype_bytes
        one = ring_time_s("all_reduce", nbytes, p, self.tp_link_bandwidth_bytes_per_s, self.tp_link_latency_s)
        return model.num_layers * self.allreduces_per_layer * one

    def slots(self, model: ExpertModel) -> int:
        """Models that fit in HBM at once (over the tp devices); raises when the model fits no tier."""
        per_device = model.weight_bytes / self.tp
        self.hierarchy.check_fits(per_device, f"model {model.name!r} ({self.tp}-way sharded)")
        store = self.hierarchy.tier(self.store_tier)
        if per_device > store.capacity_bytes:
            raise MemoryError_(f"model {model.name!r} shard of {per_device / GB:.3g} GB does not fit the store tier "
                               f"{store.name!r} ({store.capacity_bytes / GB:.3g} GB)")
        hbm = self.hierarchy.tier(self.hbm_tier)
        n = int(hbm.capacity_bytes * (1.0 - self.hbm_reserve_fraction) // per_device)
        if n < 1:
            raise MemoryError_(f"model {model.name!r} shard of {per_device / GB:.3g} GB does not fit in "
                               f"{self.hbm_tier} ({hbm.capacity_bytes / GB:.3g} GB) of {self.name or 'the deployment'}")
        return n

    def store_capacity_models(self, model: ExpertModel) -> int:
        return int(self.hierarchy.tier(self.store_tier).capacity_bytes // (model.weight_bytes / self.tp))

    def switch_s(self, model: ExpertModel) -> float:
        """Copy the model's shard store -> HBM on every device at once: bytes / bandwidth + latency."""
        return self.hierarchy.transfer_time_s(model.weight_bytes / self.tp, self.store_tier, self.hbm_tier)

    def prefill_s(self, model: ExpertModel, tokens: int) -> float:
        hbm_bw = self.hierarchy.tier(self.hbm_tier).bandwidth_bytes_per_s
        return max(FLOPS_PER_PARAM_PER_TOKEN * model.num_params * tokens / (self.tp * self.peak_flops_per_s),
                   model.weight_bytes / (self.tp * hbm_bw)) + self.allreduce_s(model, tokens)

    def decode_step_s(self, model: ExpertModel, batch: int) -> float:
        hbm_bw = self.hierarchy.tier(self.hbm_tier).bandwidth_bytes_per_s
        return max(FLOPS_PER_PARAM_PER_TOKEN * model.num_params * batch / (self.tp * self.peak_flops_per_s),
                   model.weight_bytes / (self.tp * hbm_bw)) + self.allreduce_s(model, batch) + self.overhead_s_per_token

    def service_s(self, model: ExpertModel, batch: int, prompt_tokens: int, output_tokens: int) -> float:
        """Prefill of ``batch`` prompts then ``output_tokens`` decode steps at batch ``batch``."""
        return self.prefill_s(model, batch * prompt_tokens) + output_tokens * self.decode_step_s(model, batch)


@dataclass(frozen=True)
class CoEResult:
    """Outcome of serving a request stream. latency_s [R]: completion - arrival per request id."""

    scheduler: str
    switches: int
    switch_s: float
    service_s: float
    makespan_s: float
    latency_s: np.ndarray
    deadline_misses: int
    batches: int
    log: list = field(default_factory=list, repr=False)  # (start_at_s, expert, n_requests, switch_s, service_s)

    def summary(self) -> dict:
        lat = self.latency_s
        return {"scheduler": self.scheduler, "switches": self.switches, "switch_s": self.switch_s,
                "service_s": self.service_s, "makespan_s": self.makespan_s, "batches": self.batches,
                "mean_latency_s": float(lat.mean()) if len(lat) else 0.0,
                "p99_latency_s": float(np.percentile(lat, 99)) if len(lat) else 0.0,
                "deadline_misses": self.deadline_misses,
                "requests_per_s": len(lat) / self.makespan_s if self.makespan_s > 0 else 0.0}


def _check_requests(requests: list[Request], models: list[ExpertModel]) -> None:
    for r in requests:
        if not 0 <= r.expert < len(models):
            raise MemoryError_(f"request {r.id} asks for unknown expert {r.expert} (the composition has "
                               f"experts 0..{len(models) - 1})")
        if r.prompt_tokens < 0 or r.output_tokens < 0:
            raise MemoryError_(f"request {r.id}: token counts must be >= 0")


# ----------------------------------------------------------------------------- schedulers


@dataclass(frozen=True)
class ServeOptions:
    """Knobs of :func:`serve` (see its docstring)."""

    max_batch: int = 8
    latency_bound_s: float = 10.0
    preload: bool = True
    window: int = 64
    pin_fraction: float = 0.5
    time_limit_s: float = 0.5


@dataclass
class ServeState:
    """What a scheduler sees, and may change, each time :func:`serve` picks the next model.

    pending: admitted, unserved requests in arrival order; resident: models in HBM, oldest first (a
    scheduler that calls :func:`touch` makes it recency order); counts [models]: requests admitted so
    far per model; pinned: models never evicted while another can be; plan: the scheduler's own queue
    of models still to run (kept between calls)."""

    models: list[ExpertModel]
    dep: Deployment
    slots: int
    options: ServeOptions
    now_s: float = 0.0
    pending: list[Request] = field(default_factory=list)
    resident: OrderedDict = field(default_factory=OrderedDict)
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pinned: set = field(default_factory=set)
    plan: list = field(default_factory=list)


#: a scheduler: the expert model to serve next (it must have a pending request)
Scheduler = Callable[[ServeState], int]


def touch(state: ServeState, expert: int) -> None:
    """Mark a resident model as just used (recency order of ``state.resident``)."""
    if expert in state.resident:
        state.resident.move_to_end(expert)


def fifo(state: ServeState) -> int:
    """Arrival order; eviction takes the model loaded longest ago."""
    return state.pending[0].expert


def lru(state: ServeState) -> int:
    """Arrival order; eviction takes the least recently used model."""
    e = state.pending[0].expert
    touch(state, e)
    return e


def cpsat(state: ServeState) -> int:
    """OR-Tools CP-SAT: knapsack pinning of the models worth most (requests x switch time) in
    ``pin_fraction`` of the HBM slots, and per window of pending requests an order of the per-model
    groups that meets the latency bound first and minimises request-weighted completion second;
    eviction takes the least recently used unpinned model."""
    state.plan = [e for e in state.plan if any(r.expert == e for r in state.pending)]
    if not state.plan:
        state.pinned = _pin(state)
        state.plan = _plan_window(state)
    e = state.plan[0]
    touch(state, e)
    return e


SCHEDULERS: dict[str, Scheduler] = {"fifo": fifo, "lru": lru, "cpsat": cpsat}


def _pin(state: ServeState) -> set[int]:
    o, dep, models = state.options, state.dep, state.models
    budget = state.slots * (1.0 if o.pin_fraction >= 1 else o.pin_fraction)
    if budget < 1:
        return set()
    per = [m.weight_bytes / dep.tp for m in models]
    return _pin_models(state.counts, models, dep, int(budget) * max(per), o.time_limit_s)


def _plan_window(state: ServeState) -> list[int]:
    """CP-SAT order of the models of the first ``window`` pending requests (switch + service per group)."""
    o, dep, models = state.options, state.dep, state.models
    by: dict[int, list[Request]] = {}
    for r in state.pending[:o.window]:
        by.setdefault(r.expert, []).append(r)
    groups = list(by.items())
    dur = []
    for e, rs in groups:
        sw = 0.0 if e in state.resident else dep.switch_s(models[e])
        full, last = divmod(len(rs), o.max_batch)
        sv = full * dep.service_s(models[e], o.max_batch, rs[0].prompt_tokens, rs[0].output_tokens)
        if last:
            sv += dep.service_s(models[e], last, rs[0].prompt_tokens, rs[0].output_tokens)
        dur.append(sw + sv)
    order = _order_groups(groups, dur, state.now_s, o.latency_bound_s, o.time_limit_s)
    return [groups[j][0] for j in order]


#: CP-SAT needs integers: the knapsack counts a model shard in units of 1/KNAPSACK_UNITS of the
#: smallest shard (at least one byte), values in request-microseconds, the order in 0.1 ms ticks
KNAPSACK_UNITS = 1000.0
VALUE_TICKS_PER_S = 1e6
ORDER_TICKS_PER_S = 1e4


def _pin_models(counts: np.ndarray, models: list[ExpertModel], dep: Deployment, budget_bytes: float,
                time_limit_s: float) -> set[int]:
    """CP-SAT knapsack: keep resident the models maximising (requests x switch time saved) in budget_bytes."""
    from ortools.sat.python import cp_model

    cand = [e for e in np.flatnonzero(counts > 0)]
    if not cand or budget_bytes <= 0:
        return set()
    m = cp_model.CpModel()
    x = {e: m.NewBoolVar(f"keep{e}") for e in cand}
    unit = max(1.0, min(models[e].weight_bytes for e in cand) / dep.tp / KNAPSACK_UNITS)
    m.Add(sum(int(round(models[e].weight_bytes / dep.tp / unit)) * x[e] for e in cand) <= int(budget_bytes // unit))
    m.Maximize(sum(int(round(counts[e] * dep.switch_s(models[e]) * VALUE_TICKS_PER_S)) * x[e] for e in cand))
    solver = _solve(m, time_limit_s)
    if solver is None:
        return set()
    return {int(e) for e in cand if solver.Value(x[e])}


def _order_groups(groups: list[tuple[int, list[Request]]], dur: list[float], now: float, latency_bound_s: float,
                  time_limit_s: float) -> list[int]:
    """CP-SAT: order the per-model groups on one server (NoOverlap); each group should end by its
    earliest request's deadline; minimise lateness first, then request-weighted completion time."""
    from ortools.sat.python import cp_model

    n = len(groups)
    if n <= 1:
        return list(range(n))
    d = [max(0, int(round(x * ORDER_TICKS_PER_S))) for x in dur]
    horizon = sum(d) + 1
    m = cp_model.CpModel()
    starts, ends, late, ivs = [], [], [], []
    for j, (_, reqs) in enumerate(groups):
        s = m.NewIntVar(0, horizon, f"s{j}")
        e = m.NewIntVar(0, horizon, f"e{j}")
        ivs.append(m.NewIntervalVar(s, d[j], e, f"iv{j}"))
        deadline = min(r.arrival_at_s for r in reqs) + latency_bound_s - now
        dl = int(round(deadline * ORDER_TICKS_PER_S))
        lt = m.NewIntVar(0, horizon + abs(dl), f"late{j}")
        m.Add(lt >= e - dl)
        starts.append(s), ends.append(e), late.append(lt)
    m.AddNoOverlap(ivs)
    big = sum(len(r) for _, r in groups) + 1
    m.Minimize(big * sum(late) + sum(len(groups[j][1]) * ends[j] for j in range(n)))
    solver = _solve(m, time_limit_s)
    if solver is None:
        return list(range(n))
    return sorted(range(n), key=lambda j: (solver.Value(starts[j]), j))


def _solve(m, time_limit_s: float):
    """Solve a CP-SAT model deterministically (one worker, seed 0); the solver, or None if no solution."""
    from ortools.sat.python import cp_model

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = 0
    st = solver.Solve(m)
    return solver if st in (cp_model.OPTIMAL, cp_model.FEASIBLE) else None


# ----------------------------------------------------------------------------- serving

#: relative slack before a request counts as late (absorbs floating-point rounding of the clock)
DEADLINE_TOLERANCE = 1e-12


def _check_serve(models: list[ExpertModel], dep: Deployment, scheduler: str, options: ServeOptions) -> int:
    """Validate the inputs of :func:`serve`; returns the HBM slots."""
    if scheduler not in SCHEDULERS:
        raise MemoryError_(f"unknown scheduler {scheduler!r}; known: {sorted(SCHEDULERS)}")
    if options.max_batch < 1:
        raise MemoryError_(f"max_batch must be >= 1, got {options.max_batch}")
    if not models:
        raise MemoryError_("the composition has no expert models")
    slots = min(dep.slots(m) for m in models)
    for m in models:
        if m.weight_bytes / dep.tp > dep.hierarchy.tier(dep.store_tier).capacity_bytes:
            raise MemoryError_(f"model {m.name!r} does not fit the store tier {dep.store_tier!r}")
    return slots


def _switch_to(state: ServeState, e: int) -> float | None:
    """Load model ``e`` into HBM if it is not resident (evicting the first unpinned model in resident
    order); returns the switch time, or None when ``e`` was resident (no switch)."""
    if e in state.resident:
        return None
    while len(state.resident) >= state.slots:
        victim = next((k for k in state.resident if k not in state.pinned and k != e), None)
        if victim is None:
            victim = next(iter(state.resident))
        del state.resident[victim]
    state.resident[e] = None
    return state.dep.switch_s(state.models[e])


def serve(requests: list[Request], models: list[ExpertModel], dep: Deployment, *, scheduler: str = "fifo",
          max_batch: int = 8, latency_bound_s: float = 10.0, preload: bool = True, window: int = 64,
          pin_fraction: float = 0.5, time_limit_s: float = 0.5) -> CoEResult:
    """Serve ``requests`` (any order; sorted by arrival here) with ``scheduler`` (a key of
    :data:`SCHEDULERS`). ``preload``: HBM starts holding the first ``slots`` models (by expert id).
    ``max_batch``: requests of one model served together. ``latency_bound_s``: each request should
    complete by arrival + bound (a deadline miss is counted otherwise). cpsat: ``window`` pending
    requests per plan, ``pin_fraction`` of the HBM slots pinned by the knapsack."""
    options = ServeOptions(max_batch=max_batch, latency_bound_s=latency_bound_s, preload=preload, window=window,
                           pin_fraction=pin_fraction, time_limit_s=time_limit_s)
    slots = _check_serve(models, dep, scheduler, options)
    _check_requests(requests, models)
    choose = SCHEDULERS[scheduler]
    state = ServeState(models=models, dep=dep, slots=slots, options=options, counts=np.zeros(len(models)))
    if preload:
        for e in range(min(slots, len(models))):
            state.resident[e] = None
    reqs = sorted(requests, key=lambda r: (r.arrival_at_s, r.id))
    index_of = {r.id: k for k, r in enumerate(reqs)}
    latency = np.zeros(len(reqs))
    log = []
    i = switches = misses = 0
    switch_total = service_total = 0.0
    while i < len(reqs) or state.pending:
        if not state.pending:
            state.now_s = max(state.now_s, reqs[i].arrival_at_s)
        while i < len(reqs) and reqs[i].arrival_at_s <= state.now_s:
            state.pending.append(reqs[i])
            state.counts[reqs[i].expert] += 1
            i += 1
        e = choose(state)
        batch = [r for r in state.pending if r.expert == e][:max_batch]
        sw = _switch_to(state, e)
        switches += sw is not None
        sw = sw or 0.0
        sv = dep.service_s(models[e], len(batch), max(r.prompt_tokens for r in batch),
                           max(r.output_tokens for r in batch))
        log.append((state.now_s, e, len(batch), sw, sv))
        state.now_s += sw + sv
        switch_total += sw
        service_total += sv
        for r in batch:
            lat = state.now_s - r.arrival_at_s
            latency[index_of[r.id]] = lat
            misses += lat > latency_bound_s * (1 + DEADLINE_TOLERANCE)
        done = {r.id for r in batch}
        state.pending = [r for r in state.pending if r.id not in done]
    return CoEResult(scheduler=scheduler, switches=switches, switch_s=switch_total, service_s=service_total,
                     makespan_s=state.now_s, latency_s=latency, deadline_misses=int(misses), batches=len(log), log=log)
