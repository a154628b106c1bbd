"""One training step of a whole model: per-micro-batch stage times -> pipeline schedule -> gradient
synchronisation -> optimizer step; memory per device; phases and MFU.

``step_time_s = pipeline makespan + grad_sync + optimizer + fssdp_comm + fp8_weight_cast`` (the FP8 weight casts,
once per step, of the slowest stage: :mod:`moesim.train.fp8`; each MoE layer's forward and backward also carry
its experts' FP8 casts and the host time waited after its dispatch sync, :mod:`moesim.train.overheads`; fssdp_comm
only with ``expert_mode="fssdp"``: the once-per-step sparse all-gather and reduce-scatter of :mod:`moesim.train.fssdp`;
``offload="optimizer"`` or ``"weights"`` makes the optimizer term the offloaded one of :mod:`moesim.train.offload`;
``"weights"`` also streams each layer's weights from there before its forward and its backward, overlapped with
the layer's compute like ZeRO-3's gathers). Gradient synchronisation after the
pipeline flush is not overlapped with the backward pass by default (Megatron's default; with
``overlap_grad_reduce`` only what the bucketed reduction leaves past the pipeline counts, with
``overlap_param_gather`` ZeRO 1/2's weight all-gather waits in the next step's first forwards instead:
:mod:`moesim.train.overlap`): ZeRO 0 all-reduces the gradients, ZeRO 1/2 reduce-scatter them and all-gather the
updated bf16 weights; ZeRO 3 instead all-gathers each layer's weights before its forward and backward
and reduce-scatters its gradients, every micro-batch, prefetched so that they overlap the layer's
compute (only what exceeds the compute waits). Dense gradients go over the ``dp x cp`` ranks
of a tensor-parallel rank (stride ``tp``; Megatron reduces over the data-parallel group with context parallel),
expert gradients over the expert-data-parallel replicas (stride ``ep x etp``). The Adam step is bytes-bound:
:data:`ADAM_BYTES_PER_PARAM` per local parameter.

MFU (PaLM's definition): model FLOPs / (step time x devices x peak of the dtype), with model FLOPs =
3 x the forward FLOPs of every linear layer, router, expert (top-k choices per token), the LM head and
the causal attention core (half of the full ``s^2`` products); recomputation is not model FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from moebase.units import GB
from hwmodels.collectives import COMM_KERNEL_SMS
from hwmodels.cost import overlapped_cost
from hwmodels.roofline import DTYPE_BYTES, CostModel, gemm_flops
from hwmodels.specs import System
from moesim.placement import Placement
from moesim.train import memory as mem
from moesim.train.collectives import collective_time_s, describe_collectives
from moesim.train.offload import backing, optimizer_offload_s, weight_fetch_s
from moesim.train.fssdp import FssdpComm, expert_params, fssdp_comm, placement_from_trace
from moesim.train.layers import (SELECTIVE_RECOMPUTE_PHASES, Shape, attention_linears, block_ops, core_attention_kernels,
                                 embedding_ops, head_ops)
from moesim.train.moe import MoETimes, moe_times
from moesim.train.ops import (BACKWARD_INPUT, BACKWARD_WEIGHT, COMMUNICATION, COMPUTE, FORWARD, PER_STEP, Kernel, Op,
                              Timer, kernel_cost)
from moesim.train.overheads import MoEOverheads, moe_overheads
from moesim.train.overlap import NCCL_KERNEL, bucket_fractions, gather_before_compute_s, reduce_beside_compute
from moesim.train.pipeline import Timeline, run_schedule
from moesim.train.timeline import gradient_slots
from moesim.train.spec import DUALPIPES, REPLAYED, TrainError, TrainSpec
from workloads.hf_config import ModelConfig
from workloads.trace import Trace

ADAM_BYTES_PER_PARAM = 4 + 2 + 4 + 4 + 4 + 4 + 4 + 2  # read master, grad, m, v; write master, m, v, bf16 weight
ADAM_FLOPS_PER_PARAM = 12
PHASE_COLUMNS = ("layer", "phase", "direction", "kind", "time_s")


@dataclass(frozen=True, eq=False)
class TrainResult:
    """What :func:`simulate_step` returns (all times in seconds of one step, bytes per device)."""

    step_time_s: float
    tokens_per_s: float
    tokens_per_s_per_device: float
    mfu: float
    model_flops_per_step: float
    memory_bytes: dict
    memory_per_stage: list
    phases: list
    breakdown: dict
    timeline: Timeline
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"step_time_s": self.step_time_s, "tokens_per_s": self.tokens_per_s,
                "tokens_per_s_per_device": self.tokens_per_s_per_device, "mfu": self.mfu,
                "model_flops_per_step": self.model_flops_per_step, "memory_bytes": self.memory_bytes,
                "memory_per_stage": self.memory_per_stage, "breakdown": self.breakdown, "phases": self.phases,
                "timeline": [{"stage": s.stage, "what": s.what, "chunk": _jsonable(s.chunk),
                              "micro_batch": _jsonable(s.micro_batch), "start_at_s": s.start_at_s,
                              "end_at_s": s.end_at_s} for s in self.timeline.slots],
                **{"meta": self.meta}}


def _jsonable(x):
    return list(x) if isinstance(x, tuple) else x


def model_flops_per_micro_batch(cfg: ModelConfig, micro_batch_size: int, seq_len: int) -> float:
    """Forward model FLOPs of one micro-batch of the whole model (see the module docstring)."""
    t, h = micro_batch_size * seq_len, cfg.hidden_size
    sh = Shape(micro_batch_size, seq_len, 1)
    per_layer_attn = sum(float(gemm_flops(t, n, k)) for n, k, _ in attention_linears(cfg, 1))
    per_layer_attn += core_attention_kernels(cfg, sh, 2)[0].flops
    total = cfg.num_hidden_layers * per_layer_attn + float(gemm_flops(t, cfg.vocab_size, h))
    for layer in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(layer):
            total += float(gemm_flops(t * cfg.num_experts_per_tok, 3 * cfg.moe_intermediate_size, h))
            total += float(gemm_flops(t, 3 * cfg.shared_expert_intermediate_size, h))
            total += float(gemm_flops(t, cfg.num_experts, h))
        else:
            total += float(gemm_flops(t, 3 * cfg.intermediate_size, h))
    return total


def _sum(ops: list[Op], *directions: str, kind: str | None = None) -> float:
    return sum(o.time_s for o in ops if o.direction in directions and (kind is None or o.kind == kind))


@dataclass(frozen=True)
class _Ctx:
    cfg: ModelConfig
    system: System
    spec: TrainSpec
    timer: Timer
    shape: Shape
    chunks: tuple
    moe: MoETimes | None
    moe_ordinal: dict
    fssdp: FssdpComm | None = None
    overheads: MoEOverheads | None = None  # FP8 expert casts, host exposure (moesim.train.overheads)


def simulate_step(cfg: ModelConfig, system: System, spec: TrainSpec, cost: CostModel, *,
                  trace: Trace | None = None, seed: int = 0, check_memory: bool = True,
                  placement: Placement | None = None) -> TrainResult:
    """Time and memory of one training step of ``cfg`` on ``system`` laid out as ``spec``.

    Raises TrainError when a device needs more than its HBM (unless ``check_memory`` is False: then the
    result's ``memory_bytes`` shows the overflow). ``placement``: see :func:`moesim.train.moe.moe_times`."""
    ctx = _context(cfg, system, spec, cost, trace, seed, placement)
    static = _block_ops_all(ctx)
    static[-1] = embedding_ops(cfg, ctx.shape, ctx.timer, system)
    static[cfg.num_hidden_layers] = head_ops(cfg, ctx.shape, ctx.timer, system)
    if ctx.moe is not None:
        ctx = replace(ctx, overheads=moe_overheads(cfg, spec, ctx.timer, ctx.moe, static[cfg.moe_layers[0]]))
    router_bwd = _router_backward(ctx)
    fwd, bwd, fwd_comm, bwd_comm, wgt = _chunk_times(ctx, static, router_bwd)
    params = _stage_params(ctx)
    p2p_s = _p2p_s(ctx)
    par = spec.parallel
    tl = run_schedule(spec.schedule, fwd, bwd, p2p_s, par.pp, par.virtual_stages, fwd_comm, bwd_comm, wgt)
    gather = _param_gather_s(ctx, fwd, tl)  # overlap_param_gather: first forwards wait for their weights
    if gather.any():
        fwd[:, 0] += gather
        fwd_comm[:, 0] += gather
        tl = run_schedule(spec.schedule, fwd, bwd, p2p_s, par.pp, par.virtual_stages, fwd_comm, bwd_comm, wgt)
    sync_s = _grad_sync_exposed_s(ctx, params, tl)
    opt_s = max(_optimizer_s(ctx, pc) for pc in params)
    fssdp_s = max(_fssdp_stage_s(ctx, s) for s in range(par.pp))
    cast_s = max(_weight_cast_s(ctx, static, s) for s in range(par.pp))
    step_s = tl.makespan_s + sync_s + opt_s + fssdp_s + cast_s
    memory, per_stage = _memory(ctx, params, tl, check_memory)
    flops = 3.0 * model_flops_per_micro_batch(cfg, spec.micro_batch_size, spec.seq_len) * spec.num_micro_batches * par.dp
    peak = system.device.peak(spec.dtype) * system.num_devices
    phases = _phases(ctx, static, router_bwd, tl, p2p_s, sync_s, opt_s)
    if gather.any():
        phases.append(_record(None, "param_gather", FORWARD, COMMUNICATION, float(gather.sum())))
    breakdown = {"pipeline_s": tl.makespan_s, "grad_sync_s": sync_s, "optimizer_s": opt_s,
                 "bubble_fraction": tl.bubble_fraction, "p2p_s": p2p_s,
                 "moe_imbalance_mean": float(ctx.moe.imbalance.mean()) if ctx.moe is not None else 1.0,
                 "fssdp_comm_s": fssdp_s, "fssdp_bytes_per_step": _fssdp_bytes(ctx),
                 "fp8_weight_cast_s": cast_s}
    meta = {"model": cfg.name, "model_source": cfg.source, "system": system.name, "device": system.device.name,
            "num_devices": system.num_devices, "tp": par.tp, "pp": par.pp, "dp": par.dp, "ep": par.ep, "zero": par.zero,
            "cp": par.cp, "etp": par.etp,
            "virtual_stages": par.virtual_stages, "schedule": spec.schedule, "recompute": spec.recompute,
            "seq_len": spec.seq_len, "micro_batch_size": spec.micro_batch_size, "global_batch_size": spec.global_batch_size,
            "micro_batches": spec.num_micro_batches, "layers": cfg.num_hidden_layers, "dtype": spec.dtype,
            "routing": spec.routing, "expert_mode": spec.expert_mode, "fssdp_plan": spec.fssdp_plan,
            "offload": spec.offload, "fp8_recipe": spec.fp8_recipe, "host_overhead": spec.host_overhead,
            "moe_permute": spec.moe_permute and cfg.is_moe,
            "overlap_grad_reduce": spec.overlap_grad_reduce,
            "overlap_param_gather": spec.overlap_param_gather, "tp_comm_overlap": spec.tp_comm_overlap,
            "dispatch_dedup": ctx.moe.dispatch_dedup if ctx.moe is not None else "none",
            "collectives": describe_collectives(system),
            "cost_model": getattr(cost, "name", type(cost).__name__)}
    return TrainResult(step_time_s=step_s, tokens_per_s=spec.tokens_per_step / step_s,
                       tokens_per_s_per_device=spec.tokens_per_step / step_s / system.num_devices,
                       mfu=flops / (step_s * peak), model_flops_per_step=flops, memory_bytes=memory,
                       memory_per_stage=per_stage, phases=phases, breakdown=breakdown, timeline=tl, meta=meta)


def _context(cfg, system, spec, cost, trace, seed, placement) -> _Ctx:
    par = spec.parallel
    if par.world != system.num_devices:
        raise TrainError(f"tp x cp x pp x dp = {par.tp} x {par.cp} x {par.pp} x {par.dp} = {par.world} devices, "
                         f"but system {system.name!r} has {system.num_devices} (set --nodes or the layout)")
    if par.ep * par.etp > 1 and not cfg.is_moe:
        raise TrainError(f"--ep {par.ep} / --etp {par.etp} need MoE blocks; {cfg.name!r} has none in its "
                         f"{cfg.num_hidden_layers} simulated layers")
    if trace is not None and spec.routing not in REPLAYED:
        raise TrainError(f"a trace was given but routing is {spec.routing!r}; set routing='trace' to replay it")
    chunks = par.chunks(cfg.num_hidden_layers)
    fssdp = spec.expert_mode == "fssdp" and cfg.is_moe
    if fssdp and placement is not None:
        raise TrainError("--placement and --expert-mode fssdp exclude each other: FSSDP places experts by the "
                         "step's load")
    if fssdp and spec.routing in REPLAYED:
        placement = placement_from_trace(par.ep, spec.fssdp_plan)
    moe = moe_times(cfg, system, spec, cost, trace, seed, placement) if cfg.is_moe else None
    comm = fssdp_comm(system, cfg, moe.expert_load, moe.placement, par.ep, mem.WEIGHT_BYTES, mem.GRAD_BYTES) \
        if fssdp else None
    return _Ctx(cfg, system, spec, Timer(cost, system.device, spec.dtype, spec.fp8_recipe),
                Shape(spec.micro_batch_size, spec.seq_len, par.tp, par.cp, par.etp), chunks, moe,
                {layer: j for j, layer in enumerate(cfg.moe_layers)}, comm)


def _block_ops_all(ctx: _Ctx) -> dict[int, list[Op]]:
    """Operators of every block; blocks of one kind (dense or MoE) are identical, so each kind is costed once."""
    import dataclasses

    cfg, out, first = ctx.cfg, {}, {}
    for layer in range(cfg.num_hidden_layers):
        kind = cfg.is_moe_layer(layer)
        if kind not in first:
            first[kind] = block_ops(cfg, layer, ctx.shape, ctx.timer, ctx.system, tp_overlap=ctx.spec.tp_comm_overlap)
        out[layer] = [dataclasses.replace(o, layer=layer) for o in first[kind]]
    return out


def _router_backward(ctx: _Ctx) -> list[Op]:
    if ctx.moe is None:
        return []
    ops = ctx.timer.linear(-2, "router", ctx.moe.tokens_per_device, ctx.cfg.num_experts, ctx.cfg.hidden_size,
                           precise=True)
    return [o for o in ops if o.direction != FORWARD]


def _moe_layer(ctx: _Ctx, j: int, i: int, router_bwd: list[Op]) -> tuple[float, float, float, float, float]:
    """(forward, backward, forward communication, backward communication, weight gradients inside the backward)
    of MoE layer j, micro-batch i."""
    mt, g = ctx.moe, i % ctx.moe.num_samples
    r, d, sh, e, c = (mt.router_s[g, j], mt.dispatch_s[g, j], mt.shared_s[g, j], mt.expert_s[g, j], mt.combine_s[g, j])
    fwd = r + max(d, sh) + e + c
    bwd = d + 2 * e + max(c, sh) + sh + sum(o.time_s for o in router_bwd)
    wgt = e + sh + sum(o.time_s for o in router_bwd if o.direction == BACKWARD_WEIGHT)
    if mt.permute_s is not None:  # the token permute/unpermute kernels (compute, not hidden by the all-to-all)
        fwd, bwd = fwd + mt.permute_s[g, j] + mt.unpermute_s[g, j], bwd + mt.permute_bwd_s[g, j]
    ov = ctx.overheads
    if ov is not None:
        fwd, bwd = fwd + ov.cast_fwd_s[g, j] + ov.host_s[g, j], bwd + ov.cast_bwd_s[g, j]
    return fwd, bwd, d + c, d + c, wgt


def _chunk_times(ctx: _Ctx, static: dict, router_bwd: list[Op]):
    """[chunks, micro-batches] seconds: forward, backward, the communication inside each, and the weight
    gradients inside the backward (which DualPipe may defer)."""
    q_count, m = len(ctx.chunks), ctx.spec.num_micro_batches
    arrays = [np.zeros((q_count, m)) for _ in range(5)]
    recompute = ctx.spec.recompute
    for q, layers in enumerate(ctx.chunks):
        extra = [-1] if q == 0 else []
        extra += [ctx.cfg.num_hidden_layers] if q == q_count - 1 else []
        for layer in list(layers) + extra:
            ops = static[layer]
            f, b = _sum(ops, FORWARD), _sum(ops, BACKWARD_INPUT, BACKWARD_WEIGHT)
            fc, bc = _sum(ops, FORWARD, kind=COMMUNICATION), _sum(ops, BACKWARD_INPUT, kind=COMMUNICATION)
            w = _sum(ops, BACKWARD_WEIGHT)
            zf, zb = _zero3_layer_s(ctx, layer)
            fetch = _weight_fetch_s(ctx, layer)
            zf, zb = zf + fetch, zb + fetch
            block = 0 <= layer < ctx.cfg.num_hidden_layers
            for i in range(m):
                mf, mb, mfc, mbc, mw = _moe_layer(ctx, ctx.moe_ordinal[layer], i, router_bwd) \
                    if layer in ctx.moe_ordinal else (0.0, 0.0, 0.0, 0.0, 0.0)
                rc = (f + mf) if recompute == "full" and block else _selective_s(ops) if recompute == "selective" else 0.0
                rcc = (fc + mfc) if recompute == "full" and block else 0.0
                fwd, bwd, fwd_c, bwd_c = f + mf, b + mb + rc, fc + mfc, bc + mbc + rcc
                # ZeRO-3 weight gathers / gradient scatters overlap the layer's compute; only the excess waits
                fwd += max(0.0, zf - (fwd - fwd_c))
                bwd += max(0.0, zb - (bwd - bwd_c))
                for arr, val in zip(arrays, (fwd, bwd, fwd_c + zf, bwd_c + zb, w + mw)):
                    arr[q, i] += val
    return arrays


def _layer_params(ctx: _Ctx, layer: int) -> mem.ParamCount:
    par = ctx.spec.parallel
    if 0 <= layer < ctx.cfg.num_hidden_layers:
        return mem.block_params(ctx.cfg, layer, par.tp, par.ep, par.etp)
    return mem.embedding_params(ctx.cfg, par.tp, first=layer < 0, last=layer >= 0)


def _local_weights(ctx: _Ctx, pc: mem.ParamCount) -> float:
    """Weights a device holds of ``pc``: all of them, or its ZeRO-3 shard."""
    par = ctx.spec.parallel
    return pc.dense + pc.expert if par.zero < 3 else pc.dense / par.dense_dp + pc.expert / par.expert_dp


def _weight_fetch_s(ctx: _Ctx, layer: int) -> float:
    """``--offload weights``: one layer's local bf16 weights (its ZeRO-3 shard at stage 3) from the backing tier."""
    if ctx.spec.offload != "weights":
        return 0.0
    return weight_fetch_s(ctx.system, _local_weights(ctx, _layer_params(ctx, layer)) * mem.WEIGHT_BYTES)


def _zero3_layer_s(ctx: _Ctx, layer: int) -> tuple[float, float]:
    """ZeRO-3 communication of one layer per micro-batch: (forward all-gather, backward all-gather + reduce-scatter)."""
    par = ctx.spec.parallel
    if par.zero < 3:
        return 0.0, 0.0
    pc = _layer_params(ctx, layer)
    gather = _sync(ctx, "all_gather", pc, mem.WEIGHT_BYTES)
    return gather, gather + _sync(ctx, "reduce_scatter", pc, mem.GRAD_BYTES)


def _selective_s(ops: list[Op]) -> float:
    """Forward seconds ``selective`` recomputation re-runs: norms, the attention core, MLA up-projections."""
    return sum(o.time_s for o in ops if o.phase in SELECTIVE_RECOMPUTE_PHASES and o.direction == FORWARD)


def _stage_params(ctx: _Ctx) -> list[mem.ParamCount]:
    """Parameters per pipeline stage (one device of it), before ZeRO sharding."""
    par, cfg = ctx.spec.parallel, ctx.cfg
    out = []
    for s in range(par.pp):
        pc = mem.embedding_params(cfg, par.tp, first=s == 0, last=s == par.pp - 1)
        for q in range(s, len(ctx.chunks), par.pp):
            for layer in ctx.chunks[q]:
                pc = pc + _layer_params(ctx, layer)
        out.append(pc)
    return out


def _sync(ctx: _Ctx, kind: str, pc: mem.ParamCount, bytes_per_param: int) -> float:
    par = ctx.spec.parallel
    return (collective_time_s(ctx.system, kind, pc.dense * bytes_per_param, par.dense_dp, par.tp)
            + collective_time_s(ctx.system, kind, pc.expert * bytes_per_param, par.expert_dp, par.ep * par.etp))


def _stage_moe_layers(ctx: _Ctx, s: int) -> list[int]:
    """MoE-layer ordinals (index into the replayed FSSDP arrays) of pipeline stage ``s``."""
    par, fc = ctx.spec.parallel, ctx.fssdp
    used = len(fc.touched)
    return [ctx.moe_ordinal[layer] % used for q in range(s, len(ctx.chunks), par.pp) for layer in ctx.chunks[q]
            if layer in ctx.moe_ordinal]


def _fssdp_stage_s(ctx: _Ctx, s: int) -> float:
    """FSSDP sparse all-gather + reduce-scatter seconds of stage ``s``'s MoE layers, once per step."""
    if ctx.fssdp is None:
        return 0.0
    js = _stage_moe_layers(ctx, s)
    return float(ctx.fssdp.gather_s[js].sum() + ctx.fssdp.reduce_scatter_s[js].sum())


def _fssdp_bytes(ctx: _Ctx) -> float:
    """Bytes FSSDP moves per step in one expert group, over all MoE layers of the model."""
    if ctx.fssdp is None:
        return 0.0
    fc, idx = ctx.fssdp, np.array(sorted(ctx.moe_ordinal.values())) % len(ctx.fssdp.touched)
    return float(fc.gather_bytes[idx].sum() + fc.reduce_scatter_bytes[idx].sum())


def _grad_sync_s(ctx: _Ctx, pc: mem.ParamCount) -> float:
    """Gradient synchronisation of ``pc`` after the pipeline flush; ZeRO 1/2's weight all-gather is not here with
    ``overlap_param_gather`` (it waits in the next step's forward, :func:`_param_gather_s`)."""
    zero = ctx.spec.parallel.zero
    if zero == 0:
        return _sync(ctx, "all_reduce", pc, mem.GRAD_BYTES)
    if zero in (1, 2):
        gather = 0.0 if ctx.spec.overlap_param_gather else _sync(ctx, "all_gather", pc, mem.WEIGHT_BYTES)
        return _sync(ctx, "reduce_scatter", pc, mem.GRAD_BYTES) + gather
    return 0.0


def _reduce_kind(ctx: _Ctx) -> str:
    return "all_reduce" if ctx.spec.parallel.zero == 0 else "reduce_scatter"


def _grad_sync_exposed_s(ctx: _Ctx, params: list[mem.ParamCount], tl: Timeline) -> float:
    """Seconds gradient synchronisation adds after the pipeline: all of it (the slowest stage's), or with
    ``overlap_grad_reduce`` (ZeRO 0-2) what each stage's bucketed reduction leaves past the pipeline's end
    (:mod:`moesim.train.overlap`), plus ZeRO 1/2's weight all-gather after it."""
    if not ctx.spec.overlap_grad_reduce or ctx.spec.parallel.zero == 3:
        return max(_grad_sync_s(ctx, pc) for pc in params)
    kind, slowdown = _reduce_kind(ctx), _compute_slowdown(ctx, NCCL_KERNEL)
    end = tl.makespan_s
    for s, pc in enumerate(params):
        after = _grad_sync_s(ctx, pc) - _sync(ctx, kind, pc, mem.GRAD_BYTES)  # the all-gather, if any
        end = max(end, _stage_reduce_end_s(ctx, tl, s, kind, slowdown) + after)
    return float(end - tl.makespan_s)


def _stage_reduce_end_s(ctx: _Ctx, tl: Timeline, s: int, kind: str, slowdown: float) -> float:
    """When stage ``s``'s compute and bucketed gradient reduction both end: each chunk's buckets fill evenly over
    the slot of its last weight-gradient backward and are reduced one at a time beside the stage's compute."""
    grads = gradient_slots(tl, s)
    if not grads:
        return 0.0
    slots = sorted((sl for sl in tl.slots if sl.stage == s and sl.start_at_s >= grads[0].start_at_s),
                   key=lambda sl: sl.start_at_s)
    offsets = dict(zip(map(id, slots), np.cumsum([0.0] + [sl.end_at_s - sl.start_at_s for sl in slots])))
    ready, comm = [], []
    for sl in grads:
        q = _slot_chunk(ctx, s, sl.chunk)
        if q is None:
            continue
        pc = _chunk_params(ctx, q)
        fractions = bucket_fractions(pc.dense + pc.expert, ctx.spec.parallel.dense_dp)
        ready += list(offsets[id(sl)] + (sl.end_at_s - sl.start_at_s) * np.cumsum(fractions))
        comm += [_sync(ctx, kind, _scaled(pc, f), mem.GRAD_BYTES) for f in fractions]
    segments = [(sl.start_at_s, sl.end_at_s - sl.start_at_s) for sl in slots]
    return max(reduce_beside_compute(segments, ready, comm, slowdown))


def _param_gather_s(ctx: _Ctx, fwd: np.ndarray, tl: Timeline) -> np.ndarray:
    """[chunks] seconds the first forward of each chunk waits for its bucketed weight all-gathers
    (``overlap_param_gather``, ZeRO 1/2; :mod:`moesim.train.overlap`): a stage's gathers run back to back from the
    step's start, chunk by chunk in the order ``tl`` first runs them; zeros otherwise."""
    par = ctx.spec.parallel
    out = np.zeros(fwd.shape[0])
    if not ctx.spec.overlap_param_gather or par.zero not in (1, 2):
        return out
    slowdown = _compute_slowdown(ctx, NCCL_KERNEL)
    first: dict[tuple[int, int], float] = {}  # (stage, chunk) -> start of its first forward
    for sl in tl.slots:
        q = _slot_chunk(ctx, sl.stage, sl.chunk) if sl.what == "F" else None
        if q is not None and sl.start_at_s < first.get((sl.stage, q), np.inf):
            first[(sl.stage, q)] = sl.start_at_s
    stream = dict.fromkeys(range(par.pp), 0.0)  # when each stage's gather stream is free
    for (s, q), start in sorted(first.items(), key=lambda kv: kv[1]):
        pc = _chunk_params(ctx, q)
        fractions = bucket_fractions(pc.dense + pc.expert, par.dense_dp)
        gathers = [_sync(ctx, "all_gather", _scaled(pc, f), mem.WEIGHT_BYTES) for f in fractions]
        out[q] = gather_before_compute_s(gathers, float(fwd[q, 0]), fractions, slowdown, start - stream[s])
        stream[s] += sum(gathers)
    return out


def _chunk_params(ctx: _Ctx, q: int) -> mem.ParamCount:
    """Parameters of model chunk ``q`` on one device (with the embedding / LM head on the first / last chunk)."""
    pc = mem.embedding_params(ctx.cfg, ctx.spec.parallel.tp, first=q == 0, last=q == len(ctx.chunks) - 1)
    for layer in ctx.chunks[q]:
        pc = pc + _layer_params(ctx, layer)
    return pc


def _slot_chunk(ctx: _Ctx, s: int, chunk: int) -> int | None:
    """Model chunk of a timeline slot of stage ``s`` (``Slot.chunk`` is the model chunk in ``dualpipe-bidir``, the
    virtual stage otherwise); None for DualPipe's second copy, whose synchronisation is not modelled."""
    p = ctx.spec.parallel.pp
    if ctx.spec.schedule == "dualpipe-bidir":
        return chunk if chunk == s else None
    return chunk * p + s


def _scaled(pc: mem.ParamCount, fraction: float) -> mem.ParamCount:
    return mem.ParamCount(pc.dense * fraction, pc.expert * fraction)


def _compute_slowdown(ctx: _Ctx, kernel: str) -> float:
    """How many times slower compute runs while ``kernel`` (a key of ``COMM_KERNEL_SMS``) holds its SMs: the
    backward compute of one block of each kind under the cost model with those SMs taken, over without (1 for
    cost models without SMs, :func:`hwmodels.cost.overlapped_cost`)."""
    slow_cost = overlapped_cost(ctx.timer.cost, COMM_KERNEL_SMS[kernel][0])
    if slow_cost is ctx.timer.cost:
        return 1.0
    slow = replace(ctx.timer, cost=slow_cost)  # same dtype and FP8 recipe
    kinds = {ctx.cfg.is_moe_layer(layer): layer for layer in reversed(range(ctx.cfg.num_hidden_layers))}
    fast_s = slow_s = 0.0
    for layer in kinds.values():
        fast_s += _sum(block_ops(ctx.cfg, layer, ctx.shape, ctx.timer, ctx.system), BACKWARD_INPUT, BACKWARD_WEIGHT,
                       kind=COMPUTE)
        slow_s += _sum(block_ops(ctx.cfg, layer, ctx.shape, slow, ctx.system), BACKWARD_INPUT, BACKWARD_WEIGHT,
                       kind=COMPUTE)
    # at least 1: a GEMM does not speed up because another kernel holds SMs (the fitted wave model can say so)
    return max(1.0, slow_s / fast_s) if fast_s > 0 else 1.0


def _local_params(ctx: _Ctx, pc: mem.ParamCount) -> float:
    par = ctx.spec.parallel
    if par.zero == 0:
        return pc.dense + pc.expert
    return pc.dense / par.dense_dp + pc.expert / par.expert_dp


def _optimizer_s(ctx: _Ctx, pc: mem.ParamCount) -> float:
    n = _local_params(ctx, pc)
    if ctx.spec.offload in ("optimizer", "weights"):
        return optimizer_offload_s(ctx.system, n, mem.GRAD_BYTES, mem.WEIGHT_BYTES, ADAM_BYTES_PER_PARAM)
    k = Kernel("adam", ADAM_FLOPS_PER_PARAM * n, ADAM_BYTES_PER_PARAM * n)
    return kernel_cost(ctx.timer.cost, ctx.system.device, k, "fp32").time_s


def _memory(ctx: _Ctx, params: list, tl: Timeline, check: bool) -> tuple[dict, list]:
    """Bytes per category (tier ``hbm``) of the fullest stage's device, and each stage's total."""
    cfg, spec, par = ctx.cfg, ctx.spec, ctx.spec.parallel
    e = DTYPE_BYTES[spec.dtype]
    xs = ctx.moe.expert_tokens_max.max(axis=0) if ctx.moe is not None else None  # [moe layers], busiest sample

    def x(layer: int) -> float:
        return float(xs[ctx.moe_ordinal[layer]]) if layer in ctx.moe_ordinal else 0.0

    stages = []
    for s, pc in enumerate(params):
        cats = {k: v + w for (k, v), w in zip(mem.zero_bytes(pc.dense, par.zero, par.dense_dp).items(),
                                                mem.zero_bytes(pc.expert, par.zero, par.expert_dp).values())}
        if spec.schedule in DUALPIPES:
            cats["weights"] *= 2  # DualPipe keeps two copies of the parameters
        chunk_layers = [ctx.chunks[q] for q in range(s, len(ctx.chunks), par.pp)]
        if spec.schedule == "dualpipe-bidir":  # rank s also runs chunk p-1-s (the reverse direction)
            chunk_layers.append(ctx.chunks[par.pp - 1 - s])
        per_mb = max(sum(mem.block_activation_bytes(cfg, i, ctx.shape, spec.recompute, e, x(i)) for i in c)
                     for c in chunk_layers)
        act = float(tl.max_live[s]) * per_mb
        if spec.recompute == "full":
            act += max(mem.block_activation_bytes(cfg, i, ctx.shape, "none", e, x(i)) for c in chunk_layers for i in c)
        if s == par.pp - 1:
            act += mem.logits_bytes(cfg, ctx.shape)
        cats["activations"] = act
        cats["comm_buffers"] = mem.comm_buffer_bytes(cfg, ctx.shape, spec.dtype,
                                                     max((x(i) for c in chunk_layers for i in c), default=0.0), par.pp)
        if ctx.fssdp is not None:  # materialised experts' weights and gradients, for the whole step
            pe = expert_params(cfg) * (mem.WEIGHT_BYTES + mem.GRAD_BYTES)
            cats["fssdp_buffers"] = float(ctx.fssdp.materialised_max[_stage_moe_layers(ctx, s)].sum()) * pe
        stages.append(cats)
    offloaded = [_offload_categories(ctx, s, c) for s, c in enumerate(stages)]
    totals = [sum(c.values()) for c in stages]
    worst = int(np.argmax(totals))
    cap = ctx.system.device.main_memory.capacity_bytes
    if check and totals[worst] > cap:
        big = max(stages[worst], key=stages[worst].get)
        raise TrainError(f"does not fit in HBM: stage {worst} needs {totals[worst] / GB:.1f} GB per device, "
                         f"{ctx.system.device.name} has {cap / GB:.1f} GB: short by {(totals[worst] - cap) / GB:.1f} GB "
                         f"(largest: {big} {stages[worst][big] / GB:.1f} GB; try --recompute, --zero, more --pp/--tp/--ep, "
                         f"--offload optimizer)")
    memory = {k: {"hbm": v} for k, v in stages[worst].items()}
    memory["total"] = {"hbm": totals[worst]}
    memory["capacity"] = {"hbm": cap}
    memory["stage"] = worst
    if spec.offload != "none":
        _offloaded_memory(ctx, memory, offloaded[int(np.argmax([sum(o.values()) for o in offloaded]))], check)
    return memory, [{"stage": s, **c, "total": t} for s, (c, t) in enumerate(zip(stages, totals))]


def _offload_categories(ctx: _Ctx, s: int, cats: dict) -> dict:
    """Moves the offloaded categories out of ``cats`` (stage ``s``); ``weights`` leaves a double buffer of
    the stage's largest layer in HBM (``weight_buffers``: one layer in use, the next arriving)."""
    out = {}
    if ctx.spec.offload in ("optimizer", "weights"):
        out["optimizer"] = cats.pop("optimizer")
    if ctx.spec.offload == "weights":
        out["weights"] = cats.pop("weights")
        par = ctx.spec.parallel
        layers = [layer for q in range(s, len(ctx.chunks), par.pp) for layer in ctx.chunks[q]]
        layers += ([-1] if s == 0 else []) + ([ctx.cfg.num_hidden_layers] if s == par.pp - 1 else [])
        biggest = max(_local_weights(ctx, _layer_params(ctx, layer)) for layer in layers)
        cats["weight_buffers"] = 2.0 * biggest * mem.WEIGHT_BYTES
    return out


def _offloaded_memory(ctx: _Ctx, memory: dict, offloaded: dict, check: bool) -> None:
    """Offloaded categories in the backing tier (its per-device share); not fitting there is an error."""
    name, _, cap, _ = backing(ctx.system)
    nbytes = sum(offloaded.values())
    for k, v in offloaded.items():
        memory[k] = {name: v}
    memory["total"][name] = nbytes
    memory["capacity"][name] = cap
    if check and nbytes > cap:
        raise TrainError(f"does not fit in {name}: --offload {ctx.spec.offload} needs {nbytes / GB:.1f} GB per "
                         f"device, {ctx.system.name} gives each device {cap / GB:.1f} GB: short by "
                         f"{(nbytes - cap) / GB:.1f} GB")


def _p2p_s(ctx: _Ctx) -> float:
    """Send/recv of one micro-batch's activations (sequence-parallel shard) between pipeline neighbours."""
    par = ctx.spec.parallel
    if par.pp == 1:
        return 0.0
    nbytes = float(ctx.shape.sp_tokens) * ctx.cfg.hidden_size * DTYPE_BYTES[ctx.spec.dtype]
    return collective_time_s(ctx.system, "send_recv", nbytes, 2, par.tp * par.cp * par.dp)


def _record(layer, phase, direction, kind, time_s) -> dict:
    return dict(zip(PHASE_COLUMNS, (layer, phase, direction, kind, float(time_s))))


def _phases(ctx: _Ctx, static: dict, router_bwd: list[Op], tl: Timeline, p2p_s: float, sync_s: float,
            opt_s: float) -> list[dict]:
    """One record per (layer, phase, direction, kind): seconds on the device running that layer, summed over
    the step's micro-batches. MoE ``shared_ffn`` counts only its part not hidden behind the all-to-all."""
    m = ctx.spec.num_micro_batches
    acc: dict[tuple, float] = {}

    def add(layer, phase, direction, kind, t):
        key = (layer, phase, direction, kind)
        acc[key] = acc.get(key, 0.0) + t

    for layer, ops in static.items():
        for o in ops:
            add(layer, o.phase, o.direction, o.kind, o.time_s * (1 if o.direction == PER_STEP else m))
        if ctx.spec.recompute == "full" and 0 <= layer < ctx.cfg.num_hidden_layers:
            add(layer, "recompute", "backward_input", COMPUTE, _sum(ops, FORWARD) * m)
        elif ctx.spec.recompute == "selective":
            add(layer, "recompute", "backward_input", COMPUTE, _selective_s(ops) * m)
    for layer, j in ctx.moe_ordinal.items():
        _moe_phases(ctx, layer, j, router_bwd, add)
    if ctx.fssdp is not None:
        used = len(ctx.fssdp.touched)
        for layer, j in ctx.moe_ordinal.items():
            add(layer, "fssdp_gather", FORWARD, COMMUNICATION, ctx.fssdp.gather_s[j % used])
            add(layer, "fssdp_reduce_scatter", BACKWARD_WEIGHT, COMMUNICATION, ctx.fssdp.reduce_scatter_s[j % used])
    for layer in static:
        fetch = _weight_fetch_s(ctx, layer)
        if fetch > 0:
            add(layer, "weight_fetch", FORWARD, COMMUNICATION, fetch * m)
            add(layer, "weight_fetch", BACKWARD_INPUT, COMMUNICATION, fetch * m)
        zf, zb = _zero3_layer_s(ctx, layer)
        if zf > 0:
            add(layer, "zero3_comm", FORWARD, COMMUNICATION, zf * m)
            add(layer, "zero3_comm", BACKWARD_INPUT, COMMUNICATION, zb * m)
    out = [_record(*k, v) for k, v in sorted(acc.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2]))]
    critical = int(np.argmax(tl.busy_s))
    out += [_record(None, "pp_send", FORWARD, COMMUNICATION, p2p_s * m),
            _record(None, "pp_send", BACKWARD_INPUT, COMMUNICATION, p2p_s * m),
            _record(None, "pipeline_bubble", None, "idle", tl.makespan_s - tl.busy_s[critical]),
            _record(None, "grad_sync", BACKWARD_WEIGHT, COMMUNICATION, sync_s),
            _record(None, "optimizer", None, COMPUTE, opt_s)]
    return out


