"""moesim: a hardware simulator and co-design toolkit for Mixture-of-Experts models."""

from moesim.placement import Placement, contiguous
from moesim.sim import Result, SimOptions, simulate

__all__ = ["Placement", "Result", "SimOptions", "contiguous", "simulate", "capture"]
__version__ = "0.1.0"


def capture(*args, **kwargs):
    """Record routing decisions of a PyTorch MoE model (see workloads.capture; needs moesim[capture])."""
    from workloads.capture import capture as _capture

    return _capture(*args, **kwargs)
