"""The cost-model protocol and the spec roofline: how long an operator takes on a device.

The simulator only talks to the :class:`CostModel` protocol, so the roofline here and the
calibrated model (:mod:`hwmodels.calibrated`) are interchangeable; :mod:`hwmodels.cost` names them.

Roofline of one operator: ``launch_latency_s + max(flops / peak_flops_per_s, bytes / bandwidth_bytes_per_s)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from hwmodels.specs import Device
from moebase.units import DTYPE_BYTES

#: the router's logits are fp32 whatever the compute dtype
LOGIT_DTYPE = "fp32"


@dataclass(frozen=True)
class OpCost:
    """Time and work of one (possibly grouped) operator."""

    time_s: float
    flops: float
    bytes: float


class CostModel(Protocol):
    name: str

    def gemm(self, device: Device, m: int, n: int, k: int, dtype: str) -> OpCost:
        """[m, k] x [k, n] matrix product."""

    def expert_ffn(self, device: Device, tokens_per_expert: np.ndarray, hidden_size: int,
                   intermediate_size: int, dtype: str) -> OpCost:
        """A grouped SwiGLU expert FFN: expert e gets tokens_per_expert[e] rows (zeros are skipped)."""

    def router(self, device: Device, tokens: int, hidden_size: int, num_experts: int, dtype: str) -> OpCost:
        """Router GEMM [tokens, hidden] x [hidden, experts] plus softmax/top-k over the logits."""


def gemm_flops(m, n, k):
    return 2.0 * np.asarray(m, dtype=float) * n * k


def gemm_bytes(m, n, k, dtype_bytes):
    m = np.asarray(m, dtype=float)
    return (m * k + k * n + m * n) * dtype_bytes


def softmax_topk_bytes(tokens, num_experts):
    """Bytes of the router's softmax + top-k: it reads and writes the fp32 logits [tokens, experts] once each."""
    return 2.0 * tokens * num_experts * DTYPE_BYTES[LOGIT_DTYPE]


def ffn_work(tokens_per_expert: np.ndarray, hidden_size: int, intermediate_size: int, dtype_bytes: int):
    """FLOPs and bytes of the two GEMMs of a SwiGLU expert, per expert.

    gate+up: [n, h] x [h, 2f]; down: [n, f] x [f, h]. Returns arrays (flops_up, bytes_up, flops_down, bytes_down).
    The elementwise SiLU*mul is folded into the GEMMs' epilogue (not counted separately).
    """
    n = np.asarray(tokens_per_expert, dtype=float)
    h, f = hidden_size, intermediate_size
    return (gemm_flops(n, 2 * f, h), gemm_bytes(n, 2 * f, h, dtype_bytes),
            gemm_flops(n, h, f), gemm_bytes(n, h, f, dtype_bytes))


@dataclass(frozen=True)
class RooflineCost:
    """Pure roofline from spec numbers, with optional efficiency factors (1.0 = peak).

    ``compute_efficiency`` and ``memory_efficiency`` scale the peaks; ``launch_latency_s``
    overrides the device's spec value when given.
    """

    compute_efficiency: float = 1.0
    memory_efficiency: float = 1.0
    launch_latency_s: float | None = None
    name: str = "roofline"

    def __post_init__(self):
        if not (0 < self.compute_efficiency <= 1.5 and 0 < self.memory_efficiency <= 1.5):
            raise ValueError("efficiency factors must lie in (0, 1.5]")

    def _launch(self, device: Device) -> float:
        return device.launch_latency_s if self.launch_latency_s is None else self.launch_latency_s

    def _roof(self, device: Device, flops, bytes_, dtype: str):
        peak = device.peak(dtype) * self.compute_efficiency
        bw = device.main_memory.bandwidth_bytes_per_s * self.memory_efficiency
        return np.maximum(np.asarray(flops) / peak, np.asarray(bytes_) / bw)

    def gemm(self, device: Device, m: int, n: int, k: int, dtype: str) -> OpCost:
        b = DTYPE_BYTES[dtype]
        flops, bytes_ = float(gemm_flops(m, n, k)), float(gemm_bytes(m, n, k, b))
        if m == 0:
            return OpCost(0.0, 0.0, 0.0)
        return OpCost(self._launch(device) + float(self._roof(device, flops, bytes_, dtype)), flops, bytes_)

    def expert_ffn(self, device, tokens_per_expert, hidden_size, intermediate_size, dtype) -> OpCost:
        tokens_per_expert = np.asarray(tokens_per_expert)
        active = tokens_per_expert[tokens_per_expert > 0]
        if active.size == 0:
            return OpCost(0.0, 0.0, 0.0)
        fu, bu, fd, bd = ffn_work(active, hidden_size, intermediate_size, DTYPE_BYTES[dtype])
        t = 2 * self._launch(device) + float(self._roof(device, fu, bu, dtype).sum() + self._roof(device, fd, bd, dtype).sum())
        return OpCost(t, float(fu.sum() + fd.sum()), float(bu.sum() + bd.sum()))

    def router(self, device, tokens, hidden_size, num_experts, dtype) -> OpCost:
        if tokens == 0:
            return OpCost(0.0, 0.0, 0.0)
        g = self.gemm(device, tokens, num_experts, hidden_size, dtype)
        sm_bytes = softmax_topk_bytes(tokens, num_experts)
        t = g.time_s + self._launch(device) + sm_bytes / (device.main_memory.bandwidth_bytes_per_s * self.memory_efficiency)
        return OpCost(t, g.flops, g.bytes + sm_bytes)
