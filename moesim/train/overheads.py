"""What the MoE part of a block adds to the training step beyond :mod:`moesim.train.moe`'s phases: the FP8 casts of
the routed experts (:mod:`moesim.train.fp8`) and the host time the GPU waits for after each MoE dispatch's host
sync (:mod:`moesim.train.host`), per routing sample and MoE layer.

Forward of a MoE layer: ``+ cast_fwd + host``; backward: ``+ cast_bwd`` (no host sync in the backward; a full
recomputation re-runs the forward, sync included). The local experts' weights are cast once per step
(``weight_cast_s`` per MoE layer). Under a dtype other than fp8, or recipe ``none``, the casts are 0; under
``host_overhead="none"``, the host term is 0. The casts of one direction are timed as one memory-bound kernel (one
launch latency) of their summed bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.train.fp8 import expert_cast_bytes
from moesim.train.host import HostModel, moe_segment
from moesim.train.moe import MoETimes
from moesim.train.ops import BACKWARD_INPUT, FORWARD, PER_STEP, Kernel, Op, Timer
from moesim.train.spec import TrainSpec
from workloads.hf_config import ModelConfig

CAST_KERNELS_FWD = 2  # the two expert linears' input casts (moesim.train.fp8.expert_cast_bytes)


@dataclass(frozen=True, eq=False)
class MoEOverheads:
    """Seconds [samples, moe_layers] added to each MoE layer's forward (``cast_fwd_s + host_s``) and backward
    (``cast_bwd_s``), and the per-step weight cast of one MoE layer's local experts."""

    cast_fwd_s: np.ndarray
    cast_bwd_s: np.ndarray
    host_s: np.ndarray
    weight_cast_s: float


def moe_overheads(cfg: ModelConfig, spec: TrainSpec, timer: Timer, mt: MoETimes, block_ops: list[Op]) -> MoEOverheads:
    """The overheads of every routing sample and MoE layer; ``block_ops``: the operators of one MoE block outside
    its MoE part (:func:`moesim.train.layers.block_ops`), whose forward kernels close each host segment."""
    recipe = spec.fp8_recipe if spec.dtype == "fp8" else "none"
    par = spec.parallel
    inter = cfg.moe_intermediate_size // par.etp
    local = cfg.num_experts // par.ep
    host = HostModel(spec.host_overhead)
    block_fwd = [o.time_s for o in block_ops if o.direction == FORWARD]
    shape = mt.router_s.shape
    cast_fwd, cast_bwd, host_s = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    weight_s = _kernel_s(timer, expert_cast_bytes(0, 0, cfg.hidden_size, inter, local, recipe)[2], PER_STEP)
    for g, j in np.ndindex(shape):
        fwd_b, bwd_b, _ = expert_cast_bytes(mt.tokens_per_device, float(mt.expert_tokens_max[g, j]), cfg.hidden_size,
                                            inter, local, recipe)
        cast_fwd[g, j] = _kernel_s(timer, fwd_b, FORWARD)
        cast_bwd[g, j] = _kernel_s(timer, bwd_b, BACKWARD_INPUT)
        extra = (CAST_KERNELS_FWD if fwd_b > 0 else 0, cast_fwd[g, j])
        host_s[g, j] = host_exposure_s(host, block_fwd, mt, g, j, extra)
    return MoEOverheads(cast_fwd, cast_bwd, host_s, weight_s)


def host_exposure_s(host: HostModel, block_fwd_s: list[float], mt: MoETimes, g: int, j: int,
                    extra: tuple[int, float] = (0, 0.0)) -> float:
    """Seconds the GPU waits for the host after MoE layer ``j``'s dispatch sync (sample ``g``), its segment closed by
    the block's forward kernels ``block_fwd_s`` (:func:`moesim.train.host.moe_segment`)."""
    permute = (0.0, 0.0, False) if mt.permute_s is None else \
        (float(mt.permute_s[g, j]), float(mt.unpermute_s[g, j]), mt.dispatch_dedup != "none")
    return host.exposure_s(moe_segment(host, block_fwd_s, mt.router_s[g, j], mt.dispatch_s[g, j], mt.shared_s[g, j],
                                       mt.expert_s[g, j], mt.combine_s[g, j], bool(mt.shared_s[g, j] > 0), extra,
                                       permute))


def _kernel_s(timer: Timer, nbytes: float, direction: str) -> float:
    """Seconds of one memory-bound cast kernel of ``nbytes`` through the cost model's kernel path."""
    return timer.kernel(-2, "fp8_cast", direction, Kernel("fp8_cast", 0.0, nbytes)).time_s if nbytes > 0 else 0.0
