"""Fit the GPU GEMM model to the shared Vidur timings, validate it on held-out data, write ``hwmodels/gpu_fits/``.

Validation, every figure on data the parameters were not fitted on:

* **leave one model out** (:func:`leave_one_model_out`): fit on two of Vidur's three dense models, predict the
  third, per GPU;
* **DeepGEMM** (:func:`fit_deepgemm_fp8`, :func:`deepgemm_checks`): the fp8 efficiencies are fitted on DeepGEMM's
  *dense* FP8 GEMM table (H800) only; its FP8 grouped GEMMs (contiguous and masked layouts) are held out;
* **LLMCompass** (:func:`llmcompass_checks`): an A100 matmul sweep from another project.

Re-fit (needs ``../shared/data/gpu-timings``)::

    python -m hwmodels.gpu_fit --data ../shared/data/gpu-timings --out hwmodels/gpu_fits
"""

from __future__ import annotations

import argparse
import shutil
import tomllib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from hwmodels.gpu_cost import FIT_DIR, GpuFit
from hwmodels.gpu_data import llmcompass_matmuls, vidur_gemms
from hwmodels.gpu_gemm import GemmFit, GpuShape, fit_gemm_params, gemm_time_s, grouped_gemm_time_s
from hwmodels.roofline import DTYPE_BYTES
from hwmodels.specs import PUBLISHED_KERNELS_PATH, SPEC_DIR, Device, load_device
from moebase.units import TFLOPS

FIT_COMMAND = "python -m hwmodels.gpu_fit --data ../shared/data/gpu-timings --out hwmodels/gpu_fits"
VIDUR = "microsoft/vidur@7d47513363ec447a741ac5e47241580b47724fbf data/profiling/compute/{gpu}/*/mlp.csv"
VIDUR_FITS = {
    # Vidur GPU -> (fit name, spec the efficiencies are relative to, SM count, its source, GPU as the data names it)
    "h100": ("h100-vidur", "h100-sxm", 132, "NVIDIA H100 Tensor Core GPU Architecture whitepaper: H100 SXM5 has "
             "132 SMs (https://resources.nvidia.com/en-us-tensor-core)", "H100 80GB (form factor not stated by Vidur)"),
    "a100": ("a100-vidur", "a100-pcie", 108, "NVIDIA Ampere GA100 whitepaper: A100 has 108 SMs "
             "(https://images.nvidia.com/aem-dam/en-zz/Solutions/data-center/"
             "nvidia-ampere-architecture-whitepaper.pdf)",
             "A100 80GB (probably PCIe, per Vidur's docs)"),
}
DEEPGEMM_DENSE = ("deepseek-ai/DeepGEMM README (first release, Feb 2025), table 'Normal GEMMs for dense models': "
                  "18 FP8 GEMMs on H800, M 64/128/4096 (hwmodels/published/kernels.toml [[dense_gemm]]; MIT)")
FP8_FIT_GPU, FP8_FIT_SPEC = "h100", "h800-sxm"
"""The Vidur GPU whose fit also carries fp8 efficiencies fitted on DeepGEMM's dense table, and the spec of the GPU
DeepGEMM measured on (H800 = H100 compute and SM count)."""
LICENCES = {"LICENSE-vidur": "vidur/LICENSE", "LICENSE-llmcompass": "llmcompass/LICENSE"}


def gpu_shape(device: Device, dtype: str, num_sms: int) -> GpuShape:
    return GpuShape(device.peak(dtype), device.main_memory.bandwidth_bytes_per_s, num_sms, DTYPE_BYTES[dtype])


def errors_pct(pred_s, meas_s) -> np.ndarray:
    return (np.asarray(pred_s, dtype=float) / np.asarray(meas_s, dtype=float) - 1.0) * 100.0


def summary_row(name: str, err_pct: np.ndarray, **extra) -> dict:
    a = np.abs(err_pct)
    return {"set": name, "rows": int(a.size), "mape_pct": float(a.mean()), "median_ape_pct": float(np.median(a)),
            "worst_pct": float(a.max()), **extra}


