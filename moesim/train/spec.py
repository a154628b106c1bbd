"""What a training step runs: the parallel layout and the step's options.

Rank layout (Megatron order, fastest first): tensor parallel ``tp``, then data parallel ``dp``, then
pipeline ``pp``; world = tp x dp x pp. Expert parallelism uses expert tensor parallel size 1 (as
DeepSeek-V3 and Megatron's recommended MoE setting): the ``ep`` ranks of an expert group are
consecutive ranks of the tp x dp plane, so ``ep`` divides ``tp * dp`` and the experts are replicated
over ``tp * dp / ep`` expert-data-parallel ranks. With ``tp > 1`` sequence parallelism is on: norms,
the MoE block and pipeline messages see ``tokens / tp`` tokens per device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
    split; Megatron's ``--decoder-first/last-pipeline-num-layers``), the rest split evenly."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    zero: int = 0
    virtual_stages: int = 1
    first_stage_layers: int = 0
    last_stage_layers: int = 0

    def __post_init__(self):
        for name in ("tp", "pp", "dp", "ep", "virtual_stages"):
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.first_stage_layers < 0 or self.last_stage_layers < 0:
            raise TrainError("--first-stage-layers and --last-stage-layers must be >= 0")
        if self.zero not in (0, 1, 2, 3):
            raise TrainError(f"--zero must be 0, 1, 2 or 3, got {self.zero}")
        if (self.tp * self.dp) % self.ep:
            raise TrainError(f"--ep {self.ep} must divide tp x dp = {self.tp * self.dp} (expert tensor parallel size 1)")

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

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
        """Replicas of each expert: ranks of the tp x dp plane / ep."""
        return self.tp * self.dp // self.ep


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
    comm kernel (:func:`moesim.train.moe.dispatch_dedup_of`).
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

    def __post_init__(self):
        if self.seq_len < 1 or self.micro_batch_size < 1:
            raise TrainError("--seq-len and --micro-batch-size must be >= 1")
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
        if self.offload not in OFFLOAD:
            raise TrainError(f"--offload must be one of {', '.join(OFFLOAD)}, got {self.offload!r}")
        if self.routing_samples < 1:
            raise TrainError("routing_samples must be >= 1")
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
