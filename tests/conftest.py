"""Shared fixtures: tiny hand-made systems and models for closed-form tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from hwmodels.specs import Device, Link, MemoryTier, System
from workloads.catalog import MoEModel

REPO = Path(__file__).resolve().parent.parent
SHARED_TRACES = REPO.parent / "shared" / "data" / "traces"


def make_system(num_devices: int = 1, *, peak_flops_per_s=1e12, hbm_bytes_per_s=1e11, launch_s=1e-6,
                link_bytes_per_s=1e9, link_latency_s=0.5e-6, num_nodes: int = 1) -> System:
    device = Device(name="toy", kind="gpu", peak_flops_per_s={"bf16": peak_flops_per_s, "fp32": peak_flops_per_s / 2},
                    launch_latency_s=launch_s,
                    memory=(MemoryTier("hbm", 80e9, hbm_bytes_per_s, 0.0),))
    link = Link("nvlink", link_bytes_per_s, link_latency_s)
    return System(name="toy", device=device, num_nodes=num_nodes, devices_per_node=num_devices // num_nodes,
                  scale_up=link, scale_out=Link("infiniband", link_bytes_per_s / 4, 2 * link_latency_s),
                  host_link=Link("pcie", 1e9, 1e-6), host_memory=MemoryTier("host", 1e12, 1e11, 0.0))


def make_model(num_experts: int, top_k: int, hidden: int, ffn: int, layers: int = 1, shared: int = 0) -> MoEModel:
    return MoEModel(name="toy", hf_id="none", hidden_size=hidden, moe_intermediate_size=ffn, num_experts=num_experts,
                    num_experts_per_tok=top_k, num_shared_experts=shared, shared_expert_intermediate_size=ffn * shared,
                    num_layers=layers, moe_layers=tuple(range(layers)), source="test")


@pytest.fixture
def shared_traces() -> Path:
    if not SHARED_TRACES.is_dir():
        pytest.skip("shared/data/traces is not beside the checkout")
    return SHARED_TRACES
