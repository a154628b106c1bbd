"""Collective communication times from measurements: latency + bandwidth per protocol, message size and
participant count, fitted to NCCL timings (Vidur's all-reduce and send/recv inside a DGX node).

Ring all-reduce over ``n`` GPUs moves ``2 (n - 1) / n * size`` bytes through each GPU's link in
``2 (n - 1)`` steps. NCCL picks a protocol per size: LL (low latency, flag per 8-byte word, half the
bandwidth) for small messages, Simple for large ones. The model takes the faster of the two::

    t_p(size, n) = latency_p + 2 (n - 1) hop_p + 2 (n - 1) / n * size / bus_bandwidth_p     p in {LL, Simple}
    t(size, n)   = min_p t_p

Send/recv: ``t = latency + size / bandwidth``. All-to-all over a switch (each GPU sends ``(n - 1) / n`` of its
buffer through its own link), and a ring reduce-scatter or all-gather (``n - 1`` steps of ``size / n``):
``t = min_p latency_p + (n - 1) hop_p + (n - 1) / n * size / bus_bandwidth_p`` with the LL and Simple
parameters of the same fabric (:func:`all_to_all_time_s`). The parameters are per fabric (measured system), fitted by
least squares on relative error; :func:`scale_to_link` carries a fit's efficiency (fitted / spec bandwidth) to
another link (e.g. H100 NVLink measurements to H800's NVLink).

Dtypes per direction: :func:`a2a_payload_bytes` sizes a dispatch in fp8 (with one fp32 scale per 128
values, as DeepEP and DeepGEMM use) and a combine in bf16. :data:`COMM_KERNEL_SMS`: SMs a communication
kernel family takes from compute while it overlaps (with its source).

The simulator's all-to-all models (:class:`BottleneckLinkAllToAll`, :class:`FittedAllToAll`) time one
all-to-all from the bytes a trace routes over each link; the cost model picks one
(:func:`hwmodels.cost.collective_model`).
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from hwmodels.roofline import DTYPE_BYTES
from hwmodels.specs import System, load_system
from hwmodels.topology import AllToAllRouting
from moebase.files import read_text_bounded
from moebase.units import US

NCCL_FIT_FILE = "nccl-vidur.toml"
"""The shipped collective fit (in the GPU fit folder, :data:`hwmodels.gpu_cost.FIT_DIR`)."""
FABRIC_SYSTEMS = {"h100_dgx": "dgx-h100", "a100_dgx": "dgx-a100"}
"""fitted fabric (Vidur system) -> the moesim system spec it was measured on."""
MAX_FIT_FILE_BYTES = 1 << 20

FP8_SCALE_BLOCK = 128
"""Values per fp32 scaling factor in fine-grained fp8 (DeepSeek-V3 report sec. 3.3: 1x128 activation tiles)."""

COMM_KERNEL_SMS = {
    "deepep-normal-v1": (24, "deepseek-ai/DeepEP docs/legacy.md @0297fc80, example: 'Buffer.set_num_sms(24)'"),
    "deepseek-v3-all-to-all": (20, "DeepSeek-V3 technical report (arXiv:2412.19437) sec. 3.2.2: 'only 20 SMs are "
                               "sufficient to fully utilize the bandwidths of IB and NVLink'"),
    "deepep-v2-ep8x2": (12, "deepseek-ai/DeepEP README @0297fc80, performance table: SM90 CX7 EP 8 x 2, #SMs 12"),
    "deepep-v2-ep8x4": (6, "deepseek-ai/DeepEP README @0297fc80, performance table: SM90 CX7 EP 8 x 4, #SMs 6"),
    "deepep-low-latency": (0, "deepseek-ai/DeepEP docs/legacy.md: the receive hook lets RDMA traffic run 'without "
                           "costing any GPU SMs from the computation part'"),
    "nccl-ring": (32, "NCCL (github.com/NVIDIA/nccl) src/include/devcomm.h: MAXCHANNELS 32, the most channels a "
                  "collective runs on; one CTA (SM) per channel (NCCL user guide, Environment Variables, "
                  "NCCL_MAX_NCHANNELS / NCCL_MAX_CTAS: fewer channels, fewer CUDA blocks taken from compute)"),
    "te-userbuffers": (16, "github.com/NVIDIA/TransformerEngine transformer_engine/pytorch/module/base.py @0004dbd0, "
                       "initialize_ub: add_ub(num_sm=16) for the ring-exchange, pipeline and bulk TP overlaps"),
}
"""kernel family -> (SMs it holds while overlapping compute, source)."""


@dataclass(frozen=True)
class ProtocolParams:
    latency_s: float
    hop_s: float
    bus_bandwidth_bytes_per_s: float


@dataclass(frozen=True)
class AllReduceParams:
    """Fitted all-reduce parameters of one fabric: the LL and Simple protocols."""

    ll: ProtocolParams
    simple: ProtocolParams

    def to_vector(self) -> np.ndarray:
        return np.log([*asdict(self.ll).values(), *asdict(self.simple).values()])

    @classmethod
    def from_vector(cls, x) -> "AllReduceParams":
        v = np.exp(np.clip(np.asarray(x, dtype=float), -60.0, 60.0))
        return cls(ProtocolParams(*v[:3]), ProtocolParams(*v[3:]))


def _protocol_time_s(p: ProtocolParams, size_bytes, n, steps, wire_fraction):
    return p.latency_s + steps * p.hop_s + wire_fraction * size_bytes / p.bus_bandwidth_bytes_per_s


def all_reduce_time_s(size_bytes, num_gpus, p: AllReduceParams) -> np.ndarray:
    """Ring all-reduce time (s) of ``size_bytes`` over ``num_gpus`` (arrays broadcast); 0 for one GPU."""
    s, n = (np.asarray(v, dtype=float) for v in np.broadcast_arrays(size_bytes, num_gpus))
    steps, frac = 2 * (n - 1), 2 * (n - 1) / np.maximum(n, 1)
    t = np.minimum(_protocol_time_s(p.ll, s, n, steps, frac), _protocol_time_s(p.simple, s, n, steps, frac))
    return np.where((n > 1) & (s > 0), t, 0.0)


def all_to_all_time_s(size_bytes, num_gpus, p: AllReduceParams) -> np.ndarray:
    """All-to-all over a switch: each GPU sends ``(n-1)/n`` of its ``size_bytes`` buffer in ``n - 1`` steps (also
    a ring reduce-scatter or all-gather of ``size_bytes``); 0 for one GPU. The faster of LL and Simple, as for
    all-reduce: NCCL picks its protocol per message size, and both protocols' parameters are fitted together on
    the same all-reduce rows (``nccl-vidur.toml``), so neither is extrapolated beyond the other."""
    s, n = (np.asarray(v, dtype=float) for v in np.broadcast_arrays(size_bytes, num_gpus))
    steps, frac = n - 1, (n - 1) / np.maximum(n, 1)
    t = np.minimum(_protocol_time_s(p.ll, s, n, steps, frac), _protocol_time_s(p.simple, s, n, steps, frac))
    return np.where((n > 1) & (s > 0), t, 0.0)


def send_recv_time_s(size_bytes, p: ProtocolParams) -> np.ndarray:
    s = np.asarray(size_bytes, dtype=float)
    return np.where(s > 0, p.latency_s + s / p.bus_bandwidth_bytes_per_s, 0.0)


def ring_time_s(kind: str, nbytes: float, size: int, bandwidth_bytes_per_s: float, latency_s: float) -> float:
    """Spec-link (alpha-beta) time of one collective of ``nbytes`` (the full tensor) over ``size`` ranks on
    links of ``bandwidth_bytes_per_s`` and ``latency_s``: a ring all-reduce takes ``2 (size - 1)`` steps, a
    reduce-scatter, all-gather or all-to-all ``size - 1``, each moving ``nbytes / size`` over one link and
    paying one latency; send/recv is ``nbytes / bandwidth + latency`` (no special case for 0 bytes or 1 rank)."""
    if kind == "send_recv":
        return nbytes / bandwidth_bytes_per_s + latency_s
    steps = (size - 1) * (2 if kind == "all_reduce" else 1)
    return steps / size * nbytes / bandwidth_bytes_per_s + steps * latency_s


def scale_to_link(p: AllReduceParams, fitted_link_bytes_per_s: float,
                  target_link_bytes_per_s: float) -> AllReduceParams:
    """The same efficiency (bandwidth / spec link bandwidth) and latencies on a link of another speed."""
    f = target_link_bytes_per_s / fitted_link_bytes_per_s
    return AllReduceParams(replace(p.ll, bus_bandwidth_bytes_per_s=p.ll.bus_bandwidth_bytes_per_s * f),
                           replace(p.simple, bus_bandwidth_bytes_per_s=p.simple.bus_bandwidth_bytes_per_s * f))


def a2a_payload_bytes(tokens: float, hidden_size: int, dtype: str) -> float:
    """Bytes of ``tokens`` rows of ``hidden_size`` in ``dtype``; fp8 adds one fp32 scale per 128 values."""
    b = tokens * hidden_size * DTYPE_BYTES[dtype]
    if dtype == "fp8":
        b += tokens * np.ceil(hidden_size / FP8_SCALE_BLOCK) * DTYPE_BYTES["fp32"]
    return float(b)


# ----------------------------------------------------------------------------- fitting

AR_START = AllReduceParams(ProtocolParams(10e-6, 0.5e-6, 50e9), ProtocolParams(25e-6, 1e-6, 300e9))


def fit_all_reduce(size_bytes, num_gpus, time_s, start: AllReduceParams = AR_START) -> tuple[AllReduceParams, float]:
    """Fit :class:`AllReduceParams` by least squares on relative error. Returns (params, fit MAPE %)."""
    from scipy.optimize import least_squares

    s, n, t = (np.asarray(v, dtype=float) for v in (size_bytes, num_gpus, time_s))
    if t.size < 6 or np.any(t <= 0) or np.any(n < 2):
        raise ValueError("fit_all_reduce: need >= 6 positive times, each over >= 2 GPUs")

    def resid(x):
        return all_reduce_time_s(s, n, AllReduceParams.from_vector(x)) / t - 1.0

    best = None
    for scale in (1.0, 0.3, 3.0):
        res = least_squares(resid, start.to_vector() + np.log(scale), diff_step=1e-4, max_nfev=2000)
        if best is None or res.cost < best.cost:
            best = res
    return AllReduceParams.from_vector(best.x), float(np.mean(np.abs(resid(best.x))) * 100)


def fit_send_recv(size_bytes, time_s) -> tuple[ProtocolParams, float]:
    """Fit ``latency + size / bandwidth`` (relative least squares: linear, rows weighted by 1/t).

    Returns (params, MAPE %)."""
    from scipy.optimize import nnls

    s, t = np.asarray(size_bytes, dtype=float), np.asarray(time_s, dtype=float)
    coef, _ = nnls(np.stack([np.ones_like(s), s], axis=1) / t[:, None], np.ones_like(s))
    lat, inv_bw = max(coef[0], 1e-9), max(coef[1], 1e-18)
    p = ProtocolParams(float(lat), 0.0, float(1.0 / inv_bw))
    return p, float(np.mean(np.abs(send_recv_time_s(s, p) / t - 1)) * 100)


# ----------------------------------------------------------------------------- the simulator's all-to-all models


@dataclass(frozen=True)
class BottleneckLinkAllToAll:
    """Spec all-to-all: max over links of bytes / spec bandwidth + the largest spec route latency
    (:meth:`hwmodels.topology.AllToAllRouting.duration_s`). The model of ``--cost roofline``."""

    name: str = "bottleneck-link"

    def duration_s(self, routing: AllToAllRouting, pair_bytes: np.ndarray) -> float:
        return routing.duration_s(pair_bytes)

    def describe(self) -> str:
        return f"{self.name}: spec link bandwidths and latencies (not fitted)"


@dataclass(frozen=True)
class FittedProtocol:
    """One NCCL protocol of a fitted all-to-all: start-up, per-peer step, and achieved bandwidth as a fraction of
    the spec bandwidth, per link kind (``efficiency``) and on link kinds without a fit (``other_efficiency``)."""

    name: str
    latency_s: float
    hop_s: float
    efficiency: tuple[tuple[str, float], ...]
    other_efficiency: float = 1.0

    def time_s(self, routing: AllToAllRouting, edge_bytes: np.ndarray, n: int, route_latency_s: float) -> float:
        """Seconds of one exchange under this protocol: ``edge_bytes`` per link of ``routing``, ``n`` participants."""
        eff = np.full(len(routing.edge_kinds), self.other_efficiency)
        kinds = np.asarray(routing.edge_kinds)
        for kind, e in self.efficiency:
            eff[kinds == kind] = e
        busy_s = float((edge_bytes / (routing.edge_bandwidth_bytes_per_s * eff)).max())
        return max(self.latency_s + (n - 1) * self.hop_s, route_latency_s) + busy_s


@dataclass(frozen=True)
class FittedAllToAll:
    """All-to-all with NCCL-fitted start-up and achieved bandwidth, over the trace's real per-link bytes, the
    faster of the fabric's protocols (LL, Simple; see :func:`all_to_all_time_s`)::

        t = min_p max(latency_p + (n - 1) hop_p, largest spec route latency)
              + max_e bytes_e / (spec_bw_e * eff_p(kind_e))

    ``n``: devices that send or receive; ``eff_p``: fitted bus bandwidth / spec bandwidth of the link it was
    measured on; on link kinds without a fit Simple runs at spec bandwidth and LL at its fitted fraction of
    Simple's. With uniform traffic over one switch this is :func:`all_to_all_time_s` of the fit carried to the
    link (:func:`scale_to_link`).
    """

    fabric: str
    protocols: tuple[FittedProtocol, ...]
    source: str
    name: str = "nccl-fitted"

    def duration_s(self, routing: AllToAllRouting, pair_bytes: np.ndarray) -> float:
        ex = routing.exchange(pair_bytes)
        if ex is None:
            return 0.0
        edge_bytes, pairs = ex
        n = int((pairs.any(axis=0) | pairs.any(axis=1)).sum())
        route_s = float(routing.pair_latency_s[pairs].max())
        return min(p.time_s(routing, edge_bytes, n, route_s) for p in self.protocols)

    def describe(self) -> str:
        parts = "; ".join(f"{p.name}: start-up {p.latency_s / US:.1f} us + {p.hop_s / US:.2f} us per peer, bandwidth "
                          + ", ".join(f"{k} {e * 100:.0f} % of spec" for k, e in p.efficiency)
                          + f" (other links {p.other_efficiency * 100:.0f} %)" for p in self.protocols)
        return f"{self.name} ({self.fabric}): faster of {parts}; over the bottleneck link; {self.source}"


def read_collective_fits(path: str | Path) -> dict:
    """The shipped collective fit file as a dict; a missing, oversized or invalid file raises ValueError."""
    text = read_text_bounded(path, MAX_FIT_FILE_BYTES, "collective fit file")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None


def _protocol(doc: dict, path: Path, keys: tuple[str, ...]) -> ProtocolParams:
    t = doc
    for k in keys:
        t = t.get(k) if isinstance(t, dict) else None
    try:
        p = ProtocolParams(float(t["latency_s"]), float(t["hop_s"]), float(t["bus_bandwidth_bytes_per_s"]))
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"{path}: key {'.'.join(keys)!r}: needs latency_s, hop_s, bus_bandwidth_bytes_per_s") from None
    if min(asdict(p).values()) < 0 or p.bus_bandwidth_bytes_per_s == 0:
        raise ValueError(f"{path}: key {'.'.join(keys)!r}: negative or zero parameter")
    return p


def fitted_all_to_all(system: System, fit_dir: Path) -> FittedAllToAll | None:
    """The fitted all-to-all of ``system``: the intra-node NCCL fit of the fabric measured on a system whose
    device shares ``system``'s GEMM fit (``gpu_fit``: same GPU silicon) and whose scale-up link is of the same
    kind, its efficiency carried to ``system``'s links. None when no fabric fits (then use the spec model)."""
    if not system.device.gpu_fit:
        return None
    return _fabric_all_to_all(system.device.gpu_fit, system.scale_up.kind, Path(fit_dir))


