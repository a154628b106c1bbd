"""Operators of a training step, timed through the :class:`hwmodels.roofline.CostModel` protocol.

An :class:`Op` is one operator of one micro-batch on one device: where it is (``layer``, ``phase``),
which pass (``direction``: forward, backward_input, backward_weight), whether it computes or
communicates (``kind``) and its time, FLOPs and bytes.

- A linear layer ``[m, k] x [k, n]`` is ``cost.gemm(m, n, k)`` forward; its input gradient
  ``cost.gemm(m, k, n)`` and weight gradient ``cost.gemm(k, n, m)`` (the shapes schedulers split).
- Kernels the protocol does not name (FlashAttention's fused core, norms, embedding gathers, the loss,
  the optimizer) are a :class:`Kernel` (FLOPs, bytes): timed by ``cost.kernel(device, name, flops,
  bytes, dtype)`` when the cost model has that method; else a kernel that is GEMM work in disguise
  (the attention core) runs as fast as ``cost.gemm`` says ``gemm_count`` GEMMs of its ``gemm_shape``
  (same FLOPs) run, so it gets the cost model's GEMM efficiency; any other kernel gets the device's spec roofline
  ``launch + max(flops / peak, bytes / bandwidth)`` (the formula of :class:`hwmodels.roofline.RooflineCost`).
- FP8 training (``dtype="fp8"``) runs only the linear layers in FP8; kernels, the router and the LM head
  stay in BF16 (DeepSeek-V3 report, arXiv:2412.19437, sec. 3.3.1: embedding, output head, MoE gating,
  normalization and attention operators keep their original precision). Each FP8 linear layer also gets its
  quantization kernels (:mod:`moesim.train.fp8`, recipe ``Timer.fp8_recipe``) as memory-bound kernels (phase
  ``fp8_cast``): the input cast in the forward, the output-gradient cast in the backward, and the weight cast
  once per step (direction :data:`PER_STEP`, which per-micro-batch sums leave out).
"""

from __future__ import annotations

from dataclasses import dataclass

from hwmodels.roofline import CostModel, OpCost
from hwmodels.specs import Device
from moesim.train.fp8 import linear_cast_bytes

FORWARD, BACKWARD_INPUT, BACKWARD_WEIGHT = "forward", "backward_input", "backward_weight"
PER_STEP = "per_step"  # once per step, not per micro-batch (FP8 weight casts)
COMPUTE, COMMUNICATION = "compute", "communication"


def precise_dtype(dtype: str) -> str:
    """The dtype of kernels, router, LM head and the MoE combine: BF16 under FP8 training (module docstring)."""
    return "bf16" if dtype == "fp8" else dtype


@dataclass(frozen=True)
class Op:
    """One operator instance (per micro-batch, per device): seconds, FLOPs, bytes (memory or sent)."""

    layer: int
    phase: str
    direction: str
    kind: str
    time_s: float
    flops: float = 0.0
    bytes: float = 0.0


@dataclass(frozen=True)
class Kernel:
    """Work of a kernel the CostModel protocol does not name; ``gemm_shape`` (m, n, k) x ``gemm_count``: GEMMs
    of the same FLOPs whose time the kernel takes when the cost model has no ``kernel`` method."""

    name: str
    flops: float
    bytes: float
    gemm_shape: tuple[int, int, int] | None = None
    gemm_count: float = 1.0


def kernel_cost(cost: CostModel, device: Device, k: Kernel, dtype: str) -> OpCost:
    """Time of ``k`` (see the module docstring for the fallback); zero work costs nothing."""
    if k.flops <= 0 and k.bytes <= 0:
        return OpCost(0.0, 0.0, 0.0)
    fn = getattr(cost, "kernel", None)
    if fn is not None:
        return fn(device, k.name, k.flops, k.bytes, dtype)
    if k.gemm_shape is not None:
        return OpCost(k.gemm_count * cost.gemm(device, *k.gemm_shape, dtype).time_s, k.flops, k.bytes)
    t = max(k.flops / device.peak(dtype), k.bytes / device.main_memory.bandwidth_bytes_per_s)
    return OpCost(device.launch_latency_s + t, k.flops, k.bytes)


@dataclass(frozen=True)
class Timer:
    """Builds :class:`Op` records of one device through one cost model."""

    cost: CostModel
    device: Device
    dtype: str
    fp8_recipe: str = "none"  # moesim.train.fp8.FP8_RECIPES; applies when dtype is fp8

    @property
    def precise_dtype(self) -> str:
        return precise_dtype(self.dtype)

    def linear(self, layer: int, phase: str, m: int, n: int, k: int, precise: bool = False) -> list[Op]:
        """Forward, input-gradient and weight-gradient GEMMs of ``[m, k] x [k, n]`` (``precise``: in
        :attr:`precise_dtype`)."""
        if m <= 0 or n <= 0 or k <= 0:
            return []
        out = []
        dtype = self.precise_dtype if precise else self.dtype
        for direction, (a, b, c) in ((FORWARD, (m, n, k)), (BACKWARD_INPUT, (m, k, n)), (BACKWARD_WEIGHT, (k, n, m))):
            oc = self.cost.gemm(self.device, a, b, c, dtype)
            out.append(Op(layer, phase, direction, COMPUTE, oc.time_s, oc.flops, oc.bytes))
        if dtype == "fp8" and self.fp8_recipe != "none":
            out += self.fp8_casts(layer, linear_cast_bytes(m, n, k, self.fp8_recipe))
        return out

    def fp8_casts(self, layer: int, nbytes: tuple[float, float, float]) -> list[Op]:
        """Memory-bound FP8 cast kernels of (forward, backward, per-step weight) bytes, phase ``fp8_cast``."""
        return [self.kernel(layer, "fp8_cast", direction, Kernel(f"fp8_cast_{direction}", 0.0, b))
                for direction, b in zip((FORWARD, BACKWARD_INPUT, PER_STEP), nbytes) if b > 0]

    def kernel(self, layer: int, phase: str, direction: str, k: Kernel) -> Op:
        oc = kernel_cost(self.cost, self.device, k, self.precise_dtype)
        return Op(layer, phase, direction, COMPUTE, oc.time_s, oc.flops, oc.bytes)

    def from_cost(self, layer: int, phase: str, direction: str, oc: OpCost) -> Op:
        return Op(layer, phase, direction, COMPUTE, oc.time_s, oc.flops, oc.bytes)


def default_cost(device: Device) -> CostModel:
    """The cost model a training step uses unless one is given (the one place to change it)."""
    from hwmodels.cost import default_cost_model

    return default_cost_model(device)