def _moe_phases(ctx: _Ctx, layer: int, j: int, router_bwd: list[Op], add) -> None:
    mt = ctx.moe
    for i in range(ctx.spec.num_micro_batches):
        g = i % mt.num_samples
        r, d, sh, e, c = (mt.router_s[g, j], mt.dispatch_s[g, j], mt.shared_s[g, j], mt.expert_s[g, j],
                          mt.combine_s[g, j])
        for phase, t in (("router", r), ("expert_ffn", e), ("shared_ffn", max(0.0, sh - d))):
            add(layer, phase, FORWARD, COMPUTE, t)
        add(layer, "dispatch", FORWARD, COMMUNICATION, d)
        add(layer, "combine", FORWARD, COMMUNICATION, c)
        add(layer, "combine", BACKWARD_INPUT, COMMUNICATION, d)
        add(layer, "dispatch", BACKWARD_INPUT, COMMUNICATION, c)
        add(layer, "expert_ffn", BACKWARD_INPUT, COMPUTE, e)
        add(layer, "expert_ffn", BACKWARD_WEIGHT, COMPUTE, e)
        add(layer, "shared_ffn", BACKWARD_INPUT, COMPUTE, max(0.0, sh - c))
        add(layer, "shared_ffn", BACKWARD_WEIGHT, COMPUTE, sh)
        for o in router_bwd:
            add(layer, "router", o.direction, COMPUTE, o.time_s)
        perm = 0.0
        if mt.permute_s is not None:
            perm = mt.permute_s[g, j] + mt.unpermute_s[g, j]
            add(layer, "permute", FORWARD, COMPUTE, perm)
            add(layer, "permute", BACKWARD_INPUT, COMPUTE, mt.permute_bwd_s[g, j])
        if ctx.spec.recompute == "full":
            add(layer, "recompute", BACKWARD_INPUT, COMPUTE, r + max(d, sh) + e + c + perm)
        _overhead_phases(ctx.overheads, layer, g, j, ctx.spec.recompute == "full", add)
    if ctx.overheads is not None and ctx.overheads.weight_cast_s > 0:
        add(layer, "fp8_cast", PER_STEP, COMPUTE, ctx.overheads.weight_cast_s)


