import textwrap

import pytest

from hwmodels.specs import available_systems, load_system


def test_all_shipped_systems_load_with_sources():
    names = available_systems()
    assert {"dgx-h100", "dgx-h200", "dgx-a100", "sn40l-node"} <= set(names)
    for name in names:
        s = load_system(name)
        assert s.num_devices >= 1
        assert s.device.main_memory.bandwidth_bytes_per_s > 0
        # every number has a source
        assert all(src.strip() for src in s.device.sources.values())
        assert all(src.strip() for t in s.device.memory for src in t.sources.values())
        assert "bandwidth_bytes_per_s" in s.scale_up.sources


def test_dgx_h100_numbers_are_datasheet_values():
    s = load_system("dgx-h100")
    assert s.num_devices == 8
    assert s.device.peak("bf16") == pytest.approx(989.4e12)
    assert s.device.main_memory.bandwidth_bytes_per_s == pytest.approx(3.35e12)
    assert s.scale_up.bandwidth_bytes_per_s == pytest.approx(450e9)
    assert s.scale_out.bandwidth_bytes_per_s == pytest.approx(50e9)
    assert s.with_nodes(8).num_devices == 64


def test_unknown_system_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown system 'dgx-h900'.*dgx-h100"):
        load_system("dgx-h900")


def _write_device(tmp_path, bandwidth='"3.35 TB/s"', extra=""):
    (tmp_path / "dev.toml").write_text(textwrap.dedent(f"""
        [device]
        name = "x"
        kind = "gpu"
        peak_bf16_flops_per_s = {{ value = "1 TFLOPS", source = "s" }}
        launch_latency_s = {{ value = "1 us", source = "s" }}
        {extra}
        [[device.memory]]
        name = "hbm"
        capacity_bytes = {{ value = "80 GB", source = "s" }}
        bandwidth_bytes_per_s = {{ value = {bandwidth}, source = "s" }}
        latency_s = {{ value = 0, source = "s" }}
    """))
    sys_text = textwrap.dedent("""
        [system]
        name = "t"
        device = "dev.toml"
        num_nodes = 1
        devices_per_node = 2
        [system.scale_up]
        kind = "nvlink"
        bandwidth_bytes_per_s = { value = "450 GB/s", source = "s" }
        latency_s = { value = "1 us", source = "s" }
        [system.host_link]
        kind = "pcie"
        bandwidth_bytes_per_s = { value = "64 GB/s", source = "s" }
        latency_s = { value = "1 us", source = "s" }
        [system.host_memory]
        name = "host"
        capacity_bytes = { value = "1 TB", source = "s" }
        bandwidth_bytes_per_s = { value = "100 GB/s", source = "s" }
        latency_s = { value = 0, source = "s" }
    """)
    (tmp_path / "sys.toml").write_text(sys_text)
    return tmp_path / "sys.toml"


def test_valid_custom_spec_loads(tmp_path):
    s = load_system(_write_device(tmp_path))
    assert s.device.main_memory.bandwidth_bytes_per_s == pytest.approx(3.35e12)
    assert s.scale_out is None


def test_negative_bandwidth_names_file_and_key(tmp_path):
    path = _write_device(tmp_path, bandwidth='"-3 TB/s"')
    with pytest.raises(ValueError) as err:
        load_system(path)
    assert "dev.toml" in str(err.value) and "bandwidth_bytes_per_s" in str(err.value) and "negative" in str(err.value)


def test_unknown_key_names_file_and_key(tmp_path):
    path = _write_device(tmp_path, extra='hbm_bw = { value = 1, source = "s" }')
    with pytest.raises(ValueError) as err:
        load_system(path)
    assert "dev.toml" in str(err.value) and "hbm_bw" in str(err.value) and "unknown key" in str(err.value)


def test_number_without_source_is_rejected(tmp_path):
    path = _write_device(tmp_path, extra="peak_fp32_flops_per_s = 5e12")
    with pytest.raises(ValueError, match="source"):
        load_system(path)
