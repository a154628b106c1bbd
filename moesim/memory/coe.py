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

Schedulers (one dict, :data:`SCHEDULERS`): ``fifo`` (arrival order, FIFO eviction), ``lru`` (arrival
order, LRU eviction) and ``cpsat`` (OR-Tools CP-SAT: pins the most valuable models in HBM (a knapsack
on request counts x switch time) and orders/batches the pending requests by model to cut switches
while meeting a latency bound where it can).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from hwmodels.specs import System
from moesim.memory.tiers import MemoryError_, MemoryHierarchy


@dataclass(frozen=True)
class ExpertModel:
    """One expert model of the composition: weight bytes and parameters (FLOPs per token = 2 x params)."""

    name: str
    weight_bytes: float
    num_params: float
    num_layers: int = 0  # decoder layers (for tensor-parallel all-reduces; 0 = not modelled)
    hidden_size: int = 0
    dtype_bytes: int = 2

    @classmethod
    def dense(cls, name: str, num_params: float, dtype_bytes: int = 2, num_layers: int = 0,
              hidden_size: int = 0) -> "ExpertModel":
        return cls(name=name, weight_bytes=float(num_params) * dtype_bytes, num_params=float(num_params),
                   num_layers=num_layers, hidden_size=hidden_size, dtype_bytes=dtype_bytes)

    @classmethod
    def llama2_7b(cls, name: str = "llama-2-7b") -> "ExpertModel":
        """Llama-2-7B in bf16 (the base of Samba-CoE's experts)."""
        return cls.dense(name, LLAMA2_7B_PARAMS, 2, num_layers=32, hidden_size=4096)


# Llama-2-7B: 6.74e9 parameters (Touvron et al. 2023, Table 1 "7B"; HF config: 32 layers, hidden 4096,
# intermediate 11008, vocab 32000 -> 6,738,415,616 parameters). Samba-CoE's experts derive from it.
LLAMA2_7B_PARAMS = 6_738_415_616


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


