"""The discrete-event simulator of expert-parallel MoE layers (SimPy).

For every step, micro-batch and MoE layer the model runs, on the devices of a System:

1. ``router`` on each device for its own tokens (compute resource of that device);
2. ``dispatch`` all-to-all: each (token, expert) choice is sent to the device holding the chosen
   replica (network fabric resource; one collective at a time); in parallel ``shared_ffn`` runs
   the shared experts (if the model has any) on each device;
3. ``expert_ffn``: a grouped SwiGLU GEMM on each device over the tokens it received;
4. ``combine`` all-to-all: results go back along the reverse routes.

Events are coarse (per step, micro-batch, layer and device); routing arithmetic is vectorised
with numpy. Costs come from a :class:`hwmodels.cost.CostModel`; all-to-all time from the bytes the
trace actually routes over each link (:mod:`hwmodels.topology`), timed by the cost model's all-to-all model
(:func:`hwmodels.cost.collective_model`: spec bottleneck link, or NCCL-fitted for ``gpu-fitted``). Tokens of a step are sharded
contiguously over devices; each device's share is cut into ``micro_batches`` contiguous parts.
Micro-batches of a step run concurrently and overlap (communication of one with compute of another).

No file I/O, no plotting and no globals here: ``simulate`` takes values and returns a Result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import simpy

from hwmodels.collectives import a2a_payload_bytes
from hwmodels.cost import COMM_KERNEL_SMS, DTYPE_BYTES, CostModel, OpCost, RooflineCost, collective_model, overlapped_cost
from moebase.units import DEFAULT_DTYPE
from hwmodels.specs import System
from moebase.limits import check_alloc
from hwmodels.topology import AllToAllRouting, all_to_all_routing
from moesim.placement import REPLICA_ROUTING, Placement
from workloads.catalog import MoEModel
from workloads.trace import Trace

OP_COLUMNS = ["op", "step", "micro_batch", "layer", "device", "start_at_s", "end_at_s", "flops", "bytes"]
COMPUTE_OPS = ("router", "shared_ffn", "expert_ffn")
COMM_OPS = ("dispatch", "combine")
DISPATCH_DEDUP = ("none", "gpu", "node")  # copies per dispatched token: see SimOptions


class SimulationError(ValueError):
    pass


@dataclass(frozen=True)
class SimOptions:
    """Knobs of one simulation.

    micro_batches: parts each device's tokens of a step are cut into (>= 1).
    dtype: compute and activation dtype (``bf16``, ``fp16``, ``fp8``, ``fp32``).
    overlap_micro_batches: run a step's micro-batches concurrently (True) or one after another.
    replica_routing: key of :data:`moesim.placement.REPLICA_ROUTING`.
    include_shared_experts: simulate the model's shared experts (not in routing traces).
    dispatch_dtype, combine_dtype: dtype of the activations sent in dispatch / combine (None: ``dtype``);
    DeepEP sends fp8 (with its per-128-value scales, :func:`hwmodels.collectives.a2a_payload_bytes`) and
    combines in bf16.
    comm_kernel: key of :data:`hwmodels.collectives.COMM_KERNEL_SMS` (or ``"none"``): the SMs the all-to-all
    kernel takes from a GEMM that runs while it is in flight (honoured by cost models with SMs, e.g. gpu-fitted).
    dispatch_dedup: copies the dispatch sends (:data:`DISPATCH_DEDUP`, :func:`dedup_pair_keys`): ``none`` one per
    (token, expert) choice; ``gpu`` one per (token, destination device); ``node`` one per (token, destination node)
    over scale-out links to the device of the sender's local rank in that node, which forwards one per
    (token, destination device) over scale-up links (DeepEP normal kernels). The combine is the reverse.
    """

    micro_batches: int = 1
    dtype: str = DEFAULT_DTYPE
    overlap_micro_batches: bool = True
    replica_routing: str = "local-first"
    include_shared_experts: bool = True
    dispatch_dtype: str | None = None
    combine_dtype: str | None = None
    comm_kernel: str = "deepep-normal-v1"
    dispatch_dedup: str = "none"

    def __post_init__(self):
        if self.micro_batches < 1:
            raise SimulationError(f"micro_batches must be >= 1, got {self.micro_batches}")
        if self.dtype not in DTYPE_BYTES:
            raise SimulationError(f"unknown dtype {self.dtype!r}; known: {sorted(DTYPE_BYTES)}")
        if self.replica_routing not in REPLICA_ROUTING:
            raise SimulationError(f"unknown replica routing {self.replica_routing!r}; known: {sorted(REPLICA_ROUTING)}")
        for name in ("dispatch_dtype", "combine_dtype"):
            if getattr(self, name) not in (None, *DTYPE_BYTES):
                raise SimulationError(f"unknown {name} {getattr(self, name)!r}; known: {sorted(DTYPE_BYTES)}")
        if self.comm_kernel != "none" and self.comm_kernel not in COMM_KERNEL_SMS:
            raise SimulationError(f"unknown comm_kernel {self.comm_kernel!r}; known: none, {', '.join(COMM_KERNEL_SMS)}")
        if self.dispatch_dedup not in DISPATCH_DEDUP:
            raise SimulationError(f"unknown dispatch_dedup {self.dispatch_dedup!r}; known: {', '.join(DISPATCH_DEDUP)}")

    @property
    def comm_sms(self) -> int:
        """SMs the all-to-all kernel holds while it overlaps compute (0 for ``comm_kernel="none"``)."""
        return 0 if self.comm_kernel == "none" else COMM_KERNEL_SMS[self.comm_kernel][0]


@dataclass(frozen=True, eq=False)
class Routed:
    """The trace aggregated per group g = (step, micro_batch, layer), vectorised.

    pair_tokens [G, D, D]: copies sent from src device (row) to dst device (column): (token, expert) choices, or
    fewer with ``SimOptions.dispatch_dedup`` (:func:`dedup_pair_keys`);
    expert_tokens [G, D, E]: choices each device computes for each expert;
    router_tokens [G, D]: tokens each device routes; group_key [G, 3]: (step, micro_batch, layer);
    num_tokens: tokens of all steps.
    """

    group_key: np.ndarray
    pair_tokens: np.ndarray
    expert_tokens: np.ndarray
    router_tokens: np.ndarray
    num_tokens: int


@dataclass(frozen=True, eq=False)
class Result:
    """What a simulation returns.

    ops: one row per operator instance (columns OP_COLUMNS; collectives have one row per device,
    with that device's sent bytes). layer_time_s [L]: summed over steps and micro-batches, the span
    from a layer's first router start to its last combine end. device_tokens [L, D]: choices computed
    per device. link_bytes: bytes on each directed link (``dev0->switch0``). tokens: per-layer
    conservation counts. total_time_s: makespan.
    """

    ops: pd.DataFrame
    total_time_s: float
    layer_time_s: np.ndarray
    layer_compute_s: np.ndarray
    layer_comm_s: np.ndarray
    device_tokens: np.ndarray
    link_bytes: pd.DataFrame
    tokens: pd.DataFrame
    meta: dict = field(default_factory=dict)

    @property
    def imbalance(self) -> np.ndarray:
        """Per-layer max/mean of tokens computed per device (1.0 = perfectly balanced)."""
        mean = self.device_tokens.mean(axis=1)
        return np.where(mean > 0, self.device_tokens.max(axis=1) / np.where(mean > 0, mean, 1), 1.0)

    def summary(self) -> dict:
        link = self.link_bytes
        return {
            **self.meta,
            "total_time_s": self.total_time_s,
            "layer_time_s": self.layer_time_s.tolist(),
            "layer_compute_s": self.layer_compute_s.tolist(),
            "layer_comm_s": self.layer_comm_s.tolist(),
            "imbalance_max_over_mean": self.imbalance.tolist(),
            "bytes_by_link_kind": link.groupby("kind")["bytes"].sum().to_dict() if len(link) else {},
            "tokens_routed": int(self.tokens["dispatched"].sum()),
        }


def _step_index(step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct steps, index of each row's step); O(n) when rows are sorted by step (the trace format)."""
    if len(step) and np.all(step[1:] >= step[:-1]):
        starts = np.flatnonzero(step[1:] != step[:-1]) + 1
        sizes = np.diff(np.concatenate([[0], starts, [len(step)]]))
        return step[np.concatenate([[0], starts])], np.repeat(np.arange(len(sizes)), sizes)
    return np.unique(step, return_inverse=True)


def _shard(token: np.ndarray, n: np.ndarray, num_devices: int, micro_batches: int) -> tuple[np.ndarray, np.ndarray]:
    """Device and micro-batch of token index ``token`` in a step of ``n`` tokens (contiguous shards)."""
    src = (token * num_devices) // n
    start = -(-src * n // num_devices)  # first token of src's shard: ceil(src * n / D)
    stop = -(-(src + 1) * n // num_devices)
    mb = ((token - start) * micro_batches) // np.maximum(stop - start, 1)
    return src.astype(np.int64), mb.astype(np.int64)


def _tokens_per_step(token: np.ndarray, step_idx: np.ndarray, num_steps: int) -> np.ndarray:
    """Tokens in each step: the largest token index + 1."""
    n = np.zeros(num_steps, dtype=np.int64)
    if num_steps == 1:  # one step (as streamed): no per-row scatter
        n[0] = int(token.max()) + 1
    else:
        np.maximum.at(n, step_idx, token + 1)
    return n


def aggregate(trace: Trace, placement: Placement, num_devices: int, options: SimOptions,
              rng: np.random.Generator, devices_per_node: int | None = None) -> Routed:
    """Vectorised routing: bincounts per (step, micro_batch, layer) of sources, destinations and experts.
    ``devices_per_node`` (default: all devices in one node) matters only to ``dispatch_dedup="node"``."""
    c = trace.columns
    m, d_count, e_count = options.micro_batches, num_devices, trace.meta.num_experts
    l_count = trace.meta.num_layers
    steps, step_idx = _step_index(c["step"])
    n_per_step = _tokens_per_step(c["token"], step_idx, len(steps))
    n_tokens = int(n_per_step.sum())
    check_alloc("per-token routing arrays (sum over steps of the largest token id + 1)", (n_tokens, 4),
                8, hint="token ids are sparse; renumber them 0..n-1 per step (Trace.renumber_tokens)")
    g_count = len(steps) * m * l_count
    check_alloc("per-group routing counts (steps x micro-batches x layers x devices x max(devices, experts))",
                (g_count, d_count, max(d_count, e_count)), 8, hint="use fewer micro-batches, devices or steps")
    # shard every token once (also tokens whose choices were all dropped: they still pass the router),
    # then gather per row: cheaper than integer division over all rows
    offsets = np.concatenate([[0], np.cumsum(n_per_step)[:-1]])
    all_step = np.repeat(np.arange(len(steps)), n_per_step)
    all_tokens = np.arange(n_tokens) - offsets[all_step]
    t_src, t_mb = _shard(all_tokens, n_per_step[all_step], d_count, m)
    t_group = all_step * m + t_mb  # (step, micro-batch) of each token
    row_token = offsets[step_idx] + c["token"]
    src = t_src.astype(np.int32)[row_token]  # per-row arrays in int32 where ids allow: memory per row counts
    layer = c["layer"]
    dst = _destinations(c, placement, src, step_idx, (len(steps), l_count, e_count), options.replica_routing, rng)
    g = t_group[row_token] * l_count + layer
    del step_idx
    if options.dispatch_dedup == "none":
        key = g * (d_count * d_count)  # in-place key arithmetic: one int64 per row at a time
        key += src * np.int64(d_count)
        key += dst
    else:
        key = dedup_pair_keys(g, row_token * l_count + layer, src, dst, d_count,
                              options.dispatch_dedup, devices_per_node or d_count)
    del row_token
    pair = np.bincount(key, minlength=g_count * d_count * d_count)
    del key, src
    g *= d_count
    g += dst
    g *= e_count
    g += c["expert"]
    expert = np.bincount(g, minlength=g_count * d_count * e_count)
    del g, dst
    per_mb = np.bincount(t_group * d_count + t_src, minlength=len(steps) * m * d_count)
    router = np.broadcast_to(per_mb.reshape(len(steps), m, 1, d_count), (len(steps), m, l_count, d_count))
    keys = np.stack(np.meshgrid(steps, np.arange(m), np.arange(l_count), indexing="ij"), axis=-1).reshape(-1, 3)
    return Routed(group_key=keys, pair_tokens=pair.reshape(g_count, d_count, d_count),
                  expert_tokens=expert.reshape(g_count, d_count, e_count),
                  router_tokens=router.reshape(g_count, d_count), num_tokens=n_tokens)


def _destinations(c: dict, placement: Placement, src: np.ndarray, step_idx: np.ndarray, shape: tuple[int, int, int],
                  replica_routing: str, rng: np.random.Generator) -> np.ndarray:
    """The device [rows] (int32) that computes each row's (token, expert) choice under ``placement``;
    ``shape`` = (steps, layers, experts) of the trace."""
    num_steps, l_count, e_count = shape
    layer = c["layer"]
    dst = np.empty_like(src)
    if placement.replica_count.max() == 1:  # one replica per expert: every policy picks it (no RNG draws needed)
        dev = np.stack([placement.expert_devices(i)[:, 0] for i in range(placement.num_layers)])
        dst[:] = dev.reshape(-1)[layer.astype(np.int64) * e_count + c["expert"]]
        return dst
    route = REPLICA_ROUTING[replica_routing]
    # (step, layer) in order, so a trace replayed step by step (moesim.stream) draws the same numbers
    step_layer = step_idx * l_count + layer
    order = np.argsort(step_layer, kind="stable")
    bounds = np.searchsorted(step_layer[order], np.arange(num_steps * l_count + 1))
    for sl in range(num_steps * l_count):
        rows = order[bounds[sl]:bounds[sl + 1]]  # ascending row order, like flatnonzero
        if rows.size:
            dst[rows] = route(placement, sl % l_count, src[rows], c["expert"][rows], c["token"][rows], rng)
    return dst


def dedup_pair_keys(group: np.ndarray, token_layer: np.ndarray, src: np.ndarray, dst: np.ndarray, d_count: int,
                    mode: str, devices_per_node: int) -> np.ndarray:
    """Keys ``(group * D + sender) * D + receiver`` of the copies one all-to-all sends, one per row of the
    trace's (token, expert) choices in, de-duplicated (``token_layer``: a (token, layer) id per row):

    - ``gpu``: one copy per (token, destination device);
    - ``node``: one copy per (token, destination node n != the source's) from src to its relay, the device of
      src's local rank in node n (scale-out), plus one per (token, destination device) from the relay of dst's
      node (src itself in its own node) to dst (scale-up; none where the relay is dst: device-local).
    """
    per_dst = np.unique(token_layer * d_count + dst, return_index=True)[1]
    g, s, d = group[per_dst], src[per_dst].astype(np.int64), dst[per_dst].astype(np.int64)
    if mode == "gpu":
        return (g * d_count + s) * d_count + d
    node_d = d // devices_per_node
    relay = node_d * devices_per_node + s % devices_per_node
    forward = (g * d_count + relay) * d_count + d
    n_dst = dst.astype(np.int64) // devices_per_node
    per_node = np.unique(token_layer * (d_count // devices_per_node + 1) + n_dst, return_index=True)[1]
    per_node = per_node[n_dst[per_node] != src[per_node] // devices_per_node]
    s_n = src[per_node].astype(np.int64)
    relay_n = n_dst[per_node] * devices_per_node + s_n % devices_per_node
    return np.concatenate([forward, (group[per_node] * d_count + s_n) * d_count + relay_n])


def simulate(system: System, model: MoEModel, placement: Placement, trace: Trace, *,
             cost: CostModel | None = None, options: SimOptions = SimOptions(), seed: int = 0,
             progress: Callable[[int, int], None] | None = None) -> Result:
    """Replay ``trace`` through ``model``'s MoE layers on ``system`` with ``placement``.

    ``progress(done, total)`` is called as (step, micro-batch, layer) groups finish.
    """
    cost = cost if cost is not None else RooflineCost()
    routed, a2a, act_bytes = prepare(system, model, placement, trace, options, seed)
    return _run_des(system, model, routed, a2a, cost, options, act_bytes, progress, trace)


def prepare(system: System, model: MoEModel, placement: Placement, trace: Trace, options: SimOptions, seed: int,
            a2a: AllToAllRouting | None = None) -> tuple[Routed, AllToAllRouting, int]:
    """Check that system, model, placement and trace fit together; aggregate the routing.

    Returns (routed, all-to-all routes, activation bytes per token). Shared by both engines.
    """
    meta_t = trace.meta
    check_trace_fits_model(trace, model)
    placement.check_fits(meta_t.num_layers, meta_t.num_experts, system.num_devices)
    routed = aggregate(trace, placement, system.num_devices, options, np.random.default_rng(seed),
                       system.devices_per_node)
    a2a = a2a if a2a is not None else all_to_all_routing(system)
    return routed, a2a, activation_bytes(model, options)


@dataclass(frozen=True)
class PayloadBytes:
    """Bytes of one token's activation sent in dispatch and in combine (each in its own dtype)."""

    dispatch_bytes: float
    combine_bytes: float


def activation_bytes(model: MoEModel, options: SimOptions) -> PayloadBytes:
    """Bytes of one token's activation sent in dispatch and in combine (``dispatch_dtype``/``combine_dtype``,
    default ``dtype``; fp8 carries its scales)."""
    return PayloadBytes(a2a_payload_bytes(1, model.hidden_size, options.dispatch_dtype or options.dtype),
                        a2a_payload_bytes(1, model.hidden_size, options.combine_dtype or options.dtype))


def a2a_pair_bytes(pair_tokens: np.ndarray, act: PayloadBytes) -> tuple[np.ndarray, np.ndarray]:
    """(dispatch, combine) bytes sent from src (row) to dst (column) for the choices ``pair_tokens`` [..., D, D]:
    combine sends the results back along the reverse routes, in its own dtype."""
    t = pair_tokens.astype(float)
    return t * act.dispatch_bytes, np.swapaxes(t, -1, -2) * act.combine_bytes


def check_trace_fits_model(trace: Trace, model: MoEModel) -> None:
    """Raise SimulationError when the trace's expert count or layer count does not fit ``model``
    (callers check this before building anything sized by the trace's metadata)."""
    meta_t = trace.meta
    if meta_t.num_experts != model.num_experts:
        raise SimulationError(f"trace has {meta_t.num_experts} experts per layer but model {model.name!r} has "
                              f"{model.num_experts}")
    if meta_t.num_layers > model.num_moe_layers:
        raise SimulationError(f"trace has {meta_t.num_layers} MoE layers but model {model.name!r} has only "
                              f"{model.num_moe_layers}")


def _run_des(system: System, model: MoEModel, routed: Routed, a2a: AllToAllRouting, cost: CostModel,
             options: SimOptions, act_bytes: int, progress, trace: Trace) -> Result:
    des = _Des(system, model, routed, a2a, cost, options, act_bytes, progress)
    des.env.process(des.main(trace.meta.num_layers))
    des.env.run()
    return _collect(des.ops, des.env.now, routed, a2a, system, model, options, trace, cost, act_bytes)


class _Des:
    """The SimPy processes of one run: one compute resource per device, one fabric for collectives.

    ``ops`` collects one tuple per operator row (columns :data:`OP_COLUMNS`) as processes finish.
    """

    def __init__(self, system: System, model: MoEModel, routed: Routed, a2a: AllToAllRouting, cost: CostModel,
                 options: SimOptions, act_bytes: PayloadBytes, progress, start_s: float = 0.0):
        self.env = simpy.Environment(initial_time=start_s)  # start_s: where a streamed step starts
        self.system, self.model, self.routed, self.a2a, self.cost = system, model, routed, a2a, cost
        self.a2a_model = collective_model(cost, system)
        self.comm_cost = overlapped_cost(cost, options.comm_sms)  # compute while an all-to-all is in flight
        self.comm_busy_until_s = start_s  # end of the collective holding the fabric
        self.options, self.act_bytes, self.progress = options, act_bytes, progress
        self.d_count = system.num_devices
        self.compute = [simpy.Resource(self.env, capacity=1) for _ in range(self.d_count)]
        self.fabric = simpy.Resource(self.env, capacity=1)
        self.ops: list[tuple] = []
        self.total_groups = len(routed.group_key)
        self.done = 0
        self.shared = options.include_shared_experts and model.num_shared_experts > 0

    def device_op(self, name, key, d, cost_of, beside_comm: bool = False):
        """``cost_of(cost_model, d)`` is the OpCost; the op runs on :attr:`comm_cost` (fewer SMs) when it
        starts while a collective is in flight, or ``beside_comm`` (it runs next to its own group's dispatch)."""
        env = self.env
        with self.compute[d].request() as req:
            yield req
            start = env.now
            overlapped = beside_comm or start < self.comm_busy_until_s
            c: OpCost = cost_of(self.comm_cost if overlapped else self.cost, d)
            if c.time_s > 0:
                yield env.timeout(c.time_s)
            self.ops.append((name, *key, d, start, env.now, c.flops, c.bytes))

    def collective(self, name, key, pair_bytes, duration):
        env = self.env
        with self.fabric.request() as req:
            yield req
            start = env.now
            self.comm_busy_until_s = start + duration
            if duration > 0:
                yield env.timeout(duration)
            sent = pair_bytes.sum(axis=1) - np.diag(pair_bytes)
            for d in range(self.d_count):
                self.ops.append((name, *key, d, start, env.now, 0.0, float(sent[d])))

    def on_devices(self, name, key, cost_of, beside_comm: bool = False):
        """One ``device_op`` process per device; ``cost_of(cost_model, d)`` is its OpCost."""
        return [self.env.process(self.device_op(name, key, d, cost_of, beside_comm)) for d in range(self.d_count)]

    def layer_group(self, gi):
        env, model, device, dt = self.env, self.model, self.system.device, self.options.dtype
        key = tuple(int(x) for x in self.routed.group_key[gi])
        rt = self.routed.router_tokens[gi]
        yield env.all_of(self.on_devices("router", key, lambda cost, d: cost.router(
            device, int(rt[d]), model.hidden_size, model.num_experts, dt)))
        dispatch_bytes, combine_bytes = a2a_pair_bytes(self.routed.pair_tokens[gi], self.act_bytes)
        dispatch_s = self.a2a_model.duration_s(self.a2a, dispatch_bytes)
        parallel = [env.process(self.collective("dispatch", key, dispatch_bytes, dispatch_s))]
        if self.shared:
            parallel += self.on_devices("shared_ffn", key, lambda cost, d: cost.expert_ffn(
                device, np.array([rt[d]]), model.hidden_size, model.shared_expert_intermediate_size, dt),
                beside_comm=dispatch_s > 0)
        yield env.all_of(parallel)
        et = self.routed.expert_tokens[gi]
        yield env.all_of(self.on_devices("expert_ffn", key, lambda cost, d: cost.expert_ffn(
            device, et[d], model.hidden_size, model.moe_intermediate_size, dt)))
        yield env.process(self.collective("combine", key, combine_bytes,
                                          self.a2a_model.duration_s(self.a2a, combine_bytes)))
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total_groups)

    def micro_batch(self, first_group, l_count):
        for layer in range(l_count):
            yield self.env.process(self.layer_group(first_group + layer))

    def main(self, l_count):
        m = self.options.micro_batches
        n_steps = self.total_groups // (m * l_count)
        for s in range(n_steps):
            base = s * m * l_count
            if self.options.overlap_micro_batches:
                yield self.env.all_of([self.env.process(self.micro_batch(base + mb * l_count, l_count))
                                       for mb in range(m)])
            else:
                for mb in range(m):
                    yield self.env.process(self.micro_batch(base + mb * l_count, l_count))


@dataclass(frozen=True, eq=False)
class RoutingTotals:
    """The routing counts a Result reports, summed over groups. Integer and additive, so a replay
    streamed step by step (:mod:`moesim.stream`) adds its steps' totals and gets the in-memory figures.

    device_tokens [L, D]: choices computed per device; pair_tokens [D, D]: choices sent from src (row)
    to another device dst (column), diagonal 0; dispatched, computed, combined, trace_rows [L] (with
    ``dispatch_dedup`` pair_tokens, dispatched and combined count the copies sent, not the choices)."""

    device_tokens: np.ndarray
    pair_tokens: np.ndarray
    dispatched: np.ndarray
    computed: np.ndarray
    combined: np.ndarray
    trace_rows: np.ndarray
    num_tokens: int

    @classmethod
    def of(cls, routed: Routed, trace_layer: np.ndarray, l_count: int, num_devices: int) -> "RoutingTotals":
        """Totals of one aggregation; ``trace_layer`` is the trace's ``layer`` column."""
        layers = routed.group_key[:, 2]
        device_tokens = np.zeros((l_count, num_devices), dtype=np.int64)
        np.add.at(device_tokens, layers, routed.expert_tokens.sum(axis=2))
        pair = routed.pair_tokens.sum(axis=0, dtype=np.int64)
        np.fill_diagonal(pair, 0)

        def per_layer(x):
            return np.bincount(layers, weights=x, minlength=l_count).astype(np.int64)
        return cls(device_tokens=device_tokens, pair_tokens=pair,
                   dispatched=per_layer(routed.pair_tokens.sum(axis=(1, 2))),
                   computed=per_layer(routed.expert_tokens.sum(axis=(1, 2))),
                   combined=per_layer(np.transpose(routed.pair_tokens, (0, 2, 1)).sum(axis=(1, 2))),
                   trace_rows=np.bincount(trace_layer, minlength=l_count).astype(np.int64),
                   num_tokens=routed.num_tokens)

    def __add__(self, other: "RoutingTotals") -> "RoutingTotals":
        return RoutingTotals(**{f: getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__})


def _collect(ops, now, routed: Routed, a2a: AllToAllRouting, system, model, options, trace, cost, act_bytes) -> Result:
    totals = RoutingTotals.of(routed, trace.columns["layer"], trace.meta.num_layers, system.num_devices)
    return collect_result(pd.DataFrame(ops, columns=OP_COLUMNS), now, totals, a2a, system, model, options, trace.meta,
                          cost, act_bytes)


def layer_times(df: pd.DataFrame, l_count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(span, compute, communication) seconds per layer from the operator rows ``df`` (OP_COLUMNS)."""
    inst = df.groupby(["step", "micro_batch", "layer", "op"]).agg(start=("start_at_s", "min"), end=("end_at_s", "max"))
    inst["dur"] = inst["end"] - inst["start"]
    inst = inst.reset_index()
    span = inst.groupby(["step", "micro_batch", "layer"]).agg(start=("start", "min"), end=("end", "max"))
    span["dur"] = span["end"] - span["start"]
    layer_time = span.groupby("layer")["dur"].sum().reindex(range(l_count), fill_value=0.0).to_numpy()
    by_kind = inst.assign(kind=np.where(inst["op"].isin(COMM_OPS), "comm", "compute")).groupby(["layer", "kind"])["dur"].sum()
    kinds = by_kind.index.get_level_values(1)
    comp = by_kind.xs("compute", level="kind").reindex(range(l_count), fill_value=0.0).to_numpy() if "compute" in kinds else np.zeros(l_count)
    comm = by_kind.xs("comm", level="kind").reindex(range(l_count), fill_value=0.0).to_numpy() if "comm" in kinds else np.zeros(l_count)
    return layer_time, comp, comm


def collect_result(df: pd.DataFrame, now: float, totals: RoutingTotals, a2a: AllToAllRouting, system, model,
                   options, trace_meta, cost, act_bytes, times: tuple | None = None) -> Result:
    """The Result of a replay from its operator rows ``df``, makespan ``now`` and routing ``totals``;
    ``times`` may give :func:`layer_times` already summed (then ``df`` may be empty)."""
    l_count = trace_meta.num_layers
    layer_time, comp, comm = times if times is not None else layer_times(df, l_count)
    edge = sum(a2a.edge_bytes(b) for b in a2a_pair_bytes(totals.pair_tokens, act_bytes))  # dispatch + combine
    link_bytes = pd.DataFrame({"link": list(a2a.edge_names), "kind": list(a2a.edge_kinds), "bytes": edge})
    tokens = pd.DataFrame({"layer": np.arange(l_count), "dispatched": totals.dispatched, "computed": totals.computed,
                           "combined": totals.combined, "trace_rows": totals.trace_rows})
    meta = {"system": system.name, "device": system.device.name, "num_devices": system.num_devices,
            "model": model.name, "trace_model": trace_meta.model, "trace_source": trace_meta.source,
            "num_tokens": totals.num_tokens, "num_layers": l_count, "cost_model": getattr(cost, "name", type(cost).__name__),
            "micro_batches": options.micro_batches, "dtype": options.dtype,
            "replica_routing": options.replica_routing, "activation_bytes_per_token": act_bytes.dispatch_bytes,
            "combine_bytes_per_token": act_bytes.combine_bytes,
            "dispatch_dtype": options.dispatch_dtype or options.dtype, "combine_dtype": options.combine_dtype or options.dtype,
            "all_to_all_model": collective_model(cost, system).name, "comm_kernel": options.comm_kernel,
            **({"dispatch_dedup": options.dispatch_dedup} if options.dispatch_dedup != "none" else {})}
    return Result(ops=df, total_time_s=float(now), layer_time_s=layer_time, layer_compute_s=comp, layer_comm_s=comm,
                  device_tokens=totals.device_tokens, link_bytes=link_bytes, tokens=tokens, meta=meta)
