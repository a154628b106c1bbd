"""Communication that overlaps compute in a training step: data-parallel gradient reduction and weight gathers,
and tensor-parallel (sequence-parallel) collectives.

Defaults are Megatron-LM's: ``--overlap-grad-reduce``, ``--overlap-param-gather`` and ``--tp-comm-overlap`` are
``store_true`` flags (off), and Megatron-Core's ``DistributedDataParallelConfig`` has ``overlap_grad_reduce = False``
and ``overlap_param_gather = False`` (github.com/NVIDIA/Megatron-LM,
``megatron/core/distributed/distributed_data_parallel_config.py``, core v0.7.0). Training recipes (NeMo,
Megatron-Bridge, the Megatron-MoE model zoo) turn them on; moesim leaves the choice to the run.

**Gradient reduction** (``overlap_grad_reduce``): with pipeline parallelism Megatron reduces a model chunk's
gradients only in its last micro-batch's backward (the others accumulate locally). Its gradient buffer is cut into
buckets of ``max(40,000,000, 1,000,000 x dp)`` parameters (``bucket_size``'s default in the same file: "larger DP
sizes need larger buckets to ensure collectives do not become latency-bound"), filled in the order the backward
produces gradients; a bucket's all-reduce (ZeRO 0) or reduce-scatter (ZeRO 1/2) is issued when the bucket is full,
one at a time on the communication stream. moesim spreads a chunk's gradients evenly over the slot of that last
backward on the pipeline timeline (:func:`moesim.train.timeline.gradient_slots`) and runs
:func:`reduce_beside_compute`: only what does not fit under the remaining backward compute, and always the last
bucket (ready when the backward ends), is exposed. While a bucket is in flight NCCL holds SMs
(:data:`NCCL_KERNEL` in :data:`hwmodels.collectives.COMM_KERNEL_SMS`) and the stage's compute runs slower by
:func:`compute_slowdown`'s factor (the cost model's ``overlap_sms``, as the MoE path's shared experts beside the
all-to-all; 1 for cost models without SMs). The stretch stays on its stage: it is not passed on to the stages
that wait for this one.

**Weight gathers** (``overlap_param_gather``, ZeRO 1/2): the updated bf16 weights' all-gather moves from the end of
the step into the next step's forward: a stage's gathers run back to back from the start of the step, chunk by
chunk in the order the chunks first run and bucket by bucket in forward order, and the first forward of a chunk
waits for each bucket before its layers (:func:`gather_before_compute_s`). Megatron's interleaved schedule launches
the first two chunks' gathers before its warm-up and each later chunk's during the chunk before it
(``schedules.py``, ``param_sync_func``), so the idle warm-up hides them; moesim issues all of them at the start,
slightly earlier. A first pass of the schedule gives each chunk's first forward; the waits are added to those
forwards and the schedule is run again.

**Tensor-parallel communication** (``tp_comm_overlap``, Transformer Engine's userbuffers; github.com/NVIDIA/
TransformerEngine ``transformer_engine/pytorch/module/base.py`` @0004dbd0, ``initialize_ub``): the
sequence-parallel all-gather before the first GEMM of a block (QKV / FC1) is a ring exchange of ``tp`` shards, each
shard's GEMM beside the next shard's transfer (:func:`ring_exchange_s`); the reduce-scatter after the last GEMM
(projection / FC2) is pipelined in 4 splits, each split's reduce-scatter beside the next split's GEMM
(:func:`pipelined_reduce_scatter_s`); in the backward pass the gradient all-gather before the last GEMM's input
gradient is a ring exchange and the input gradient's reduce-scatter runs in bulk beside the first GEMM's weight
gradient (:func:`bulk_s`). Every method holds :data:`TE_KERNEL`'s SMs (``add_ub``'s default ``num_sm = 16``).
"""

from __future__ import annotations

import math

import numpy as np

