"""The ``calibrated`` entry of :data:`hwmodels.cost.COST_MODELS`, importable without an import cycle
(:mod:`hwmodels.calibrated` itself imports :mod:`hwmodels.cost`)."""

from __future__ import annotations


class CalibratedEntry:
    """Factory used by ``moesim simulate --cost calibrated --profile P``."""

    name = "calibrated"

    @staticmethod
    def from_profile(profile_path, device=None, **kwargs):
        from hwmodels.calibrated import CalibratedCost

        return CalibratedCost.from_profile(profile_path, device, **kwargs)
