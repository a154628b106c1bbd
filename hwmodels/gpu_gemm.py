"""A GPU GEMM time model with the physics that makes real GEMMs slower than the datasheet roofline.

A GEMM ``[m, k] x [k, n]`` is cut into output tiles of ``bm x bn`` (optionally split ``s`` ways along
``k``); tiles run in waves of ``num_sms`` (one tile per SM at a time), so a shape whose tile count is
just above a multiple of the SM count pays a whole extra wave (**wave quantisation**), and a dimension
that is not a multiple of the tile is padded up to it (**tile quantisation**). For every candidate tile
and split the time is::

    waves      = ceil(ceil(m / bm) * ceil(n / bn) * s / num_sms)
    tile_s     = max(2 bm bn ceil(k / s) / (peak / num_sms * compute_efficiency),      # tensor cores
                     (bm + bn) ceil(k / s) dtype_bytes / operand_feed_bytes_per_s)     # L2 -> SM operand feed
                 + tile_epilogue_s
    stream_s   = (m k + k n + m n) dtype_bytes / (bandwidth * memory_efficiency)       # HBM, memory-bound small m
                 + [s > 1] 2 s m n 4 / (bandwidth * memory_efficiency)                 # fp32 split-k partials
    time_s     = overhead_s + max(waves * tile_s, stream_s)

and the GEMM takes the fastest candidate (as a library's heuristic would pick). A grouped GEMM (MoE
experts sharing ``n`` and ``k``) pads **every group** to the tile on ``m``, sums the tiles of all groups
into one wave schedule, and streams every active group's weights once.

Five efficiency parameters per GPU and dtype (:class:`GemmParams`) are fitted by least squares on
relative error (:func:`fit_gemm_params`); the SM count and the peaks come from the spec.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

TILES = ((64, 64), (64, 128), (128, 64), (128, 128), (128, 256), (256, 128))
"""Output tile shapes (bm, bn) a GEMM library chooses from (CUTLASS/cuBLAS-style Ampere/Hopper tiles)."""
SPLIT_K = (1, 2, 4, 8)
"""Split-k factors tried for plain GEMMs (grouped GEMMs never split k)."""
FP32_BYTES = 4


@dataclass(frozen=True)
class GemmParams:
    """Fitted efficiencies of one GPU and dtype.

    compute_efficiency: fraction of the dtype's peak a tile's main loop reaches; memory_efficiency:
    fraction of HBM bandwidth a streaming GEMM reaches; overhead_s: fixed time per kernel (launch tail,
    prologue); operand_feed_bytes_per_s: L2-to-SM operand bandwidth per SM; tile_epilogue_s: time per
    tile after its main loop (accumulator write-out).
    """

    compute_efficiency: float
    memory_efficiency: float
    overhead_s: float
    operand_feed_bytes_per_s: float
    tile_epilogue_s: float

    def __post_init__(self):
        for key, value in asdict(self).items():
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"GemmParams.{key} must be finite and >= 0, got {value!r}")
        if not 0 < self.compute_efficiency <= 1.5 or not 0 < self.memory_efficiency <= 1.5:
            raise ValueError("GemmParams efficiencies must lie in (0, 1.5]")

    def to_vector(self) -> np.ndarray:
        return np.log(np.maximum(np.array(list(asdict(self).values()), dtype=float), 1e-30))

    @classmethod
    def from_vector(cls, x: np.ndarray) -> "GemmParams":
        return cls(*(float(v) for v in np.exp(np.asarray(x, dtype=float))))


@dataclass(frozen=True)
class GpuShape:
    """What the spec says about the GPU for one dtype: its peak (FLOP/s), HBM bandwidth (B/s), SM count."""

    peak_flops_per_s: float
    bandwidth_bytes_per_s: float
    num_sms: int
    dtype_bytes: int


def _tile_time_s(bm: int, bn: int, k_per_split, gpu: GpuShape, p: GemmParams):
    comp = 2.0 * bm * bn * k_per_split / (gpu.peak_flops_per_s / gpu.num_sms * p.compute_efficiency)
    feed = (bm + bn) * k_per_split * gpu.dtype_bytes / p.operand_feed_bytes_per_s
    return np.maximum(comp, feed) + p.tile_epilogue_s


_CAND = np.array([(bm, bn, sk) for bm, bn in TILES for sk in SPLIT_K], dtype=float)  # [C, 3]: bm, bn, split


def _candidates(m, n, k, gpu: GpuShape, sms: float):
    """Per candidate (tile, split) and shape, the raw terms [C, R]: tensor-core time at 100 % of peak, operand
    bytes fed to the SMs, waves, and HBM time at 100 % of bandwidth (operands + split-k fp32 partials)."""
    bm, bn, sk = (_CAND[:, i, None] for i in range(3))
    kk = np.ceil(k / sk)
    waves = np.ceil(np.ceil(m / bm) * np.ceil(n / bn) * sk / sms)
    comp_raw = waves * 2.0 * bm * bn * kk / (gpu.peak_flops_per_s / sms)
    feed_raw = waves * (bm + bn) * kk * gpu.dtype_bytes
    partials = np.where(sk > 1, 2.0 * sk * m * n * FP32_BYTES, 0.0)
    mem_raw = ((m * k + k * n + m * n) * gpu.dtype_bytes + partials) / gpu.bandwidth_bytes_per_s
    return comp_raw, feed_raw, waves, mem_raw


def gemm_terms(m, n, k, gpu: GpuShape, p: GemmParams, num_sms: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(time_s [R], design [R, 5]) of GEMMs: the time of the fastest candidate and, for it, the coefficients of
    (overhead_s, 1 / compute_efficiency, 1 / memory_efficiency, 1 / operand_feed_bytes_per_s, tile_epilogue_s)
    in the branch that binds, so that ``design @ those == time_s`` (used by the fit's linear steps)."""
    m, n, k = (np.asarray(v, dtype=float).ravel() for v in np.broadcast_arrays(m, n, k))
    comp_raw, feed_raw, waves, mem_raw = _candidates(m, n, k, gpu, float(num_sms or gpu.num_sms))
    comp, feed = comp_raw / p.compute_efficiency, feed_raw / p.operand_feed_bytes_per_s
    tile_branch = np.maximum(comp, feed) + waves * p.tile_epilogue_s
    mem = mem_raw / p.memory_efficiency
    t = p.overhead_s + np.maximum(tile_branch, mem)
    win = np.argmin(t, axis=0)
    pick = np.arange(m.size)
    tile_wins, comp_wins = (tile_branch >= mem)[win, pick], (comp >= feed)[win, pick]
    design = np.stack([np.ones_like(m), np.where(tile_wins & comp_wins, comp_raw[win, pick], 0.0),
                       np.where(tile_wins, 0.0, mem_raw[win, pick]),
                       np.where(tile_wins & ~comp_wins, feed_raw[win, pick], 0.0),
                       np.where(tile_wins, waves[win, pick], 0.0)], axis=1)
    return t[win, pick], design