def _overhead_phases(ov: MoEOverheads | None, layer: int, g: int, j: int, full_recompute: bool, add) -> None:
    """One micro-batch's FP8 expert casts and exposed host time of MoE layer ``layer`` (ordinal ``j``, sample ``g``)."""
    if ov is None:
        return
    add(layer, "fp8_cast", FORWARD, COMPUTE, ov.cast_fwd_s[g, j])
    add(layer, "fp8_cast", BACKWARD_INPUT, COMPUTE, ov.cast_bwd_s[g, j])
    add(layer, "host_sync", FORWARD, "idle", ov.host_s[g, j])
    if full_recompute:
        add(layer, "recompute", BACKWARD_INPUT, COMPUTE, ov.cast_fwd_s[g, j] + ov.host_s[g, j])


def _weight_cast_s(ctx: _Ctx, static: dict, s: int) -> float:
    """FP8 weight casts of pipeline stage ``s``, once per step (:mod:`moesim.train.fp8`): its layers' linear
    weights (operators of direction ``per_step``) and, per MoE layer, its local experts'."""
    par = ctx.spec.parallel
    layers = [layer for q in range(s, len(ctx.chunks), par.pp) for layer in ctx.chunks[q]]
    layers += ([-1] if s == 0 else []) + ([ctx.cfg.num_hidden_layers] if s == par.pp - 1 else [])
    experts = ctx.overheads.weight_cast_s if ctx.overheads is not None else 0.0
    return sum(_sum(static[layer], PER_STEP) + (experts if layer in ctx.moe_ordinal else 0.0) for layer in layers)
