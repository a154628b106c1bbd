"""Studies: spec validation, executors agree, resume, Dask LocalCluster, report figures."""

import json

import pandas as pd
import pytest

from moesim.cli import main as cli_main
from moesim.study.runner import run_study
from moesim.study.spec import load_study

SMALL = """
[study]
description = "test"
seed = 1
[base]
tokens = 512
[grid]
nodes = [1, 2]
placement = ["contiguous", "round-robin"]
micro_batches = [1, 2]
"""
OUTPUTS = ["total_time_s", "throughput_tokens_per_s", "usd_per_million_tokens", "imbalance_mean", "comm_fraction",
           "scale_out_bytes", "drill_device_tokens", "drill_timeline"]


def make(tmp_path, text, name="s"):
    d = tmp_path / name
    d.mkdir()
    (d / "study.toml").write_text(text)
    return d


def test_grid_expands_and_names_varied(tmp_path):
    s = load_study(make(tmp_path, SMALL))
    assert len(s.configs) == 8 and s.varied == ("nodes", "placement", "micro_batches")
    assert all(c["tokens"] == 512 for c in s.configs)


@pytest.mark.parametrize("text,match", [
    ("[grid]\nnodez = [1]\n", "unknown key 'nodez'"),
    ("[grid]\nnodes = []\n", "grid.nodes' is an empty list"),
    ("[study]\nseed = 0\n", "no configurations"),
    ("[grid]\n", r"\[grid\] is empty"),
    ("[study]\nengin = 'des'\n[grid]\nnodes=[1]\n", "unknown key 'study.engin'"),
    ("[base]\nnodes = 0\n[grid]\ndtype=['bf16']\n", "'nodes' must be a positive integer"),
    ("[extra]\n", "unknown key 'extra'"),
])
def test_bad_study_files(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        load_study(make(tmp_path, text))


def test_cli_bad_study_is_one_line_error(tmp_path, capsys):
    d = make(tmp_path, "[grid]\nbogus = [1]\n")
    assert cli_main(["study", "run", str(d)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'bogus'" in err and "Traceback" not in err


def test_executors_agree_and_resume(tmp_path):
    a = load_study(make(tmp_path, SMALL, "a"))
    first = run_study(a, executor="serial", limit=3)
    assert len(first) == 3 and a.results_path.exists()
    kept = first.set_index("config_id")["eval_wall_s"]
    full = run_study(a, executor="serial")
    assert len(full) == 8
    # finished configurations were not recomputed: their rows (incl. wall time) are unchanged
    assert (full.set_index("config_id").loc[kept.index, "eval_wall_s"] == kept).all()
    assert len(run_study(a, executor="serial")) == 8  # nothing left to do
    b = load_study(make(tmp_path, SMALL, "b"))
    pool = run_study(b, executor="process", workers=2)
    c = load_study(make(tmp_path, SMALL, "c"))
    dask = run_study(c, executor="dask", dask="local", workers=2)
    for other in (pool, dask):
        assert list(other["config_id"]) == list(full["config_id"])
        pd.testing.assert_frame_equal(other[OUTPUTS], full[OUTPUTS])
    # outputs respond to inputs: two nodes move bytes over InfiniBand, one node does not
    assert (full.loc[full["nodes"] == 1, "scale_out_bytes"] == 0).all()
    assert (full.loc[full["nodes"] == 2, "scale_out_bytes"] > 0).all()
    assert len(json.loads(full["drill_device_tokens"][0])) == 8  # layers of the FLAME trace


def test_unreachable_dask_scheduler(tmp_path):
    s = load_study(make(tmp_path, "[base]\ntokens = 256\n[grid]\nnodes = [1]\n"))
    with pytest.raises(ValueError, match="cannot reach the Dask scheduler at 'tcp://127.0.0.1:1'"):
        run_study(s, executor="dask", dask="tcp://127.0.0.1:1")
    with pytest.warns(UserWarning, match="unreachable"):
        rows = run_study(s, executor="dask", dask="tcp://127.0.0.1:1", fallback_local=True, workers=1)
    assert len(rows) == 1


def test_report_has_expected_figures(tmp_path):
    from moesim.report.study import build_figures, pareto_mask, write_study_report

    s = load_study(make(tmp_path, SMALL))
    rows = run_study(s, executor="serial")
    figs = build_figures(rows, list(s.varied), drill=5)
    assert [len(f.data) for _, f in figs] == [2, 1, 5, 5]
    mask = pareto_mask([1, 2, 2, 3], [10, 5, 20, 15])
    assert mask.tolist() == [True, False, True, False]
    out = write_study_report(s, drill=5)
    text = out.read_text()
    assert text.count('class="plotly-graph-div"') == 4 and "moesim-render-status" in text
    try:
        import kaleido  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="kaleido"):
            write_study_report(s, tmp_path / "r.html", drill=2, png_dir=tmp_path / "png")
