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
trace actually routes over each link (:mod:`hwmodels.topology`). Tokens of a step are sharded
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

from hwmodels.cost import DTYPE_BYTES, CostModel, OpCost, RooflineCost
from hwmodels.specs import System
from hwmodels.topology import AllToAllRouting, all_to_all_routing
from moesim.placement import REPLICA_ROUTING, Placement
from workloads.catalog import MoEModel
from workloads.trace import Trace

OP_COLUMNS = ["op", "step", "micro_batch", "layer", "device", "start_at_s", "end_at_s", "flops", "bytes"]
COMPUTE_OPS = ("router", "shared_ffn", "expert_ffn")
COMM_OPS = ("dispatch", "combine")


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
    """

    micro_batches: int = 1
    dtype: str = "bf16"
    overlap_micro_batches: bool = True
    replica_routing: str = "local-first"
    include_shared_experts: bool = True

    def __post_init__(self):
        if self.micro_batches < 1:
            raise SimulationError(f"micro_batches must be >= 1, got {self.micro_batches}")
        if self.dtype not in DTYPE_BYTES:
            raise SimulationError(f"unknown dtype {self.dtype!r}; known: {sorted(DTYPE_BYTES)}")
        if self.replica_routing not in REPLICA_ROUTING:
            raise SimulationError(f"unknown replica routing {self.replica_routing!r}; known: {sorted(REPLICA_ROUTING)}")


@dataclass(frozen=True, eq=False)
class Routed:
    """The trace aggregated per group g = (step, micro_batch, layer), vectorised.

    pair_tokens [G, D, D]: (token, expert) choices sent from src device (row) to dst device (column);
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
        change = step[1:] != step[:-1]
        return np.concatenate([step[:1], step[1:][change]]), np.cumsum(np.concatenate([[0], change.astype(np.int64)]))
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
    np.maximum.at(n, step_idx, token + 1)
    return n


def aggregate(trace: Trace, placement: Placement, num_devices: int, options: SimOptions,
              rng: np.random.Generator) -> Routed:
    """Vectorised routing: bincounts per (step, micro_batch, layer) of sources, destinations and experts."""
    c = trace.columns
    m, d_count, e_count = options.micro_batches, num_devices, trace.meta.num_experts
    l_count = trace.meta.num_layers
    steps, step_idx = _step_index(c["step"])
    n_per_step = _tokens_per_step(c["token"], step_idx, len(steps))
    # shard every token once (also tokens whose choices were all dropped: they still pass the router),
    # then gather per row: cheaper than integer division over all rows
    offsets = np.concatenate([[0], np.cumsum(n_per_step)[:-1]])
    all_step = np.repeat(np.arange(len(steps)), n_per_step)
    all_tokens = np.arange(int(n_per_step.sum())) - offsets[all_step]
    t_src, t_mb = _shard(all_tokens, n_per_step[all_step], d_count, m)
    t_group = all_step * m + t_mb  # (step, micro-batch) of each token
    row_token = offsets[step_idx] + c["token"]
    src = t_src[row_token]
    route = REPLICA_ROUTING[options.replica_routing]
    dst = np.empty_like(src)
    layer = c["layer"]
    if placement.replica_count.max() == 1:  # one replica per expert: every policy picks it (no RNG draws needed)
        dev = np.stack([placement.expert_devices(i)[:, 0] for i in range(placement.num_layers)])
        dst[:] = dev.reshape(-1)[layer.astype(np.int64) * e_count + c["expert"]]
    else:
        order = np.argsort(layer.astype(np.int16) if l_count < 2**15 else layer, kind="stable")
        bounds = np.searchsorted(layer[order], np.arange(l_count + 1))
        for layer_i in range(l_count):
            rows = order[bounds[layer_i]:bounds[layer_i + 1]]  # ascending row order, like flatnonzero
            if rows.size:
                dst[rows] = route(placement, layer_i, src[rows], c["expert"][rows], c["token"][rows], rng)
    g = t_group[row_token] * l_count + layer
    g_count = len(steps) * m * l_count
    pair = np.bincount(g * d_count * d_count + src * d_count + dst, minlength=g_count * d_count * d_count)
    expert = np.bincount((g * d_count + dst) * e_count + c["expert"], minlength=g_count * d_count * e_count)
    per_mb = np.bincount(t_group * d_count + t_src, minlength=len(steps) * m * d_count)
    router = np.broadcast_to(per_mb.reshape(len(steps), m, 1, d_count), (len(steps), m, l_count, d_count))
    keys = np.stack(np.meshgrid(steps, np.arange(m), np.arange(l_count), indexing="ij"), axis=-1).reshape(-1, 3)
    return Routed(group_key=keys, pair_tokens=pair.reshape(g_count, d_count, d_count),
                  expert_tokens=expert.reshape(g_count, d_count, e_count),
                  router_tokens=router.reshape(g_count, d_count), num_tokens=int(n_per_step.sum()))


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
    if meta_t.num_experts != model.num_experts:
        raise SimulationError(f"trace has {meta_t.num_experts} experts per layer but model {model.name!r} has "
                              f"{model.num_experts}")
    if meta_t.num_layers > model.num_moe_layers:
        raise SimulationError(f"trace has {meta_t.num_layers} MoE layers but model {model.name!r} has only "
                              f"{model.num_moe_layers}")
    placement.check_fits(meta_t.num_layers, meta_t.num_experts, system.num_devices)
    routed = aggregate(trace, placement, system.num_devices, options, np.random.default_rng(seed))
    a2a = a2a if a2a is not None else all_to_all_routing(system)
    return routed, a2a, model.hidden_size * DTYPE_BYTES[options.dtype]


