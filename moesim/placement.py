"""Expert placement: which physical expert slot (on which device) holds which expert, per layer.

A Placement is three arrays (see STYLE.md):

- ``slot_to_expert`` int32 [layers, slots]: expert held by each physical slot, -1 for an empty slot.
  Slot s lives on device ``s // slots_per_device``.
- ``expert_to_slots`` int32 [layers, experts, max_replicas]: the slots holding each expert, -1 padded.
- ``replica_count`` int32 [layers, experts]: how many slots hold each expert (>= 1).

Replica routing policies decide which replica serves a (token, expert) choice; they are plain
functions with one signature, named in :data:`REPLICA_ROUTING`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


class PlacementError(ValueError):
    pass


@dataclass(frozen=True, eq=False)
class Placement:
    slot_to_expert: np.ndarray
    expert_to_slots: np.ndarray
    replica_count: np.ndarray
    slots_per_device: int
    name: str = "custom"

    @property
    def num_layers(self) -> int:
        return self.slot_to_expert.shape[0]

    @property
    def num_slots(self) -> int:
        return self.slot_to_expert.shape[1]

    @property
    def num_devices(self) -> int:
        return self.num_slots // self.slots_per_device

    @property
    def num_experts(self) -> int:
        return self.expert_to_slots.shape[1]

    def device_of_slot(self, slots: np.ndarray) -> np.ndarray:
        return np.asarray(slots) // self.slots_per_device

    def expert_devices(self, layer: int) -> np.ndarray:
        """[experts, max_replicas] device of each replica, -1 padded."""
        slots = self.expert_to_slots[layer]
        return np.where(slots >= 0, slots // self.slots_per_device, -1)

    def experts_on_device(self, layer: int, device: int) -> np.ndarray:
        s = self.slot_to_expert[layer, device * self.slots_per_device:(device + 1) * self.slots_per_device]
        return s[s >= 0]

    @classmethod
    def from_slot_to_expert(cls, slot_to_expert: np.ndarray, num_experts: int, slots_per_device: int,
                            name: str = "custom") -> "Placement":
        s2e = np.asarray(slot_to_expert, dtype=np.int32)
        if s2e.ndim != 2:
            raise PlacementError(f"slot_to_expert must be [layers, slots], got shape {s2e.shape}")
        if s2e.shape[1] % slots_per_device:
            raise PlacementError(f"{s2e.shape[1]} slots do not divide into devices of {slots_per_device} slots")
        if s2e.max() >= num_experts or s2e.min() < -1:
            raise PlacementError(f"slot_to_expert holds ids outside -1..{num_experts - 1}")
        layers = s2e.shape[0]
        count = np.zeros((layers, num_experts), dtype=np.int32)
        for layer in range(layers):
            ids = s2e[layer][s2e[layer] >= 0]
            count[layer] = np.bincount(ids, minlength=num_experts)
        max_r = max(int(count.max()), 1)
        e2s = np.full((layers, num_experts, max_r), -1, dtype=np.int32)
        for layer in range(layers):
            slots = np.flatnonzero(s2e[layer] >= 0)
            experts = s2e[layer, slots]
            order = np.lexsort((slots, experts))
            experts, slots = experts[order], slots[order]
            starts = np.searchsorted(experts, np.arange(num_experts))
            rank = np.arange(len(slots)) - starts[experts]
            e2s[layer, experts, rank] = slots
        p = cls(slot_to_expert=s2e, expert_to_slots=e2s, replica_count=count, slots_per_device=slots_per_device,
                name=name)
        p.validate()
        return p

    def validate(self) -> None:
        """Maps are mutually inverse and every expert has at least one replica."""
        missing = np.argwhere(self.replica_count < 1)
        if missing.size:
            layer, expert = missing[0]
            raise PlacementError(f"expert {expert} of layer {layer} has no slot (every expert needs >= 1 replica)")
        for layer in range(self.num_layers):
            for e in range(self.num_experts):
                slots = self.expert_to_slots[layer, e]
                slots = slots[slots >= 0]
                if len(slots) != self.replica_count[layer, e] or np.any(self.slot_to_expert[layer, slots] != e):
                    raise PlacementError(f"placement maps disagree for expert {e} at layer {layer}")
        used = (self.slot_to_expert >= 0).sum(axis=1)
        if np.any(used != self.replica_count.sum(axis=1)):
            raise PlacementError("slot_to_expert and replica_count disagree on the number of used slots")

    def check_fits(self, num_layers: int, num_experts: int, num_devices: int) -> None:
        if self.num_layers != num_layers:
            raise PlacementError(f"placement has {self.num_layers} layers, the trace has {num_layers}")
        if self.num_experts != num_experts:
            raise PlacementError(f"placement is for {self.num_experts} experts, the trace has {num_experts}")
        if self.num_devices != num_devices:
            raise PlacementError(f"placement spans {self.num_devices} devices, the system has {num_devices}")


def contiguous(num_layers: int, num_experts: int, num_devices: int) -> Placement:
    """Experts 0..E/D-1 on device 0, the next E/D on device 1, ... (E must be a multiple of D; else
    the last device gets empty slots)."""
    if num_devices < 1:
        raise PlacementError("num_devices must be >= 1")
    per = -(-num_experts // num_devices)
    row = np.full(per * num_devices, -1, dtype=np.int32)
    row[:num_experts] = np.arange(num_experts)
    return Placement.from_slot_to_expert(np.tile(row, (num_layers, 1)), num_experts, per, name="contiguous")


# --------------------------------------------------------------------------- replica routing

ReplicaRouting = Callable[[Placement, int, np.ndarray, np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def route_local_first(placement: Placement, layer: int, src_device: np.ndarray, expert: np.ndarray,
                      token: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Destination device of each (token, expert) choice: the replica on the token's own device if
    there is one, else replica ``token % replica_count`` (spreads a hot expert's tokens evenly)."""
    rep_dev = placement.expert_devices(layer)  # [E, R]
    count = placement.replica_count[layer]  # [E]
    local = np.zeros((placement.num_experts, placement.num_devices), dtype=bool)
    e_idx, r_idx = np.nonzero(rep_dev >= 0)
    local[e_idx, rep_dev[e_idx, r_idx]] = True
    chosen = rep_dev[expert, token % count[expert]]
    return np.where(local[expert, src_device], src_device, chosen)


def route_round_robin(placement, layer, src_device, expert, token, rng) -> np.ndarray:
    """Replica ``token % replica_count``, ignoring locality."""
    return placement.expert_devices(layer)[expert, token % placement.replica_count[layer][expert]]


def route_random(placement, layer, src_device, expert, token, rng) -> np.ndarray:
    """A uniformly random replica per choice (seeded)."""
    count = placement.replica_count[layer][expert]
    return placement.expert_devices(layer)[expert, rng.integers(0, count)]


REPLICA_ROUTING: dict[str, ReplicaRouting] = {
    "local-first": route_local_first,
    "round-robin": route_round_robin,
    "random": route_random,
}
