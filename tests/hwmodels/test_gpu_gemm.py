"""The tile/wave GPU GEMM model, its fit, the shipped fits and the default cost model."""

from pathlib import Path

import numpy as np
import pytest

from hwmodels.cost import COST_MODELS, RooflineCost, default_cost_model, describe_cost
from hwmodels.gpu_cost import GpuFittedCost, read_gpu_fit
from hwmodels.gpu_gemm import (GemmParams, GpuShape, fit_gemm_params, gemm_time_s, grouped_gemm_time_s,
                               stream_time_s)
from hwmodels.specs import SPEC_DIR, load_device, load_system

REPO = Path(__file__).resolve().parents[2]
SHARED_GPU_DATA = REPO.parent / "shared" / "data" / "gpu-timings"

GPU = GpuShape(peak_flops_per_s=400e12, bandwidth_bytes_per_s=2e12, num_sms=100, dtype_bytes=2)


def test_fit_recovers_a_synthetic_gpus_known_parameters():
    # feed 33 GB/s per SM limits tiles up to 128x128 but not 128x256 here, so every parameter shows in the times
    true = GemmParams(compute_efficiency=0.62, memory_efficiency=0.71, overhead_s=6e-6,
                      operand_feed_bytes_per_s=33e9, tile_epilogue_s=0.8e-6)
    m = np.repeat([1, 8, 48, 96, 200, 333, 640, 1024, 1500, 2048, 3000, 4096], 9)
    n = np.tile([1024, 2560, 4096, 5120, 8192, 11008, 14336, 20480, 28672], 12)
    k = np.tile([4096, 8192, 2048, 1024, 5120, 3072, 4096, 8192, 1536], 12)
    t = gemm_time_s(m, n, k, GPU, true)
    fit = fit_gemm_params(m, n, k, t, GPU)
    assert fit.train_mape_pct < 0.5
    for key, want in true.__dict__.items():
        assert getattr(fit.params, key) == pytest.approx(want, rel=0.05), key


def test_wave_quantisation_adds_a_whole_wave():
    # compute-bound tiles only: memory and feed effectively free, no overheads
    p = GemmParams(1.0, 1.5, 0.0, 1e30, 0.0)
    gpu = GpuShape(400e12, 1e30, 100, 2)
    one_wave = float(gemm_time_s(128 * 10, 256 * 10, 4096, gpu, p))     # 100 tiles of 128x256: one wave
    over = float(gemm_time_s(128 * 10 + 1, 256 * 10, 4096, gpu, p))     # one more row: padded tiles
    tile_s = 2 * 128 * 256 * 4096 / (400e12 / 100)
    assert one_wave == pytest.approx(tile_s)
    assert over > one_wave * 1.05  # the extra row costs far more than its 0.1 % of the work


def test_grouped_gemm_pads_every_group_to_the_tile():
    p = GemmParams(1.0, 1.5, 0.0, 1e30, 0.0)
    gpu = GpuShape(400e12, 1e30, 100, 2)
    spread = grouped_gemm_time_s([1] * 64, 4096, 4096, gpu, p)   # 64 groups of one token each
    packed = grouped_gemm_time_s([64], 4096, 4096, gpu, p)       # the same 64 tokens in one group
    assert spread > 10 * packed
    assert grouped_gemm_time_s([0, 0], 4096, 4096, gpu, p) == 0.0


def test_small_m_is_memory_bound():
    p = GemmParams(0.8, 0.5, 0.0, 1e30, 0.0)
    t = float(gemm_time_s(1, 8192, 8192, GPU, p))
    assert t == pytest.approx((8192 + 8192 * 8192 + 8192) * 2 / (GPU.bandwidth_bytes_per_s * 0.5))
    assert float(stream_time_s(0, GPU, p)) == 0.0


def test_default_cost_model_follows_the_spec_attribute():
    h800 = load_system("hgx-h800").device
    assert h800.gpu_fit == "h100-vidur"
    assert isinstance(default_cost_model(h800), GpuFittedCost)
    sn40l = load_device(SPEC_DIR / "sn40l.toml")
    assert sn40l.gpu_fit is None and isinstance(default_cost_model(sn40l), RooflineCost)
    assert "gpu-fitted" in COST_MODELS and "roofline" in COST_MODELS


def test_fitted_cost_is_slower_than_the_roofline_and_describes_itself():
    dev = load_device(SPEC_DIR / "h800-sxm.toml")
    fitted, roof = GpuFittedCost(), RooflineCost(launch_latency_s=0.0)
    for m in (1, 64, 300, 4096):
        assert fitted.gemm(dev, m, 7168, 2048, "bf16").time_s > roof.gemm(dev, m, 7168, 2048, "bf16").time_s
    tpe = np.array([0, 37, 5, 120])
    ffn = fitted.expert_ffn(dev, tpe, 7168, 2048, "bf16")
    assert ffn.flops == pytest.approx(roof.expert_ffn(dev, tpe, 7168, 2048, "bf16").flops)
    text = describe_cost(fitted, dev, "fp32")
    assert "vidur" in text and "leave-one-model-out MAPE" in text and "extrapolated" in text
    fp8 = describe_cost(fitted, dev, "fp8")
    assert "DeepGEMM" in fp8 and "held-out MAPE contiguous" in fp8 and "extrapolated" not in fp8
    assert "not fitted" in describe_cost(RooflineCost(), dev, "bf16")


def test_comm_overlap_takes_sms_from_compute():
    dev = load_device(SPEC_DIR / "h800-sxm.toml")
    alone = GpuFittedCost().gemm(dev, 4096, 7168, 2048, "bf16").time_s
    shared = GpuFittedCost(overlap_sms=24).gemm(dev, 4096, 7168, 2048, "bf16").time_s
    assert shared > alone