def leave_one_model_out(data: pd.DataFrame, gpu: GpuShape) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fit on all models but one, predict that one. Returns (summary per held-out model, per-row predictions)."""
    rows, preds = [], []
    for held in sorted(data["model"].unique()):
        train, test = data[data["model"] != held], data[data["model"] == held]
        fit = fit_gemm_params(train["m"], train["n"], train["k"], train["time_s"], gpu)
        p = gemm_time_s(test["m"], test["n"], test["k"], gpu, fit.params)
        err = errors_pct(p, test["time_s"])
        rows.append(summary_row(held, err, train_mape_pct=fit.train_mape_pct, **asdict(fit.params)))
        preds.append(test.assign(predicted_s=p, error_pct=err))
    return pd.DataFrame(rows), pd.concat(preds, ignore_index=True)


def fit_vidur(data_dir: str | Path, gpu_key: str, spec_dir: Path = SPEC_DIR) -> dict:
    """Fit one Vidur GPU on all three models and run leave-one-model-out. Returns a dict with ``fit``
    (:class:`GpuFit`), ``lomo`` (summary DataFrame), ``lomo_rows`` and ``data``."""
    name, spec, sms, sms_src, gpu_desc = VIDUR_FITS[gpu_key]
    device = load_device(spec_dir / f"{spec}.toml")
    data = vidur_gemms(data_dir, gpu_key)
    gpu = gpu_shape(device, "fp16", sms)
    full = fit_gemm_params(data["m"], data["n"], data["k"], data["time_s"], gpu)
    lomo, lomo_rows = leave_one_model_out(data, gpu)
    validation = {"rows": full.rows, "train_mape_pct": round(full.train_mape_pct, 2),
                  "lomo_mape_pct": round(float(lomo["mape_pct"].mean()), 2),
                  "lomo_worst_model_mape_pct": round(float(lomo["mape_pct"].max()), 2),
                  "lomo_worst_row_pct": round(float(lomo["worst_pct"].max()), 1),
                  "lomo_per_model_mape_pct": {r["set"]: round(r["mape_pct"], 2) for r in lomo.to_dict("records")}}
    prov = {"gpu": gpu_desc, "spec": spec, "data": VIDUR.format(gpu=gpu_key) + " (fp16 projection GEMMs of "
            "Llama-2-7b, Llama-2-70b, phi-2; M 1-4096, TP 1-8; median kernel time)", "licence": "MIT, LICENSE-vidur",
            "command": FIT_COMMAND, "num_sms_source": sms_src, "fitted_dtype": "fp16"}
    fit = GpuFit(name=name, num_sms=sms, params={"fp16": full.params}, provenance=prov, validation=validation)
    return {"fit": fit, "lomo": lomo, "lomo_rows": lomo_rows, "data": data, "device": device}


def _toml_value(v) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml_value(x)}' for k, x in v.items()) + " }"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(float(v)) if isinstance(v, float) else repr(v)


def write_gpu_fit(fit: GpuFit, out_dir: Path) -> Path:
    """Write ``<out_dir>/<fit.name>.toml`` (read back by :func:`hwmodels.gpu_cost.read_gpu_fit`)."""
    lines = [f"# Fitted GPU GEMM parameters ({fit.name}); written by: {fit.provenance['command']}",
             "# Derived from third-party measurements: see 'data' and the licence file beside this one.", "[fit]",
             f"num_sms = {fit.num_sms}"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in fit.provenance.items()]
    for dtype, p in fit.params.items():
        lines.append(f"\n[fit.params.{dtype}]")
        lines += [f"{k} = {v!r}" for k, v in asdict(p).items()]
    lines.append("\n[fit.validation]")
    lines += [f"{k} = {_toml_value(v)}" for k, v in fit.validation.items()]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{fit.name}.toml"
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def published(path: Path = PUBLISHED_KERNELS_PATH) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read published figures: {exc}") from None


def deepgemm_dense(doc: dict | None = None) -> pd.DataFrame:
    """DeepGEMM's dense FP8 GEMM table (``[[dense_gemm]]`` of the published figures): m, n, k, time_s (s), from
    the published TFLOPS as DeepGEMM computes them (``2 m n k / t``)."""
    doc = doc if doc is not None else published()
    rows = []
    for e in doc.get("dense_gemm", []):
        try:
            m, n, k, tflops = int(e["m"]), int(e["n"]), int(e["k"]), float(e["value_tflops"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"published figures: a [[dense_gemm]] entry lacks a valid {exc}") from None
        if min(m, n, k) < 1 or not tflops > 0:
            raise ValueError(f"published figures: [[dense_gemm]] {m}x{n}x{k} needs positive m, n, k and TFLOPS")
        rows.append({"m": m, "n": n, "k": k, "published_tflops": tflops, "time_s": 2.0 * m * n * k / (tflops * TFLOPS)})
    if not rows:
        raise ValueError("published figures: no [[dense_gemm]] entries to fit the fp8 efficiencies on")
    return pd.DataFrame(rows)


def fit_deepgemm_fp8(fit: GpuFit, device: Device, doc: dict | None = None) -> tuple[GpuFit, GemmFit]:
    """Fit the fp8 efficiencies of ``fit``'s GPU on DeepGEMM's dense FP8 table only (H800 = H100 compute, same SM
    count) and return ``fit`` with ``params["fp8"]`` added, its provenance (``data_fp8``) and its errors: the fit's
    own (``fp8_train_mape_pct``, on the dense rows) and the held-out grouped tables' (``fp8_heldout_*``)."""
    doc = doc if doc is not None else published()
    dense = deepgemm_dense(doc)
    gpu = gpu_shape(device, "fp8", fit.num_sms)
    gemm_fit = fit_gemm_params(dense["m"], dense["n"], dense["k"], dense["time_s"], gpu)
    with_fp8 = GpuFit(name=fit.name, num_sms=fit.num_sms, params={**fit.params, "fp8": gemm_fit.params},
                      provenance={**fit.provenance, "data_fp8": DEEPGEMM_DENSE}, validation=dict(fit.validation),
                      path=fit.path)
    held = deepgemm_checks(with_fp8, device, doc)
    held = held[held["role"] == "held-out"]
    with_fp8.validation.update({"fp8_rows": gemm_fit.rows, "fp8_train_mape_pct": round(gemm_fit.train_mape_pct, 2),
                                **{f"fp8_heldout_{layout}_mape_pct": round(float(g["error_pct"].abs().mean()), 2)
                                   for layout, g in held.groupby("layout")}})
    return with_fp8, gemm_fit