@lru_cache(maxsize=16)
def _fabric_all_to_all(gpu_fit: str, link_kind: str, fit_dir: Path) -> FittedAllToAll | None:
    path = fit_dir / NCCL_FIT_FILE
    doc = read_collective_fits(path)
    for fabric, spec in FABRIC_SYSTEMS.items():
        ref = load_system(spec)
        if fabric not in doc or ref.device.gpu_fit != gpu_fit or ref.scale_up.kind != link_kind:
            continue
        simple = _protocol(doc, path, (fabric, "intra-node", "all_reduce", "simple"))
        ar = doc[fabric]["intra-node"]["all_reduce"].get("validation", {})
        held = ar.get("held-out sizes (every 3rd)", {})
        err = f"held-out all-reduce MAPE {float(held['mape_pct']):.1f} %" if "mape_pct" in held else "not validated"
        ll = _protocol(doc, path, (fabric, "intra-node", "all_reduce", "ll"))
        protocols = tuple(
            FittedProtocol(name, p.latency_s, p.hop_s,
                           ((ref.scale_up.kind, p.bus_bandwidth_bytes_per_s / ref.scale_up.bandwidth_bytes_per_s),),
                           p.bus_bandwidth_bytes_per_s / simple.bus_bandwidth_bytes_per_s)
            for name, p in (("LL", ll), ("Simple", simple)))
        return FittedAllToAll(fabric=f"{fabric} intra-node, {path.name}", protocols=protocols,
                              source=f"LL/Simple NCCL all-reduce fit on {spec} ({err})")
    return None
