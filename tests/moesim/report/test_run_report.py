"""The run report's numbers add up and read well: where the time went (hand-computed on a tiny op log),
achieved rates against the peaks, defined columns, integer axes, units that fit, one load heatmap."""

import re

import pandas as pd
import pytest

from moesim.cli import main
from moesim.report.html import format_number, table_html
from moesim.report.run_report import int_axis, time_breakdown, time_unit


def _ops(rows):
    cols = ["op", "step", "micro_batch", "layer", "device", "start_at_s", "end_at_s", "flops", "bytes"]
    return pd.DataFrame([(op, 0, 0, 0, d, a, b, 0.0, 0.0) for op, d, a, b in rows], columns=cols)


def test_breakdown_by_hand():
    # device 0: router 0-1, dispatch 1-4 (hidden 2-3 behind shared_ffn), shared_ffn 2-3, expert 4-6, combine 6-8
    # device 1: router 0-2, dispatch 1-4 (hidden 1-2 behind its router), expert 4-5, combine 6-8; makespan 10
    ops = _ops([("router", 0, 0, 1), ("dispatch", 0, 1, 4), ("shared_ffn", 0, 2, 3), ("expert_ffn", 0, 4, 6),
                ("combine", 0, 6, 8), ("router", 1, 0, 2), ("dispatch", 1, 1, 4), ("expert_ffn", 1, 4, 5),
                ("combine", 1, 6, 8)])
    b = time_breakdown(ops, 10.0, 2)
    assert b["router"] == pytest.approx((1 + 2) / 2)
    assert b["shared_ffn"] == pytest.approx(1 / 2)
    assert b["expert_ffn"] == pytest.approx((2 + 1) / 2)
    assert b["dispatch"] == pytest.approx((2 + 2) / 2)  # exposed: 3 - 1 hidden on each device
    assert b["hidden_comm"] == pytest.approx((1 + 1) / 2)
    assert b["combine"] == pytest.approx(2.0)
    parts = ("router", "shared_ffn", "expert_ffn", "dispatch", "combine", "idle")
    assert sum(b[k] for k in parts) == pytest.approx(10.0)
    assert b["idle"] == pytest.approx(10.0 - 1.5 - 0.5 - 1.5 - 2.0 - 2.0)


def test_numbers_and_axes_read_well():
    assert format_number(77900.0) == "77,900" and format_number(0.1234567) == "0.1235"
    assert "e+" not in table_html([{"t": 7.79e4, "x": 1.5e7}])
    assert time_unit(638e-6) == (1e-6, "us") and time_unit(0.0779)[1] == "ms"
    assert int_axis(64)["dtick"] == 4 and int_axis(8)["dtick"] == 1 and int_axis(8)["tickformat"] == "d"


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    run = tmp_path_factory.mktemp("r") / "run"
    assert main(["simulate", "--micro-batches", "2", "--out", str(run)]) == 0
    assert main(["report", str(run)]) == 0
    return (run / "report.html").read_text()


def test_report_leads_with_where_the_time_went(demo_report):
    heads = re.findall(r"<h2>(.*?)</h2>", demo_report)
    assert heads[:3] == ["Summary", "Where the time went", "Achieved rates against the device&#x27;s peaks"]
    assert sum("Expert load" in h for h in heads) == 1  # the load heatmap appears once
    where = demo_report.split("<h2>Where the time went</h2>", 1)[1].split("<h2>", 1)[0]
    shares = [float(x) for x in re.findall(r"<td>([\d.]+) %</td>", where)]
    assert shares[-1] == 100.0 and sum(shares[:-1]) == pytest.approx(100.0, abs=0.3)
    assert "Why 2 micro-batches can be slower than 1" in where


def test_report_defines_its_columns_and_uses_fitting_units(demo_report):
    text = re.sub(r"<script.*?</script>", "", demo_report, flags=re.S)
    assert "<dt>imbalance</dt><dd>max over devices / mean over devices" in text
    assert not re.search(r"\de[+-]\d\d", re.sub(r"<[^>]+>", " ", text))  # no 7.79e+04 anywhere in the text
    assert re.search(r"Simulated time \(makespan\) <b>\d+\.\d us</b>", text)  # a sub-ms run in us
    assert "% of peak" in text and "TFLOP/s" in text
    assert "class='tbl'" in text  # tables scroll in their box, not off the page