GRAD_BUCKET_PARAMS = 40_000_000  # Megatron-Core bucket_size default: max(40M, 1M x dp) parameters
GRAD_BUCKET_PARAMS_PER_DP_RANK = 1_000_000
NCCL_KERNEL = "nccl-ring"  # key of hwmodels.collectives.COMM_KERNEL_SMS: SMs NCCL's collectives hold
TE_KERNEL = "te-userbuffers"  # key of hwmodels.collectives.COMM_KERNEL_SMS: SMs TE's userbuffers kernels hold
TE_PIPELINE_SPLITS = 4  # TE initialize_ub: add_ub(num_splits=4) for the pipelined reduce-scatter
_EPS = 1e-15


def bucket_fractions(params: float, dp: int) -> np.ndarray:
    """Shares of ``params`` gradients in each bucket, in the order the backward fills them: full buckets of
    ``max(40M, 1M x dp)`` parameters, the last one the remainder (module docstring)."""
    if params <= 0:
        return np.zeros(0)
    size = max(GRAD_BUCKET_PARAMS, GRAD_BUCKET_PARAMS_PER_DP_RANK * dp)
    n = math.ceil(params / size)
    out = np.full(n, size / params)
    out[-1] = 1.0 - size * (n - 1) / params
    return out


def reduce_beside_compute(segments: list[tuple[float, float]], ready_work_s: list[float], comm_s: list[float],
                          slowdown: float = 1.0) -> tuple[float, float]:
    """One device's compute and its gradient buckets on one communication stream.

    ``segments``: (start_at_s, seconds) of compute in time order (a segment starts at its time or when the one
    before it ends, whichever is later); bucket ``j`` is issued once the compute has done ``ready_work_s[j]``
    seconds of its work (ascending) and bucket ``j - 1`` has finished, and takes ``comm_s[j]``; while a bucket is
    in flight the compute runs ``slowdown`` (>= 1) times slower. Returns (compute end, communication end)."""
    if len(ready_work_s) != len(comm_s):
        raise ValueError("reduce_beside_compute: one ready point per bucket")
    if not segments:
        segments = [(0.0, 0.0)]
    t, k, left, work, j = segments[0][0], 0, segments[0][1], 0.0, 0
    busy_until, comm_end, compute_end = None, t, t
    while True:
        if k < len(segments) and left <= _EPS and t >= segments[k][0]:  # a segment done: the next one
            k += 1
            compute_end = t
            left = segments[k][1] if k < len(segments) else 0.0
            continue
        if busy_until is None and j < len(comm_s) and (work >= ready_work_s[j] - _EPS or k == len(segments)):
            busy_until, j = t + comm_s[j], j + 1
        computing = k < len(segments) and t >= segments[k][0]
        rate = 1.0 / slowdown if busy_until is not None else 1.0
        events = [] if busy_until is None else [busy_until]
        step = 0.0
        if computing:  # to the segment's end, or to the next bucket's ready point when the stream is idle
            step = left if busy_until is not None or j >= len(comm_s) or ready_work_s[j] <= work \
                else min(left, ready_work_s[j] - work)
            events.append(t + step / rate)
        elif k < len(segments):
            events.append(segments[k][0])
        if not events:
            break
        t_next = min(events)
        if computing:  # the work done: exactly ``step`` when its own event comes first (no rounding stalls)
            done = step if t_next == events[-1] else min(step, (t_next - t) * rate)
            work, left = work + done, left - done
        t = t_next
        if busy_until is not None and t >= busy_until:
            comm_end, busy_until = t, None
    return compute_end, comm_end


def gemm_beside_s(comm_s: float, gemm_s: float, gemm_slow_s: float) -> float:
    """Seconds a GEMM of ``gemm_s`` takes when a communication kernel started with it runs for ``comm_s``: it runs
    at the speed of ``gemm_slow_s`` (the GEMM with the kernel's SMs taken) while the kernel is in flight."""
    if gemm_slow_s <= comm_s or gemm_slow_s <= 0:
        return gemm_slow_s
    return comm_s + gemm_s - comm_s * gemm_s / gemm_slow_s


