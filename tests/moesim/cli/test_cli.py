"""The command line end to end: simulate the embedded trace, write the report and the Perfetto trace."""

import json

import pytest

from moesim.cli import main


def test_simulate_and_report_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["simulate", "--system", "dgx-h100", "--model", "flame-moe-290m", "--trace", "default",
                 "--micro-batches", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_devices"] == 8 and summary["num_tokens"] == 2048
    assert summary["total_time_s"] > 0 and len(summary["layer_time_s"]) == 8
    assert main(["report", str(out)]) == 0
    html = (out / "report.html").read_text()
    # self-contained: plotly.js inlined, no script loaded from a CDN
    assert "plotly" in html and 'src="https://cdn' not in html
    for heading in ("Expert load", "Per-device timeline", "Per-layer time breakdown"):
        assert heading in html
    assert html.count('class="plotly-graph-div"') >= 3
    assert "Trace statistics: Inter-layer affinity 0-&gt;1" in html  # routing statistics of the replayed trace
    trace = json.loads((out / "timeline.perfetto.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    import pandas as pd

    assert len(spans) == len(pd.read_parquet(out / "ops.parquet"))
    assert {e["name"] for e in spans} >= {"router", "dispatch", "expert_ffn", "combine"}
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["simulate", "--system", "dgx-h900"], "unknown system 'dgx-h900'"),
    (["simulate", "--model", "gpt-5"], "unknown model 'gpt-5'"),
    (["simulate", "--trace", "nope.parquet"], "no trace named or found"),
    (["simulate", "--cost", "magic"], "unknown cost model 'magic'"),
    (["report", "/nonexistent/run"], "not a moesim run directory"),
])
def test_bad_input_is_one_clear_line(argv, message, capsys, tmp_path):
    if argv[0] == "simulate":
        argv = argv + ["--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "simulate" in out and "report" in out
