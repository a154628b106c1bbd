"""moesim: a hardware simulator and co-design toolkit for Mixture-of-Experts models.

Top-level names are imported lazily so that ``import moebase.units`` (used by the spec loader)
does not pull in the simulator.
"""

__version__ = "0.1.0"
__all__ = ["Placement", "Result", "SimOptions", "contiguous", "simulate", "capture"]


def __getattr__(name):
    if name in ("Placement", "contiguous"):
        from moesim import placement

        return getattr(placement, name)
    if name in ("Result", "SimOptions", "simulate"):
        from moesim import sim

        return getattr(sim, name)
    raise AttributeError(f"module 'moesim' has no attribute {name!r}")


def capture(*args, **kwargs):
    """Record routing decisions of a PyTorch MoE model (see workloads.capture; needs moesim[capture])."""
    from workloads.capture import capture as _capture

    return _capture(*args, **kwargs)
