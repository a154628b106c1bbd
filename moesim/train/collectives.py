"""Collectives of a training step on the system's topology (ring algorithms, alpha-beta).

A group of ``n`` devices whose ranks are ``stride`` apart in the rank order lies inside one node when
``n * stride <= devices_per_node``; then its links are the scale-up links, else every device's
scale-out NIC is the bottleneck (a flat ring; hierarchical algorithms are not modelled). With ``B``
bytes of the full tensor, bandwidth ``bw`` and latency ``a`` per hop:

- all-reduce: ``2 (n-1)/n * B / bw + 2 (n-1) a``;
- reduce-scatter and all-gather: ``(n-1)/n * B / bw + (n-1) a``;
- send/recv between two devices: ``B / bw + a``.

All-to-all is not here: the MoE path times it from the routed bytes on every link
(:class:`hwmodels.topology.AllToAllRouting`).

Where the system has measured data, :func:`collective_time_s` uses the NCCL fits of
:mod:`hwmodels.collectives` instead (``hwmodels/gpu_fits/nccl-vidur.toml``, Vidur's measurements inside a
DGX node; :func:`fitted_collectives` matches a fabric by GPU fit and scale-up link kind, as
:func:`hwmodels.collectives.fitted_all_to_all` does, and carries its efficiency to the system's link):

- all-reduce inside a node: the fitted LL/Simple ring all-reduce (:func:`hwmodels.collectives.all_reduce_time_s`);
- reduce-scatter and all-gather inside a node: half of that ring (``(n-1)`` steps, ``(n-1)/n`` of the bytes)
  with the same fitted protocol parameters (derived from the all-reduce fit, not measured apart;
  :func:`hwmodels.collectives.all_to_all_time_s`);
- send/recv: the fitted intra-node or inter-node point-to-point line;
- anything else (collectives across nodes, systems without a fit): the ring on the spec links above.

:func:`describe_collectives` says which applies to a system (printed by ``moesim train``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

from hwmodels.collectives import (FABRIC_SYSTEMS, NCCL_FIT_FILE, AllReduceParams, ProtocolParams, all_reduce_time_s,
                                  all_to_all_time_s, read_collective_fits, scale_to_link, send_recv_time_s)
from hwmodels.collectives import ring_time_s as spec_ring_time_s
from hwmodels.gpu_cost import FIT_DIR
from hwmodels.specs import Link, System, load_system

KINDS = ("all_reduce", "reduce_scatter", "all_gather", "send_recv")


def group_link(system: System, size: int, stride: int = 1) -> Link:
    """The bottleneck link class of a group of ``size`` ranks ``stride`` apart."""
    if size * stride <= system.devices_per_node:
        return system.scale_up
    if system.scale_out is None:
        raise ValueError(f"system {system.name!r} has no scale-out link but a group of {size} ranks "
                         f"(stride {stride}) spans nodes of {system.devices_per_node} devices")
    return system.scale_out


def group_system(system: System, size: int, stride: int = 1) -> System:
    """The sub-system a group of ``size`` ranks spans (same links; for all-to-all routing)."""
    span = size * stride
    if span <= system.devices_per_node:
        return dataclasses.replace(system, name=f"{system.name}[{size}]", num_nodes=1, devices_per_node=size)
    nodes = -(-span // system.devices_per_node)
    if size % nodes:
        raise ValueError(f"a group of {size} ranks does not divide evenly over {nodes} nodes")
    return dataclasses.replace(system, name=f"{system.name}[{size}]", num_nodes=nodes, devices_per_node=size // nodes)


@dataclass(frozen=True)
class FittedCollectives:
    """NCCL-fitted parameters carried to one system's links (None parts: no data, spec ring)."""

    all_reduce: AllReduceParams  # inside a node
    p2p_intra: ProtocolParams
    p2p_inter: ProtocolParams | None
    source: str


def fitted_collectives(system: System, fit_dir=FIT_DIR) -> FittedCollectives | None:
    """The fitted collectives of ``system`` (see the module docstring), None where no fabric matches."""
    out = system.scale_out
    return _fitted(system.device.gpu_fit or "", system.scale_up.kind, system.scale_up.bandwidth_bytes_per_s,
                   out.kind if out else "", out.bandwidth_bytes_per_s if out else 0.0, str(fit_dir))