def bulk_s(comm_s: float, gemm_s: float, gemm_slow_s: float) -> float:
    """A collective and a GEMM started together (TE's ``bulk`` overlap): the later of the two."""
    return max(comm_s, gemm_beside_s(comm_s, gemm_s, gemm_slow_s))


def ring_exchange_s(comm_s: float, chunk_s: float, chunk_slow_s: float, tp: int) -> float:
    """All-gather + GEMM as TE's ring exchange: ``tp`` GEMMs of one shard's rows (``chunk_s`` each, ``chunk_slow_s``
    with the kernel's SMs taken); the first ``tp - 1`` beside the transfer of the next shard
    (``comm_s / (tp - 1)``), the last one alone."""
    if tp <= 1:
        return chunk_s
    return (tp - 1) * bulk_s(comm_s / (tp - 1), chunk_s, chunk_slow_s) + chunk_s


def pipelined_reduce_scatter_s(comm_s: float, chunk_s: float, chunk_slow_s: float,
                               splits: int = TE_PIPELINE_SPLITS) -> float:
    """GEMM + reduce-scatter in ``splits`` row chunks (TE's ``pipeline`` overlap): the first chunk's GEMM alone, each
    later one beside the previous chunk's reduce-scatter, the last chunk's reduce-scatter alone."""
    n = max(1, splits)
    return chunk_s + (n - 1) * bulk_s(comm_s / n, chunk_s, chunk_slow_s) + comm_s / n


def tp_overlap_s(all_gather_s: float, reduce_scatter_s: float, tp: int, first_fwd: tuple, first_wgrad: tuple,
                 last_fwd: tuple, last_dgrad: tuple) -> tuple[float, float]:
    """Exposed seconds (forward, backward) of one tensor-parallel block's sequence-parallel all-gather and
    reduce-scatter under TE's userbuffers overlap (module docstring), over the unsplit GEMMs the step already
    counts. Each GEMM argument is (whole GEMM, one chunk of it, that chunk with the userbuffers kernel's SMs taken)
    seconds, chunks of ``1 / tp`` of the rows for the ring exchanges, ``1 / TE_PIPELINE_SPLITS`` for the pipelined
    reduce-scatter and the whole GEMM for the bulk one: the block's first GEMM(s) (QKV / FC1) forward and weight
    gradient, its last GEMM (projection / FC2) forward and input gradient. The exposed part includes the split
    GEMMs' lower efficiency and their slowdown beside the communication."""
    fwd = (ring_exchange_s(all_gather_s, *first_fwd[1:], tp) - first_fwd[0]
           + pipelined_reduce_scatter_s(reduce_scatter_s, *last_fwd[1:]) - last_fwd[0])
    bwd = (ring_exchange_s(all_gather_s, *last_dgrad[1:], tp) - last_dgrad[0]
           + bulk_s(reduce_scatter_s, *first_wgrad[1:]) - first_wgrad[0])
    return max(0.0, fwd), max(0.0, bwd)


def gather_before_compute_s(gather_s: list[float], compute_s: float, fractions: np.ndarray, slowdown: float = 1.0,
                            lead_s: float = 0.0) -> float:
    """Seconds a forward of ``compute_s`` waits for its weights' bucketed all-gathers: the gathers run back to back
    from ``lead_s`` before the forward starts, bucket ``j`` holding ``fractions[j]`` of the work's weights in
    forward order; a bucket's layers wait for it, and run ``slowdown`` times slower while a later bucket is in
    flight. Returns the forward's end minus ``compute_s``."""
    arrivals = np.cumsum(gather_s) - lead_s
    t = 0.0
    for j, frac in enumerate(fractions):
        start = max(t, float(arrivals[j]))
        in_flight = max(0.0, float(arrivals[j + 1]) - start) if j + 1 < len(arrivals) else 0.0
        work = compute_s * float(frac)
        t = start + gemm_beside_s(in_flight, work, work * slowdown)
    return max(0.0, t - compute_s)
