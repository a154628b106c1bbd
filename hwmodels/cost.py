"""The cost models by name (``moesim simulate --cost NAME``).

Below this module: :mod:`hwmodels.roofline` (the :class:`CostModel` protocol, work formulas and the
spec roofline), :mod:`hwmodels.calibrated` (fitted from a measured profile) and :mod:`hwmodels.gpu_cost`
(the tile/wave GPU model with shipped fitted parameters). This module only names them, so that nothing
below it needs to import it. :func:`default_cost_model` picks the default for a device.
"""

from __future__ import annotations

from hwmodels.calibrated import CalibratedCost
from hwmodels.collectives import COMM_KERNEL_SMS, BottleneckLinkAllToAll, FittedAllToAll
from hwmodels.gpu_cost import GpuFittedCost
from hwmodels.roofline import (DTYPE_BYTES, CostModel, OpCost, RooflineCost, ffn_work, gemm_bytes,
                               gemm_flops)
from hwmodels.specs import Device, System

__all__ = ["COMM_KERNEL_SMS", "COST_MODELS", "BottleneckLinkAllToAll", "CalibratedCost", "CostModel", "DTYPE_BYTES",
           "DEFAULT_COST", "FittedAllToAll", "GpuFittedCost", "OpCost", "RooflineCost", "collective_model",
           "cost_model", "cost_names", "default_cost_model", "describe_cost", "ffn_work", "gemm_bytes", "gemm_flops",
           "overlapped_cost"]

COST_MODELS = {"roofline": RooflineCost, "calibrated": CalibratedCost, "gpu-fitted": GpuFittedCost}
"""name -> factory; ``calibrated`` is built with ``CalibratedCost.from_profile(path, device)``."""
DEFAULT_COST = "default"
"""The name that means :func:`default_cost_model` of the device."""


def cost_names(with_profile: bool = False) -> tuple[str, ...]:
    """The names :func:`cost_model` accepts: ``default`` and the :data:`COST_MODELS` built without a measured
    profile (with ``with_profile``, also those built ``from_profile``)."""
    return (DEFAULT_COST, *(n for n, f in COST_MODELS.items() if with_profile or not hasattr(f, "from_profile")))


def cost_model(name: str, device: Device) -> CostModel:
    """The cost model called ``name`` (one of :func:`cost_names`) for ``device``; ValueError naming the known
    ones otherwise (a profile-built model needs its profile: ``COST_MODELS[name].from_profile``)."""
    if name == DEFAULT_COST:
        return default_cost_model(device)
    if name not in cost_names():
        raise ValueError(f"cost model {name!r} is not usable without a profile (known: {', '.join(cost_names())})")
    return COST_MODELS[name]()


def default_cost_model(device: Device) -> CostModel:
    """The fitted GPU model for a device whose spec names shipped fitted parameters (``gpu_fit``), else the
    spec roofline."""
    return GpuFittedCost() if device.gpu_fit else RooflineCost()


def collective_model(cost: CostModel, system: System):
    """The all-to-all model ``cost`` uses on ``system`` (``cost.collective(system)``); cost models without one
    (roofline, calibrated) use the spec bottleneck-link model, :class:`BottleneckLinkAllToAll`.
    The model has ``name``, ``describe()`` and ``duration_s(routing, pair_bytes)``."""
    make = getattr(cost, "collective", None)
    return make(system) if make is not None else BottleneckLinkAllToAll()


def overlapped_cost(cost: CostModel, comm_sms: int) -> CostModel:
    """``cost`` while a communication kernel holds ``comm_sms`` SMs (``cost.with_overlap_sms``); cost models
    without a notion of SMs (roofline, calibrated) return themselves unchanged."""
    make = getattr(cost, "with_overlap_sms", None)
    return make(comm_sms) if make is not None and comm_sms > 0 else cost


def describe_cost(cost: CostModel, device: Device | None = None, dtype: str | None = None,
                  system: System | None = None) -> str:
    """One line: which cost model, what it was fitted on, its validated error; with ``system``, also its
    all-to-all model."""
    a2a = f"; all-to-all: {collective_model(cost, system).describe()}" if system is not None else ""
    return _describe_compute(cost, device, dtype) + a2a


def _describe_compute(cost: CostModel, device: Device | None, dtype: str | None) -> str:
    describe = getattr(cost, "describe", None)
    if describe is not None:
        return describe(device, dtype)
    if isinstance(cost, RooflineCost):
        return ("roofline: datasheet peaks and bandwidths of the spec, not fitted to measurements (GPU GEMMs "
                "measure 1.3-2x slower, docs/validation.md)")
    if isinstance(cost, CalibratedCost):
        return f"calibrated: fitted to profile {cost.profile_path} measured on {cost.device_name}"
    return getattr(cost, "name", type(cost).__name__)
