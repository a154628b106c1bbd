"""The serving report: built from the run directory, figures hold the run's data, every user string escaped,
and headless Chromium renders it with no JavaScript error (and runs none of the payloads)."""

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from moesim.cli import main
from moesim.report.serve import breakdown_rows, cdf_points, is_serve_run, load_run, throughput_over_time
from tests.moesim.report.test_browser_report import FLAGS, chromium, render_status

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = "<script>document.title='PWNED-script';document.body.dataset.pwned='script'</script>"
IMG = "<img src=x onerror=\"document.title='PWNED-img';document.body.dataset.pwned='img'\">"


def _evil_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A model config whose name (its path) and a system spec whose system and device names carry payloads."""
    model_dir = tmp_path / "m<img src=x onerror=alert(1)>"
    model_dir.mkdir()
    shutil.copy(ROOT / "workloads" / "configs" / "olmoe-1b-7b.json", model_dir / "config.json")
    specs = ROOT / "hwmodels" / "specs"
    device = re.sub(r'(?m)^name = "[^"]*"', f"name = '''gpu {IMG}'''", (specs / "h100-sxm.toml").read_text(), count=1)
    (tmp_path / "evil-gpu.toml").write_text(device)
    system = (specs / "dgx-h100.toml").read_text().replace('name = "dgx-h100"', f"name = '''sys {SCRIPT}'''")
    (tmp_path / "evil-system.toml").write_text(system.replace('device = "h100-sxm"', 'device = "evil-gpu.toml"'))
    return model_dir / "config.json", tmp_path / "evil-system.toml"


@pytest.fixture(scope="module")
def evil_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-report")
    model, system = _evil_inputs(tmp)
    out = tmp / "run"
    assert main(["serve", "--model", str(model), "--system", str(system), "--ep", "8", "--rate", "40",
                 "--duration-s", "2", "--preemption", "swap", "--out", str(out)]) == 0
    return out


def test_report_escapes_every_payload_and_chromium_runs_none(evil_run, tmp_path):
    page = (evil_run / "report.html").read_text()
    for payload in (SCRIPT, IMG, "<img src=x onerror=alert(1)>"):
        assert payload not in page
    body = page.split("</head>", 1)[1]
    assert html.escape(SCRIPT) in body and html.escape(IMG) in body
    status = render_status(evil_run / "report.html", tmp_path)
    assert status["errors"] == []
    assert status["plotly"]
    # three CDFs (1 trace), throughput (2), KV per tier (3 for the one pool), time breakdown (1 pool)
    assert {k: v["traces"] for k, v in status["figures"].items()} == {
        "fig-0": 1, "fig-1": 1, "fig-2": 1, "fig-3": 2, "fig-4": 3, "fig-5": 1}
    assert all(v["rendered"] and v["svg_traces"] >= 1 for v in status["figures"].values())
    proc = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={tmp_path / 'p2'}", (evil_run / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert re.search(r"<title>(.*?)</title>", proc.stdout, re.S).group(1).startswith("moesim serve:")
    assert "data-pwned" not in proc.stdout


def test_report_rebuilt_by_moesim_report_from_the_directory(evil_run, tmp_path):
    assert is_serve_run(evil_run) and not is_serve_run(tmp_path)
    out = tmp_path / "again.html"
    assert main(["report", str(evil_run), "--out", str(out)]) == 0
    assert out.read_text().count("plotly-graph-div") == (evil_run / "report.html").read_text().count("plotly-graph-div")


def test_report_figures_hold_the_runs_numbers(evil_run):
    m, req, it = load_run(evil_run)
    tp = throughput_over_time(it, bins=10)
    width = tp["time_s"][1] - tp["time_s"][0]
    assert tp["output_tokens_per_s"].sum() * width == pytest.approx(it["sampled"].sum())
    assert tp["input_tokens_per_s"].sum() * width == pytest.approx(it["prefill_tokens"].sum())
    rows = breakdown_rows(m)
    b = m["iteration_time"]["colocated"]
    assert sum(r["seconds"] for r in rows) == pytest.approx(b["simulated_busy_s"], rel=0.01)
    assert {r["part"] for r in rows} >= {"attention core", "dispatch", "experts", "combine"}
    x, y = cdf_points(req["ttft_s"])
    assert y[-1] == 1.0 and np.all(np.diff(x) >= 0) and x[-1] == np.nanmax(req["ttft_s"])


def test_cdf_points_thin_long_inputs():
    x, y = cdf_points(np.arange(10_000, dtype=float)[::-1])
    assert len(x) <= 2000 and x[0] == 0 and x[-1] == 9999 and y[-1] == 1.0


def test_load_run_refuses_a_directory_that_is_not_a_serve_run(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"schema": "something/1"}))
    with pytest.raises(ValueError, match="no metrics.json of a 'moesim serve' run"):
        load_run(tmp_path)


@pytest.mark.parametrize("ranks", [1, 8])
def test_time_breakdown_adds_up_to_the_simulated_time(ranks):
    """Timed over every iteration, the parts add up to the busy time, for explicit ranks and for one scheduler
    whose cost pools the batch over 8 ranks (the slowest rank's or the pooled share's work is logged)."""
    from hwmodels.specs import load_system
    from workloads import requests as rq
    from moesim.serve.cost import IterationCost, ServeLayout
    from moesim.serve.engine import Replica, simulate
    from moesim.serve.kv import KVBlocks
    from moesim.serve.metrics import time_breakdown
    from moesim.serve.scheduler import SchedulerConfig
    from workloads.hf_config import load_config

    ic = IterationCost(load_config("olmoe-1b-7b"), load_system("dgx-h100"), ServeLayout(tp=1, ep=8, dp=8))
    req = rq.generate("poisson", 20, 2, rq.LENGTH_MODELS["azure-conv-2023"], np.random.default_rng(0))
    res = simulate(req, [Replica("colocated", ic, KVBlocks(ic.kv_capacity_blocks(16)), ranks=ranks)], SchedulerConfig())
    b = time_breakdown(res, {"colocated": ic}, samples=10**6)["colocated"]
    assert b["sampled_iterations"] == b["iterations"] == len(res.iterations["start_s"])
    assert sum(b["parts_s"].values()) == pytest.approx(b["simulated_busy_s"], rel=1e-3)
    assert b["parts_s"]["experts"] > 0 and b["parts_s"]["dispatch"] > 0
