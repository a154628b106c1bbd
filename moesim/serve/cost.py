"""The time of one serving iteration and the memory of one replica: the one adapter onto :mod:`moesim.train`.

Everything this package needs from the training engine goes through this module (so a change there is
one edit here): the forward operators of a transformer block (``moesim.train.layers.block_ops``), the MoE
part (``moesim.train.moe.moe_times``: router, dispatch all-to-all beside the shared experts, grouped
experts, combine, on balanced routing), the embedding and LM head, parameter counts
(``moesim.train.memory``) and the cost model's kernel timing (``moesim.train.ops.kernel_cost``).

Layout (:class:`ServeLayout`): ``dp`` data-parallel attention ranks of ``tp`` tensor-parallel devices
each (``tp * dp`` devices); experts spread over ``ep`` devices of the tp x dp plane (``ep`` divides
``tp * dp``, expert tensor parallel 1, as in training). Each rank has its own requests and KV blocks
(the engine's ranks); they iterate in lock step (the MoE all-to-alls join them), so an iteration takes
the slowest rank's time (:meth:`IterationCost.ranks_iteration_s`). :meth:`IterationCost.iteration_s`
instead splits one batch evenly over the ranks (a pooled model, for callers without ranks).

One iteration of ``T`` new tokens (prefill chunks and decodes together) per rank costs

    linear(T) + head(S) + layers x attention(F, B)

- ``linear(T)``: every forward operator of every block except the attention core (projections, norms,
  dense FFN or the MoE part, tensor-parallel collectives) plus the embedding, for ``T`` tokens;
- ``head(S)``: final norm and LM head for the ``S`` sequences that sample a token this iteration;
- ``attention``: one paged-attention kernel per layer over the batch's (query, key) pairs: a request
  adding ``n`` tokens after ``c`` cached ones has ``n c + n^2 / 2`` causal pairs (the training core's
  ``s^2 / 2`` when ``c = 0``) and reads ``c + n`` tokens of KV; FLOPs ``2 heads (d_qk + d_v)`` per pair,
  bytes: the KV read plus Q and O of the new tokens and the fp32 log-sum-exp, in the precise dtype (BF16
  under FP8), timed by the cost model's ``kernel``, else as the training core (its GEMM equivalent at the
  cost model's efficiency), never below the spec roofline (the KV read bounds decode).

``linear`` is exact up to ``exact_up_to`` tokens and at the points of a geometric grid (ratio
``grid_ratio``) above; between grid points it is interpolated linearly once the interval's quarter points and
midpoint are within ``interp_tol`` (0.5 %) of the exact value, else the interval is halved around the token count
asked for (:meth:`IterationCost.linear_s`). benchmarks/bench_serve.py reports the error at random counts.

KV cache per token and device: ``2 * kv_heads / tp * head_dim`` elements per layer (GQA/MHA; at least
one head per device) or ``kv_lora_rank + qk_rope_head_dim`` (MLA latent, replicated over tp). Weights per
device: the training engine's parameter count of one tp/ep shard, in the serving dtype. KV capacity: the
device's HBM x ``memory_fraction`` (vLLM's ``gpu_memory_utilization`` default 0.9) minus weights and an
activation reserve, over the KV bytes per token. Swapped-out KV (preemption ``swap``) goes to host
memory over each device's host link (``swap_s``), before the iteration's compute.

``placement`` and ``ep_mode`` (:class:`moesim.serve.exflow.EPMode`): the trace's routing replayed on an expert
placement by the training engine's MoE phases (:func:`moesim.serve.exflow.ep_moe_times`), in standard expert
parallelism (a dispatch and a combine per layer: those phases unchanged; ``ep_mode`` None is the same) or ExFlow's
context-coherent mode (tokens stay where their expert ran: the dispatch starts there and the outputs are summed on
the primary expert's device, plus the KV all-gather; each device then holds the KV of every rank of its EP group,
``kv_replicas``).

``expert_cache`` (:class:`moesim.serve.offload.ExpertCache`): offloaded serving; HBM holds the dense weights and
the cache's routed experts (``weight_bytes_per_device``), and each iteration adds the time it waits for
expert weights fetched on misses (``expert_stall_s``).

``request_routing`` (:class:`moesim.serve.routing.RequestRouting`): per-request routing; each iteration's
dispatch, routed experts and combine come from replaying the batch's own trace rows (``BatchWork.routing_rows``) on
``placement`` in ``ep_mode`` (:meth:`IterationCost.routed_moe`; replicas of ``placement`` get their share
local-first), the rest from ``linear``'s routing-free parts (:meth:`IterationCost.routed_linear_s`); with
``two_batch_overlap`` each micro-batch replays every other row (:meth:`IterationCost.routed_halves`); with
``expert_cache`` the caches see the rows (``online_cache``, :class:`moesim.serve.offload.OnlineCache`: each rank's
own, ``BatchWork.rank_rows``, or the EP group's). :meth:`IterationCost.rank_parts_s` gives that time part by part as
it is computed (the engine records it per iteration for the time breakdown).

``host_overhead`` (``eager`` | ``cuda-graphs`` | ``none``, the default): each MoE layer's ``pre`` part also holds the
host launch time the GPU waits for after the layer's dispatch sync (:mod:`moesim.train.host`).

``two_batch_overlap``: the rank's batch is split into two micro-batches whose attention/expert compute
and dispatch/combine all-to-alls alternate on two streams (:func:`two_batch_makespan`); each phase is timed
at half the tokens (exact, memoized per token count: no interpolation on this path).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, replace

import numpy as np

from hwmodels.roofline import DTYPE_BYTES, CostModel
from hwmodels.specs import System
from moesim.train.collectives import group_system
from moesim.train.layers import FP32_BYTES, Shape, attention_dims, block_ops, embedding_ops, head_ops
from moesim.train.memory import block_params, embedding_params
from moesim.serve.exflow import ep_moe_times
from moesim.train.moe import moe_times
from moesim.train.host import HostModel
from moesim.train.ops import FORWARD, Kernel, Timer, default_cost, kernel_cost
from moesim.train.overheads import host_exposure_s
from moesim.train.spec import Parallel, TrainSpec
from workloads.hf_config import ModelConfig
from workloads.trace import Trace

DEFAULT_MEMORY_FRACTION = 0.9
#: phases of a block that the serving iteration times itself (the varlen attention core)
OWN_PHASES = ("attention_core",)
#: the parts of :meth:`IterationCost.breakdown_s`, in the order an iteration runs them
BREAKDOWN_PARTS = ("embedding", "attention side", "attention core", "dispatch", "shared experts", "experts",
                   "combine", "LM head", "KV swap", "expert fetch stall", "hidden by two-batch overlap")


def part_column(part: str) -> str:
    """The ``iterations.csv`` column of a part of :data:`BREAKDOWN_PARTS` the engine records under per-request
    routing (``"attention side"`` -> ``part_attention_side_s``)."""
    return "part_" + part.replace(" ", "_").replace("-", "_") + "_s"


class ServeError(ValueError):
    """A serving layout or option that cannot run (names the flag)."""


@dataclass(frozen=True)
class ServeLayout:
    tp: int = 1
    ep: int = 1
    dp: int = 1

    def __post_init__(self):
        for name in ("tp", "ep", "dp"):
            if getattr(self, name) < 1:
                raise ServeError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if (self.tp * self.dp) % self.ep:
            raise ServeError(f"--ep {self.ep} must divide tp x dp = {self.tp * self.dp}")

    @property
    def devices(self) -> int:
        return self.tp * self.dp

    def parallel(self) -> Parallel:
        return Parallel(tp=self.tp, pp=1, dp=self.dp, ep=self.ep)


def kv_elements_per_token_layer(cfg: ModelConfig, tp: int) -> int:
    """KV-cache elements one token holds in one layer on one of ``tp`` devices (see the module docstring)."""
    if cfg.attention_kind == "mla":
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return 2 * max(1, cfg.num_key_value_heads // tp) * cfg.head_dim


@dataclass(frozen=True, eq=False)
class LayerParts:
    """Forward seconds of one rank for a token count: ``embed_s``, and per layer [num_hidden_layers] ``pre_s``
    (norms, projections, tensor-parallel collectives and, in MoE layers, the router: everything but the
    attention core and the MoE phases), ``dispatch_s``, ``shared_s``, ``expert_s``, ``combine_s`` (0 in dense
    layers). One pass of a layer is ``pre + max(dispatch, shared) + expert + combine`` (the training step's
    composition: shared experts beside the dispatch)."""

    embed_s: float
    pre_s: np.ndarray
    dispatch_s: np.ndarray
    shared_s: np.ndarray
    expert_s: np.ndarray
    combine_s: np.ndarray


def two_batch_makespan(a_s: np.ndarray, d_s: np.ndarray, e_s: np.ndarray, c_s: np.ndarray) -> float:
    """Seconds of the layers when two micro-batches alternate on a compute and a communication stream.

    Per layer l and micro-batch m: ``A`` (attention side and router, compute) -> ``D`` (dispatch, comm) ->
    ``E`` (experts and shared experts, compute) -> ``C`` (combine, comm); ``A`` of layer l + 1 waits for
    ``C`` of layer l of the same micro-batch. The compute stream runs A1 A2 E1 E2, the communication stream
    D1 D2 C1 C2, each in that order, a task starting when its stream is free and its input is ready
    (DeepSeek-V3's and SGLang's two-batch overlap, decode). Arrays are per layer [layers], the same for both
    micro-batches, or per micro-batch and layer [2, layers].
    """
    n = np.shape(a_s)[-1]
    a_s, d_s, e_s, c_s = (np.broadcast_to(np.asarray(x, dtype=float), (2, n)) for x in (a_s, d_s, e_s, c_s))
    compute = comm = 0.0
    c_end = [0.0, 0.0]
    for i in range(n):
        a_end, d_end, e_end = [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
        for m in (0, 1):
            compute = a_end[m] = max(compute, c_end[m]) + a_s[m, i]
        for m in (0, 1):
            comm = d_end[m] = max(comm, a_end[m]) + d_s[m, i]
        for m in (0, 1):
            compute = e_end[m] = max(compute, d_end[m]) + e_s[m, i]
        for m in (0, 1):
            comm = c_end[m] = max(comm, e_end[m]) + c_s[m, i]
    return max(c_end)


@dataclass(frozen=True)
class BatchWork:
    """What one iteration computes, summed over the whole batch (all dp ranks): new tokens, sequences that
    sample a token, causal (query, key) pairs, KV tokens read, and KV tokens swapped to or from host memory."""

    tokens: int
    sampled: int
    attention_pairs: float
    kv_tokens_read: float
    swap_tokens: int = 0
    #: of ``kv_tokens_read``, those read from on-chip SRAM (``--kv-sram-gib``, :class:`moesim.serve.kv.SramBlocks`)
    kv_tokens_read_sram: float = 0.0
    #: trace rows of the batch's tokens (all ranks'; :class:`moesim.serve.routing.RequestRouting`), or None
    routing_rows: np.ndarray | None = field(default=None, compare=False, repr=False)
    #: the data-parallel rank doing this work and its own rows (a slice of ``routing_rows``; None: all of them)
    rank: int = field(default=0, compare=False)
    rank_rows: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass
class IterationCost:
    """Iteration time and memory of ``cfg`` on ``system`` laid out as ``layout`` (see the module docstring)."""

    cfg: ModelConfig
    system: System
    layout: ServeLayout
    cost: CostModel | None = None
    dtype: str = "bf16"
    memory_fraction: float = DEFAULT_MEMORY_FRACTION
    activation_reserve_bytes: float = 0.0
    trace: Trace | None = None
    exact_up_to: int = 128
    grid_ratio: float = 1.05
    interp_tol: float = 0.005
    two_batch_overlap: bool = False
    host_overhead: str = "none"  # moesim.train.host: host time waited after each MoE dispatch's sync
    ep_mode: object | None = None  # moesim.serve.exflow.EPMode: standard (None: the same) or context-coherent EP
    placement: object | None = None  # moesim.placement.Placement of the trace's layers (trace routing only)
    expert_cache: object | None = None  # moesim.serve.offload.ExpertCache: routed experts cached in HBM
    request_routing: object | None = None  # moesim.serve.routing.RequestRouting: per-request trace rows
    routed_tokens_per_device: int = 256  # per-request routing replays at most this many tokens per EP device
    _routed: dict = field(default_factory=dict, repr=False)
    _halves: tuple | None = field(default=None, repr=False)
    online_cache: object | None = field(default=None, repr=False)  # offload.OnlineCache: cache on the rows
    _unrouted: dict = field(default_factory=dict, repr=False)
    _linear: dict = field(default_factory=dict, repr=False)
    _parts: dict = field(default_factory=dict, repr=False)
    _accepted: set = field(default_factory=set, repr=False)
    _head: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.layout.devices != self.system.num_devices:
            raise ServeError(f"tp x dp = {self.layout.tp} x {self.layout.dp} = {self.layout.devices} devices, but "
                             f"system {self.system.name!r} has {self.system.num_devices} (set --nodes or the layout)")
        if self.layout.ep > 1 and not self.cfg.is_moe:
            raise ServeError(f"--ep {self.layout.ep} needs an MoE model; {self.cfg.name!r} is dense")
        if self.cfg.is_moe and self.cfg.num_experts % self.layout.ep and self.placement is None:
            raise ServeError(f"--ep {self.layout.ep} must divide the {self.cfg.num_experts} routed experts")
        if self.request_routing is not None:
            self._check_request_routing()
        if self.ep_mode is not None and self.ep_mode.coherent and self.trace is None and self.request_routing is None:
            raise ServeError("--ep-mode coherent needs routing from a trace (--trace or --request-routing)")
        if not 0 < self.memory_fraction <= 1:
            raise ServeError(f"memory fraction must lie in (0, 1], got {self.memory_fraction}")
        if self.cost is None:
            self.cost = default_cost(self.system.device)
        self.timer = Timer(self.cost, self.system.device, self.dtype)
        heads, kv, d_qk, d_v, _ = attention_dims(self.cfg, self.layout.tp)
        self._qo_elems = heads * (d_qk + d_v)
        self._flops_per_pair = 2.0 * heads * (d_qk + d_v)
        self._core_heads, self._core_dim = heads, d_qk + d_v
        if self.kv_capacity_tokens_per_device < 1:
            self._raise_no_room()

    # ---- memory -------------------------------------------------------------------------------------
    @property
    def kv_bytes_per_token_layer(self) -> float:
        """KV bytes one token holds in one layer on one device."""
        return kv_elements_per_token_layer(self.cfg, self.layout.tp) * DTYPE_BYTES[self.dtype]

    @property
    def kv_bytes_per_token(self) -> float:
        """KV bytes one token holds on one device (all layers)."""
        return self.kv_bytes_per_token_layer * self.cfg.num_hidden_layers

    @property
    def kv_bytes_per_token_model(self) -> float:
        """KV bytes of one token of the whole model, every head once (what a prefill-to-decode transfer moves)."""
        return float(kv_elements_per_token_layer(self.cfg, 1) * DTYPE_BYTES[self.dtype] * self.cfg.num_hidden_layers)

    @property
    def weight_bytes_per_device(self) -> float:
        lay, cfg = self.layout, self.cfg
        pc = embedding_params(cfg, lay.tp, first=True, last=True)
        for layer in range(cfg.num_hidden_layers):
            pc = pc + block_params(cfg, layer, lay.tp, lay.ep)
        routed = pc.expert * DTYPE_BYTES[self.dtype]
        if self.placement is not None:  # the placement's expert slots per device (redundant ones included)
            routed *= self.placement.slots_per_device * self.layout.ep / self.cfg.num_experts
        if self.expert_cache is not None:  # offloaded: only the cache's share of the routed experts in HBM
            routed = min(routed, self.expert_cache.capacity_experts * self.expert_cache.expert_bytes)
        return pc.dense * DTYPE_BYTES[self.dtype] + routed

    @property
    def hbm_budget_bytes(self) -> float:
        return self.system.device.main_memory.capacity_bytes * self.memory_fraction

    @property
    def kv_replicas(self) -> int:
        """Copies of a rank's KV: 1, or the EP group's ranks in context-coherent mode (every device of the
        group holds every request's KV)."""
        if self.ep_mode is not None and self.ep_mode.coherent and self.ep_mode.replicate_kv:
            return max(1, self.layout.ep // self.layout.tp)
        return 1

    @property
    def kv_capacity_tokens_per_device(self) -> int:
        """KV tokens of its own rank's requests one device can hold (see the module docstring)."""
        free = self.hbm_budget_bytes - self.weight_bytes_per_device - self.activation_reserve_bytes
        return max(0, int(free // self.kv_bytes_per_token)) // self.kv_replicas

    def kv_capacity_blocks(self, block_size: int) -> int:
        """KV blocks of ``block_size`` tokens of one data-parallel rank (its tp devices hold a block together)."""
        return self.kv_capacity_tokens_per_device // block_size

    def _raise_no_room(self):
        from moebase.units import GB
        raise ServeError(f"{self.cfg.name} does not fit: weights need {self.weight_bytes_per_device / GB:.1f} GB per "
                         f"device, {self.system.device.name} offers {self.hbm_budget_bytes / GB:.1f} GB "
                         f"({self.memory_fraction:g} of HBM), leaving no room for the KV cache; raise --tp or --ep")

    # ---- time ---------------------------------------------------------------------------------------
    def _grid_upto(self, t: int) -> list[int]:
        g = list(range(1, self.exact_up_to + 1))
        x = float(self.exact_up_to)
        while g[-1] < t:
            x *= self.grid_ratio
            g.append(max(g[-1] + 1, int(math.ceil(x))))
        return g

    def linear_exact_s(self, tokens: int) -> float:
        """``linear(T)`` computed through the training engine (``tokens`` per dp rank)."""
        if tokens <= 0:
            return 0.0
        p = self.layer_parts(tokens)
        return p.embed_s + float(np.sum(p.pre_s + np.maximum(p.dispatch_s, p.shared_s) + p.expert_s + p.combine_s))

    def layer_parts(self, tokens: int) -> "LayerParts":
        """Per-layer forward seconds for ``tokens`` per rank (memoized; see :class:`LayerParts`)."""
        got = self._parts.get(tokens)
        if got is not None:
            return got
        cfg, lay = self.cfg, self.layout
        sh = Shape(1, tokens, lay.tp)
        fwd = lambda ops: sum(o.time_s for o in ops  # noqa: E731
                              if o.direction == FORWARD and o.phase not in OWN_PHASES)
        n = cfg.num_hidden_layers
        parts = {k: np.zeros(n) for k in ("pre_s", "dispatch_s", "shared_s", "expert_s", "combine_s")}
        dense = [i for i in range(n) if not cfg.is_moe_layer(i)]
        if dense:
            parts["pre_s"][dense] = fwd(block_ops(cfg, dense[0], sh, self.timer, self.system))
        if cfg.moe_layers:
            moe = list(cfg.moe_layers)
            mt = self._moe_times(tokens)
            ops = block_ops(cfg, moe[0], sh, self.timer, self.system)
            host = HostModel(self.host_overhead)  # the host time waited after each dispatch sync: moesim.train.host
            kernels = [o.time_s for o in ops if o.direction == FORWARD and o.phase not in OWN_PHASES]
            parts["pre_s"][moe] = fwd(ops) + mt.router_s[0] + [host_exposure_s(host, kernels, mt, 0, j)
                                                               for j in range(len(moe))]
            for key, arr in (("dispatch_s", mt.dispatch_s), ("shared_s", mt.shared_s),
                             ("expert_s", mt.expert_s + mt.permute_fwd_s),  # with the token (un)permute kernels
                             ("combine_s", mt.combine_s)):
                parts[key][moe] = arr[0]
        got = self._parts[tokens] = LayerParts(fwd(embedding_ops(cfg, sh, self.timer, self.system)), **parts)
        return got

    def _moe_times(self, tokens: int):
        """The training engine's MoE phases for ``tokens`` per rank: balanced routing unless a routing ``trace`` is
        given (then MoE layer j replays trace layer j mod its layers, one sample, on ``placement`` if set, else
        the contiguous one). With ``request_routing`` balanced: only the router, shared experts and attention side
        are used from these (:meth:`routed_linear_s`), and none of them depends on the routing."""
        if self.request_routing is not None:  # routed phases come per iteration (routed_moe); the rest is routing-free
            spec = TrainSpec(parallel=self.layout.parallel(), seq_len=tokens, micro_batch_size=1,
                             global_batch_size=self.layout.dp, dtype=self.dtype, routing="balanced")
            return moe_times(self.cfg, self.system, spec, self.cost, None)
        spec = TrainSpec(parallel=self.layout.parallel(), seq_len=tokens, micro_batch_size=1,
                         global_batch_size=self.layout.dp, dtype=self.dtype,
                         routing="trace" if self.trace is not None else "balanced", routing_samples=1)
        return ep_moe_times(self.cfg, self.system, spec, self.cost, self.trace, self.placement, self.ep_mode)

    def _check_request_routing(self):
        rr = self.request_routing
        if not self.cfg.is_moe or rr.meta.num_experts != self.cfg.num_experts:
            raise ServeError(f"--request-routing: the trace has {rr.meta.num_experts} experts per layer, "
                             f"{self.cfg.name!r} {self.cfg.num_experts if self.cfg.is_moe else 0}")
        if self.expert_cache is not None:
            from moesim.serve.offload import OnlineCache
            if self.layout.ep not in (1, self.layout.devices):
                raise ServeError(f"--request-routing with --expert-cache-gb: --ep must be 1 or all "
                                 f"{self.layout.devices} devices (one EP group sees the batch's rows)")
            try:
                self.online_cache = OnlineCache(self.expert_cache, rr.ids)
            except ValueError as exc:
                raise ServeError(str(exc)) from None

    def routed_moe(self, rows: np.ndarray):
        """The training engine's MoE phases (:class:`moesim.train.moe.MoETimes`, one sample) of the EP group routing
        the tokens at trace ``rows`` (all ranks' tokens of one iteration) on ``placement``: ``ceil(n / devices)``
        tokens per device. One EP group replays ``ep`` x that many rows (fewer than one per device: tiled; when
        ``ep`` does not divide them, ``moesim.train.moe``'s window drops the remainder and scales); with
        several EP groups (``ep < tp x dp``) or above ``routed_tokens_per_device`` tokens per device (large
        prefill batches, at bounded cost) an evenly spaced subset of the rows is replayed and scaled by
        ``moesim.train.moe``. Memoized for the last few ``rows`` objects (every rank of an iteration shares them)."""
        got = self._routed.get(id(rows))
        if got is not None and got[0] is rows:
            return got[1]
        lay = self.layout
        per_device = max(1, -(-len(rows) // lay.devices))  # every device's share of the batch (dp x tp devices)
        want = lay.ep * min(per_device, self.routed_tokens_per_device)  # rows one EP group replays
        replay = np.resize(rows, lay.ep) if len(rows) < lay.ep else rows  # at least one token per device
        if len(replay) > want:  # several EP groups or a large batch: evenly spaced rows, scaled to per_device
            replay = replay[np.linspace(0, len(replay) - 1, want).astype(np.int64)]
        spec = TrainSpec(parallel=lay.parallel(), seq_len=per_device * lay.tp, micro_batch_size=1,
                         global_batch_size=lay.dp, dtype=self.dtype, routing="trace", routing_samples=1)
        mt = ep_moe_times(self.cfg, self.system, spec, self.cost, self.request_routing.trace(replay), self.placement,
                          self.ep_mode)
        if len(self._routed) >= 4:
            self._routed.clear()
        self._routed[id(rows)] = (rows, mt)
        return mt

    def routed_halves(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The two micro-batches of two-batch overlap: every other token of ``rows`` (each rank's tokens split
        evenly), the same array objects for every rank of an iteration (so :meth:`routed_moe` memoizes them)."""
        got = self._halves
        if got is None or got[0] is not rows:
            got = self._halves = (rows, (rows[0::2], rows[1::2]))
        return got[1]

    def routed_linear_s(self, tokens: int, rows: np.ndarray) -> float:
        """``linear(T)`` with the MoE dispatch, routed experts and combine of :meth:`routed_moe` on ``rows``
        instead of the cost's static routing; the rest (embedding, router, attention side, dense layers, shared
        experts beside the dispatch) at ``tokens``: exact up to ``exact_up_to`` and on the geometric grid, linear
        between grid points (:meth:`_unrouted_parts`). The sum of :meth:`routed_linear_parts_s`."""
        return sum(self.routed_linear_parts_s(tokens, rows).values())

    def routed_linear_parts_s(self, tokens: int, rows: np.ndarray) -> dict[str, float]:
        """:meth:`routed_linear_s` part by part (names of :data:`BREAKDOWN_PARTS`): ``embedding``, ``attention
        side`` (every layer's ``pre``), ``dispatch``, ``shared experts`` (only the part longer than the dispatch),
        ``experts``, ``combine``."""
        base_s, shared_s, embed_s = self._unrouted_parts(tokens)
        mt = self.routed_moe(rows)
        d = mt.dispatch_s[0]
        return {"embedding": embed_s, "attention side": base_s - embed_s, "dispatch": float(d.sum()),
                "shared experts": float(np.maximum(shared_s - d, 0.0).sum()),
                "experts": float((mt.expert_s + mt.permute_fwd_s)[0].sum()),
                "combine": float(mt.combine_s[0].sum())}

    def _unrouted_at(self, t: int) -> tuple[float, np.ndarray, float]:
        got = self._unrouted.get(t)
        if got is None:
            p = self.layer_parts(t)
            got = self._unrouted[t] = (p.embed_s + float(p.pre_s.sum()), p.shared_s[list(self.cfg.moe_layers)],
                                       p.embed_s)
        return got

    def _unrouted_parts(self, tokens: int) -> tuple[float, np.ndarray, float]:
        """(embedding + every layer's ``pre``, shared experts [MoE layers], embedding) for ``tokens`` per rank: exact
        up to ``exact_up_to`` and at grid points, linear between neighbouring grid points above."""
        if tokens <= self.exact_up_to:
            return self._unrouted_at(tokens)
        g = self._grid_upto(tokens)
        i = bisect.bisect_left(g, tokens)
        if g[i] == tokens:
            return self._unrouted_at(tokens)
        (a, sa, ea), (b, sb, eb) = self._unrouted_at(g[i - 1]), self._unrouted_at(g[i])
        f = (tokens - g[i - 1]) / (g[i] - g[i - 1])
        return a + (b - a) * f, sa + (sb - sa) * f, ea + (eb - ea) * f

    def _linear_at(self, t: int) -> float:
        v = self._linear.get(t)
        if v is None:
            v = self._linear[t] = self.linear_exact_s(t)
        return v

    def linear_s(self, tokens: int) -> float:
        """``linear(T)``: exact up to ``exact_up_to``; above, linear interpolation inside an interval of the
        geometric grid once its quarter points and midpoint are within ``interp_tol`` of the exact value, else
        the half holding ``T`` is checked the same way (down to neighbouring integers). Cost models with steps
        (tiles, waves) get refined near their steps, only where iterations land."""
        if tokens <= self.exact_up_to:
            return self._linear_at(tokens)
        g = self._grid_upto(tokens)
        i = bisect.bisect_left(g, tokens)
        if g[i] == tokens:
            return self._linear_at(tokens)
        lo, hi = g[i - 1], g[i]
        while hi - lo > 1 and (lo, hi) not in self._accepted:
            mid = (lo + hi) // 2
            if self._is_linear(lo, hi):
                self._accepted.add((lo, hi))
            elif tokens == mid:
                return self._linear_at(mid)
            else:
                lo, hi = (lo, mid) if tokens < mid else (mid, hi)
        a, b = self._linear_at(lo), self._linear_at(hi)
        return a + (b - a) * (tokens - lo) / (hi - lo)

    def _is_linear(self, lo: int, hi: int) -> bool:
        """Whether the chord from ``lo`` to ``hi`` is within ``interp_tol`` of the exact value at the interval's
        quarter points and midpoint."""
        a, b = self._linear_at(lo), self._linear_at(hi)
        for t in sorted({lo + (hi - lo) * q // 4 for q in (1, 2, 3)} - {lo, hi}):
            m = self._linear_at(t)
            if abs(a + (b - a) * (t - lo) / (hi - lo) - m) > self.interp_tol * m:
                return False
        return True

    def head_s(self, sequences: int) -> float:
        if sequences <= 0:
            return 0.0
        v = self._head.get(sequences)
        if v is None:
            ops = head_ops(self.cfg, Shape(1, sequences, self.layout.tp), self.timer, self.system)
            v = self._head[sequences] = sum(o.time_s for o in ops if o.direction == FORWARD and o.phase != "loss")
        return v

    def attention_kernel(self, pairs: float, kv_read: float, tokens: float, kv_read_sram: float = 0.0) -> Kernel:
        """Work of one layer's attention core on one device (see the module docstring); Q and O in the precise
        dtype (BF16 under FP8: attention stays in BF16, :mod:`moesim.train.ops`), and, as the training core, its
        GEMM equivalent ``[heads x tokens, d_qk + d_v] x [d_qk + d_v, pairs / tokens]`` (the same FLOPs).
        ``kv_read_sram`` of the ``kv_read`` tokens come from on-chip SRAM: their bytes count as the bytes the
        main memory would move in the same time (x main / SRAM bandwidth), so the roofline's memory time is
        HBM bytes / HBM bandwidth + SRAM bytes / SRAM bandwidth."""
        b = DTYPE_BYTES[self.timer.precise_dtype]
        kv_bytes = kv_read * self.kv_bytes_per_token_layer
        if kv_read_sram > 0:
            sram_bytes = kv_read_sram * self.kv_bytes_per_token_layer
            kv_bytes += sram_bytes * (self.system.device.main_memory.bandwidth_bytes_per_s
                                      / self.sram_read_bandwidth_bytes_per_s - 1.0)
        io = kv_bytes + tokens * (self._qo_elems * b + FP32_BYTES)
        flops = self._flops_per_pair * pairs
        m, n, k = max(1, math.ceil(self._core_heads * tokens)), max(1, round(pairs / tokens)), self._core_dim
        return Kernel("paged_attention_fwd", flops, io, (m, n, k), flops / (2.0 * m * n * k))

    def attention_s(self, pairs_per_rank: float, kv_read_per_rank: float, tokens_per_rank: float,
                    kv_read_sram_per_rank: float = 0.0) -> float:
        """All layers' attention cores for one rank's share of the batch, in the precise dtype: the cost model's
        time of the GEMM equivalent (its fitted efficiency, as the training core), but never less than the spec
        roofline of the kernel's bytes and FLOPs (the KV read bounds decode; ``kv_read_sram_per_rank`` of the KV
        tokens read at the SRAM's bandwidth, :meth:`attention_kernel`)."""
        if tokens_per_rank <= 0:
            return 0.0
        k = self.attention_kernel(pairs_per_rank, kv_read_per_rank, tokens_per_rank, kv_read_sram_per_rank)
        cost, dev, dtype = self.timer.cost, self.system.device, self.timer.precise_dtype
        per_layer = max(kernel_cost(cost, dev, k, dtype).time_s, kernel_cost(cost, dev, replace(k, gemm_shape=None),
                                                                             dtype).time_s)
        return self.cfg.num_hidden_layers * per_layer

    def iteration_s(self, w: BatchWork) -> float:
        """Seconds of one iteration doing ``w``, the whole batch of the ``dp`` ranks split evenly over them (the
        pooled model; the engine's explicit ranks use :meth:`ranks_iteration_s`)."""
        return self.rank_s(self.rank_share(w))

    def rank_share(self, w: BatchWork) -> BatchWork:
        """One rank's share of the whole batch ``w`` split evenly over the ``dp`` ranks (the pooled model)."""
        dp = self.layout.dp
        return BatchWork(-(-w.tokens // dp), -(-w.sampled // dp), w.attention_pairs / dp, w.kv_tokens_read / dp,
                         w.swap_tokens / dp, routing_rows=w.routing_rows,
                         kv_tokens_read_sram=w.kv_tokens_read_sram / dp)

    def ranks_iteration_s(self, works: list[BatchWork]) -> float:
        """Seconds of one iteration of the ``dp`` ranks doing ``works`` (one each) in lock step: the slowest
        rank's (its whole iteration; layer-by-layer waits are not modelled finer)."""
        return max(self.rank_s(w) for w in works)

    def non_expert_s_per_layer(self, tokens: int) -> float:
        """Mean seconds per MoE layer outside the routed experts (what expert prefetches overlap), at the token
        count the expert cache is replayed at."""
        cache = self.expert_cache
        p = self.layer_parts(max(1, cache.batch_tokens(tokens) // cache.ep))  # one rank's share of the replayed batch
        moe = list(self.cfg.moe_layers)
        other = p.pre_s + np.maximum(p.dispatch_s, p.shared_s) + p.combine_s
        return float(other[moe].mean())

    def expert_stall_s(self, tokens: int) -> float:
        """Seconds one rank's iteration of ``tokens`` waits for routed-expert weights (0 without a cache)."""
        if self.expert_cache is None or tokens <= 0:
            return 0.0
        return self.expert_cache.per_batch(tokens, self.non_expert_s_per_layer(tokens))["stall_s"]

    def _stall_s(self, w: BatchWork) -> float:
        """:meth:`expert_stall_s`, or with per-request routing the online caches' wait on the batch's own rows
        (:class:`moesim.serve.offload.OnlineCache`; stateful: once per rank and iteration, as the engine calls it)."""
        if self.online_cache is None or w.routing_rows is None or w.tokens <= 0:
            return self.expert_stall_s(w.tokens)
        rows = w.rank_rows if w.rank_rows is not None else w.routing_rows
        return self.online_cache.stall_s(w.rank, rows, w.routing_rows, self.non_expert_s_per_layer(w.tokens))

    def rank_s(self, w: BatchWork) -> float:
        """Seconds of one rank doing ``w`` (see the module docstring)."""
        if w.tokens <= 0:
            return self.swap_s(w.swap_tokens)
        if w.routing_rows is not None and self.request_routing is not None:
            return sum(self.rank_parts_s(w).values())
        rest = self.head_s(w.sampled) + self.swap_s(w.swap_tokens) + self._stall_s(w)
        if self.two_batch_overlap and w.tokens >= 2:
            return rest + self.two_batch_s(w)
        return rest + self.linear_s(w.tokens) + self.attention_s(w.attention_pairs, w.kv_tokens_read, w.tokens,
                                                                 w.kv_tokens_read_sram)

    def rank_parts_s(self, w: BatchWork) -> dict[str, float]:
        """Under per-request routing (``w.routing_rows``), :meth:`rank_s` part by part as it computes it (the parts
        of :data:`BREAKDOWN_PARTS`; they add up to it): the batch's own dispatch, experts and combine, the online
        caches' ``expert fetch stall`` on its rows, and the routing-free rest as :meth:`routed_linear_parts_s`. With
        ``two_batch_overlap`` the two micro-batches' parts one after the other (shared experts whole: they run
        beside the experts, not the dispatch) and ``hidden by two-batch overlap`` (negative: their makespan minus
        that sum). Stateful like :meth:`rank_s` (the online caches see the rows): call one of them once per rank
        and iteration. Without per-request routing: :meth:`breakdown_s`."""
        if w.routing_rows is None or self.request_routing is None:
            return self.breakdown_s(w)
        out = dict.fromkeys(BREAKDOWN_PARTS, 0.0)
        out["KV swap"] = self.swap_s(w.swap_tokens)
        if w.tokens <= 0:
            return out
        out["LM head"], out["expert fetch stall"] = self.head_s(w.sampled), self._stall_s(w)
        if self.two_batch_overlap and w.tokens >= 2:
            out.update(self._two_batch_parts(w))
            return out
        out.update(self.routed_linear_parts_s(w.tokens, w.routing_rows))
        out["attention core"] = self.attention_s(w.attention_pairs, w.kv_tokens_read, w.tokens, w.kv_tokens_read_sram)
        return out

    def breakdown_s(self, w: BatchWork) -> dict[str, float]:
        """Where one rank's iteration doing ``w`` spends its time, in seconds per part (exact ``linear``, no
        interpolation): ``embedding``, ``attention side`` (norms, projections, tensor-parallel collectives, router),
        ``attention core``, ``dispatch``, ``shared experts`` (beside the dispatch: only the part longer than it),
        ``experts``, ``combine``, ``LM head``, ``KV swap``; with ``two_batch_overlap`` also ``hidden by two-batch
        overlap`` (negative: the parts' sum minus the overlapped time)."""
        out = dict.fromkeys(BREAKDOWN_PARTS, 0.0)
        out["LM head"], out["KV swap"] = self.head_s(w.sampled), self.swap_s(w.swap_tokens)
        out["expert fetch stall"] = self.expert_stall_s(w.tokens)
        if w.tokens <= 0:
            return out
        p = self.layer_parts(w.tokens)
        out["embedding"], out["attention side"] = p.embed_s, float(p.pre_s.sum())
        out["attention core"] = self.attention_s(w.attention_pairs, w.kv_tokens_read, w.tokens, w.kv_tokens_read_sram)
        out["dispatch"], out["experts"], out["combine"] = (float(p.dispatch_s.sum()), float(p.expert_s.sum()),
                                                            float(p.combine_s.sum()))
        out["shared experts"] = float(np.maximum(p.shared_s - p.dispatch_s, 0.0).sum())
        if self.two_batch_overlap and w.tokens >= 2:
            total = sum(out.values())
            out["hidden by two-batch overlap"] = self.rank_s(w) - total
        return out

    def two_batch_s(self, w: BatchWork) -> float:
        """Embedding and layers of one rank with its batch split into two micro-batches of ``ceil(T / 2)``
        tokens (each half the attention work) overlapped by :func:`two_batch_makespan`."""
        p, attn, a, d, e, c = self._two_batch_phases(w)
        return 2 * p.embed_s + two_batch_makespan(a, d, e, c)

    def _two_batch_phases(self, w: BatchWork):
        """(:class:`LayerParts` at ``ceil(T / 2)``, one micro-batch's attention cores, and the phases ``A``, ``D``,
        ``E``, ``C`` of :func:`two_batch_makespan`) of :meth:`two_batch_s`; with per-request routing each
        micro-batch's own dispatch, experts and combine ([2, layers])."""
        p = self.layer_parts(-(-w.tokens // 2))
        attn = self.attention_s(w.attention_pairs / 2, w.kv_tokens_read / 2, w.tokens / 2, w.kv_tokens_read_sram / 2)
        a = p.pre_s + attn / self.cfg.num_hidden_layers
        d, e, c = p.dispatch_s, p.shared_s + p.expert_s, p.combine_s
        if w.routing_rows is not None and self.request_routing is not None:  # each micro-batch's own rows
            moe = list(self.cfg.moe_layers)
            d, e, c = (np.tile(x, (2, 1)) for x in (d, e, c))
            for m, half in enumerate(self.routed_halves(w.routing_rows)):
                mt = self.routed_moe(half)
                routed = (mt.expert_s + mt.permute_fwd_s)[0]  # with the token (un)permute kernels
                d[m, moe], e[m, moe], c[m, moe] = mt.dispatch_s[0], p.shared_s[moe] + routed, mt.combine_s[0]
        return p, attn, a, d, e, c

    def _two_batch_parts(self, w: BatchWork) -> dict[str, float]:
        """The two micro-batches' parts of :meth:`two_batch_s` one after the other, and ``hidden by two-batch
        overlap`` (:meth:`rank_parts_s`)."""
        p, attn, a, d, e, c = self._two_batch_phases(w)
        shared = 2.0 * float(p.shared_s.sum())
        out = {"embedding": 2 * p.embed_s, "attention side": 2.0 * float(p.pre_s.sum()), "attention core": 2 * attn,
               "dispatch": float(np.sum(np.broadcast_to(d, (2, len(a))))), "shared experts": shared,
               "experts": float(np.sum(np.broadcast_to(e, (2, len(a))))) - shared,
               "combine": float(np.sum(np.broadcast_to(c, (2, len(a)))))}
        out["hidden by two-batch overlap"] = 2 * p.embed_s + two_batch_makespan(a, d, e, c) - sum(out.values())
        return out

    @property
    def sram_read_bandwidth_bytes_per_s(self) -> float:
        """Bandwidth of the tier above the KV's (SRAM on an SN40L) that KV held there is read at
        (:func:`moesim.serve.kv.sram_tier`'s choice of tier)."""
        from moesim.serve.kv import tier_above_kv

        tier = tier_above_kv(self.system)
        if tier is None:
            raise ServeError(f"{self.system.name} has no memory tier above {self.system.device.main_memory.name}")
        return tier.bandwidth_bytes_per_s

    def swap_s(self, tokens_per_rank: float) -> float:
        """Copying ``tokens_per_rank`` tokens of KV between a device and host memory over its host link, before
        the iteration's compute (not overlapped)."""
        if tokens_per_rank <= 0:
            return 0.0
        link = self.system.host_link
        return tokens_per_rank * self.kv_bytes_per_token / link.bandwidth_bytes_per_s + link.latency_s

    def host_kv_capacity_blocks(self, block_size: int, swap_bytes_per_device: float) -> int:
        """Host-memory KV blocks of one data-parallel rank for swapped-out requests: ``swap_bytes_per_device`` per
        device (at most the node's host memory shared by its devices)."""
        share = self.system.host_memory.capacity_bytes / self.system.devices_per_node
        return int(min(swap_bytes_per_device, share) // self.kv_bytes_per_token) // block_size

    def describe(self) -> dict:
        return {"tp": self.layout.tp, "ep": self.layout.ep, "dp": self.layout.dp, "dtype": self.dtype,
                "cost_model": getattr(self.cost, "name", type(self.cost).__name__),
                "weight_bytes_per_device": self.weight_bytes_per_device,
                "kv_bytes_per_token_per_device": self.kv_bytes_per_token,
                "kv_capacity_tokens_per_device": self.kv_capacity_tokens_per_device,
                "memory_fraction": self.memory_fraction, "two_batch_overlap": self.two_batch_overlap,
                "ep_mode": self.ep_mode.mode if self.ep_mode is not None else "standard",
                "kv_replicas": self.kv_replicas}


def pool_system(system: System, devices: int) -> System:
    """The part of ``system`` a pool of ``devices`` devices spans (same device and links)."""
    if devices < 1 or devices > system.num_devices:
        raise ServeError(f"a pool of {devices} devices does not fit system {system.name!r} of {system.num_devices}")
    try:
        return group_system(system, devices)
    except ValueError as exc:
        raise ServeError(f"a pool of {devices} devices: {exc}") from None


def interpolation_error(ic: IterationCost, tokens: np.ndarray) -> np.ndarray:
    """Relative error of the interpolated ``linear(T)`` against the exact value at each of ``tokens``."""
    out = []
    for t in tokens:
        exact = ic.linear_exact_s(int(t))
        out.append((ic.linear_s(int(t)) - exact) / exact)
    return np.array(out)
