"""``--offload optimizer|weights``: Adam's states (and the weights) in the memory tier behind HBM, with the
transfers on the step.

As ZeRO-Offload (Ren et al., USENIX ATC 2021) and Megatron-Core's ``--optimizer-cpu-offload`` do: the fp32
master weights, momentum and variance (12 bytes per local parameter) live in the backing tier of the device's
main memory (:meth:`moesim.memory.tiers.MemoryHierarchy.backing_tier`: host memory behind the host link on a
GPU, DDR on a device that has it). After the backward pass, each device sends its local bf16 gradients
there, the Adam step runs there, bytes-bound on that tier (:data:`moesim.train.step.ADAM_BYTES_PER_PARAM` per
parameter), and the updated bf16 weights come back:

``offload_s = transfer(n * grad_bytes, hbm -> tier) + n * adam_bytes / tier_bandwidth + transfer(n * weight_bytes,
tier -> hbm)``

``--offload weights`` also keeps the bf16 weights there (HBM holds a double buffer of the largest layer) and
fetches each layer's local weights before its forward and again before its backward, every micro-batch (as
ZeRO-Infinity streams parameters), ``transfer(layer weights, tier -> hbm)`` each, prefetched so that only what
exceeds the layer's compute waits (the ZeRO-3 rule of :mod:`moesim.train.step`).

The transfers are timed by :meth:`~moesim.memory.tiers.MemoryHierarchy.transfer_time_s` (bottleneck of the host
link and both tiers, plus their latencies). Host memory is shared by the node's devices, which all update at
once: each gets ``1 / devices_per_node`` of its bandwidth and capacity. Nothing of this overlaps the pipeline
(ZeRO-Offload overlaps part of it; so this is the un-overlapped bound).
"""

from __future__ import annotations

from hwmodels.specs import System
from moesim.memory.tiers import HOST, MemoryHierarchy

def backing(system: System) -> tuple[str, float, float, MemoryHierarchy]:
    """(tier name, bandwidth per device, capacity per device, hierarchy) of where offloaded states live."""
    h = MemoryHierarchy.from_system(system)
    name = h.backing_tier(system.device.main_memory.name)
    tier = h.tier(name)
    share = system.devices_per_node if name == HOST else 1
    return name, tier.bandwidth_bytes_per_s / share, tier.capacity_bytes / share, h


def optimizer_offload_s(system: System, params: float, grad_bytes: int, weight_bytes: int, adam_bytes: int) -> float:
    """Seconds of the offloaded optimizer step of ``params`` local parameters (module docstring)."""
    if params <= 0:
        return 0.0
    name, bw, _, h = backing(system)
    hbm = system.device.main_memory.name
    return (h.transfer_time_s(params * grad_bytes, hbm, name) + params * adam_bytes / bw
            + h.transfer_time_s(params * weight_bytes, name, hbm))


def weight_fetch_s(system: System, nbytes: float) -> float:
    """Seconds to bring ``nbytes`` of weights from the backing tier into HBM."""
    if nbytes <= 0:
        return 0.0
    name, _, _, h = backing(system)
    return h.transfer_time_s(nbytes, name, system.device.main_memory.name)
