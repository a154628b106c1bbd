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
  normalization and attention operators keep their original precision).
"""

from __future__ import annotations

from dataclasses import dataclass

from hwmodels.roofline import CostModel, OpCost
from hwmodels.specs import Device

FORWARD, BACKWARD_INPUT, BACKWARD_WEIGHT = "forward", "backward_input", "backward_weight"
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
        return out

    def kernel(self, layer: int, phase: str, direction: str, k: Kernel) -> Op:
        oc = kernel_cost(self.cost, self.device, k, self.precise_dtype)
        return Op(layer, phase, direction, COMPUTE, oc.time_s, oc.flops, oc.bytes)

    def from_cost(self, layer: int, phase: str, direction: str, oc: OpCost) -> Op:
        return Op(layer, phase, direction, COMPUTE, oc.time_s, oc.flops, oc.bytes)


def default_cost(device: Device) -> CostModel:
    """The cost model a training step uses unless one is given (the one place to change it)."""
    from hwmodels.cost import default_cost_model

    return default_cost_model(device)
