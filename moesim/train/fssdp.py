"""Fully sharded sparse data parallel (FSSDP) for the routed experts, as an alternative to expert parallel.

Hecate (Qing et al., "Hecate: Unlocking Efficient Sparse Model Training via Fully Sharded Sparse Data
Parallelism", arXiv:2502.02581): the parameters and optimizer states of the MoE layers are fully sharded over
the devices, and each iteration materialises, on each device, the experts it will compute with a
``SparseAllGather`` (only the experts the routing needs), then returns their gradients to the owning shards
with a ``SparseReduceScatter``. The placement of the materialised experts follows the iteration's loads, so no
device is a straggler by a fixed placement.

moesim's form, over the ``--ep`` devices of an expert group (``n`` = ep):

- every expert's parameters are sharded ``1 / n`` over the group's devices (so a device owns as many expert
  parameters, gradients and optimizer states as under expert parallel);
- placement, per MoE layer and step: the experts the step's routing touches (load > 0, summed over the
  step's routing samples) are materialised; an expert with more load than a device's fair share (total / n)
  in ``ceil(load / share)`` copies on distinct devices (a hot expert's tokens split evenly over its copies),
  the copies assigned longest-processing-time first to the least-loaded device; untouched experts are not
  materialised. The loads are the step's own (``fssdp_plan="oracle"``: Hecate plans its placement from the
  loads it observes; its exact replication and heterogeneous-sharding policy is not reproduced) or only the
  first routing sample's (``"first-sample"``: a plan made on one batch and used on the others);
- bytes moved per MoE layer and step: the sparse all-gather brings each materialised copy's missing
  ``(n - 1) / n`` to its device, ``P_e * weight_bytes * (n - 1) / n`` per copy, and the sparse
  reduce-scatter sends the same share of its gradient back: ``P_e * grad_bytes * (n - 1) / n``. ``P_e`` = 3
  x hidden x moe_intermediate (gate, up, down). When no expert exceeds the fair share, the copies are
  exactly the experts the trace touches. Seconds: the busiest device's receive (all-gather) or send
  (reduce-scatter) bytes over the group's bottleneck link, plus one link latency per peer;
- tokens then go to the device holding their expert by the same all-to-all as expert parallel (the
  placement machinery of :mod:`moesim.placement`), and the busiest device's expert compute is what the
  balanced placement leaves.

The materialisation happens once per step (gradient accumulation keeps the experts materialised over the
step's micro-batches); it is not overlapped with compute in the step time (as the gradient sync is not), so
``fssdp_comm_s`` in the breakdown bounds what overlapping would save. The materialised experts are a
per-device buffer of weights and gradients (memory category ``fssdp_buffers``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hwmodels.specs import System
from moesim.placement import Placement, contiguous
from moesim.train.collectives import group_link
from workloads.catalog import swiglu_params
from workloads.hf_config import ModelConfig
from workloads.trace import Trace


def expert_params(cfg: ModelConfig) -> float:
    """Parameters of one routed expert: gate, up and down projections."""
    return float(swiglu_params(cfg.hidden_size, cfg.moe_intermediate_size))


def replica_counts(load: np.ndarray, devices: int) -> np.ndarray:
    """[layers, experts] materialised copies: ``ceil(load / mean device load)`` for a touched expert (at most
    ``devices``), so that no copy carries more than a device's fair share; 1 for an untouched one."""
    load = np.asarray(load, dtype=float)
    mean = load.sum(axis=1, keepdims=True) / devices
    r = np.ceil(np.divide(load, mean, out=np.zeros_like(load), where=mean > 0))
    return np.clip(r, 1, devices).astype(np.int64)


