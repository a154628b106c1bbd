"""``moesim calibrate --from-torch-profile``: a CPU trace written here with torch.profiler, and a hand-built
GPU-style Kineto trace."""

import json

import pytest

from hwmodels.calib_profile import read_profile
from hwmodels.calibrated import CalibratedCost
from moesim.calibrate.torch_profile import ShapeHints, classify, load_trace, profile_from_trace
from moesim.cli import main


def test_cpu_trace_written_by_torch_profiler(tmp_path):
    torch = pytest.importorskip("torch")
    from torch.profiler import ProfilerActivity, profile

    a, bs = torch.randn(48, 96), [torch.randn(96, n) for n in (24, 56, 88)]
    lin = torch.nn.Linear(96, 40)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(4):
            for b in bs:
                a @ b
            lin(a)
            torch.sort(a, dim=1)  # not an operator moesim models: must be listed as unmapped
    path = tmp_path / "cpu_trace.json"
    prof.export_chrome_trace(str(path))
    out = tmp_path / "prof.parquet"
    assert main(["calibrate", "--from-torch-profile", str(path), "--out", str(out)]) == 0
    p = read_profile(out)
    shapes = {(r["m"], r["n"], r["k"]) for r in p.rows.to_dict("records")}
    assert shapes == {(48, 24, 96), (48, 56, 96), (48, 88, 96), (48, 40, 96)}
    assert set(p.rows["repeats"]) == {4} and p.dtype == "fp32"
    unmapped = {u["name"] for u in p.meta["torch_profile"]["unmapped"]}
    assert "aten::sort" in unmapped
    assert CalibratedCost.fit(p).fits["gemm"].rows == 4


def _gpu_trace(with_shapes=True):
    ev = [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 50, "pid": 1, "tid": 1,
           "args": {"External id": 7, "Input Dims": [[256, 4096], [4096, 1024]] if with_shapes else [],
                    "Input type": ["c10::BFloat16", "c10::BFloat16"]}}]
    gemm = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_cublas"
    for i, dur in enumerate((30.0, 32.0, 31.0)):
        ev.append({"ph": "X", "cat": "kernel", "name": gemm, "ts": 100 + 100 * i, "dur": dur, "pid": 0, "tid": 7,
                   "args": {"External id": 7, "device": 0}})
    ev += [{"ph": "X", "cat": "kernel", "name": "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage)",
            "ts": 500, "dur": 40, "pid": 0, "tid": 8, "args": {}},
           {"ph": "X", "cat": "kernel", "name": "void deep_ep::intranode::dispatch<8, 768, 8192>(int4*, float*)",
            "ts": 600, "dur": 80, "pid": 0, "tid": 8, "args": {}},
           {"ph": "X", "cat": "kernel", "name": "void deep_ep::intranode::combine<__nv_bfloat16, 8, 768>(int)",
            "ts": 700, "dur": 90, "pid": 0, "tid": 8, "args": {}},
           {"ph": "X", "cat": "kernel", "name": "flash_fwd_kernel<Flash_fwd_kernel_traits<128, 64>>", "ts": 800,
            "dur": 60, "pid": 0, "tid": 7, "args": {}},
           {"ph": "X", "cat": "kernel", "name": "my_fused_router_topk_kernel", "ts": 900, "dur": 5, "pid": 0,
            "tid": 7, "args": {}},
           {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pageable -> Device)", "ts": 1000, "dur": 20,
            "pid": 0, "tid": 9, "args": {"bytes": 1048576}}]
    return {"deviceProperties": [{"name": "NVIDIA H100 80GB HBM3"}], "traceEvents": ev}


def test_hand_built_gpu_trace(tmp_path):
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(_gpu_trace()))
    rows, meta, summary = profile_from_trace(load_trace(path), source=str(path))
    gemm = rows[rows["op"] == "gemm"].iloc[0]
    assert (gemm["m"], gemm["n"], gemm["k"], gemm["repeats"]) == (256, 1024, 4096, 3)
    assert gemm["median_s"] == pytest.approx(31e-6) and gemm["min_s"] == pytest.approx(30e-6)
    copy = rows[rows["op"] == "copy_h2d"].iloc[0]
    assert copy["m"] == 1048576 and copy["median_s"] == pytest.approx(20e-6)
    assert meta["device_name"] == "NVIDIA H100 80GB HBM3" and meta["dtype"] == "bf16"
    cats = meta["torch_profile"]["categories"]
    assert {"gemm", "all_reduce", "all_to_all_dispatch", "all_to_all_combine", "attention", "memcpy"} <= set(cats)
    assert cats["gemm"]["count"] == 3
    assert [u["name"] for u in meta["torch_profile"]["unmapped"]] == ["my_fused_router_topk_kernel"]


def test_gpu_trace_without_shapes_uses_the_model_config(tmp_path):
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(_gpu_trace(with_shapes=False)))
    trace = load_trace(path)
    rows, _, summary = profile_from_trace(trace, source=str(path))
    assert "gemm" not in set(rows["op"])
    assert summary.skipped["gemm without shapes (record with record_shapes=True or give --shapes)"][0] == 3
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16,
                               "num_key_value_heads": 4}))
    hints = ShapeHints.from_config(cfg, tokens=64)
    rows, _, _ = profile_from_trace(trace, source=str(path), hints=hints)
    got = {(r["m"], r["n"], r["k"]) for r in rows[rows["op"] == "gemm"].to_dict("records")}
    assert got == {(64, 1536, 1024), (64, 1024, 1024), (64, 5632, 1024)}  # qkv, o, gate+up: 3 kernels in order


def test_oversized_or_foreign_trace_is_refused(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps(_gpu_trace()))
    with pytest.raises(ValueError, match="over the 100 byte limit"):
        load_trace(path, max_bytes=100)
    path.write_text('{"rows": []}')
    with pytest.raises(ValueError, match="no 'traceEvents'"):
        load_trace(path)


def test_classify_names():
    assert classify("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn") == "gemm"
    assert classify("cutlass::Kernel<grouped_gemm_moe>") == "grouped_gemm"
    assert classify("ncclDevKernel_AllToAll_RING") == "all_to_all"
    assert classify("elementwise_kernel_with_index") is None