def _run_des(system: System, model: MoEModel, routed: Routed, a2a: AllToAllRouting, cost: CostModel,
             options: SimOptions, act_bytes: int, progress, trace: Trace) -> Result:
    env = simpy.Environment()
    d_count = system.num_devices
    device = system.device
    compute = [simpy.Resource(env, capacity=1) for _ in range(d_count)]
    fabric = simpy.Resource(env, capacity=1)
    ops: list[tuple] = []
    total_groups = len(routed.group_key)
    done = [0]
    shared = options.include_shared_experts and model.num_shared_experts > 0

    def device_op(name, key, d, c: OpCost):
        with compute[d].request() as req:
            yield req
            start = env.now
            if c.time_s > 0:
                yield env.timeout(c.time_s)
            ops.append((name, *key, d, start, env.now, c.flops, c.bytes))

    def collective(name, key, pair_bytes):
        with fabric.request() as req:
            yield req
            start = env.now
            duration = a2a.duration_s(pair_bytes)
            if duration > 0:
                yield env.timeout(duration)
            sent = pair_bytes.sum(axis=1) - np.diag(pair_bytes)
            for d in range(d_count):
                ops.append((name, *key, d, start, env.now, 0.0, float(sent[d])))

    def layer_group(gi):
        key = tuple(int(x) for x in routed.group_key[gi])
        rt = routed.router_tokens[gi]
        yield env.all_of([env.process(device_op("router", key, d, cost.router(
            device, int(rt[d]), model.hidden_size, model.num_experts, options.dtype))) for d in range(d_count)])
        pair_bytes = routed.pair_tokens[gi].astype(float) * act_bytes
        parallel = [env.process(collective("dispatch", key, pair_bytes))]
        if shared:
            parallel += [env.process(device_op("shared_ffn", key, d, cost.expert_ffn(
                device, np.array([rt[d]]), model.hidden_size, model.shared_expert_intermediate_size, options.dtype)))
                for d in range(d_count)]
        yield env.all_of(parallel)
        et = routed.expert_tokens[gi]
        yield env.all_of([env.process(device_op("expert_ffn", key, d, cost.expert_ffn(
            device, et[d], model.hidden_size, model.moe_intermediate_size, options.dtype))) for d in range(d_count)])
        yield env.process(collective("combine", key, pair_bytes.T.copy()))
        done[0] += 1
        if progress is not None:
            progress(done[0], total_groups)

    l_count = trace.meta.num_layers
    m = options.micro_batches

    def micro_batch(first_group):
        for layer in range(l_count):
            yield env.process(layer_group(first_group + layer))

    def main():
        n_steps = total_groups // (m * l_count)
        for s in range(n_steps):
            base = s * m * l_count
            if options.overlap_micro_batches:
                yield env.all_of([env.process(micro_batch(base + mb * l_count)) for mb in range(m)])
            else:
                for mb in range(m):
                    yield env.process(micro_batch(base + mb * l_count))

    env.process(main())
    env.run()
    return _collect(ops, env.now, routed, a2a, system, model, options, trace, cost, act_bytes)


