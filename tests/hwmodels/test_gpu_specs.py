"""The GPU specs added for the measured data: every number has a source, datasheet numbers cite a document."""

import pytest

from hwmodels.specs import SPEC_DIR, load_device, load_system

NEW_DEVICES = ("h800-sxm", "a100-pcie")


@pytest.mark.parametrize("name", NEW_DEVICES)
def test_every_number_in_new_device_specs_has_a_source(name):
    dev = load_device(SPEC_DIR / f"{name}.toml")
    keys = {f"peak_{dt}_flops_per_s" for dt in dev.peak_flops_per_s} | {"launch_latency_s"}
    assert keys <= set(dev.sources)
    for tier in dev.memory:
        assert {"capacity_bytes", "bandwidth_bytes_per_s", "latency_s"} <= set(tier.sources)
    for src in [*dev.sources.values(), *(s for t in dev.memory for s in t.sources.values())]:
        # a source is a cited document (URL or named datasheet) or a stated assumption
        assert "http" in src or "datasheet" in src or src.startswith("assumption"), src


def test_h800_has_h100_compute_and_hgx_h800_node_links():
    h800, h100 = load_device(SPEC_DIR / "h800-sxm.toml"), load_device(SPEC_DIR / "h100-sxm.toml")
    assert h800.peak_flops_per_s == h100.peak_flops_per_s
    node = load_system("hgx-h800")
    assert node.devices_per_node == 8
    assert node.scale_up.bandwidth_bytes_per_s == pytest.approx(200e9)   # 400 GB/s bidirectional
    assert node.scale_out.bandwidth_bytes_per_s == pytest.approx(50e9)   # 400 Gb/s per GPU
    for link in (node.scale_up, node.scale_out, node.host_link):
        assert set(link.sources) == {"bandwidth_bytes_per_s", "latency_s"}


def test_a100_pcie_bandwidth():
    dev = load_device(SPEC_DIR / "a100-pcie.toml")
    assert dev.main_memory.bandwidth_bytes_per_s == pytest.approx(1.935e12)
    assert dev.gpu_fit == "a100-vidur"
