"""Calibrated cost model: exact recovery of a fake device's known formula, bad input, simulator wiring.
No torch needed here (the fake device's times are computed, not measured)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from hwmodels.calib_profile import (ProfileError, make_rows, op_kernels, read_profile, write_profile)
from hwmodels.calibrated import CalibratedCost, CalibrationWarning
from hwmodels.cost import COST_MODELS, DTYPE_BYTES
from hwmodels.specs import load_device
from moesim.calibrate.grids import make_grid, tokens_per_expert

# the fake device: per op (launch_s, peak FLOP/s, bandwidth B/s); inf = never limiting. Grids include
# compute- and memory-bound kernels of every op whose peak is finite, so all parameters are identifiable.
TRUTH = {
    "gemm": (3e-6, 2.0e11, 1.0e10),  # ridge 20 FLOP/B: small-m shapes are memory-bound
    "grouped_ffn": (5e-6, 1.5e11, 2.0e10),
    "router": (4e-6, 5.0e10, 1.0e10),
    "permute": (2e-6, np.inf, 2.5e10),
    "unpermute": (2.5e-6, np.inf, 1.5e10),  # memory-bound: its few FLOPs never limit
    "copy_d2d": (1e-6, np.inf, 4.0e10),
}
META = {"device_name": "Fake Device X1 (test)", "device_kind": "cpu", "dtype": "fp32", "timer": "formula"}


def fake_times(rows: pd.DataFrame) -> np.ndarray:
    """Times (s) by the known formula: launches*L + sum_k max(F_k/P, B_k/W)."""
    out = np.empty(len(rows))
    for op, (launch, peak, bw) in TRUTH.items():
        idx = np.flatnonzero(rows["op"].to_numpy() == op)
        sub = rows.iloc[idx].reset_index(drop=True)
        kern = op_kernels(op, sub, DTYPE_BYTES["fp32"])
        per_k = np.maximum(kern.flops / peak, kern.bytes / bw)
        out[idx] = kern.launches * launch + np.bincount(kern.row, weights=per_k, minlength=len(sub))
    return out


def fake_profile(tmp_path, grid="small", meta=META):
    specs = [s for s in make_grid(grid) if s["op"] in TRUTH]
    rows = make_rows([{**s, "dtype": "fp32", "median_s": 1.0} for s in specs])
    rows["median_s"] = rows["min_s"] = rows["max_s"] = fake_times(rows)
    path = write_profile(rows, meta, tmp_path / "fake.parquet")
    return path, rows


def test_fit_recovers_fake_device_exactly(tmp_path):
    path, rows = fake_profile(tmp_path)
    cost = CalibratedCost.fit(read_profile(path))
    for op, (launch, peak, bw) in TRUTH.items():
        f = cost.fits[op]
        assert f.launch_s == pytest.approx(launch, rel=1e-6), op
        assert f.bandwidth_bytes_per_s == pytest.approx(bw, rel=1e-6), op
        if np.isfinite(peak):
            assert f.peak_flops_per_s == pytest.approx(peak, rel=1e-6), op
        else:  # not identifiable, but must not limit any kernel (all have intensity < 1 FLOP/B)
            assert f.peak_flops_per_s >= 10 * f.bandwidth_bytes_per_s
        assert f.train_mape < 1e-4
    # both modes reproduce every measured time
    for mode in ("roofline", "auto"):
        c = CalibratedCost.fit(read_profile(path), mode=mode, fold_permute=False)
        pred = np.array([c.predict_row(r["op"], r) for r in rows.to_dict("records")])
        np.testing.assert_allclose(pred, rows["median_s"].to_numpy(), rtol=1e-6)


def test_cost_model_protocol_matches_formula_by_hand(tmp_path):
    path, _ = fake_profile(tmp_path)
    cost = CalibratedCost.fit(read_profile(path), fold_permute=False)
    launch, peak, bw = TRUTH["gemm"]
    m, n, k = 64, 256, 256  # a measured shape of the small grid
    flops, bytes_ = 2.0 * m * n * k, (m * k + k * n + m * n) * 4
    c = cost.gemm(None, m, n, k, "fp32")
    assert c.time_s == pytest.approx(launch + max(flops / peak, bytes_ / bw), rel=1e-6)
    assert (c.flops, c.bytes) == (flops, bytes_)
    # expert FFN through the protocol: SwiGLU kernels per active expert, 3 launches each
    tpe = tokens_per_expert("flame-L4", 256, 16, 2)
    launch, peak, bw = TRUTH["grouped_ffn"]
    h, f = 256, 512
    expect = 0.0
    for n_e in tpe[tpe > 0].astype(float):
        expect += 3 * launch + max(2 * n_e * 2 * f * h / peak, (n_e * h + h * 2 * f + n_e * 2 * f) * 4 / bw)
        expect += 3 * n_e * f * 4 / bw  # SiLU*mul is memory-bound at these rates
        expect += max(2 * n_e * h * f / peak, (n_e * f + f * h + n_e * h) * 4 / bw)
    assert cost.expert_ffn(None, tpe, h, f, "fp32").time_s == pytest.approx(expect, rel=1e-6)
    assert cost.expert_ffn(None, np.zeros(16), h, f, "fp32").time_s == 0.0


def test_shape_outside_profile_warns_and_falls_back_to_roofline(tmp_path):
    path, _ = fake_profile(tmp_path)
    auto = CalibratedCost.fit(read_profile(path), mode="auto")
    roof = CalibratedCost.fit(read_profile(path), mode="roofline")
    with pytest.warns(CalibrationWarning, match="outside the profiled range.*falling back to the fitted roofline"):
        t = auto.gemm(None, 8192, 256, 256, "fp32").time_s
    assert t == roof.gemm(None, 8192, 256, 256, "fp32").time_s
    with warnings.catch_warnings():  # inside the range: no warning
        warnings.simplefilter("error", CalibrationWarning)
        auto.gemm(None, 100, 256, 256, "fp32")


def test_missing_op_uses_spec_roofline_with_warning(tmp_path):
    specs = [s for s in make_grid("small") if s["op"] == "gemm"]
    rows = make_rows([{**s, "dtype": "fp32", "median_s": 1.0} for s in specs])
    rows["median_s"] = rows["min_s"] = rows["max_s"] = fake_times(rows)
    path = write_profile(rows, META, tmp_path / "gemm_only.parquet")
    cost = CalibratedCost.fit(read_profile(path))
    dev = load_device("hwmodels/specs/h100-sxm.toml")
    dev = type(dev)(**{**dev.__dict__, "peak_flops_per_s": {"fp32": 1e11}})
    with pytest.warns(CalibrationWarning, match="no 'router' measurements"):
        t = cost.router(dev, 128, 256, 16, "fp32").time_s
    assert t == pytest.approx(COST_MODELS["roofline"]().router(dev, 128, 256, 16, "fp32").time_s)


def test_bad_profiles_raise_clear_errors(tmp_path):
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    with pytest.raises(ProfileError, match="not a readable Parquet"):
        read_profile(empty)
    with pytest.raises(ProfileError, match="no moesim profile header"):
        read_profile("workloads/data/flame_moe_290m.parquet")  # a trace, not a profile
    with pytest.raises(ProfileError, match="no such profile"):
        read_profile(tmp_path / "missing.parquet")
    rows = make_rows([{"op": "gemm", "m": 8, "n": 8, "k": 8, "dtype": "fp32", "median_s": 1e-6}])
    with pytest.raises(ProfileError, match="no measurements"):
        write_profile(rows.iloc[:0], META, tmp_path / "zero.parquet")
    bad = rows.copy()
    bad["median_s"] = -1.0
    with pytest.raises(ProfileError, match="'median_s' must be finite and > 0"):
        write_profile(bad, META, tmp_path / "neg.parquet")
    with pytest.raises(ProfileError, match="lacks"):
        write_profile(rows, {"device_name": "x"}, tmp_path / "nometa.parquet")


def test_profile_for_another_device_and_missing_profile(tmp_path):
    path, _ = fake_profile(tmp_path)
    h100 = load_device("hwmodels/specs/h100-sxm.toml")
    with pytest.raises(ProfileError, match="measured on 'Fake Device X1.*simulated device is 'NVIDIA H100"):
        COST_MODELS["calibrated"].from_profile(str(path), h100)
    with pytest.raises(ValueError, match="needs a kernel-timing profile"):
        COST_MODELS["calibrated"].from_profile(None, h100)
    from moesim.cli.simulate import resolve_cost  # the CLI names the flags

    with pytest.raises(ValueError, match="needs --profile"):
        resolve_cost("calibrated", None, h100)
    # an H100 profile whose torch name differs from the spec name still matches (same model token)
    path2, _ = fake_profile(tmp_path / "h", meta={**META, "device_name": "NVIDIA H100 80GB HBM3"})
    assert COST_MODELS["calibrated"].from_profile(str(path2), h100).device_name == "NVIDIA H100 80GB HBM3"
    cost = CalibratedCost.fit(read_profile(path))
    with pytest.raises(ValueError, match="measured in fp32, not bf16"):
        cost.gemm(None, 64, 256, 256, "bf16")


def test_cli_words_profile_errors_in_its_flags(tmp_path, capsys):
    """hwmodels words its errors without CLI flags; ``moesim simulate`` adds them."""
    from moesim.cli import main
    from moesim.cli.calibrate import write_fitted_specs

    path, _ = fake_profile(tmp_path)
    _, system = write_fitted_specs(CalibratedCost.fit(read_profile(path)), path, "cpu")
    rc = main(["simulate", "--system", str(system), "--cost", "calibrated", "--profile", str(path),
               "--dtype", "bf16", "--out", str(tmp_path / "run")])
    assert rc == 2
    assert "simulate with --dtype fp32 or calibrate with --dtype bf16" in capsys.readouterr().err


def test_simulate_with_calibrated_cost_on_fitted_system(tmp_path):
    from moesim.cli import main

    path, _ = fake_profile(tmp_path, grid="default")
    from moesim.cli.calibrate import write_fitted_specs

    cost = CalibratedCost.fit(read_profile(path))
    _, system = write_fitted_specs(cost, path, "cpu")
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        rc = main(["simulate", "--system", str(system), "--cost", "calibrated", "--profile", str(path),
                   "--dtype", "fp32", "--out", str(out)])
    assert rc == 0
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["cost_model"] == "calibrated"
    assert summary["device"] == META["device_name"]
    # simulated layer time is at least the calibrated expert FFN time of the layer's busiest work
    from workloads.importers import load_trace

    trace = load_trace("default")
    load = trace.expert_load()[0]
    ffn = cost.expert_ffn(None, load, 1024, 704, "fp32").time_s
    assert summary["layer_time_s"][0] >= ffn


def test_published_checks_have_sources_and_errors():
    from moesim.calibrate.validate import published_checks

    pub = published_checks()
    assert len(pub) >= 6
    assert pub["source"].str.contains("deepseek-ai/Deep").all()
    np.testing.assert_allclose(pub["error_pct"], (pub["predicted"] / pub["published"] - 1) * 100)
    first = pub.iloc[0]  # 4 x 8192 x 4096 x 7168 fp8 on the H100 spec roofline (1978.9 TFLOPS, 4 us launch)
    flops = 2.0 * 4 * 8192 * 4096 * 7168
    t = 4e-6 + 4 * flops / 4 / 1978.9e12
    assert first["predicted"] == pytest.approx(flops / t / 1e12, rel=1e-9)
