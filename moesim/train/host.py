"""Host (CPU launch and synchronisation) time that the GPU waits for.

The host launches every kernel of the step in order; the GPU runs them in order, asynchronously behind the
host, so the host's launch time is hidden while the host is ahead. It is not ahead after a host-device
synchronisation: a dropless MoE dispatch needs the number of tokens each rank sends and each expert receives
on the host (the all-to-all split sizes and the grouped-GEMM row counts), a device-to-host copy the host
waits for (Megatron-LM PR 4247, "Paged Stashing": in token-dropless MoE training "the size of a tensor cannot
be dynamically adjusted at runtime without the intervene of the host"; Megatron-Core's "MoE Paged Stash" guide:
sync-free execution pre-sizes the dispatch and expert buffers, "avoiding a per-step device query"; Megatron-Bridge,
"MoE Training Optimization": the compute-efficiency wall is "Small expert GEMMs + host overhead"). After the
sync the GPU idles until the host has launched the next kernels.

**Exposure of one segment** (the kernels launched after a sync, up to the next sync). The host launches kernel
``p`` (1-based) at ``H_p``, the host time of launches 1..p after the sync (``H_p = p h`` at ``h`` seconds per
launch); the GPU starts it at ``max(H_p, end of kernel p - 1)``, so the segment ends at
``max_p (H_p + sum_{i >= p} g_i)`` and the GPU waits

    E = max_p ( H_p - sum_{i < p} g_i )          (at least H_1: the first kernel's launch)

beyond the segment's GPU time ``sum g_i``. With ``k`` kernels of equal time ``g`` and equal launch cost in a
group the term is linear in the position, so only each group's first and last kernel are checked
(:func:`exposed_host_s`).

Modes (:class:`HostModel`): ``eager``: every kernel is one launch of ``h`` (:data:`HOST_LAUNCH` ``eager``).
``cuda-graphs``: what Megatron-Bridge captures for dropless MoE ("dropless MoE: attn moe_router moe_preprocess",
its CUDA-graphs guide): the attention side of the block and the router are one graph launch each
(:data:`HOST_LAUNCH` ``cuda-graphs``), while the dispatch, experts and combine, whose shapes the sync decides, stay
eager (so the sync stays). ``none``: no host time (the step as before this term).

Where the syncs are (:func:`moe_segment`): one per MoE layer in each forward pass (and again in the
recomputed forward of ``recompute="full"``); none in the backward (the split sizes are the forward's) and
none in dense models (their host stays ahead: no exposure). A segment runs from a MoE layer's dispatch to the
next MoE layer's dispatch: the dispatch beside the shared experts, the routed experts, the combine, then the
next block's forward operators up to its router (identical blocks: this block's). Kernels per operator:
each :class:`moesim.train.ops.Op` is one kernel; the MoE phases count the terms of the cost model's formulas
(router: GEMM and softmax/top-k, 2; routed and shared experts: gate-up GEMM, SwiGLU, down GEMM, 3 each;
dispatch and combine: 1 each; the token permute and unpermute of :mod:`moesim.train.moe`: 1 each, around the
all-to-alls, or inside them on the receiver side of a de-duplicating dispatch). No other kernels (padding,
allocator, the permutation's index building) are counted. Serving decode
engines that capture the whole forward with sync-free dispatch kernels (DeepEP's low-latency mode) have no
per-layer sync; there this model is an upper bound.

Per-launch host seconds (:data:`HOST_LAUNCH`), each from a published measurement; none fitted to the
validation figures.
"""

from __future__ import annotations

from dataclasses import dataclass

from moebase.units import US

HOST_OVERHEAD = ("eager", "cuda-graphs", "none")
EXPERT_KERNELS = 3  # gate-up GEMM, SwiGLU, down GEMM (the three terms of the cost models' expert_ffn)
ROUTER_KERNELS = 2  # router GEMM, softmax + top-k (the two terms of the cost models' router)


@dataclass(frozen=True)
class LaunchCost:
    seconds: float
    source: str