def lpt_placement(load: np.ndarray, devices: int) -> Placement:
    """Per layer: each touched expert in :func:`replica_counts` copies of ``load / copies`` each, copies
    longest-processing-time first onto the device with the least load so far that has no copy of that expert
    (ties: fewest copies, then lowest index); untouched experts onto the devices with the fewest copies (they hold
    a slot but compute nothing and are not materialised)."""
    load = np.asarray(load, dtype=float)
    layers, experts = load.shape
    copies = replica_counts(load, devices)
    assign: list[list[tuple[int, int]]] = []
    for layer in range(layers):
        dev_load, dev_count = np.zeros(devices), np.zeros(devices, dtype=np.int64)
        items = sorted(((load[layer, e] / copies[layer, e], e) for e in range(experts)
                        for _ in range(copies[layer, e])), key=lambda it: -it[0])
        held = np.zeros((experts, devices), dtype=bool)
        placed = []
        for w, e in items:
            keys = (np.arange(devices), dev_count) + ((dev_load,) if w > 0 else ())
            d = next(int(d) for d in np.lexsort(keys) if not held[e, d])  # lexsort: the last key is the primary one
            held[e, d] = True
            dev_load[d] += w
            dev_count[d] += 1
            placed.append((d, e))
        assign.append(placed)
    per = max(int(np.bincount([d for d, _ in placed], minlength=devices).max()) for placed in assign)
    s2e = np.full((layers, devices * per), -1, dtype=np.int32)
    for layer, placed in enumerate(assign):
        fill = np.zeros(devices, dtype=np.int64)
        for d, e in placed:
            s2e[layer, d * per + fill[d]] = e
            fill[d] += 1
    return Placement.from_slot_to_expert(s2e, experts, per, name="fssdp-lpt")


def placement_from_trace(devices: int, plan: str = "oracle"):
    """The callable :func:`moesim.train.moe.moe_times` calls with the sampled trace: the LPT placement from the
    loads of all the step's routing samples (``oracle``) or of its first sample only (``first-sample``: planned on
    one batch, then used for batches it has not seen, as a placement planned ahead of the step would be)."""
    def build(sampled: Trace, layers: int) -> Placement:  # the sampled trace holds ``layers`` layers
        rows = sampled.select(sampled.columns["step"] == 0) if plan == "first-sample" else sampled
        return lpt_placement(rows.expert_load(), devices)
    return build


@dataclass(frozen=True)
class FssdpComm:
    """Per replayed MoE layer: touched experts, the busiest device's materialised experts, bytes and seconds."""

    touched: np.ndarray  # [layers] experts with load > 0
    copies: np.ndarray  # [layers] materialised copies of them (touched + extra copies of hot experts)
    materialised_max: np.ndarray  # [layers] most touched experts on one device
    gather_bytes: np.ndarray  # [layers] bytes the sparse all-gather moves over the group (all devices)
    reduce_scatter_bytes: np.ndarray
    gather_s: np.ndarray  # [layers]
    reduce_scatter_s: np.ndarray


def fssdp_comm(system: System, cfg: ModelConfig, load: np.ndarray, placement: Placement | None, devices: int,
               weight_bytes: int, grad_bytes: int) -> FssdpComm:
    """Bytes and seconds of the sparse all-gather and reduce-scatter of each layer (module docstring).

    ``load`` [layers, experts]; ``placement`` None means the contiguous one (expert e on device e // (E / n))."""
    load = np.asarray(load)
    layers, experts = load.shape
    touched_mask = load > 0
    if placement is None:
        placement = contiguous(layers, experts, devices)
    per_dev = np.zeros((layers, devices), dtype=np.int64)  # materialised copies of touched experts per device
    for layer in range(layers):
        slots = np.flatnonzero(placement.slot_to_expert[layer] >= 0)
        hot = slots[touched_mask[layer, placement.slot_to_expert[layer, slots]]]
        per_dev[layer] = np.bincount(hot // placement.slots_per_device, minlength=devices)
    touched, copies = touched_mask.sum(axis=1), per_dev.sum(axis=1)
    share = (devices - 1) / devices if devices > 1 else 0.0
    pe = expert_params(cfg)
    link = group_link(system, devices) if devices > 1 else None

    def seconds(nbytes_per_expert: float) -> np.ndarray:
        if link is None:
            return np.zeros(layers)
        recv = per_dev.max(axis=1) * pe * nbytes_per_expert * share  # busiest device's incoming bytes
        # each device sends its shard of every copy it does not materialise itself
        send = (copies - per_dev.min(axis=1)) * pe * nbytes_per_expert / devices
        t = np.maximum(recv, send) / link.bandwidth_bytes_per_s + (devices - 1) * link.latency_s
        return np.where(touched > 0, t, 0.0)

    return FssdpComm(touched=touched, copies=copies, materialised_max=per_dev.max(axis=1),
                     gather_bytes=copies * pe * weight_bytes * share,
                     reduce_scatter_bytes=copies * pe * grad_bytes * share,
                     gather_s=seconds(weight_bytes), reduce_scatter_s=seconds(grad_bytes))