def make_requests(num_requests: int, num_experts: int, rng: np.random.Generator, *, num_categories: int | None = None,
                  rate_per_s: float = 20.0, zipf_s: float = 1.0, prompt_tokens: int = 128, output_tokens: int = 20,
                  category_to_expert: np.ndarray | None = None) -> list[Request]:
    """A Poisson stream of requests. Step 1 (prompt -> category) draws categories with Zipf(``zipf_s``)
    popularity; step 2 maps category -> expert (default: category c -> expert c mod num_experts)."""
    if num_requests < 0 or num_experts < 1:
        raise MemoryError_(f"need num_requests >= 0 and num_experts >= 1, got {num_requests}, {num_experts}")
    if rate_per_s <= 0:
        raise MemoryError_(f"rate_per_s must be > 0, got {rate_per_s}")
    c = num_categories or num_experts
    weights = 1.0 / np.arange(1, c + 1) ** zipf_s
    perm = rng.permutation(c)  # popular categories are not the low ids
    cats = perm[rng.choice(c, size=num_requests, p=weights / weights.sum())]
    table = np.arange(c) % num_experts if category_to_expert is None else np.asarray(category_to_expert)
    experts = two_step_route(cats, table, num_experts)
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
                    dtype: str = "bf16", **kw) -> "Deployment":
        """A deployment over ``tp`` devices of ``system`` (default: all of them). ``store_tier``
        defaults to the device's ``ddr`` tier if it has one, else ``host``."""
        h = MemoryHierarchy.from_system(system)
        tp = tp or system.num_devices
        if tp > system.num_devices:
            raise MemoryError_(f"tp={tp} exceeds the {system.num_devices} devices of {system.name!r}")
        store = store_tier or ("ddr" if "ddr" in h.tiers else "host")
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
        one = 2 * (p - 1) / p * nbytes / self.tp_link_bandwidth_bytes_per_s + 2 * (p - 1) * self.tp_link_latency_s
        return model.num_layers * self.allreduces_per_layer * one

    def slots(self, model: ExpertModel) -> int:
        """Models that fit in HBM at once (over the tp devices); raises when the model fits no tier."""
        per_device = model.weight_bytes / self.tp
        self.hierarchy.check_fits(per_device, f"model {model.name!r} ({self.tp}-way sharded)")
        store = self.hierarchy.tier(self.store_tier)
        if per_device > store.capacity_bytes:
            raise MemoryError_(f"model {model.name!r} shard of {per_device / 1e9:.3g} GB does not fit the store tier "
                               f"{store.name!r} ({store.capacity_bytes / 1e9:.3g} GB)")
        hbm = self.hierarchy.tier(self.hbm_tier)
        n = int(hbm.capacity_bytes * (1.0 - self.hbm_reserve_fraction) // per_device)
        if n < 1:
            raise MemoryError_(f"model {model.name!r} shard of {per_device / 1e9:.3g} GB does not fit in "
                               f"{self.hbm_tier} ({hbm.capacity_bytes / 1e9:.3g} GB) of {self.name or 'the deployment'}")
        return n

    def store_capacity_models(self, model: ExpertModel) -> int:
        return int(self.hierarchy.tier(self.store_tier).capacity_bytes // (model.weight_bytes / self.tp))

    def switch_s(self, model: ExpertModel) -> float:
        """Copy the model's shard store -> HBM on every device at once: bytes / bandwidth + latency."""
        return self.hierarchy.transfer_time_s(model.weight_bytes / self.tp, self.store_tier, self.hbm_tier)

    def prefill_s(self, model: ExpertModel, tokens: int) -> float:
        hbm_bw = self.hierarchy.tier(self.hbm_tier).bandwidth_bytes_per_s
        return max(2.0 * model.num_params * tokens / (self.tp * self.peak_flops_per_s),
                   model.weight_bytes / (self.tp * hbm_bw)) + self.allreduce_s(model, tokens)

    def decode_step_s(self, model: ExpertModel, batch: int) -> float:
        hbm_bw = self.hierarchy.tier(self.hbm_tier).bandwidth_bytes_per_s
        return max(2.0 * model.num_params * batch / (self.tp * self.peak_flops_per_s),
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


def _pin_models(counts: np.ndarray, models: list[ExpertModel], dep: Deployment, budget_bytes: float,
                time_limit_s: float) -> set[int]:
    """CP-SAT knapsack: keep resident the models maximising (requests x switch time saved) in budget_bytes."""
    from ortools.sat.python import cp_model

    cand = [e for e in np.flatnonzero(counts > 0)]
    if not cand or budget_bytes <= 0:
        return set()
    m = cp_model.CpModel()
    x = {e: m.NewBoolVar(f"keep{e}") for e in cand}
    unit = max(1.0, min(models[e].weight_bytes for e in cand) / dep.tp / 1000.0)
    m.Add(sum(int(round(models[e].weight_bytes / dep.tp / unit)) * x[e] for e in cand) <= int(budget_bytes // unit))
    m.Maximize(sum(int(round(counts[e] * dep.switch_s(models[e]) * 1e6)) * x[e] for e in cand))
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
    scale = 1e4  # 0.1 ms ticks
    d = [max(0, int(round(x * scale))) for x in dur]
    horizon = sum(d) + 1
    m = cp_model.CpModel()
    starts, ends, late, ivs = [], [], [], []
    for j, (_, reqs) in enumerate(groups):
        s = m.NewIntVar(0, horizon, f"s{j}")
        e = m.NewIntVar(0, horizon, f"e{j}")
        ivs.append(m.NewIntervalVar(s, d[j], e, f"iv{j}"))
        deadline = min(r.arrival_at_s for r in reqs) + latency_bound_s - now
        dl = int(round(deadline * scale))
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


def serve(requests: list[Request], models: list[ExpertModel], dep: Deployment, *, scheduler: str = "fifo",
          max_batch: int = 8, latency_bound_s: float = 10.0, preload: bool = True, window: int = 64,
          pin_fraction: float = 0.5, time_limit_s: float = 0.5) -> CoEResult:
    """Serve ``requests`` (any order; sorted by arrival here) with ``scheduler`` (a key of
    :data:`SCHEDULERS`). ``preload``: HBM starts holding the first ``slots`` models (by expert id).
    ``max_batch``: requests of one model served together. ``latency_bound_s``: each request should
    complete by arrival + bound (a deadline miss is counted otherwise). cpsat: ``window`` pending
    requests per plan, ``pin_fraction`` of the HBM slots pinned by the knapsack."""
    if scheduler not in SCHEDULERS:
        raise MemoryError_(f"unknown scheduler {scheduler!r}; known: {sorted(SCHEDULERS)}")
    if max_batch < 1:
        raise MemoryError_(f"max_batch must be >= 1, got {max_batch}")
    if not models:
        raise MemoryError_("the composition has no expert models")
    _check_requests(requests, models)
    slots = min(dep.slots(m) for m in models)
    for m in models:
        if m.weight_bytes / dep.tp > dep.hierarchy.tier(dep.store_tier).capacity_bytes:
            raise MemoryError_(f"model {m.name!r} does not fit the store tier {dep.store_tier!r}")
    reqs = sorted(requests, key=lambda r: (r.arrival_at_s, r.id))
    resident: OrderedDict[int, None] = OrderedDict()  # insertion (FIFO) / recency (LRU) order
    if preload:
        for e in range(min(slots, len(models))):
            resident[e] = None
    pinned: set[int] = set()
    counts = np.zeros(len(models))
    t = 0.0
    i = 0
    pending: list[Request] = []
    plan: list[int] = []
    latency = np.zeros(len(reqs))
    index_of = {r.id: k for k, r in enumerate(reqs)}
    log = []
    switches = 0
    switch_total = service_total = 0.0
    misses = 0

    def admit(now):
        nonlocal i
        while i < len(reqs) and reqs[i].arrival_at_s <= now:
            pending.append(reqs[i])
            counts[reqs[i].expert] += 1
            i += 1

    while i < len(reqs) or pending:
        if not pending:
            t = max(t, reqs[i].arrival_at_s)
        admit(t)
        # --- choose the model to run next and its batch
        if scheduler == "cpsat":
            plan = [e for e in plan if any(r.expert == e for r in pending)]
            if not plan:
                budget = slots * (1.0 if pin_fraction >= 1 else pin_fraction)
                per = [m.weight_bytes / dep.tp for m in models]
                pinned = _pin_models(counts, models, dep, int(budget) * max(per), time_limit_s) if budget >= 1 else set()
                win = pending[:window]
                by: dict[int, list[Request]] = {}
                for r in win:
                    by.setdefault(r.expert, []).append(r)
                groups = list(by.items())
                dur = []
                for e, rs in groups:
                    sw = 0.0 if e in resident else dep.switch_s(models[e])
                    nb = -(-len(rs) // max_batch)
                    full, last = divmod(len(rs), max_batch)
                    sv = full * dep.service_s(models[e], max_batch, rs[0].prompt_tokens, rs[0].output_tokens)
                    if last:
                        sv += dep.service_s(models[e], last, rs[0].prompt_tokens, rs[0].output_tokens)
                    dur.append(sw + sv if nb else sw)
                order = _order_groups(groups, dur, t, latency_bound_s, time_limit_s)
                plan = [groups[j][0] for j in order]
            e = plan[0]
            batch = [r for r in pending if r.expert == e][:max_batch]
        else:
            e = pending[0].expert
            batch = [r for r in pending if r.expert == e][:max_batch]
        # --- switch if needed
        sw = 0.0
        if e not in resident:
            while len(resident) >= slots:
                victim = next((k for k in resident if k not in pinned and k != e), None)
                if victim is None:
                    victim = next(iter(resident))
                del resident[victim]
            resident[e] = None
            sw = dep.switch_s(models[e])
            switches += 1
        elif scheduler in ("lru", "cpsat"):
            resident.move_to_end(e)
        sv = dep.service_s(models[e], len(batch), max(r.prompt_tokens for r in batch),
                           max(r.output_tokens for r in batch))
        log.append((t, e, len(batch), sw, sv))
        t += sw + sv
        switch_total += sw
        service_total += sv
        done = {r.id for r in batch}
        for r in batch:
            lat = t - r.arrival_at_s
            latency[index_of[r.id]] = lat
            if lat > latency_bound_s * (1 + 1e-12):
                misses += 1
        pending = [r for r in pending if r.id not in done]
    return CoEResult(scheduler=scheduler, switches=switches, switch_s=switch_total, service_s=service_total,
                     makespan_s=t, latency_s=latency, deadline_misses=misses, batches=len(log), log=log)


SCHEDULERS = {"fifo": "arrival order, evict the model loaded longest ago",
              "lru": "arrival order, evict the least recently used model",
              "cpsat": "OR-Tools CP-SAT: knapsack pinning + per-window ordering/batching by model under a latency bound"}
