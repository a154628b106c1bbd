"""The calibrated cost model: a roofline whose launch latency, compute peak and bandwidth are fitted
per operator from a measured profile (``moesim calibrate``), plus an interpolating table mode.

Fitted roofline of one op instance (``Kernels`` from :mod:`hwmodels.calib_profile`)::

    time_s = launches * launch_s + sum over kernels of max(flops / peak_flops_per_s, bytes / bandwidth_bytes_per_s)

``launch_s``, ``peak_flops_per_s`` and ``bandwidth_bytes_per_s`` are fitted per op (gemm, grouped_ffn,
router, permute, unpermute, copy_*) by least squares on relative error, so a device whose times
follow this formula is recovered exactly.

Table mode (like Vidur's profiled predictors): for a shape inside the profiled range, the fitted roofline
is scaled by the measured/fitted ratio of the nearest measured shapes (inverse-distance weighting in
log-shape space; exact at a measured shape). Outside the range, or for an op the profile lacks, the model
warns once and falls back to the fitted roofline (or to the device's spec roofline), saying so.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hwmodels.calib_profile import (COPY_OPS, Kernels, Profile, ProfileError, copy_kernels, ffn_expert_kernels,
                                    launches_of, op_kernels, permute_kernels, read_profile, router_kernels,
                                    unpermute_kernels)
from hwmodels.roofline import DTYPE_BYTES, OpCost, RooflineCost, gemm_bytes, gemm_flops
from hwmodels.specs import Device, MemoryTier
from moebase.units import GB, GFLOPS, NS, PFLOPS, TB, TiB

MODES = ("auto", "roofline", "table")

# placeholders of a fitted device for what a profile does not measure (its sources say "assumed"/"placeholder")
_PLACEHOLDER_BANDWIDTH_BYTES_PER_S = 10 * GB  # no copy/permute/gemm bandwidth fitted
_PLACEHOLDER_PEAK_FLOPS_PER_S = 100 * GFLOPS  # the gemm fit saw no compute-bound kernel
_PLACEHOLDER_CAPACITY_BYTES = TiB  # capacity is not measured: large enough never to bind


#: physical bounds of a fitted op (one device): beyond them a fitted limit is "not limiting" (inf)
_MAX_PLAUSIBLE_FLOPS_PER_S = 1e6 * PFLOPS
_MAX_PLAUSIBLE_BYTES_PER_S = 10_000 * TB
#: below this a fitted launch latency is not measurable: 0
_MIN_MEASURABLE_LAUNCH_S = NS


class TooFewShapesError(ProfileError):
    """A fit with fewer measured shapes than parameters (it would match any data exactly)."""


class CalibrationWarning(UserWarning):
    """A calibrated prediction fell back to a roofline (shape outside the profile, op not profiled)."""


@dataclass(frozen=True)
class OpFit:
    """Fitted roofline parameters of one op: seconds per launch, FLOP/s, B/s (inf = not limiting)."""

    op: str
    launch_s: float
    peak_flops_per_s: float
    bandwidth_bytes_per_s: float
    rows: int
    train_mape: float

    def predict(self, kern: Kernels, n_rows: int) -> np.ndarray:
        """Times [n_rows] (s) of the op rows whose kernels are ``kern``."""
        return _row_times(kern, n_rows, self.launch_s, 1.0 / self.peak_flops_per_s, 1.0 / self.bandwidth_bytes_per_s)


def _row_times(kern: Kernels, n_rows: int, launch_s: float, s_per_flop: float, s_per_byte: float) -> np.ndarray:
    """The roofline per op row: launches x launch_s + sum over its kernels of max(flops, bytes) times their cost."""
    t_k = np.maximum(kern.flops * s_per_flop, kern.bytes * s_per_byte)
    return kern.launches * launch_s + np.bincount(kern.row, weights=t_k, minlength=n_rows)


def _predict_x(x: np.ndarray, kern: Kernels, n_rows: int, fit_peak: bool, fit_bw: bool) -> np.ndarray:
    return _row_times(kern, n_rows, np.exp(x[0]), np.exp(x[1]) if fit_peak else 0.0, np.exp(x[2]) if fit_bw else 0.0)


#: floor of a fitted coefficient before its log (s per launch, s per FLOP, s per byte): keeps log() finite
_TINY = 1e-30
#: at most this many intensity thresholds seed the regime search (quantiles beyond it; ~ms per threshold)
_MAX_REGIME_THRESHOLDS = 200
#: the best regime assignments kept as starting points of the nonlinear fit, plus one scale-based start
_STARTS_FROM_REGIMES = 3
#: lower clamp of a start's log-parameter (exp(-60) ~ 1e-26: effectively "not limiting")
_LOG_FLOOR = -60.0
#: least-squares stopping tolerances (relative; tight, since the fit is small and times span decades)
_LSQ_TOL = 1e-15
#: cap on residual evaluations of one least-squares start
_LSQ_MAX_NFEV = 4000


def fit_op(op: str, kern: Kernels, times_s: np.ndarray) -> OpFit:
    """Fit (launch_s, peak, bandwidth) of one op to measured ``times_s`` [R] (s) by least squares on
    relative error (scipy ``least_squares`` in log-parameters, several starts, best kept).

    A parameter the data cannot see (no FLOPs at all, e.g. copies) is left at infinity.
    """
    from scipy.optimize import least_squares

    t = np.asarray(times_s, dtype=float)
    n = len(t)
    if n == 0:
        raise ProfileError(f"no measurements of op {op!r} to fit")
    fit_peak = bool(np.any(kern.flops > 0))
    fit_bw = bool(np.any(kern.bytes > 0))
    n_params = 1 + fit_peak + fit_bw
    if n < n_params:
        raise TooFewShapesError(f"op {op!r}: {n} measured shape(s) cannot determine {n_params} parameters (launch"
                                f"{', peak' if fit_peak else ''}{', bandwidth' if fit_bw else ''}); profile more "
                                "shapes (a larger --grid)")

    def resid(x):
        return _predict_x(x, kern, n, fit_peak, fit_bw) / t - 1.0

    best = None
    for x0 in _fit_starts(kern, t):
        x0 = np.maximum(np.where(np.isfinite(x0), x0, _LOG_FLOOR), _LOG_FLOOR)
        try:
            res = least_squares(resid, x0, method="trf", xtol=_LSQ_TOL, ftol=_LSQ_TOL, gtol=_LSQ_TOL,
                                max_nfev=_LSQ_MAX_NFEV)
        except ValueError:
            continue
        if best is None or res.cost < best.cost:
            best = res
    x = best.x
    mape = float(np.mean(np.abs(resid(x))) * 100)
    peak = float(np.exp(-x[1])) if fit_peak else float("inf")
    bw = float(np.exp(-x[2])) if fit_bw else float("inf")
    # physics: a peak or bandwidth beyond any machine means the data never saw that limit (not limiting);
    # a launch below a nanosecond is not measurable (0)
    peak = peak if peak <= _MAX_PLAUSIBLE_FLOPS_PER_S else float("inf")
    bw = bw if bw <= _MAX_PLAUSIBLE_BYTES_PER_S else float("inf")
    launch = float(np.exp(x[0]))
    launch = launch if launch >= _MIN_MEASURABLE_LAUNCH_S else 0.0
    return OpFit(op=op, launch_s=launch, peak_flops_per_s=peak, bandwidth_bytes_per_s=bw, rows=n, train_mape=mape)


def _fit_starts(kern: Kernels, t: np.ndarray) -> list[np.ndarray]:
    """Starting log-parameters (launch_s, s per FLOP, s per byte) for :func:`fit_op`.

    The model is linear in (launch, 1/peak, 1/bandwidth) once each kernel's regime (compute- or
    memory-bound) is fixed, so solve non-negative least squares (relative) per regime assignment. A kernel
    is compute-bound iff its intensity flops/bytes >= peak/bandwidth: every assignment the true parameters
    can produce is a threshold on intensity, so try them all (at most ~200 quantiles); keep the best few
    and add one start from the data's scale.
    """
    from scipy.optimize import nnls

    n = len(t)

    def solve(comp):
        fa = np.bincount(kern.row, weights=kern.flops * comp, minlength=n)
        ba = np.bincount(kern.row, weights=kern.bytes * ~comp, minlength=n)
        a = np.stack([kern.launches, fa, ba], axis=1) / t[:, None]
        coef, _ = nnls(a, np.ones(n))
        return coef

    with np.errstate(divide="ignore", invalid="ignore"):
        inten = np.where(kern.bytes > 0, kern.flops / kern.bytes, np.inf)
    finite = np.unique(inten[np.isfinite(inten) & (kern.flops > 0)])
    if finite.size > _MAX_REGIME_THRESHOLDS:
        finite = np.quantile(finite, np.linspace(0, 1, _MAX_REGIME_THRESHOLDS))
    thresholds = np.concatenate([[0.0], (finite[:-1] + finite[1:]) / 2 if finite.size > 1 else [], [np.inf]])
    cands = []
    for thr in thresholds:
        coef = solve((kern.flops > 0) & (inten >= thr))
        x = np.log(np.maximum(coef, _TINY))
        err = _predict_x(x, kern, n, True, True) / t - 1.0
        cands.append((float(np.sum(err**2)), x))
    cands.sort(key=lambda c: c[0])
    starts = [c[1] for c in cands[:_STARTS_FROM_REGIMES]]
    f_row = np.bincount(kern.row, weights=kern.flops, minlength=n)
    b_row = np.bincount(kern.row, weights=kern.bytes, minlength=n)
    scale = np.array([t.min() / max(kern.launches.max(), 1), t.max() / max(f_row.max(), _TINY),
                      t.max() / max(b_row.max(), _TINY)])
    starts.append(np.log(scale + _TINY))
    return starts


# ----------------------------------------------------------------------------- table features


def op_features(op: str, rows: pd.DataFrame) -> np.ndarray:
    """log-shape features [R, F] used for nearest-shape interpolation and range checks."""
    m, n, k = (rows[c].to_numpy(dtype=float) for c in ("m", "n", "k"))
    if op == "gemm":
        cols = [m, n, k]
    elif op == "grouped_ffn":
        tpe = [np.asarray(v, dtype=float) for v in rows["tokens_per_expert"]]
        active = np.array([max(int((v > 0).sum()), 1) for v in tpe], dtype=float)
        mean = np.maximum(m, 1) / active
        skew = np.array([v.max() if v.size else 1.0 for v in tpe]) / mean  # max/mean load, >= 1
        cols = [mean, active, k, n, np.exp(4 * np.maximum(skew, 1.0))]  # log -> 4*skew: spread like the others
    elif op == "router":
        cols = [m, k, n]
    elif op in ("permute", "unpermute"):
        cols = [m * rows["top_k"].to_numpy(dtype=float), k]
    else:
        cols = [m]
    return np.log(np.maximum(np.stack(cols, axis=1), 1.0))


FEATURE_NAMES = {"gemm": ("m", "n", "k"),
                 "grouped_ffn": ("tokens per active expert", "active experts", "hidden", "intermediate", "exp(4 max/mean load)"),
                 "router": ("tokens", "hidden", "experts"), "permute": ("rows", "hidden"), "unpermute": ("rows", "hidden")}


#: slack of the range check in log-shape space: a shape on the profiled edge stays inside despite log() rounding
_RANGE_TOL = 1e-9
#: a query this close (normalised log-shape distance) to a measured shape takes that shape's ratio exactly
_EXACT_DISTANCE = 1e-12


@dataclass(frozen=True, eq=False)
class OpTable:
    """Measured shapes of one op: features [R, F] (log), ratio [R] = measured / fitted roofline."""

    features: np.ndarray
    ratio: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    scale: np.ndarray

    @classmethod
    def build(cls, features: np.ndarray, ratio: np.ndarray) -> "OpTable":
        lo, hi = features.min(axis=0), features.max(axis=0)
        scale = np.where(hi > lo, hi - lo, 1.0)
        return cls(features=features, ratio=ratio, lo=lo, hi=hi, scale=scale)

    def inside(self, q: np.ndarray, tol: float = _RANGE_TOL) -> bool:
        return bool(np.all(q >= self.lo - tol) and np.all(q <= self.hi + tol))

    def ratio_at(self, q: np.ndarray, neighbours: int = 4) -> float:
        d = np.sqrt((((self.features - q) / self.scale) ** 2).sum(axis=1))
        j = np.argsort(d)[:neighbours]
        if d[j[0]] < _EXACT_DISTANCE:
            return float(self.ratio[j[0]])
        w = 1.0 / d[j] ** 2
        return float(np.exp((w * np.log(self.ratio[j])).sum() / w.sum()))


# ----------------------------------------------------------------------------- the cost model


def _device_tokens(name: str) -> set[str]:
    """Model tokens such as 'H100', 'A100', 'MI300X', 'SN40L' in a device name (upper case)."""
    return set(re.findall(r"\b[A-Z]{1,3}\d{2,4}[A-Z]?\b", name.upper()))


def same_device(profile_name: str, device: Device) -> bool:
    """True when a profile measured on ``profile_name`` describes ``device`` (exact name, or the same
    model token such as H100 in both names)."""
    if profile_name.strip().lower() == device.name.strip().lower():
        return True
    a, b = _device_tokens(profile_name), _device_tokens(device.name)
    return bool(a and b and a & b)


@dataclass(eq=False)
class CalibratedCost:
    """Cost model fitted from a profile; implements :class:`hwmodels.cost.CostModel`.

    ``mode``: ``auto`` (table near measured shapes, fitted roofline elsewhere, with a warning),
    ``roofline`` (fitted roofline only) or ``table`` (like auto; kept for symmetry with the docs).
    ``fold_permute``: add the profiled permute + unpermute of the expert's rows to ``expert_ffn``
    (the simulator has no separate op for the local token shuffle around the expert GEMMs).
    """

    fits: dict[str, OpFit]
    tables: dict[str, OpTable]
    dtype: str
    device_name: str
    profile_path: str = "<memory>"
    mode: str = "auto"
    fold_permute: bool = True
    top_k: int = 1
    name: str = "calibrated"
    fallback: RooflineCost = field(default_factory=RooflineCost)
    warned: set = field(default_factory=set)
    refused: dict = field(default_factory=dict)  # op -> why it was not fitted (too few shapes)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown calibrated mode {self.mode!r}; known: {', '.join(MODES)}")

    # -- construction

    @classmethod
    def fit(cls, profile: Profile, *, mode: str = "auto", fold_permute: bool = True,
            stat: str = "median") -> "CalibratedCost":
        """Fit every op the profile has to its ``stat`` time per shape (``median``, or ``min`` to estimate
        the time free of interference from other processes)."""
        if stat not in ("median", "min"):
            raise ValueError(f"stat must be 'median' or 'min', got {stat!r}")
        b = DTYPE_BYTES[profile.dtype]
        fits, tables, refused = {}, {}, {}
        for op in sorted(set(profile.rows["op"])):
            rows = profile.op_rows(op)
            kern = op_kernels(op, rows, b)
            t = rows[f"{stat}_s"].to_numpy(dtype=float)
            try:
                fit = fit_op(op, kern, t)
            except TooFewShapesError as exc:
                refused[op] = str(exc)  # this op falls back to the roofline, with a warning when used
                continue
            fits[op] = fit
            tables[op] = OpTable.build(op_features(op, rows), t / fit.predict(kern, len(rows)))
        topk = profile.rows.loc[profile.rows["op"].isin(["permute", "unpermute"]), "top_k"]
        return cls(fits=fits, tables=tables, dtype=profile.dtype, device_name=profile.device_name,
                   profile_path=profile.path, mode=mode, fold_permute=fold_permute,
                   top_k=int(topk.iloc[0]) if len(topk) else 1, refused=refused)

    @classmethod
    def from_profile(cls, profile_path: str | Path | None, device: Device | None = None, *,
                     mode: str = "auto", stat: str = "median") -> "CalibratedCost":
        """Read a profile and fit; ``device`` (the simulated system's device) must be the profiled one."""
        if profile_path is None:
            raise ValueError("the calibrated cost model needs a kernel-timing profile (a Parquet file measured on "
                             "the simulated device); none was given")
        prof = read_profile(profile_path)
        if device is not None and not same_device(prof.device_name, device):
            raise ProfileError(f"{profile_path}: profile was measured on {prof.device_name!r} but the simulated "
                               f"device is {device.name!r}; calibrate on that device, or use the roofline cost model")
        cost = cls.fit(prof, mode=mode, stat=stat)
        return cost if device is None else cost.bounded_by(device)

    def bounded_by(self, device: Device) -> "CalibratedCost":
        """Compute efficiency in (0, 1]: a fitted peak above the device's datasheet peak is impossible
        (a degenerate fit), so it is lowered to that peak, with a warning."""
        spec_peak = device.peak_flops_per_s.get(self.dtype)
        if spec_peak is None:
            return self
        over = {op: f for op, f in self.fits.items() if np.isfinite(f.peak_flops_per_s) and f.peak_flops_per_s > spec_peak}
        for op, f in over.items():
            self._warn(f"peak-{op}", f"op {op!r}: fitted peak {f.peak_flops_per_s:.3g} FLOP/s exceeds {device.name}'s "
                                     f"{self.dtype} peak {spec_peak:.3g} FLOP/s; using the datasheet peak")
        fits = {**self.fits, **{op: dataclasses.replace(f, peak_flops_per_s=spec_peak) for op, f in over.items()}}
        return dataclasses.replace(self, fits=fits)

    # -- helpers

    def _warn(self, key: str, msg: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(f"calibrated cost ({self.profile_path}): {msg}", CalibrationWarning, stacklevel=3)

    def _check_dtype(self, dtype: str) -> None:
        if dtype != self.dtype:
            raise ValueError(f"profile {self.profile_path} was measured in {self.dtype}, not {dtype}; simulate in "
                             f"{self.dtype} or calibrate in {dtype}")

    def predict_row(self, op: str, row: dict) -> float:
        """Time (s) of one op instance described like a profile row (op without a fit: NaN)."""
        from hwmodels.calib_profile import row_kernels

        f, b, launches = row_kernels(op, row, DTYPE_BYTES[self.dtype])
        return self._time(op, f, b, launches, pd.DataFrame([row]))

    def _time(self, op: str, flops: np.ndarray, bytes_: np.ndarray, launches: int, row_df: pd.DataFrame,
              fallback_s: float | None = None) -> float:
        fit = self.fits.get(op)
        if fit is None:
            if fallback_s is None:
                return float("nan")
            self._warn(f"missing:{op}", f"the profile has no {op!r} measurements; using the device's spec roofline "
                       f"for {op}")
            return fallback_s
        kern = Kernels(np.zeros(len(flops), dtype=int), np.asarray(flops, float), np.asarray(bytes_, float),
                       np.array([float(launches)]))
        t = float(fit.predict(kern, 1)[0])
        if self.mode == "roofline":
            return t
        table = self.tables[op]
        q = op_features(op, row_df)[0]
        if not table.inside(q):
            names = FEATURE_NAMES.get(op, ("bytes",))
            desc = ", ".join(f"{nm} {np.exp(v):.0f} (profiled {np.exp(lo):.0f}-{np.exp(hi):.0f})"
                             for nm, v, lo, hi in zip(names, q, table.lo, table.hi) if not lo - _RANGE_TOL <= v <= hi + _RANGE_TOL)
            self._warn(f"range:{op}:{desc}", f"{op} shape outside the profiled range ({desc}); falling back to "
                       "the fitted roofline for it")
            return t
        return t * table.ratio_at(q)

    # -- CostModel protocol

    def gemm(self, device: Device, m: int, n: int, k: int, dtype: str) -> OpCost:
        self._check_dtype(dtype)
        if m == 0:
            return OpCost(0.0, 0.0, 0.0)
        b = DTYPE_BYTES[dtype]
        flops, bytes_ = float(gemm_flops(m, n, k)), float(gemm_bytes(m, n, k, b))
        fb = self.fallback.gemm(device, m, n, k, dtype).time_s if "gemm" not in self.fits else None
        t = self._time("gemm", np.array([flops]), np.array([bytes_]), 1,
                       pd.DataFrame([{"m": m, "n": n, "k": k}]), fb)
        return OpCost(t, flops, bytes_)

    def expert_ffn(self, device, tokens_per_expert, hidden_size, intermediate_size, dtype) -> OpCost:
        self._check_dtype(dtype)
        tpe = np.asarray(tokens_per_expert)
        active = tpe[tpe > 0]
        if active.size == 0:
            return OpCost(0.0, 0.0, 0.0)
        b = DTYPE_BYTES[dtype]
        f, by = ffn_expert_kernels(active, hidden_size, intermediate_size, b)
        fb = (self.fallback.expert_ffn(device, tpe, hidden_size, intermediate_size, dtype).time_s
              if "grouped_ffn" not in self.fits else None)
        row = {"m": int(active.sum()), "n": intermediate_size, "k": hidden_size, "tokens_per_expert": list(active)}
        t = self._time("grouped_ffn", f, by, launches_of("grouped_ffn", active.size), pd.DataFrame([row]), fb)
        flops, bytes_ = float(f.sum()), float(by.sum())
        if self.fold_permute:
            k = max(self.top_k, 1)
            tokens = -(-int(active.sum()) // k)
            t += self.permute(tokens, hidden_size, k) + self.unpermute(tokens, hidden_size, k)
        return OpCost(t, flops, bytes_)

    def router(self, device, tokens, hidden_size, num_experts, dtype) -> OpCost:
        self._check_dtype(dtype)
        if tokens == 0:
            return OpCost(0.0, 0.0, 0.0)
        f, by = router_kernels(tokens, hidden_size, num_experts, DTYPE_BYTES[dtype])
        fb = (self.fallback.router(device, tokens, hidden_size, num_experts, dtype).time_s
              if "router" not in self.fits else None)
        t = self._time("router", f, by, launches_of("router", 0),
                       pd.DataFrame([{"m": tokens, "n": num_experts, "k": hidden_size}]), fb)
        return OpCost(t, float(f[0]), float(by.sum()))

    # -- extra ops

    def permute(self, tokens: int, hidden_size: int, top_k: int) -> float:
        """Time (s) to gather tokens*top_k rows of hidden_size into expert order (0 when not profiled)."""
        return self._shuffle("permute", permute_kernels, tokens, hidden_size, top_k)

    def unpermute(self, tokens: int, hidden_size: int, top_k: int) -> float:
        """Time (s) of the weighted scatter-add of tokens*top_k rows back to tokens (0 when not profiled)."""
        return self._shuffle("unpermute", unpermute_kernels, tokens, hidden_size, top_k)

    def _shuffle(self, op, kernels, tokens, hidden_size, top_k) -> float:
        if op not in self.fits or tokens == 0:
            return 0.0
        f, by = kernels(tokens, hidden_size, top_k, DTYPE_BYTES[self.dtype])
        row = {"m": tokens, "n": 0, "k": hidden_size, "top_k": top_k}
        return self._time(op, f, by, launches_of(op, 0), pd.DataFrame([row]))

    def copy_time_s(self, device: Device | None, nbytes: float, kind: str = "d2d") -> float:
        """Time (s) of a memory copy of ``nbytes``; kind ``d2d`` | ``h2d`` | ``d2h``. Without a profiled
        copy of that kind: the device's main-memory bandwidth (d2d: read + write) plus its latency."""
        op = f"copy_{kind}"
        if op not in COPY_OPS:
            raise ValueError(f"unknown copy kind {kind!r}; known: d2d, h2d, d2h")
        if nbytes <= 0:
            return 0.0
        if op not in self.fits:
            if device is None:
                raise ValueError(f"the profile has no {op} measurements and no device was given for a roofline")
            self._warn(f"missing:{op}", f"the profile has no {op!r} measurements; using the device's spec bandwidth")
            tier = device.main_memory
            factor = 2.0 if kind == "d2d" else 1.0
            return tier.latency_s + factor * nbytes / tier.bandwidth_bytes_per_s
        f, by = copy_kernels(nbytes)
        return self._time(op, f, by, 1, pd.DataFrame([{"m": nbytes, "n": 0, "k": 0}]))

    # -- a device spec from the profile

    def fitted_device(self, kind: str = "cpu") -> Device:
        """A :class:`Device` whose peak, bandwidth and launch latency are the fitted ones (sources say so)."""
        g = self.fits.get("gemm") or self.fits.get("grouped_ffn")
        if g is None:
            raise ProfileError(f"{self.profile_path}: a device needs gemm or grouped_ffn measurements")
        bw_fit = next((self.fits[o] for o in ("copy_d2d", "permute", "gemm") if o in self.fits
                       and np.isfinite(self.fits[o].bandwidth_bytes_per_s)), None)
        bw = bw_fit.bandwidth_bytes_per_s if bw_fit is not None else _PLACEHOLDER_BANDWIDTH_BYTES_PER_S
        # a d2d copy moves each byte twice (read + write); the fitted copy bandwidth counts it once
        if bw_fit is not None and bw_fit.op == "copy_d2d":
            bw *= 2
        src = f"fitted from profile {self.profile_path}"
        peak = g.peak_flops_per_s if np.isfinite(g.peak_flops_per_s) else _PLACEHOLDER_PEAK_FLOPS_PER_S
        tier = MemoryTier(name="main", capacity_bytes=float(_PLACEHOLDER_CAPACITY_BYTES), bandwidth_bytes_per_s=float(bw), latency_s=0.0,
                          sources={"bandwidth_bytes_per_s": f"{src} ({bw_fit.op if bw_fit else 'assumed'})",
                                   "capacity_bytes": "placeholder: not measured"})
        return Device(name=self.device_name, kind=kind, peak_flops_per_s={self.dtype: float(peak)},
                      launch_latency_s=float(g.launch_s), memory=(tier,),
                      sources={f"peak_{self.dtype}_flops_per_s": f"{src} ({g.op})", "launch_latency_s": f"{src} ({g.op})"})

    def summary(self) -> list[dict]:
        """One row per op: fitted launch (s), peak (FLOP/s), bandwidth (B/s), training MAPE (%)."""
        return [dataclasses.asdict(f) for f in self.fits.values()]