def deepgemm_checks(fit: GpuFit, device: Device, doc: dict | None = None) -> pd.DataFrame:
    """DeepGEMM's FP8 tables against the fitted model on ``device``: the dense table (``role`` "fit" when the fit
    has its own fp8 efficiencies, which :func:`fit_deepgemm_fp8` fits on it) and the grouped-GEMM tables, contiguous
    and masked (``role`` "held-out": no parameter is fitted on them)."""
    doc = doc if doc is not None else published()
    params, exact = fit.params_for("fp8")
    gpu = gpu_shape(device, "fp8", fit.num_sms)
    rows = []
    for e in deepgemm_dense(doc).to_dict("records"):
        m, n, k = e["m"], e["n"], e["k"]
        pred = 2.0 * m * n * k / float(gemm_time_s(m, n, k, gpu, params)) / TFLOPS
        rows.append({"layout": "dense", "role": "fit" if exact else "held-out", "groups": 1, "m_per_group": m,
                     "n": n, "k": k, "published_tflops": e["published_tflops"], "predicted_tflops": pred,
                     "error_pct": (pred / e["published_tflops"] - 1) * 100,
                     "roofline_tflops": 2.0 * m * n * k / _roof_s(1, m, n, k, gpu) / TFLOPS})
    for e in doc.get("grouped_gemm", []):
        g, m, n, k = int(e["groups"]), int(e["m_per_group"]), int(e["n"]), int(e["k"])
        t = grouped_gemm_time_s(np.full(g, m), n, k, gpu, params)
        pred = 2.0 * g * m * n * k / t / TFLOPS
        rows.append({"layout": e.get("layout", "contiguous"), "role": "held-out", "groups": g, "m_per_group": m,
                     "n": n, "k": k, "published_tflops": float(e["value_tflops"]), "predicted_tflops": pred,
                     "error_pct": (pred / e["value_tflops"] - 1) * 100,
                     "roofline_tflops": 2.0 * g * m * n * k / _roof_s(g, m, n, k, gpu) / TFLOPS})
    return pd.DataFrame(rows)


def _roof_s(g, m, n, k, gpu: GpuShape) -> float:
    flops = 2.0 * g * m * n * k
    nbytes = (g * m * (k + n) + g * k * n) * gpu.dtype_bytes
    return max(flops / gpu.peak_flops_per_s, nbytes / gpu.bandwidth_bytes_per_s)


