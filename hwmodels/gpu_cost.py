"""The fitted GPU cost model: the tile/wave GEMM model of :mod:`hwmodels.gpu_gemm` with efficiency parameters
fitted to measured kernel times, shipped as small TOML files in ``hwmodels/gpu_fits/`` (no data needed at run
time). A device spec opts in with ``gpu_fit = "<file stem>"``; :func:`hwmodels.cost.default_cost_model` then
returns :class:`GpuFittedCost` for it.

Dtypes: the parameters are fitted per dtype: ``fitted_dtype`` (fp16 for the Vidur data) and, where a fit names
``data_<dtype>`` (``data_fp8``: DeepGEMM's dense FP8 table for the H100/H800 fit), that dtype too. bf16 runs on the
same tensor cores at the same datasheet rate as fp16, so it uses the fp16 parameters as they are; a dtype with no
parameters of its own (fp32; fp8 on a fit without them) uses the ``fitted_dtype`` efficiencies against its own
peak and byte width, and :meth:`GpuFittedCost.describe` says so (an extrapolation).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from hwmodels.collectives import BottleneckLinkAllToAll, FittedAllToAll, fitted_all_to_all
from hwmodels.gpu_gemm import GemmParams, GpuShape, gemm_time_s, grouped_gemm_time_s, stream_time_s
from hwmodels.roofline import DTYPE_BYTES, OpCost, ffn_work, gemm_bytes, gemm_flops, softmax_topk_bytes
from hwmodels.specs import Device, System
from moebase.files import read_text_bounded

FIT_DIR = Path(__file__).parent / "gpu_fits"
SAME_RATE_DTYPES = {"fp16": ("bf16",), "bf16": ("fp16",)}
"""dtype -> dtypes that run at the same tensor-core rate on NVIDIA GPUs (datasheet: equal FP16 and BF16 peaks)."""
MAX_FIT_BYTES = 1 << 20


@dataclass(frozen=True)
class GpuFit:
    """One shipped fit: parameters per fitted dtype, the SM count, and where it came from."""

    name: str
    num_sms: int
    params: dict[str, GemmParams]
    provenance: dict[str, str]
    validation: dict = field(default_factory=dict, compare=False, hash=False)
    path: str = "<memory>"

    def params_for(self, dtype: str) -> tuple[GemmParams, bool]:
        """(parameters, exact) for ``dtype``: exact is False when borrowed from another dtype."""
        if dtype in self.params:
            return self.params[dtype], True
        for fitted, same in SAME_RATE_DTYPES.items():
            if dtype in same and fitted in self.params:
                return self.params[fitted], True
        return next(iter(self.params.values())), False


def read_gpu_fit(name_or_path: str | Path, fit_dir: Path = FIT_DIR) -> GpuFit:
    """Read ``hwmodels/gpu_fits/<name>.toml`` (or a path); bad files raise ValueError naming file and key."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = fit_dir / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in fit_dir.glob("*.toml")))
        raise ValueError(f"unknown GPU fit {str(name_or_path)!r} ({path} does not exist); known: {known}")
    text = read_text_bounded(path, MAX_FIT_BYTES, "GPU fit file")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    fit = doc.get("fit")
    if not isinstance(fit, dict):
        raise ValueError(f"{path}: key 'fit': missing table")
    try:
        num_sms = int(fit["num_sms"])
        params = {dt: GemmParams(**{k: float(v) for k, v in p.items()}) for dt, p in fit["params"].items()}
        prov = {k: str(fit[k]) for k in ("gpu", "spec", "data", "licence", "command", "num_sms_source", "fitted_dtype")}
        prov.update({f"data_{dt}": str(fit[f"data_{dt}"]) for dt in params if f"data_{dt}" in fit})
    except KeyError as exc:
        raise ValueError(f"{path}: key 'fit.{exc.args[0]}': missing") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: key 'fit.params': {exc}") from None
    if num_sms < 1 or not params:
        raise ValueError(f"{path}: key 'fit.num_sms' must be >= 1 and 'fit.params' must hold a dtype")
    return GpuFit(name=path.stem, num_sms=num_sms, params=params, provenance=prov,
                  validation=dict(fit.get("validation", {})), path=str(path))


@lru_cache(maxsize=4096)
def _scalar_gemm_time_s(m: int, n: int, k: int, gpu: GpuShape, p: GemmParams, sms: int) -> float:
    """One GEMM's time (s), cached: a simulation asks for the same router and dense shapes many times."""
    return float(gemm_time_s(m, n, k, gpu, p, sms))


