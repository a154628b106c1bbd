"""What a training step runs: the parallel layout and the step's options.

Rank layout (Megatron order ``tp-cp-ep-dp-pp``, fastest first): tensor parallel ``tp``, context parallel ``cp``,
data parallel ``dp``, then pipeline ``pp``; world = tp x cp x dp x pp (Megatron-LM
``docs/source/api-guide/context_parallel.rst``: "the total number of GPUs equals TPxCPxPPxDP"). With
``tp > 1`` sequence parallelism is on: norms, the MoE block and pipeline messages see
``tokens / (cp * tp)`` tokens per device. Context parallelism splits every sequence over the ``cp`` ranks
(each holds two of ``2 cp`` chunks, Megatron's causal load balance, so ``seq_len`` is a multiple of
``2 cp``); dense gradients are reduced and ZeRO-sharded over the ``dp x cp`` ranks that hold the same
dense parameters (:attr:`Parallel.dense_dp`).

The expert side folds the same ``tp x cp x dp`` ranks of a pipeline stage into expert tensor parallel
``etp`` (fastest), expert parallel ``ep``, then expert data parallel ``tp * cp * dp / (ep * etp)``
(Megatron-Core's MoE parallel folding: ``megatron/core/parallel_state.py`` builds the expert rank
generator with ``expert_data_parallel_size = world_size // (ETP x EP x PP)`` and fails when it does not
divide; arXiv:2504.14960). ``etp`` defaults to 1 (DeepSeek-V3's setting; Megatron's own default ties
``--expert-tensor-parallel-size`` to ``--tensor-model-parallel-size``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.train.fp8 import FP8_RECIPES
from moesim.train.host import HOST_OVERHEAD

SCHEDULES = ("1f1b", "interleaved", "dualpipe", "dualpipe-bidir")
DUALPIPES = ("dualpipe", "dualpipe-bidir")  # schedules that keep two copies of the parameters
RECOMPUTE = ("none", "selective", "full")
ROUTING = ("balanced", "trace", "synthetic")
DISPATCH_DEDUP = ("auto", "none", "gpu", "node")  # "auto" + moesim.sim.DISPATCH_DEDUP (tested equal)
REPLAYED = ("trace", "synthetic")  # routings that replay the trace passed to the step
EXPERT_MODES = ("ep", "fssdp")
OFFLOAD = ("none", "optimizer", "weights")
FSSDP_PLANS = ("oracle", "first-sample")


class TrainError(ValueError):
    """A training layout or option that cannot run (names the flag)."""


@dataclass(frozen=True)
class Parallel:
    """Parallel layout. ``zero``: ZeRO stage 0-3 of the data-parallel ranks (3 = FSDP-style full sharding);
    ``virtual_stages``: model chunks per pipeline rank for the interleaved schedule;
    ``first_stage_layers`` / ``last_stage_layers``: blocks of the first and last model chunk (0: an even
    split; Megatron's ``--decoder-first/last-pipeline-num-layers``), the rest split evenly; ``cp``: context
    parallel size (Megatron's ``--context-parallel-size``); ``etp``: expert tensor parallel size
    (``--expert-tensor-parallel-size``): each expert's gate/up columns and down rows split over ``etp`` ranks."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    zero: int = 0
    virtual_stages: int = 1
    first_stage_layers: int = 0
    last_stage_layers: int = 0
    cp: int = 1
    etp: int = 1

    def __post_init__(self):
        for name in ("tp", "pp", "dp", "ep", "virtual_stages", "cp", "etp"):
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.first_stage_layers < 0 or self.last_stage_layers < 0:
            raise TrainError("--first-stage-layers and --last-stage-layers must be >= 0")
        if self.zero not in (0, 1, 2, 3):
            raise TrainError(f"--zero must be 0, 1, 2 or 3, got {self.zero}")
        plane = self.tp * self.cp * self.dp
        if plane % (self.ep * self.etp):
            raise TrainError(f"--ep {self.ep} x --etp {self.etp} = {self.ep * self.etp} must divide --tp x --cp x --dp "
                             f"= {self.tp} x {self.cp} x {self.dp} = {plane} (the expert side folds ep x etp x "
                             "expert-dp onto the same ranks)")

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def dense_dp(self) -> int:
        """Ranks holding the same dense parameters, over which their gradients are reduced and ZeRO shards
        them: dp x cp (Megatron's data-parallel group with context parallel)."""
        return self.dp * self.cp

    def chunks(self, num_layers: int) -> tuple[tuple[int, ...], ...]:
        """Blocks of each model chunk q = c * pp + s (pp x virtual_stages chunks, in model order)."""
        n = self.pp * self.virtual_stages
        first, last = self.first_stage_layers, self.last_stage_layers
        middle_layers = num_layers - first - last
        middle = n - (first > 0) - (last > 0)
        if num_layers < n or middle_layers < middle or (middle == 0 and middle_layers > 0):
            raise TrainError(f"{num_layers} layers cannot fill {n} pipeline chunks with first/last stage layers "
                             f"{first}/{last}")
        sizes = ([first] if first else []) + [len(c) for c in np.array_split(np.arange(middle_layers), middle)] + \
            ([last] if last else [])
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        return tuple(tuple(range(int(a), int(b))) for a, b in zip(bounds[:-1], bounds[1:]))

    @property
    def expert_dp(self) -> int:
        """Replicas of each expert shard: ranks of the tp x cp x dp plane / (ep x etp)."""
        return self.tp * self.cp * self.dp // (self.ep * self.etp)


@dataclass(frozen=True)
class TrainSpec:
    """One training step: sequence length, batch sizes (in sequences), schedule, recomputation.

    ``global_batch_size`` = ``micro_batch_size`` x micro-batches x ``dp``. ``routing``: ``balanced``
    (every expert gets tokens x top_k / experts), ``trace`` (replayed; the trace is passed to the
    step) or ``synthetic`` (the same replay of a trace drawn by :func:`moesim.train.routing.synthetic_trace`). ``routing_samples``: distinct routed micro-batches drawn from the trace (micro-batch i
    uses sample i mod routing_samples). ``expert_mode``: ``ep`` (expert parallel: each of the ``ep``
    devices holds a fixed share of the experts) or ``fssdp`` (Hecate's fully sharded sparse data parallel
    over the same ``ep`` devices, :mod:`moesim.train.fssdp`; ``fssdp_plan``: the loads its placement is
    planned from). ``offload``: ``optimizer`` keeps Adam's states
    in the tier behind HBM, ``weights`` the weights too (:mod:`moesim.train.offload`). ``dispatch_dedup``:
    copies the MoE all-to-all sends per token (``moesim.sim.SimOptions.dispatch_dedup``); ``auto``: by the
    comm kernel (:func:`moesim.train.moe.dispatch_dedup_of`). ``overlap_grad_reduce``,
    ``overlap_param_gather``, ``tp_comm_overlap``: Megatron's ``--overlap-grad-reduce`` (bucketed gradient
    reduction during the last micro-batch's backward), ``--overlap-param-gather`` (ZeRO-1/2's weight all-gather
    during the next step's forward) and ``--tp-comm-overlap`` (Transformer Engine's userbuffers: sequence-parallel
    all-gather / reduce-scatter in chunks beside the adjacent GEMM); all off by default, as in Megatron
    (:mod:`moesim.train.overlap`). ``fp8_recipe``: the FP8 quantization kernels of ``dtype="fp8"``
    (:mod:`moesim.train.fp8`; Megatron's ``--fp8-recipe`` names, default ``delayed`` as Megatron's; ``none``: not
    modelled). ``host_overhead``: host launch time the GPU waits for after each MoE dispatch's host sync
    (:mod:`moesim.train.host`): ``eager`` (Megatron's default, no CUDA graphs), ``cuda-graphs`` or ``none``.
    ``moe_permute``: the MoE token permute/unpermute kernels around the all-to-all (:mod:`moesim.train.moe`; False:
    not modelled, the step as before them).
    """

    parallel: Parallel
    seq_len: int
    micro_batch_size: int
    global_batch_size: int
    schedule: str = "1f1b"
    recompute: str = "none"
    dtype: str = "bf16"
    routing: str = "balanced"
    routing_samples: int = 4
    expert_mode: str = "ep"
    offload: str = "none"
    fssdp_plan: str = "oracle"
    dispatch_dedup: str = "auto"
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    tp_comm_overlap: bool = False
    fp8_recipe: str = "delayed"
    host_overhead: str = "eager"
    moe_permute: bool = True

    def __post_init__(self):
        if self.seq_len < 1 or self.micro_batch_size < 1:
            raise TrainError("--seq-len and --micro-batch-size must be >= 1")
        cp = self.parallel.cp
        if cp > 1 and self.seq_len % (2 * cp):
            raise TrainError(f"--seq-len {self.seq_len} must be a multiple of 2 x --cp = {2 * cp} (each "
                             "context-parallel rank holds two sequence chunks, Megatron's causal load balance)")
        per = self.micro_batch_size * self.parallel.dp
        if self.global_batch_size < per or self.global_batch_size % per:
            raise TrainError(f"--global-batch-size {self.global_batch_size} must be a positive multiple of "
                             f"micro-batch-size x dp = {per}")
        if self.schedule not in SCHEDULES:
            raise TrainError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.recompute not in RECOMPUTE:
            raise TrainError(f"--recompute must be one of {', '.join(RECOMPUTE)}, got {self.recompute!r}")
        if self.routing not in ROUTING:
            raise TrainError(f"routing must be one of {', '.join(ROUTING)}, got {self.routing!r}")
        if self.expert_mode not in EXPERT_MODES:
            raise TrainError(f"--expert-mode must be one of {', '.join(EXPERT_MODES)}, got {self.expert_mode!r}")
        if self.fssdp_plan not in FSSDP_PLANS:
            raise TrainError(f"--fssdp-plan must be one of {', '.join(FSSDP_PLANS)}, got {self.fssdp_plan!r}")
        if self.expert_mode == "fssdp" and self.parallel.etp > 1:
            raise TrainError(f"--expert-mode fssdp materialises whole experts: it needs --etp 1, "
                             f"got {self.parallel.etp}")
        if self.offload not in OFFLOAD:
            raise TrainError(f"--offload must be one of {', '.join(OFFLOAD)}, got {self.offload!r}")
        if self.routing_samples < 1:
            raise TrainError("routing_samples must be >= 1")
        for flag, value, known in (("--fp8-recipe", self.fp8_recipe, FP8_RECIPES),
                                   ("--host-overhead", self.host_overhead, HOST_OVERHEAD)):
            if value not in known:
                raise TrainError(f"{flag} must be one of {', '.join(known)}, got {value!r}")
        if self.dispatch_dedup not in DISPATCH_DEDUP:
            raise TrainError(f"--dispatch-dedup must be one of {', '.join(DISPATCH_DEDUP)}, "
                             f"got {self.dispatch_dedup!r}")
        v = self.parallel.virtual_stages
        if self.schedule != "interleaved" and v != 1:
            raise TrainError("--virtual-stages > 1 needs --schedule interleaved")
        if self.schedule == "interleaved" and self.num_micro_batches % self.parallel.pp:
            raise TrainError(f"--schedule interleaved needs micro-batches ({self.num_micro_batches}) to be a "
                             f"multiple of --pp {self.parallel.pp}")
        if self.schedule in DUALPIPES and self.parallel.pp % 2:
            raise TrainError(f"--schedule {self.schedule} needs an even --pp, got {self.parallel.pp}")
        m, p = self.num_micro_batches, self.parallel.pp
        if self.schedule == "dualpipe-bidir" and (m % 2 or m < 2 * p):
            raise TrainError(f"--schedule dualpipe-bidir needs an even number of micro-batches >= 2 x pp = {2 * p} "
                             f"(half enter each end of the pipeline), got {m}")

    @property
    def num_micro_batches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.parallel.dp)

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch_size * self.seq_len

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


#: option names a caller (the ``moesim train`` flags, a study configuration) passes through to :class:`Parallel`
PARALLEL_OPTIONS = ("tp", "pp", "ep", "zero", "virtual_stages", "first_stage_layers", "last_stage_layers", "cp",
                    "etp")
#: ... and to :class:`TrainSpec` (besides ``parallel`` and ``routing``)
SPEC_OPTIONS = ("seq_len", "micro_batch_size", "global_batch_size", "schedule", "recompute", "dtype",
                "routing_samples", "expert_mode", "offload", "fssdp_plan", "dispatch_dedup", "overlap_grad_reduce",
                "overlap_param_gather", "tp_comm_overlap", "fp8_recipe", "host_overhead")


def spec_from_options(options, dp: int, routing: str) -> TrainSpec:
    """The :class:`TrainSpec` of named options (a mapping; names it lacks keep their defaults) with ``dp`` data-parallel
    ranks and ``routing``: the one place the CLI and the study engine map their options onto the spec."""
    par = Parallel(dp=dp, **{k: options[k] for k in PARALLEL_OPTIONS if k in options})
    return TrainSpec(parallel=par, routing=routing, **{k: options[k] for k in SPEC_OPTIONS if k in options})
