"""Calibrated fits are refused or bounded by physics: fewer shapes than parameters is no fit; a peak or
bandwidth beyond any machine means "not limiting"; a launch below a nanosecond is 0; a fitted peak above
the device's datasheet peak (efficiency > 1) is lowered to it."""

import numpy as np
import pytest

from hwmodels.calib_profile import Kernels
from hwmodels.calibrated import TooFewShapesError, fit_op


def _kernels(flops, bytes_):
    n = len(flops)
    return Kernels(row=np.arange(n), flops=np.asarray(flops, float), bytes=np.asarray(bytes_, float),
                   launches=np.ones(n))


def test_fewer_shapes_than_parameters_is_refused():
    kern = _kernels([1e9, 2e9], [1e6, 3e6])  # 3 parameters (launch, peak, bandwidth), 2 shapes
    with pytest.raises(TooFewShapesError, match=r"2 measured shape\(s\) cannot determine 3 parameters"):
        fit_op("router", kern, np.array([1e-3, 2e-3]))


def test_unseen_limits_are_not_limiting_and_tiny_launch_is_zero():
    # pure compute-bound data with no launch cost: bandwidth and launch are invisible to the fit
    flops = np.array([1e9, 2e9, 4e9, 8e9, 16e9])
    kern = _kernels(flops, np.full(5, 1e3))  # a few bytes each: memory never binds
    fit = fit_op("gemm", kern, flops / 1e11)
    assert fit.peak_flops_per_s == pytest.approx(1e11, rel=1e-3)
    assert fit.bandwidth_bytes_per_s == float("inf") or fit.bandwidth_bytes_per_s <= 1e16  # never 1e26
    assert fit.launch_s == 0.0 or fit.launch_s >= 1e-9  # never 8.76e-27 s


def test_fitted_peak_above_the_datasheet_is_lowered(recwarn):
    from dataclasses import replace

    from hwmodels.calibrated import CalibratedCost, OpFit, CalibrationWarning
    from tests.conftest import make_system

    device = make_system(1, peak_flops_per_s=1e12).device
    fit = OpFit(op="gemm", launch_s=1e-6, peak_flops_per_s=5e12, bandwidth_bytes_per_s=1e11, rows=8, train_mape=1.0)
    cost = CalibratedCost(fits={"gemm": fit}, tables={}, dtype="bf16", device_name="toy")
    bounded = cost.bounded_by(device)
    assert bounded.fits["gemm"].peak_flops_per_s == 1e12
    assert cost.fits["gemm"].peak_flops_per_s == 5e12  # the original is not changed
    assert any(issubclass(w.category, CalibrationWarning) and "exceeds" in str(w.message) for w in recwarn)
    assert replace(fit, peak_flops_per_s=1e11) == replace(bounded.fits["gemm"], peak_flops_per_s=1e11)