@dataclass(eq=False)
class GpuFittedCost:
    """Cost model for GPUs whose spec names a shipped fit (``gpu_fit``); implements the CostModel protocol.

    ``overlap_sms``: SMs held by a communication kernel running at the same time (see
    :data:`hwmodels.collectives.COMM_KERNEL_SMS`); compute gets the rest.
    """

    name: str = "gpu-fitted"
    overlap_sms: int = 0
    fit_dir: Path = FIT_DIR
    _fits: dict = field(default_factory=dict, repr=False)

    def fit_for(self, device: Device) -> GpuFit:
        if not device.gpu_fit:
            raise ValueError(f"device {device.name!r} has no 'gpu_fit' in its spec; use --cost roofline for it")
        if device.gpu_fit not in self._fits:
            self._fits[device.gpu_fit] = read_gpu_fit(device.gpu_fit, self.fit_dir)
        return self._fits[device.gpu_fit]

    def collective(self, system: System) -> "FittedAllToAll | BottleneckLinkAllToAll":
        """The all-to-all model of ``system``: NCCL-fitted where a collective fit matches its GPU and scale-up
        link (:func:`hwmodels.collectives.fitted_all_to_all`), else spec bandwidths (bottleneck link)."""
        fitted = fitted_all_to_all(system, self.fit_dir)
        return fitted if fitted is not None else BottleneckLinkAllToAll()

    def with_overlap_sms(self, sms: int) -> "GpuFittedCost":
        """This model with ``sms`` SMs held by a communication kernel (compute gets the rest); shares the fit cache."""
        return self if sms == self.overlap_sms else replace(self, overlap_sms=int(sms))

    def _setup(self, device: Device, dtype: str) -> tuple[GpuShape, GemmParams, int]:
        fit = self.fit_for(device)
        params, _ = fit.params_for(dtype)
        gpu = GpuShape(device.peak(dtype), device.main_memory.bandwidth_bytes_per_s, fit.num_sms, DTYPE_BYTES[dtype])
        return gpu, params, max(fit.num_sms - self.overlap_sms, 1)

    def gemm(self, device: Device, m: int, n: int, k: int, dtype: str) -> OpCost:
        if m == 0:
            return OpCost(0.0, 0.0, 0.0)
        gpu, p, sms = self._setup(device, dtype)
        b = DTYPE_BYTES[dtype]
        t = _scalar_gemm_time_s(int(m), int(n), int(k), gpu, p, sms)
        return OpCost(t, float(gemm_flops(m, n, k)), float(gemm_bytes(m, n, k, b)))

    def expert_ffn(self, device, tokens_per_expert, hidden_size, intermediate_size, dtype) -> OpCost:
        """Grouped gate+up GEMM ``[n_e, h] x [h, 2f]``, SiLU*mul (reads 2f, writes f per row), grouped down GEMM."""
        tpe = np.asarray(tokens_per_expert)
        active = tpe[tpe > 0]
        if active.size == 0:
            return OpCost(0.0, 0.0, 0.0)
        gpu, p, sms = self._setup(device, dtype)
        b = DTYPE_BYTES[dtype]
        rows = float(active.sum())
        t = (grouped_gemm_time_s(active, 2 * intermediate_size, hidden_size, gpu, p, sms)
             + float(stream_time_s(3.0 * rows * intermediate_size * b, gpu, p))
             + grouped_gemm_time_s(active, hidden_size, intermediate_size, gpu, p, sms))
        fu, bu, fd, bd = ffn_work(active, hidden_size, intermediate_size, b)
        return OpCost(t, float(fu.sum() + fd.sum()), float(bu.sum() + bd.sum()))

    def router(self, device, tokens, hidden_size, num_experts, dtype) -> OpCost:
        """Router GEMM, then softmax + top-k reading and writing the fp32 logits once each."""
        if tokens == 0:
            return OpCost(0.0, 0.0, 0.0)
        g = self.gemm(device, tokens, num_experts, hidden_size, dtype)
        gpu, p, _ = self._setup(device, dtype)
        sm_bytes = softmax_topk_bytes(tokens, num_experts)
        return OpCost(g.time_s + float(stream_time_s(sm_bytes, gpu, p)), g.flops, g.bytes + sm_bytes)

    def describe(self, device: Device | None = None, dtype: str | None = None) -> str:
        """Which model this is, what it was fitted on and its validated error (one line)."""
        if device is None or not device.gpu_fit:
            return (f"{self.name}: tile/wave GEMM model with efficiencies fitted to measured GPU kernel times "
                    "(hwmodels/gpu_fits/)")
        fit = self.fit_for(device)
        v, prov = fit.validation, fit.provenance
        err = (f"leave-one-model-out MAPE {float(v['lomo_mape_pct']):.1f} % (worst model "
               f"{float(v['lomo_worst_model_mape_pct']):.1f} %), fit MAPE {float(v['train_mape_pct']):.1f} %"
               if "lomo_mape_pct" in v else "not validated")
        note = ""
        if dtype is not None and not fit.params_for(dtype)[1]:
            note = (f"; {dtype} uses the {prov['fitted_dtype']} efficiencies against the {dtype} peak "
                    "(extrapolated, see docs/validation.md)")
        elif dtype is not None and f"data_{dtype}" in prov:
            note = f"; {dtype} efficiencies fitted on {prov[f'data_{dtype}']}"
            if f"{dtype}_train_mape_pct" in v:
                held = ", ".join(f"{key.split('_heldout_')[1].removesuffix('_mape_pct')} {float(val):.1f} %"
                                 for key, val in v.items() if key.startswith(f"{dtype}_heldout_"))
                note += f" (fit MAPE {float(v[f'{dtype}_train_mape_pct']):.1f} %; held-out MAPE {held})"
        return (f"{self.name} ({fit.name}): tile/wave GEMM model fitted on {prov['data']} [{prov['licence']}]; "
                f"{prov['fitted_dtype']} {err}{note}")