@lru_cache(maxsize=32)
def _fitted(gpu_fit: str, up_kind: str, up_bw: float, out_kind: str, out_bw: float, fit_dir: str):
    if not gpu_fit:
        return None
    path = f"{fit_dir}/{NCCL_FIT_FILE}"
    doc = read_collective_fits(path)
    for fabric, name in FABRIC_SYSTEMS.items():
        ref = load_system(name)
        intra = doc.get(fabric, {}).get("intra-node", {})
        if ref.device.gpu_fit != gpu_fit or ref.scale_up.kind != up_kind or "all_reduce" not in intra:
            continue
        try:
            ar = AllReduceParams(*(ProtocolParams(**{k: float(v) for k, v in intra["all_reduce"][p].items()})
                                   for p in ("ll", "simple")))
            p2p = ProtocolParams(**{k: float(v) for k, v in intra["send_recv"]["p2p"].items()})
            inter = doc[fabric].get("inter-node", {}).get("send_recv", {}).get("p2p")
            p2p_out = ProtocolParams(**{k: float(v) for k, v in inter.items()}) if inter else None
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: fabric {fabric!r}: bad collective parameters ({exc})") from None
        f_up = up_bw / ref.scale_up.bandwidth_bytes_per_s
        p2p = dataclasses.replace(p2p, bus_bandwidth_bytes_per_s=p2p.bus_bandwidth_bytes_per_s * f_up)
        if p2p_out is not None and ref.scale_out is not None and out_kind == ref.scale_out.kind:
            f_out = out_bw / ref.scale_out.bandwidth_bytes_per_s
            p2p_out = dataclasses.replace(p2p_out, bus_bandwidth_bytes_per_s=p2p_out.bus_bandwidth_bytes_per_s * f_out)
        else:
            p2p_out = None
        return FittedCollectives(scale_to_link(ar, ref.scale_up.bandwidth_bytes_per_s, up_bw), p2p, p2p_out,
                                 f"{NCCL_FIT_FILE} fabric {fabric} (measured on {name})")
    return None


def describe_collectives(system: System) -> str:
    """Which collective model ``system`` gets (one line)."""
    fit = fitted_collectives(system)
    if fit is None:
        return "collectives: ring on the spec links (no NCCL fit for this system)"
    inter = "fitted" if fit.p2p_inter is not None else "spec"
    return (f"collectives: NCCL-fitted inside a node ({fit.source}; send/recv across nodes {inter}), "
            "ring on the spec links across nodes")


def _fitted_time_s(fit: FittedCollectives, kind: str, nbytes: float, size: int, inside: bool) -> float | None:
    """Fitted seconds, or None where the fit has no data for this collective (module docstring)."""
    if kind == "send_recv":
        p = fit.p2p_intra if inside else fit.p2p_inter
        return float(send_recv_time_s(nbytes, p)) if p is not None else None
    if not inside:
        return None
    if kind == "all_reduce":
        return float(all_reduce_time_s(nbytes, size, fit.all_reduce))
    return float(all_to_all_time_s(nbytes, size, fit.all_reduce))  # the same n - 1 steps of nbytes / n


def collective_time_s(system: System, kind: str, nbytes: float, size: int, stride: int = 1) -> float:
    """Seconds of one collective of ``nbytes`` (the full tensor) over a group (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown collective {kind!r}; known: {', '.join(KINDS)}")
    if size <= 1 or nbytes <= 0:
        return 0.0
    fit = fitted_collectives(system)
    if fit is not None:
        t = _fitted_time_s(fit, kind, nbytes, size, size * stride <= system.devices_per_node)
        if t is not None:
            return t
    return ring_time_s(system, kind, nbytes, size, stride)


def ring_time_s(system: System, kind: str, nbytes: float, size: int, stride: int = 1) -> float:
    """The ring (alpha-beta) time on the spec links of the group's bottleneck link class."""
    if size <= 1 or nbytes <= 0:
        return 0.0
    link = group_link(system, size, stride)
    return spec_ring_time_s(kind, nbytes, size, link.bandwidth_bytes_per_s, link.latency_s)