def _collect(ops, now, routed: Routed, a2a: AllToAllRouting, system, model, options, trace, cost, act_bytes) -> Result:
    df = pd.DataFrame(ops, columns=OP_COLUMNS)
    l_count = trace.meta.num_layers
    inst = df.groupby(["step", "micro_batch", "layer", "op"]).agg(start=("start_at_s", "min"), end=("end_at_s", "max"))
    inst["dur"] = inst["end"] - inst["start"]
    inst = inst.reset_index()
    span = inst.groupby(["step", "micro_batch", "layer"]).agg(start=("start", "min"), end=("end", "max"))
    span["dur"] = span["end"] - span["start"]
    layer_time = span.groupby("layer")["dur"].sum().reindex(range(l_count), fill_value=0.0).to_numpy()
    by_kind = inst.assign(kind=np.where(inst["op"].isin(COMM_OPS), "comm", "compute")).groupby(["layer", "kind"])["dur"].sum()
    comp = by_kind.xs("compute", level="kind").reindex(range(l_count), fill_value=0.0).to_numpy() if "compute" in by_kind.index.get_level_values(1) else np.zeros(l_count)
    comm = by_kind.xs("comm", level="kind").reindex(range(l_count), fill_value=0.0).to_numpy() if "comm" in by_kind.index.get_level_values(1) else np.zeros(l_count)
    layers = routed.group_key[:, 2]
    device_tokens = np.zeros((l_count, system.num_devices), dtype=np.int64)
    np.add.at(device_tokens, layers, routed.expert_tokens.sum(axis=2))
    pair = routed.pair_tokens.astype(float) * act_bytes
    off = pair.copy()
    idx = np.arange(system.num_devices)
    off[:, idx, idx] = 0
    total_pair = off.sum(axis=0)
    edge = a2a.edge_bytes(total_pair) + a2a.edge_bytes(total_pair.T.copy())  # dispatch + combine
    link_bytes = pd.DataFrame({"link": list(a2a.edge_names), "kind": list(a2a.edge_kinds), "bytes": edge})
    tokens = pd.DataFrame({
        "layer": np.arange(l_count),
        "dispatched": np.bincount(layers, weights=routed.pair_tokens.sum(axis=(1, 2)), minlength=l_count).astype(np.int64),
        "computed": np.bincount(layers, weights=routed.expert_tokens.sum(axis=(1, 2)), minlength=l_count).astype(np.int64),
        "combined": np.bincount(layers, weights=np.transpose(routed.pair_tokens, (0, 2, 1)).sum(axis=(1, 2)), minlength=l_count).astype(np.int64),
        "trace_rows": np.bincount(trace.columns["layer"], minlength=l_count).astype(np.int64),
    })
    meta = {"system": system.name, "device": system.device.name, "num_devices": system.num_devices,
            "model": model.name, "trace_model": trace.meta.model, "trace_source": trace.meta.source,
            "num_tokens": routed.num_tokens, "num_layers": l_count, "cost_model": getattr(cost, "name", type(cost).__name__),
            "micro_batches": options.micro_batches, "dtype": options.dtype,
            "replica_routing": options.replica_routing, "activation_bytes_per_token": act_bytes}
    return Result(ops=df, total_time_s=float(now), layer_time_s=layer_time, layer_compute_s=comp, layer_comm_s=comm,
                  device_tokens=device_tokens, link_bytes=link_bytes, tokens=tokens, meta=meta)
