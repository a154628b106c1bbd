"""The MoE part of each MoE block, timed by the MoE-layer cost path of :mod:`moesim.analytic`.

Per routing sample and MoE layer, one expert-parallel group of ``ep`` devices runs, per device
``T = tokens / (tp * cp)`` tokens (sequence-parallel shard of the context-parallel chunk): ``router`` ->
``dispatch`` all-to-all (with the ``shared_ffn`` beside it) -> grouped ``expert_ffn`` -> ``combine``
all-to-all, exactly the phases and costs of :func:`moesim.analytic.group_costs` (the cost model's
``router``/``expert_ffn`` and the all-to-all over the group's links). Times are the busiest device's.

Routing:

- ``trace``: each sample takes one step of the trace and a window of ``ep * S`` of its tokens,
  ``S = min(T, tokens_in_step // ep)`` per device (sample i uses step i mod steps and the window
  shifted by ``(i // steps) * ep * S``), aggregated as :func:`moesim.sim.prepare` would aggregate the samples
  as one trace (one :func:`moesim.sim.aggregate` per sample: no concatenated copy of the rows) on a contiguous
  placement; counts are then scaled by ``T / S``. MoE layer j of the model replays trace layer
  j mod (trace layers).
- ``balanced``: every device sends ``T * top_k / ep`` choices to every device and each expert
  computes ``ep * T * top_k / experts`` tokens. When the copies depend on each token's experts (a
  de-duplicating all-to-all, or a model with group-limited routing, ``n_group > 1``) the balanced routing is
  drawn per token instead (:func:`moesim.train.routing.balanced_trace`: balanced over experts, each token's
  experts in at most ``topk_group`` groups; ``min(T, 2048)`` tokens per device, counts scaled by ``T`` / that).

Copies per token (:func:`dispatch_dedup_of`, the one place this is decided): with a DeepEP-like kernel (the
default, ``deepep-normal-v1``) the dispatch sends one copy per (token, destination node) over the scale-out
links and forwards one per (token, destination GPU) inside the node (``SimOptions.dispatch_dedup="node"``);
``TrainSpec.dispatch_dedup`` overrides it.

Bytes per routed choice on the wire (:func:`hwmodels.collectives.a2a_payload_bytes`): the dispatch in the
step's dtype (FP8 adds one fp32 scale per 128 values), the combine in BF16 under FP8 training (DeepSeek-V3
report sec. 3.3: FP8 dispatch, BF16 combine).

Expert tensor parallel (``etp > 1``, Megatron-Core's ``--expert-tensor-parallel-size``): each expert's gate/up
projections are split by columns and its down projection by rows over ``etp`` consecutive ranks, so every GEMM of
a choice has ``moe_intermediate_size / etp`` columns (gate/up) or rows (down): half the FLOPs per choice at
``etp = 2``. The EP group's ranks are ``etp`` apart; after the dispatch all-to-all the ``etp`` ranks all-gather
the choices they received (each rank then computes ``etp x`` its received choices on its slice of the width), and
the down projection's partial sums are reduce-scattered back before the combine all-to-all, exactly the order of
Megatron's ``MoEAlltoAllTokenDispatcher`` (``megatron/core/transformer/moe/token_dispatcher.py``:
"permute->A2A(EP)->AG(TP)" and "RS(TP)->A2A(EP)->unpermute", its TP group being the expert TP group). Both are
folded into the ``dispatch`` and ``combine`` phases (:func:`etp_comm_s`); the busiest device's received choices
size them, its etp peers (other EP groups, not simulated) taken to receive as many.

Token permutation (``TrainSpec.moe_permute``, on by default; :func:`permute_kernel_bytes`): Megatron-Core's
all-to-all dispatcher copies each token's hidden state once per routed choice into expert-sorted order before the
dispatch (``moe_utils.permute``: ``index_select`` of the rows by ``sorted_indices``) and gathers the combined rows
back, weighted by the router probabilities, after the combine (``moe_utils.unpermute``); DeepEP's de-duplicated
dispatch sends one copy per destination and the receiver expands it into its local experts' rows, so the
copies happen there (on the busiest device's received choices). Each is a memory-bound kernel reading and writing
every routed row once (``2 x rows x hidden x dtype bytes``, FP8 with its scales) plus an int64 index per row and,
for the unpermute, an fp32 probability; the backward runs one of each in BF16. Timed through the cost model's
kernel path (:class:`moesim.train.ops.Kernel`, zero FLOPs), as compute: they occupy the GPU and overlap nothing.
Megatron's ``--moe-permute-fusion`` (off by default) fuses the index building into TE's kernels but moves the same
routed rows; the index-building kernels of the unfused path are not counted.

Backward: the input gradient of the combine is an all-to-all shaped like the dispatch and vice versa;
expert and shared FFNs have an input-gradient and a weight-gradient grouped GEMM of the forward's
FLOPs each (timed as one forward each); the router has its two GEMMs (see :mod:`moesim.train.ops`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from hwmodels.collectives import a2a_payload_bytes
from hwmodels.roofline import CostModel
from hwmodels.specs import System
from hwmodels.topology import all_to_all_routing
from moesim.analytic import group_costs
from moesim.placement import Placement, contiguous
from moesim.sim import Routed, SimOptions, activation_bytes, aggregate, check_trace_fits_model
from moesim.train.collectives import collective_time_s, group_system
from moesim.train.ops import BACKWARD_INPUT, FORWARD, Kernel, Timer, precise_dtype
from moesim.train.routing import balanced_trace
from moesim.train.spec import REPLAYED, TrainError, TrainSpec
from workloads.hf_config import ModelConfig
from workloads.trace import Trace, TraceMeta


@dataclass(frozen=True, eq=False)
class MoETimes:
    """Busiest-device seconds [samples, moe_layers] of each MoE phase (forward), and the work behind them.

    ``expert_tokens_max`` [samples, moe_layers]: (token, expert) choices the busiest device computes;
    ``imbalance``: their max / mean over the group's devices; ``*_flops`` are the busiest device's.
    """

    router_s: np.ndarray
    dispatch_s: np.ndarray
    shared_s: np.ndarray
    expert_s: np.ndarray
    combine_s: np.ndarray
    expert_flops: np.ndarray
    shared_flops: np.ndarray
    router_flops: np.ndarray
    dispatch_sent_bytes: np.ndarray
    expert_tokens_max: np.ndarray
    imbalance: np.ndarray
    tokens_per_device: int
    expert_load: np.ndarray | None = None  # [replayed layers, experts] choices per expert, summed over samples
    placement: Placement | None = None  # the placement the trace was replayed on (None: contiguous)
    dispatch_dedup: str = "none"  # copies the all-to-all sent (SimOptions.dispatch_dedup, :func:`dispatch_dedup_of`)
    etp_gather_s: np.ndarray | None = None  # [samples, moe_layers] ETP all-gather inside dispatch_s (etp > 1)
    etp_scatter_s: np.ndarray | None = None  # [samples, moe_layers] ETP reduce-scatter inside combine_s (etp > 1)
    permute_s: np.ndarray | None = None  # [samples, moe_layers] forward token permute kernel (None: not modelled)
    unpermute_s: np.ndarray | None = None  # [samples, moe_layers] forward unpermute kernel
    permute_bwd_s: np.ndarray | None = None  # [samples, moe_layers] backward of both (two kernels)

    @property
    def num_samples(self) -> int:
        return self.router_s.shape[0]

    @property
    def permute_fwd_s(self) -> np.ndarray | float:
        """Forward seconds of the permute and unpermute kernels [samples, moe_layers] (0.0 when not modelled)."""
        return 0.0 if self.permute_s is None else self.permute_s + self.unpermute_s


def sample_trace(trace: Trace, ep: int, tokens_per_device: int, samples: int, layers: int) -> tuple[Trace, float]:
    """The trace cut into ``samples`` steps of ``ep * S`` tokens and ``layers`` layers; returns it and T / S.

    Rows keep only the columns routing needs; within a step they are not re-sorted (the aggregation
    counts, it does not depend on row order)."""
    parts, scale = sample_steps(trace, ep, tokens_per_device, samples, layers)
    return _concat(parts), scale


def _concat(parts: list[Trace]) -> Trace:
    return Trace(columns={k: np.concatenate([p.columns[k] for p in parts]) for k in parts[0].columns},
                 meta=parts[0].meta)


def sample_steps(trace: Trace, ep: int, tokens_per_device: int, samples: int,
                 layers: int) -> tuple[list[Trace], float]:
    """:func:`sample_trace`, one trace per sample (step i of the sampled trace), sharing the trace's columns
    where a sample is a whole step (views, no copies)."""
    c = trace.columns
    step_col, tok_col = c["step"], c["token"]
    steps = np.unique(step_col)
    keep = c["layer"] < layers
    by_step = [_as_slice(np.flatnonzero((step_col == s) & keep)) for s in steps]
    top = [int(tok_col[rows].max()) + 1 if _size(rows) else 0 for rows in by_step]
    n_step = min(top)
    per = min(tokens_per_device, n_step // ep)
    if per < 1:
        raise TrainError(f"a trace step has {n_step} tokens, fewer than --ep {ep}: cannot give every device a token")
    width = ep * per
    names = ("layer", "rank", "expert", "weight")
    meta = dataclasses.replace(trace.meta, num_layers=layers)
    out = []
    for i in range(samples):
        rows = by_step[i % len(steps)]
        offset = ((i // len(steps)) * width) % n_step
        if offset == 0 and top[i % len(steps)] <= width:  # the whole step, tokens as they are (no copies here)
            picked, tok = rows, tok_col[rows]
        else:
            rows = np.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
            tok = (tok_col[rows] - offset) % n_step
            inside = tok < width
            picked, tok = rows[inside], tok[inside]
        cols = {k: c[k][picked] for k in names}
        cols["token"] = tok.astype(tok_col.dtype, copy=False)
        cols["step"] = np.full(len(tok), i, dtype=step_col.dtype)
        out.append(Trace(columns=cols, meta=meta))
    return out, tokens_per_device / per


def aggregate_samples(system: System, model, placement: Placement, parts: list[Trace], options: SimOptions,
                      seed: int) -> Routed:
    """What :func:`moesim.sim.prepare` returns as ``routed`` for the concatenation of ``parts`` (one step each,
    steps 0, 1, ... in order), without building it: its checks, then :func:`moesim.sim.aggregate` per part with one
    generator (drawn in the same (step, layer) order), the groups stacked in step order."""
    check_trace_fits_model(parts[0], model)
    placement.check_fits(parts[0].meta.num_layers, parts[0].meta.num_experts, system.num_devices)
    rng = np.random.default_rng(seed)
    rs = [aggregate(p, placement, system.num_devices, options, rng, system.devices_per_node) for p in parts]
    return Routed(group_key=np.concatenate([r.group_key for r in rs]),
                  pair_tokens=np.concatenate([r.pair_tokens for r in rs]),
                  expert_tokens=np.concatenate([r.expert_tokens for r in rs]),
                  router_tokens=np.concatenate([r.router_tokens for r in rs]), num_tokens=sum(r.num_tokens for r in rs))


def _as_slice(rows: np.ndarray) -> np.ndarray | slice:
    """``rows`` (ascending indices) as a slice when they are one contiguous run (the trace format sorts rows by
    step then layer, so a step's first layers are): views instead of gathers of the columns."""
    if rows.size and int(rows[-1]) - int(rows[0]) + 1 == rows.size:
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows


def _size(rows: np.ndarray | slice) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else rows.size


def balanced_routed(ep: int, tokens_per_device: int, top_k: int, num_experts: int, layers: int) -> Routed:
    """Perfectly balanced routing of one sample (see the module docstring); counts rounded to integers."""
    if num_experts % ep:
        raise TrainError(f"--ep {ep} must divide the {num_experts} routed experts")
    choices = tokens_per_device * top_k
    pair = np.full((layers, ep, ep), int(round(choices / ep)), dtype=np.int64)
    per_expert = int(round(ep * choices / num_experts))
    expert = np.zeros((layers, ep, num_experts), dtype=np.int64)
    per_dev = num_experts // ep
    for d in range(ep):
        expert[:, d, d * per_dev:(d + 1) * per_dev] = per_expert
    keys = np.stack([np.zeros(layers, int), np.zeros(layers, int), np.arange(layers)], axis=1)
    router = np.full((layers, ep), tokens_per_device, dtype=np.int64)
    return Routed(group_key=keys, pair_tokens=pair, expert_tokens=expert, router_tokens=router,
                  num_tokens=ep * tokens_per_device)


# Where the training step decides how its all-to-all copies tokens (the one place): the kernel families that send
# one copy per (token, destination node) over RDMA and forward it over NVLink (DeepEP's normal kernels, DeepSeek-V3's
# own: arXiv:2412.19437 sec. 3.2.2; deepseek-ai/DeepEP README: kernels for "asymmetric-domain bandwidth forwarding,
# such as forwarding data from NVLink domain to RDMA domain"). DeepEP's low-latency kernels send over RDMA directly,
# per expert: no de-duplication.
NODE_DEDUP_KERNELS = ("deepep-normal-v1", "deepseek-v3-all-to-all", "deepep-v2-ep8x2", "deepep-v2-ep8x4")
PERMUTE_INDEX_BYTES = 8  # int64 row index per permuted row (Megatron's sorted_indices)
PERMUTE_PROB_BYTES = 4  # fp32 router probability per permuted row, read by the unpermute
BALANCED_SAMPLE_TOKENS = 2048  # tokens per device of the per-token balanced routing; counts scaled to the rest


def dispatch_dedup_of(comm_kernel: str, requested: str = "auto") -> str:
    """The ``SimOptions.dispatch_dedup`` of the step: ``requested`` unless ``auto``, else ``node`` for the kernels
    of :data:`NODE_DEDUP_KERNELS` and ``none`` for others."""
    if requested != "auto":
        return requested
    return "node" if comm_kernel in NODE_DEDUP_KERNELS else "none"


def _balanced_per_token(cfg: ModelConfig, ep_system: System, model, options: SimOptions, tokens: int,
                        seed: int) -> Routed:
    """Balanced, group-limited routing of one sample (:func:`moesim.train.routing.balanced_trace`) of
    ``min(tokens, BALANCED_SAMPLE_TOKENS)`` tokens per device, aggregated on the contiguous placement with
    ``options``' de-duplication; counts scaled to ``tokens`` per device."""
    per = min(tokens, BALANCED_SAMPLE_TOKENS)
    trace = balanced_trace(cfg, ep_system.num_devices * per, 1, seed)
    placement = contiguous(1, cfg.num_experts, ep_system.num_devices)
    return _scaled(aggregate_samples(ep_system, model, placement, [trace], options, seed), tokens / per)


def _scaled(routed: Routed, scale: float) -> Routed:
    if scale == 1.0:
        return routed
    r = lambda a: np.rint(a * scale).astype(np.int64)  # noqa: E731
    return dataclasses.replace(routed, pair_tokens=r(routed.pair_tokens), expert_tokens=r(routed.expert_tokens),
                               router_tokens=r(routed.router_tokens), num_tokens=int(round(routed.num_tokens * scale)))


def step_options(spec: TrainSpec) -> SimOptions:
    """The all-to-all options of the step's MoE phases: the dispatch in the step's dtype, the combine in BF16 under
    FP8 training (module docstring), the copies of :func:`dispatch_dedup_of`."""
    options = SimOptions(micro_batches=1, dtype=spec.dtype, combine_dtype=precise_dtype(spec.dtype))
    return dataclasses.replace(options, dispatch_dedup=dispatch_dedup_of(options.comm_kernel, spec.dispatch_dedup))


def moe_times(cfg: ModelConfig, system: System, spec: TrainSpec, cost: CostModel, trace: Trace | None,
              seed: int = 0, placement: Placement | None = None) -> MoETimes:
    """Forward MoE phase times of every routing sample and MoE layer of ``cfg`` (see the module docstring).

    ``placement`` (trace routing only): expert slots of the EP group's devices per replayed trace layer
    (e.g. EPLB-style replicas from ``moesim place``), instead of the contiguous one; a choice goes to a
    replica by the ``local-first`` policy of :mod:`moesim.placement`. A callable ``placement(sampled_trace,
    layers)`` is called with the sampled trace to build one (FSSDP's load-driven placement,
    :mod:`moesim.train.fssdp`)."""
    par = spec.parallel
    ep_system = group_system(system, par.ep, par.etp)  # EP ranks are etp apart (expert order etp-ep-edp)
    tokens = -(-spec.tokens_per_micro_batch // (par.tp * par.cp))
    model = cfg.to_moe_model()
    if model.moe_intermediate_size % par.etp:
        raise TrainError(f"--etp {par.etp} must divide the expert width (moe_intermediate_size "
                         f"{model.moe_intermediate_size} of {cfg.name!r})")
    options = step_options(spec)
    a2a = all_to_all_routing(ep_system)
    n_moe = len(cfg.moe_layers)
    if spec.routing in REPLAYED:
        if trace is None:
            raise TrainError(f"routing {spec.routing!r} needs a trace (--trace, or --routing synthetic)")
        if trace.meta.num_experts != cfg.num_experts:
            raise TrainError(f"trace has {trace.meta.num_experts} experts per layer but model {cfg.name!r} has "
                             f"{cfg.num_experts}")
        used = min(trace.meta.num_layers, n_moe)
        parts, scale = sample_steps(trace, par.ep, tokens, spec.routing_samples, used)
        if callable(placement):
            placement = placement(_concat(parts), used)
        placement = _check_placement(placement, used, cfg.num_experts, par.ep)
        routed = aggregate_samples(ep_system, model, placement, parts, options, seed)
        routed, samples = _scaled(routed, scale), spec.routing_samples
    else:
        if placement is not None:
            raise TrainError("a placement needs trace routing (--trace): balanced routing assumes the contiguous one")
        used, samples = 1, 1
        if cfg.n_group > 1 or options.dispatch_dedup != "none":  # copies depend on each token's experts
            routed = _balanced_per_token(cfg, ep_system, model, options, tokens, seed)
        else:
            routed = balanced_routed(par.ep, tokens, cfg.num_experts_per_tok, cfg.num_experts, used)
    # expert tensor parallel: each device computes 1/etp of every local expert's width on the choices of its
    # etp group (all-gathered after the dispatch); the all-to-all itself moves the routed choices as before
    gathered = dataclasses.replace(routed, expert_tokens=routed.expert_tokens * par.etp)
    sliced = dataclasses.replace(model, moe_intermediate_size=model.moe_intermediate_size // par.etp)
    gc = group_costs(ep_system, sliced, gathered, a2a, cost, options, activation_bytes(model, options))
    mt = _with_etp_comm(_collect(gc, routed, samples, used, n_moe, tokens), system, model.hidden_size, options, par.etp)
    if spec.moe_permute:
        mt = _with_permute(mt, Timer(cost, system.device, spec.dtype), cfg.num_experts_per_tok, model.hidden_size,
                           options)
    load = routed.expert_tokens.sum(axis=1).reshape(samples, used, -1).sum(axis=0)
    return dataclasses.replace(mt, expert_load=load, placement=placement if spec.routing in REPLAYED else None,
                               dispatch_dedup=options.dispatch_dedup)


def etp_comm_s(system: System, choices: float, hidden_size: int, dtype: str, etp: int) -> tuple[float, float, float]:
    """(all-gather seconds, reduce-scatter seconds, bytes of the full gathered tensor) of one device's expert tensor
    parallel exchange: the ``choices`` it received, ``hidden_size`` wide in ``dtype``, over ``etp`` consecutive ranks
    (Megatron's all-to-all dispatcher: A2A(EP) -> AG(ETP) before the experts, RS(ETP) -> A2A(EP) after them)."""
    if etp <= 1 or choices <= 0:
        return 0.0, 0.0, 0.0
    nbytes = a2a_payload_bytes(choices * etp, hidden_size, dtype)
    return (collective_time_s(system, "all_gather", nbytes, etp),
            collective_time_s(system, "reduce_scatter", nbytes, etp), nbytes)


def _with_etp_comm(mt: MoETimes, system: System, hidden_size: int, options: SimOptions, etp: int) -> MoETimes:
    """``mt`` with the expert-tensor-parallel all-gather folded into the dispatch (in its dtype) and the
    reduce-scatter of the down projection's partial sums into the combine (in the combine's dtype), as Megatron's
    dispatcher does; the busiest device's choices set both (its etp peers are taken to receive as many)."""
    if etp <= 1:
        return mt
    x = mt.expert_tokens_max
    ag = np.vectorize(lambda c: etp_comm_s(system, c, hidden_size, options.dispatch_dtype or options.dtype, etp)[0])(x)
    rs = np.vectorize(lambda c: etp_comm_s(system, c, hidden_size, options.combine_dtype or options.dtype, etp)[1])(x)
    return dataclasses.replace(mt, dispatch_s=mt.dispatch_s + ag, combine_s=mt.combine_s + rs, etp_gather_s=ag,
                               etp_scatter_s=rs)


def permute_bytes(rows: float, hidden_size: int, dtype: str, probs: bool) -> float:
    """Bytes of one token (un)permutation kernel over ``rows`` routed (token, expert) rows ``hidden_size`` wide in
    ``dtype`` (FP8 with its 1x128 scales, :func:`hwmodels.collectives.a2a_payload_bytes`): every row read once and
    written once, plus its int64 index and, with ``probs``, its fp32 router probability (module docstring)."""
    extra = PERMUTE_INDEX_BYTES + (PERMUTE_PROB_BYTES if probs else 0)
    return 2.0 * a2a_payload_bytes(rows, hidden_size, dtype) + rows * extra


def permute_kernel_bytes(rows: float, hidden_size: int, options: SimOptions) -> tuple[float, float, float, float]:
    """(forward permute, forward unpermute, backward of the permute, backward of the unpermute) bytes over ``rows``
    routed rows: the permute in the dispatch's dtype, the unpermute (weighted by the probabilities) in the combine's;
    the backward in BF16: the permute's is an unpermute of the permuted rows' gradient (no probabilities), the
    unpermute's a permute of the output gradient that also reads the probabilities (their gradient)."""
    grad = precise_dtype(options.dtype)
    return (permute_bytes(rows, hidden_size, options.dispatch_dtype or options.dtype, False),
            permute_bytes(rows, hidden_size, options.combine_dtype or options.dtype, True),
            permute_bytes(rows, hidden_size, grad, False), permute_bytes(rows, hidden_size, grad, True))


def _with_permute(mt: MoETimes, timer: Timer, top_k: int, hidden_size: int, options: SimOptions) -> MoETimes:
    """``mt`` with the permute/unpermute kernels timed through the cost model's memory-bound kernel path: over the
    device's ``T * top_k`` choices before the dispatch (Megatron's all-to-all dispatcher, sender side), or over the
    busiest device's received choices after it when the dispatch de-duplicates (DeepEP: receiver side)."""
    receiver = options.dispatch_dedup != "none"
    rows = mt.expert_tokens_max if receiver else np.full(mt.router_s.shape, float(mt.tokens_per_device * top_k))
    memo: dict[float, tuple[float, float, float]] = {}

    def times(r: float) -> tuple[float, float, float]:
        if r not in memo:
            t = [timer.kernel(-2, "permute", d, Kernel("moe_permute", 0.0, b)).time_s
                 for d, b in zip((FORWARD, FORWARD, BACKWARD_INPUT, BACKWARD_INPUT),
                                 permute_kernel_bytes(r, hidden_size, options))]
            memo[r] = (t[0], t[1], t[2] + t[3])
        return memo[r]

    out = np.array([times(float(r)) for r in rows.ravel()]).reshape(*rows.shape, 3)
    return dataclasses.replace(mt, permute_s=out[..., 0], unpermute_s=out[..., 1], permute_bwd_s=out[..., 2])


def _check_placement(placement: Placement | None, layers: int, experts: int, ep: int) -> Placement:
    if placement is None:
        return contiguous(layers, experts, ep)
    if placement.num_devices != ep or placement.num_layers != layers or placement.num_experts != experts:
        raise TrainError(f"placement spans {placement.num_devices} devices x {placement.num_layers} layers x "
                         f"{placement.num_experts} experts; the step needs --ep {ep} devices x {layers} replayed "
                         f"trace layers x {experts} experts")
    return placement


def _collect(gc, routed: Routed, samples: int, used: int, n_moe: int, tokens: int) -> MoETimes:
    idx = np.arange(n_moe) % used

    def per(a: np.ndarray, how: str = "max") -> np.ndarray:
        a = a.reshape(samples, used, -1)
        a = a.max(axis=2) if how == "max" else a[:, :, 0]
        return a[:, idx]

    busiest = gc.expert_s.reshape(samples, used, -1).argmax(axis=2)

    def take(a: np.ndarray) -> np.ndarray:
        return np.take_along_axis(a.reshape(samples, used, -1), busiest[:, :, None], 2)[:, :, 0][:, idx]

    et = routed.expert_tokens.sum(axis=2).reshape(samples, used, -1).astype(float)
    mean = et.mean(axis=2)
    return MoETimes(router_s=per(gc.router_s), dispatch_s=per(gc.dispatch_s[:, None], "first"),
                    shared_s=per(gc.shared_s), expert_s=per(gc.expert_s), combine_s=per(gc.combine_s[:, None], "first"),
                    expert_flops=take(gc.expert_flops), shared_flops=per(gc.shared_flops),
                    router_flops=per(gc.router_flops),
                    dispatch_sent_bytes=per(gc.dispatch_sent_bytes), expert_tokens_max=et.max(axis=2)[:, idx],
                    imbalance=np.where(mean > 0, et.max(axis=2) / np.where(mean > 0, mean, 1), 1.0)[:, idx],
                    tokens_per_device=tokens)