#: host seconds per launch: per kernel (eager) or per graph (cuda-graphs). Both from one page, which measures a
#: launch-bound stream of tiny kernels with and without a graph; corroborated by PyTorch's operator micro-benchmark
#: (eager ``split`` on CUDA, an operator that launches no kernel: 3.333 us of framework time per call,
#: github.com/pytorch/pytorch/pull/32194) and a 2.6 us floor of a plain CUDA launch
#: (github.com/makslevental/persistent_kernel README: "conventional kernel launch, sitting at 2.6us, at the minimum").
HOST_LAUNCH = {
    "eager": LaunchCost(260 * US / 80, "CUDA.jl documentation, 'Graphs' (cuda.juliagpu.org/dev/usage/graphs/): 10 "
                        "RK4 steps, 80 broadcast kernels, take 260 us launched one by one (70 us as a graph): "
                        "3.25 us of host time per kernel when the host is the bottleneck"),
    "cuda-graphs": LaunchCost(3.5 * US, "same page: the 80-kernel graph is launched with 3.5 us of CPU time"),
    "none": LaunchCost(0.0, "host overhead not modelled"),
}


def exposed_host_s(groups: list[tuple[int, float, float]]) -> float:
    """Seconds the GPU waits for the host over one segment (module docstring); ``groups``: (kernels, GPU seconds
    of all of them, host seconds per launch) in launch order, each group's kernels of equal time."""
    host, gpu_before, worst = 0.0, 0.0, 0.0
    for kernels, gpu_s, launch_s in groups:
        if kernels <= 0:
            continue
        g = gpu_s / kernels
        worst = max(worst, host + launch_s - gpu_before,
                    host + kernels * launch_s - gpu_before - (kernels - 1) * g)
        host, gpu_before = host + kernels * launch_s, gpu_before + gpu_s
    return worst


@dataclass(frozen=True)
class HostModel:
    """``mode``: ``eager``, ``cuda-graphs`` or ``none`` (module docstring)."""

    mode: str = "none"

    def __post_init__(self):
        if self.mode not in HOST_OVERHEAD:
            raise ValueError(f"--host-overhead must be one of {', '.join(HOST_OVERHEAD)}, got {self.mode!r}")

    @property
    def kernel_s(self) -> float:
        """Host seconds per eagerly launched kernel (0 under ``none``)."""
        return 0.0 if self.mode == "none" else HOST_LAUNCH["eager"].seconds

    def captured(self, gpu_s: list[float]) -> list[tuple[int, float, float]]:
        """Groups of kernels (``gpu_s``: GPU seconds each) the mode captures in one graph (one launch) or launches one
        by one."""
        if self.mode == "cuda-graphs":
            return [(1, sum(gpu_s), HOST_LAUNCH["cuda-graphs"].seconds)]
        return [(1, t, self.kernel_s) for t in gpu_s]

    def exposure_s(self, groups: list[tuple[int, float, float]]) -> float:
        """Seconds the GPU waits for the host after one sync, for the segment ``groups``."""
        return 0.0 if self.mode == "none" else exposed_host_s(groups)


def moe_segment(host: HostModel, block_fwd_s: list[float], router_s: float, dispatch_s: float, shared_s: float,
                expert_s: float, combine_s: float, shared: bool, extra: tuple[int, float] = (0, 0.0),
                permute: tuple[float, float, bool] = (0.0, 0.0, False)) -> list[tuple[int, float, float]]:
    """(kernels, GPU seconds, host seconds per launch) groups of one MoE layer's segment (module docstring): the
    dispatch with the shared experts beside it, ``extra`` (kernels, seconds) before the routed experts (their FP8
    casts), the routed experts, the combine (all eager), then the block's forward kernels ``block_fwd_s`` and the
    router (a graph each under ``cuda-graphs``). ``permute``: (permute seconds, unpermute seconds, receiver side)
    of the token permutation kernels (:mod:`moesim.train.moe`), one eager kernel each when non-zero: before the
    dispatch and after the combine, or (receiver side) after the dispatch and before the combine."""
    h = host.kernel_s
    p, u, receiver = permute
    perm, unperm = [(1, p, h)] if p > 0 else [], [(1, u, h)] if u > 0 else []
    dispatch, combine = [(1 + (EXPERT_KERNELS if shared else 0), max(dispatch_s, shared_s), h)], [(1, combine_s, h)]
    first, last = (dispatch + perm, unperm + combine) if receiver else (perm + dispatch, combine + unperm)
    groups = first + [(*extra, h), (EXPERT_KERNELS, expert_s, h)] + last
    return groups + host.captured(block_fwd_s) + host.captured([router_s / ROUTER_KERNELS] * ROUTER_KERNELS)
