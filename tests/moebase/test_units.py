import pytest

from moebase.units import GB, GiB, TFLOPS, format_quantity, parse_quantity, unit_suffix


def test_parse_quantities_in_base_units():
    assert parse_quantity("bandwidth_bytes_per_s", "3.35 TB/s") == pytest.approx(3.35e12)
    assert parse_quantity("bandwidth_bytes_per_s", "400 Gb/s") == pytest.approx(50e9)
    assert parse_quantity("capacity_bytes", "80 GiB") == 80 * GiB
    assert parse_quantity("capacity_bytes", "80 GB") == 80 * GB
    assert parse_quantity("peak_bf16_flops_per_s", "989.4 TFLOPS") == pytest.approx(989.4 * TFLOPS)
    assert parse_quantity("latency_s", "5 us") == pytest.approx(5e-6)
    assert parse_quantity("latency_s", 2.5) == 2.5


def test_unit_must_fit_the_key():
    with pytest.raises(ValueError, match="does not fit"):
        parse_quantity("capacity_bytes", "3 TB/s")
    with pytest.raises(ValueError, match="cannot read"):
        parse_quantity("latency_s", "fast")
    assert unit_suffix("hbm_bandwidth_bytes_per_s") == "_bytes_per_s"
    assert unit_suffix("capacity_bytes") == "_bytes"


def test_format_for_labels():
    assert format_quantity(3.35e12, "bytes_per_s") == "3.35 TB/s"
    assert format_quantity(2e-6, "s") == "2 us"