def llmcompass_checks(data_dir: str | Path, fit: GpuFit, device: Device, min_flops: float = 1e10) -> pd.DataFrame:
    """LLMCompass's A100 fp16 matmul sweep against the fitted model on ``device``. Shapes under ``min_flops``
    are marked ``floor`` (the source warns their ~30 us includes a launch/timer floor) and kept out of MAPE."""
    d = llmcompass_matmuls(data_dir)
    gpu = gpu_shape(device, "fp16", fit.num_sms)
    p = gemm_time_s(d["m"], d["n"], d["k"], gpu, fit.params_for("fp16")[0])
    roof = np.maximum(2 * d["m"] * d["n"] * d["k"] / gpu.peak_flops_per_s,
                      (d["m"] * d["k"] + d["k"] * d["n"] + d["m"] * d["n"]) * 2 / gpu.bandwidth_bytes_per_s)
    return d.assign(predicted_s=p, error_pct=errors_pct(p, d["time_s"]),
                    roofline_error_pct=errors_pct(roof, d["time_s"]),
                    floor=2 * d["m"] * d["n"] * d["k"] < min_flops)


def gpu_fidelity(data_dir: str | Path) -> dict:
    """Every GPU-fidelity figure, computed from the shared data (held-out figures come from fits that did not see
    them; fit errors are labelled as such).

    Returns DataFrames: ``lomo`` (per GPU and held-out model), ``lomo_rows`` (per-row predictions),
    ``deepgemm`` (column ``role``: "fit" for the dense table the fp8 efficiencies are fitted on, "held-out" for the
    grouped tables), ``llmcompass``, ``collectives`` (all-reduce and send/recv error tables), ``deepep``; plus
    ``fits`` (GPU name -> :class:`GpuFit` fitted here on all of its data).
    """
    from hwmodels.collective_fit import collective_report, deepep_checks

    lomo, lomo_rows, fits = [], [], {}
    for key in VIDUR_FITS:
        res = fit_vidur(data_dir, key)
        fits[key] = res["fit"]
        lomo.append(res["lomo"].assign(gpu=key, spec=res["device"].name))
        lomo_rows.append(res["lomo_rows"].assign(gpu=key))
    doc = published()
    h800 = load_device(SPEC_DIR / f"{FP8_FIT_SPEC}.toml")
    fits[FP8_FIT_GPU], _ = fit_deepgemm_fp8(fits[FP8_FIT_GPU], h800, doc)
    deepgemm = deepgemm_checks(fits[FP8_FIT_GPU], h800, doc)
    llm = pd.concat([llmcompass_checks(data_dir, fits["a100"], load_device(SPEC_DIR / f"{spec}.toml")).assign(
        spec=spec) for spec in ("a100-sxm", "a100-pcie")], ignore_index=True)
    coll = collective_report(data_dir)
    tables = []
    for fabric, res in coll.items():
        for kind in ("all_reduce", "send_recv"):
            if kind in res:
                tables.append(res[f"{kind}_rows"].assign(fabric=fabric, collective=kind))
    deepep = deepep_checks(coll["h100_dgx intra-node"]["all_reduce"], doc)
    return {"lomo": pd.concat(lomo, ignore_index=True), "lomo_rows": pd.concat(lomo_rows, ignore_index=True),
            "deepgemm": deepgemm, "llmcompass": llm, "collectives": pd.concat(tables, ignore_index=True),
            "deepep": deepep, "fits": fits}


def copy_licences(data_dir: Path, out_dir: Path) -> None:
    for dst, src in LICENCES.items():
        shutil.copyfile(Path(data_dir) / src, out_dir / dst)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hwmodels.gpu_fit", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="the gpu-timings directory (../shared/data/gpu-timings)")
    ap.add_argument("--out", default=str(FIT_DIR), help="where to write <fit>.toml and the licence files")
    args = ap.parse_args(argv)
    out = Path(args.out)
    for key in VIDUR_FITS:
        res = fit_vidur(args.data, key)
        fit = res["fit"]
        if key == FP8_FIT_GPU:
            fit, _ = fit_deepgemm_fp8(fit, load_device(SPEC_DIR / f"{FP8_FIT_SPEC}.toml"))
        path = write_gpu_fit(fit, out)
        v = fit.validation
        print(f"{path}: fit MAPE {v['train_mape_pct']:.2f} %, leave-one-model-out MAPE {v['lomo_mape_pct']:.2f} %")
        if "fp8_train_mape_pct" in v:
            print(f"{path}: fp8 fit MAPE (DeepGEMM dense) {v['fp8_train_mape_pct']:.2f} %, held-out contiguous "
                  f"{v['fp8_heldout_contiguous_mape_pct']:.2f} %, masked {v['fp8_heldout_masked_mape_pct']:.2f} %")
    from hwmodels.collective_fit import collective_report, write_collective_fits

    path = write_collective_fits(collective_report(args.data), out, FIT_COMMAND)
    print(f"{path}: NCCL all-reduce and send/recv fits")
    copy_licences(Path(args.data), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
