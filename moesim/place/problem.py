"""A placement problem: the statistics a placer needs, taken from a (fitting) trace and a system.

All loads are counts of (token, expert) choices -- "tokens" for short -- over the fitting trace.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.placement import Placement, PlacementError


@dataclass(frozen=True, eq=False)
class PlacementProblem:
    """What the placers see.

    load [layers, experts] int64: choices of each expert in the fitting trace (tokens).
    affinity [layers - 1, experts, experts] int64 or None: ``affinity[l, e, f]`` = tokens that chose
        expert e at layer l and expert f at layer l + 1 (all top-k x top-k pairs; ExFlow/MoETuner's
        inter-layer affinity). None when not computed (balance only).
    num_devices: GPUs; devices_per_node: GPUs per node (device d is on node d // devices_per_node).
    slots_per_device: expert slots (memory capacity, in experts) of every GPU.
    num_replicas: redundant slots in total (placed experts = experts + num_replicas).
    cross_gpu_cost / cross_node_cost: cost of one token crossing GPUs inside a node / across nodes
        (relative units: the inverse link bandwidths, NVLink crossing = 1).
    scenarios [S, layers, experts] int64 or None: bootstrap resamples of the fitting trace (whole
        sequences drawn with replacement, same size as the fit); the balance model minimises the
        average over the nominal load and these scenarios of the max GPU load (sample-average
        approximation of the expected max load on unseen traffic).
    """

    load: np.ndarray
    affinity: np.ndarray | None
    num_devices: int
    devices_per_node: int
    slots_per_device: int
    num_replicas: int = 0
    cross_gpu_cost: float = 1.0
    cross_node_cost: float = 1.0
    scenarios: np.ndarray | None = None

    def __post_init__(self):
        validate_shape(self.load.shape[1], self.num_devices, self.slots_per_device, self.num_replicas)
        if self.num_devices % self.devices_per_node:
            raise PlacementError(f"{self.num_devices} GPUs do not divide into nodes of {self.devices_per_node}")
        want = (self.num_layers - 1, self.num_experts, self.num_experts)
        if self.affinity is not None and self.affinity.shape != want:
            raise PlacementError(f"affinity must be [layers-1, experts, experts], got {self.affinity.shape}")
        if self.scenarios is not None and self.scenarios.shape[1:] != self.load.shape:
            raise PlacementError(f"scenarios must be [S, layers, experts], got {self.scenarios.shape}")

    @property
    def num_layers(self) -> int:
        return self.load.shape[0]

    @property
    def num_experts(self) -> int:
        return self.load.shape[1]

    @property
    def num_slots(self) -> int:
        return self.num_devices * self.slots_per_device

    def node_of(self, device: np.ndarray) -> np.ndarray:
        return np.asarray(device) // self.devices_per_node

    def device_cost(self) -> np.ndarray:
        """[D, D] cost of one token going from GPU a to GPU b (0 on the diagonal)."""
        d = np.arange(self.num_devices)
        same_node = self.node_of(d)[:, None] == self.node_of(d)[None, :]
        cost = np.where(same_node, self.cross_gpu_cost, self.cross_node_cost)
        np.fill_diagonal(cost, 0.0)
        return cost


def min_slots_per_device(num_experts: int, num_devices: int, num_replicas: int = 0) -> int:
    """Smallest per-GPU slot capacity that holds every expert plus the replicas."""
    return -(-(num_experts + num_replicas) // num_devices)


def validate_shape(num_experts: int, num_devices: int, slots_per_device: int, num_replicas: int) -> None:
    """Raise PlacementError naming the problem for shapes no placement can satisfy."""
    if num_devices < 1:
        raise PlacementError(f"num_devices must be >= 1, got {num_devices}")
    if num_replicas < 0:
        raise PlacementError(f"replicas must be >= 0, got {num_replicas}")
    placed = num_experts + num_replicas
    if num_devices > placed:
        raise PlacementError(f"more GPUs ({num_devices}) than expert slots to fill ({num_experts} experts + "
                             f"{num_replicas} replicas = {placed}): some GPU would hold no expert; use fewer GPUs "
                             f"or at least {num_devices - num_experts} replicas")
    need = min_slots_per_device(num_experts, num_devices, num_replicas)
    if slots_per_device < need:
        raise PlacementError(f"infeasible capacity: {num_devices} GPUs x {slots_per_device} slots = "
                             f"{num_devices * slots_per_device} slots cannot hold {num_experts} experts + "
                             f"{num_replicas} replicas; the minimum capacity is {need} slots per GPU")
    if num_replicas > num_experts * (num_devices - 1):
        raise PlacementError(f"{num_replicas} replicas exceed what {num_devices} GPUs can use (at most one copy of "
                             f"an expert per GPU: {num_experts * (num_devices - 1)} replicas)")


def problem_from_trace(trace, num_devices: int, devices_per_node: int, *, num_replicas: int = 0,
                       slots_per_device: int | None = None, num_experts: int | None = None,
                       cross_gpu_cost: float = 1.0, cross_node_cost: float = 1.0,
                       with_affinity: bool = True, num_scenarios: int = 0,
                       rng: np.random.Generator | None = None) -> PlacementProblem:
    """Problem statistics from a :class:`workloads.trace.Trace` (the fitting part).

    ``num_experts`` (e.g. the model's) must agree with the trace's; ``slots_per_device`` defaults
    to the minimum that holds experts + replicas. ``num_scenarios`` > 0 adds bootstrap scenarios
    (see :func:`bootstrap_scenarios`; needs ``rng``).
    """
    m = trace.meta
    if num_experts is not None and num_experts != m.num_experts:
        raise PlacementError(f"trace and model disagree on the expert count: the trace has {m.num_experts} "
                             f"experts per layer, the model {num_experts}")
    if slots_per_device is None:
        validate_shape(m.num_experts, num_devices, min_slots_per_device(m.num_experts, num_devices, num_replicas),
                       num_replicas)
        slots_per_device = min_slots_per_device(m.num_experts, num_devices, num_replicas)
    affinity = None
    if with_affinity:
        from workloads.stats import pair_count_matrices

        affinity = pair_count_matrices(trace)
    scenarios = None
    if num_scenarios > 0:
        scenarios = bootstrap_scenarios(trace, num_scenarios, rng if rng is not None else np.random.default_rng(0))
    return PlacementProblem(load=trace.expert_load(), affinity=affinity, scenarios=scenarios, num_devices=num_devices,
                            devices_per_node=devices_per_node, slots_per_device=slots_per_device,
                            num_replicas=num_replicas, cross_gpu_cost=cross_gpu_cost, cross_node_cost=cross_node_cost)


def bootstrap_scenarios(trace, num_scenarios: int, rng: np.random.Generator, block_tokens: int = 64) -> np.ndarray:
    """[S, layers, experts] expert loads of ``num_scenarios`` bootstrap resamples of ``trace``.

    The resampled unit is a sequence (the ``sequence`` column when present, else blocks of
    ``block_tokens`` consecutive tokens of a step), because tokens of one sequence pick correlated
    experts; each resample draws as many units as the trace has, with replacement."""
    c, m = trace.columns, trace.meta
    if "sequence" in c:
        unit_key = c["step"].astype(np.int64) * (int(c["sequence"].max()) + 1) + c["sequence"]
    else:
        unit_key = c["step"].astype(np.int64) * (int(c["token"].max()) // block_tokens + 1) + c["token"] // block_tokens
    _, unit = np.unique(unit_key, return_inverse=True)
    n_units = int(unit.max()) + 1
    per = np.zeros((n_units, m.num_layers * m.num_experts), dtype=np.int64)
    np.add.at(per, (unit, c["layer"].astype(np.int64) * m.num_experts + c["expert"]), 1)
    draws = rng.integers(0, n_units, size=(num_scenarios, n_units))
    counts = np.stack([np.bincount(d, minlength=n_units) for d in draws])  # [S, units]
    return (counts @ per).reshape(num_scenarios, m.num_layers, m.num_experts)


def link_costs(system) -> tuple[float, float]:
    """(cross-GPU, cross-node) cost of one token for a :class:`hwmodels.specs.System`: inverse link
    bandwidths normalised so that one NVLink crossing costs 1."""
    up = system.scale_up.bandwidth_bytes_per_s
    out = system.scale_out.bandwidth_bytes_per_s if system.scale_out is not None else up
    return 1.0, float(up / out)


def assignment_to_placement(assign: np.ndarray, problem: PlacementProblem, name: str) -> Placement:
    """Build a Placement from a 0/1 (or count) array assign [layers, experts, devices].

    Device d's slots hold its experts in increasing expert order, then -1 (empty)."""
    l_count, e_count, d_count = assign.shape
    spd = problem.slots_per_device
    s2e = np.full((l_count, d_count * spd), -1, dtype=np.int32)
    for layer in range(l_count):
        for d in range(d_count):
            experts = np.flatnonzero(assign[layer, :, d])
            if len(experts) > spd:
                raise PlacementError(f"layer {layer}: GPU {d} would hold {len(experts)} experts but has {spd} slots")
            s2e[layer, d * spd:d * spd + len(experts)] = experts
    return Placement.from_slot_to_expert(s2e, e_count, spd, name=name)


def placement_to_assignment(placement: Placement) -> np.ndarray:
    """[layers, experts, devices] int8: 1 where the GPU holds a copy of the expert."""
    out = np.zeros((placement.num_layers, placement.num_experts, placement.num_devices), dtype=np.int8)
    for layer in range(placement.num_layers):
        slots = np.flatnonzero(placement.slot_to_expert[layer] >= 0)
        out[layer, placement.slot_to_expert[layer, slots], slots // placement.slots_per_device] = 1
    return out