def test_shipped_fits_name_their_data_and_errors():
    for name in ("h100-vidur", "a100-vidur"):
        fit = read_gpu_fit(name)
        assert "vidur" in fit.provenance["data"] and "MIT" in fit.provenance["licence"]
        assert (Path(fit.path).parent / "LICENSE-vidur").is_file()
        assert fit.validation["lomo_mape_pct"] > 0 and fit.num_sms > 0


def test_bad_fit_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.toml"
    bad.write_text("[fit]\nnum_sms = 132\n")
    with pytest.raises(ValueError, match="x.toml.*fit.params"):
        read_gpu_fit(bad)
    with pytest.raises(ValueError, match="unknown GPU fit 'nope'"):
        read_gpu_fit("nope")


@pytest.mark.skipif(not SHARED_GPU_DATA.is_dir(), reason=f"shared GPU timing data not found at {SHARED_GPU_DATA}")
def test_leave_one_model_out_on_vidur_h100_stays_under_15_percent():
    from hwmodels.gpu_fit import fit_vidur

    res = fit_vidur(SHARED_GPU_DATA, "h100")
    assert len(res["lomo"]) == 3
    assert res["lomo"]["mape_pct"].max() < 15.0
    # the shipped fit is the one this data gives
    shipped = read_gpu_fit("h100-vidur")
    assert shipped.params["fp16"].compute_efficiency == pytest.approx(
        res["fit"].params["fp16"].compute_efficiency, rel=1e-3)


def _deepgemm_doc(rows):
    return {"dense_gemm": [{"m": m, "n": n, "k": k, "value_tflops": v} for m, n, k, v in rows]}


def test_fp8_fit_uses_only_the_dense_table_and_holds_out_the_grouped_ones():
    from hwmodels.gpu_fit import deepgemm_checks, fit_deepgemm_fp8, published

    doc, dev = published(), load_device(SPEC_DIR / "h800-sxm.toml")
    base = read_gpu_fit("h100-vidur")
    fp16_only = type(base)(name=base.name, num_sms=base.num_sms, params={"fp16": base.params["fp16"]},
                           provenance=base.provenance, validation={})
    fitted, gemm_fit = fit_deepgemm_fp8(fp16_only, dev, doc)
    assert gemm_fit.rows == len(doc["dense_gemm"]) == 18
    # moving the grouped tables does not move the fit: they are never fitted on
    moved = {**doc, "grouped_gemm": [{**e, "value_tflops": e["value_tflops"] * 3} for e in doc["grouped_gemm"]]}
    again, _ = fit_deepgemm_fp8(fp16_only, dev, moved)
    assert again.params["fp8"] == fitted.params["fp8"]
    checks = deepgemm_checks(fitted, dev, doc)
    assert set(checks.loc[checks["role"] == "held-out", "layout"]) == {"contiguous", "masked"}
    assert set(checks.loc[checks["role"] == "fit", "layout"]) == {"dense"}
    v = fitted.validation
    assert v["fp8_train_mape_pct"] == pytest.approx(gemm_fit.train_mape_pct, abs=0.01)
    for layout in ("contiguous", "masked"):
        held = checks[(checks["role"] == "held-out") & (checks["layout"] == layout)]
        assert v[f"fp8_heldout_{layout}_mape_pct"] == pytest.approx(held["error_pct"].abs().mean(), abs=0.01)
    # the shipped fit carries these fp8 parameters (re-fit: python -m hwmodels.gpu_fit)
    for key, want in fitted.params["fp8"].__dict__.items():
        assert getattr(base.params["fp8"], key) == pytest.approx(want, rel=1e-3), key
    assert base.validation["fp8_heldout_masked_mape_pct"] == pytest.approx(v["fp8_heldout_masked_mape_pct"], abs=0.05)


def test_fp8_fit_recovers_a_synthetic_dense_table():
    from hwmodels.gpu_fit import fit_deepgemm_fp8, gpu_shape
    from moebase.units import TFLOPS

    dev, base = load_device(SPEC_DIR / "h800-sxm.toml"), read_gpu_fit("h100-vidur")
    true = GemmParams(0.6, 0.8, 3e-6, 1e30, 2e-6)
    gpu = gpu_shape(dev, "fp8", base.num_sms)
    shapes = [(m, n, k) for m in (64, 128, 1024, 4096) for n, k in ((2112, 7168), (24576, 1536), (7168, 2048),
                                                                     (4096, 7168), (32768, 512))]
    rows = [(m, n, k, 2 * m * n * k / float(gemm_time_s(m, n, k, gpu, true)) / TFLOPS) for m, n, k in shapes]
    _, fit = fit_deepgemm_fp8(base, dev, _deepgemm_doc(rows))
    assert fit.train_mape_pct < 1.0
    assert fit.params.compute_efficiency == pytest.approx(0.6, rel=0.05)
    assert fit.params.tile_epilogue_s == pytest.approx(2e-6, rel=0.1)


def test_dense_table_errors_name_the_problem():
    from hwmodels.gpu_fit import deepgemm_dense

    with pytest.raises(ValueError, match="no \\[\\[dense_gemm\\]\\]"):
        deepgemm_dense({})
    with pytest.raises(ValueError, match="dense_gemm.*'k'"):
        deepgemm_dense({"dense_gemm": [{"m": 64, "n": 128, "value_tflops": 1.0}]})
    with pytest.raises(ValueError, match="positive"):
        deepgemm_dense(_deepgemm_doc([(64, 128, 256, 0.0)]))