def gemm_time_s(m, n, k, gpu: GpuShape, p: GemmParams, num_sms: int | None = None) -> np.ndarray:
    """Time (s) of ``[m, k] x [k, n]`` GEMMs (arrays broadcast); 0 where m, n or k is 0.

    ``num_sms`` overrides the SMs available (e.g. while a communication kernel holds some).
    """
    shape = np.broadcast(np.asarray(m), np.asarray(n), np.asarray(k)).shape
    t, _ = gemm_terms(m, n, k, gpu, p, num_sms)
    m, n, k = (np.asarray(v, dtype=float).ravel() for v in np.broadcast_arrays(m, n, k))
    return np.where((m > 0) & (n > 0) & (k > 0), t, 0.0).reshape(shape)


def grouped_gemm_time_s(group_m, n: int, k: int, gpu: GpuShape, p: GemmParams, num_sms: int | None = None) -> float:
    """Time (s) of one grouped GEMM: group g is ``[group_m[g], k] x [k, n]`` with its own weights.

    Each group is padded to the tile on m; empty groups cost nothing (their weights are not read).
    """
    gm = np.asarray(group_m, dtype=float)
    gm = gm[gm > 0]
    if gm.size == 0 or n <= 0 or k <= 0:
        return 0.0
    sms = float(num_sms or gpu.num_sms)
    bw = gpu.bandwidth_bytes_per_s * p.memory_efficiency
    stream = (gm.sum() * (k + n) + gm.size * float(k) * n) * gpu.dtype_bytes / bw
    m_tiles = {bm: np.ceil(gm / bm).sum() for bm in {bm for bm, _ in TILES}}  # m-tiles of all groups, per bm
    best = np.inf
    for bm, n_tiles, tile_s in _grouped_tiles(n, k, gpu, p):
        waves = np.ceil(float(m_tiles[bm] * n_tiles) / sms)
        t = p.overhead_s + max(waves * tile_s, stream)
        best = min(best, t)
    return float(best)


