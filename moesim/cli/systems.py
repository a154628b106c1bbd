"""``moesim systems`` and ``moesim models``: list what is shipped."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("systems", help="list shipped system specs")
    p.set_defaults(func=_systems)
    p = sub.add_parser("models", help="list the MoE model catalog")
    p.set_defaults(func=_models)


def _systems(args) -> int:
    from hwmodels.specs import available_systems, load_system
    from moebase.units import format_quantity

    for name in available_systems():
        s = load_system(name)
        print(f"{name:14s} {s.num_nodes} x {s.devices_per_node} x {s.device.name}; "
              f"{s.scale_up.kind} {format_quantity(s.scale_up.bandwidth_bytes_per_s, 'bytes_per_s')}/dir, "
              f"HBM {format_quantity(s.device.main_memory.bandwidth_bytes_per_s, 'bytes_per_s')}")
    return 0


def _models(args) -> int:
    from workloads.catalog import load_catalog

    for name, m in load_catalog().items():
        print(f"{name:16s} {m.num_experts} experts top-{m.num_experts_per_tok}, {m.num_shared_experts} shared, "
              f"{m.num_moe_layers} MoE layers, hidden {m.hidden_size}, expert FFN {m.moe_intermediate_size}")
    return 0