@lru_cache(maxsize=1024)
def _grouped_tiles(n, k, gpu: GpuShape, p: GemmParams) -> tuple[tuple[int, float, float], ...]:
    """Per tile of :data:`TILES`: (bm, tiles along n, one tile's time in s); depends only on the GEMM's n and k,
    so an MoE layer's grouped GEMMs (same n, k every call) compute it once."""
    return tuple((bm, np.ceil(n / bn), float(_tile_time_s(bm, bn, float(k), gpu, p))) for bm, bn in TILES)


def stream_time_s(nbytes, gpu: GpuShape, p: GemmParams) -> np.ndarray:
    """Time (s) of a memory-bound elementwise kernel moving ``nbytes`` (one kernel overhead included)."""
    nbytes = np.asarray(nbytes, dtype=float)
    return np.where(nbytes > 0, p.overhead_s + nbytes / (gpu.bandwidth_bytes_per_s * p.memory_efficiency), 0.0)


# ----------------------------------------------------------------------------- fitting

STARTS = tuple(GemmParams(ce, 0.8, 5e-6, feed, epi) for ce in (0.5, 0.8, 1.0) for feed in (20e9, 50e9, 150e9)
               for epi in (0.0, 1e-6))
"""Starting points of the fit: the choice of tile and binding limit makes the error surface piecewise, with
several local minima, so the fit starts from a grid over the three parameters that shape it."""


@dataclass(frozen=True)
class GemmFit:
    """Fitted parameters and the fit's error on its own training rows (MAPE, %)."""

    params: GemmParams
    train_mape_pct: float
    rows: int


def _linear_refit(m, n, k, t, gpu: GpuShape, p: GemmParams, steps: int = 30) -> GemmParams:
    """Alternate: fix which candidate and branch bind (from ``p``), solve the now linear relative least squares
    for the five parameters by non-negative least squares, repeat until the binding pattern settles."""
    from scipy.optimize import nnls

    for _ in range(steps):
        _, design = gemm_terms(m, n, k, gpu, p)
        coef, _ = nnls(design / t[:, None], np.ones_like(t))
        ov, inv_ce, inv_me, inv_feed, epi = coef
        new = GemmParams(compute_efficiency=min(1.0 / max(inv_ce, 1e-12), 1.5),
                         memory_efficiency=min(1.0 / max(inv_me, 1e-12), 1.5), overhead_s=float(ov),
                         operand_feed_bytes_per_s=1.0 / max(inv_feed, 1e-30), tile_epilogue_s=float(epi))
        if new == p:
            break
        p = new
    return p


def fit_gemm_params(m, n, k, time_s, gpu: GpuShape, starts=STARTS, polish: int = 3) -> GemmFit:
    """Fit :class:`GemmParams` to measured GEMM times ``time_s`` (s) of shapes (m, n, k) by least squares on
    relative error: from each start, alternating linear steps (:func:`_linear_refit`); the ``polish`` best are
    then refined by scipy ``least_squares`` in log-parameters and the best result is kept."""
    from scipy.optimize import least_squares

    m, n, k, t = (np.asarray(v, dtype=float) for v in (m, n, k, time_s))
    if t.size == 0 or not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise ValueError("fit_gemm_params: need at least one finite, positive measured time")

    def clip(x):  # efficiencies stay <= 1.5 (the GemmParams bound)
        return np.concatenate([np.minimum(x[:2], np.log(1.5)), np.maximum(x[2:], -69.0)])

    def resid(x):
        return gemm_time_s(m, n, k, gpu, GemmParams.from_vector(clip(x))) / t - 1.0

    refits = [_linear_refit(m, n, k, t, gpu, start).to_vector() for start in starts]
    refits.sort(key=lambda x: float(np.sum(resid(x) ** 2)))
    best_x, best_cost = None, np.inf
    for x0 in refits[:polish]:
        res = least_squares(resid, x0, diff_step=1e-4, max_nfev=400)
        for x in (x0, res.x):
            cost = float(np.sum(resid(x) ** 2))
            if cost < best_cost:
                best_x, best_cost = x, cost
    params = GemmParams.from_vector(clip(best_x))
    return GemmFit(params=params, train_mape_pct=float(np.mean(np.abs(resid(best_x))) * 100), rows=int(t.size))
