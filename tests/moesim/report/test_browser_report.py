"""Open a study report in headless Chromium (no network), let the plots render, and check the page's
render status: no JavaScript errors and the expected number of traces per figure.

Needs the Debian package ``chromium`` (``make test`` installs it when missing); without it the test fails with a
message saying so (it is not skipped: CI must have the browser).
"""

import json
import re
import shutil
import subprocess

import pytest

from moesim.study.runner import run_study
from moesim.study.spec import load_study

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=10000", "--dump-dom"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium not found: install the Debian package 'chromium' (apt-get install -y chromium)")


def render_status(html_path, tmp_path) -> dict:
    profile = tmp_path / "chromium-profile"
    proc = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", html_path.resolve().as_uri()],
                          capture_output=True, text=True, timeout=90)
    m = re.search(r'<pre id="moesim-render-status"[^>]*>([^<]*)</pre>', proc.stdout)
    assert m, f"no render status in the dumped DOM (rc {proc.returncode}): {proc.stderr[-2000:]}"
    assert m.group(1), "the page's status script did not run"
    return json.loads(m.group(1))


def test_report_renders_in_chromium(tmp_path):
    d = tmp_path / "study"
    d.mkdir()
    (d / "study.toml").write_text("[base]\ntokens = 256\n[grid]\nnodes = [1, 2]\nplacement = ['contiguous', 'round-robin']\n")
    study = load_study(d)
    run_study(study, executor="serial")
    from moesim.report.study import write_study_report
    out = write_study_report(study, drill=3)
    status = render_status(out, tmp_path)
    assert status["errors"] == []
    assert status["plotly"]
    figs = status["figures"]
    assert {k: v["traces"] for k, v in figs.items()} == {"fig-0": 2, "fig-1": 1, "fig-2": 3, "fig-3": 3}
    assert all(v["rendered"] for v in figs.values())
    assert all(v["svg_traces"] >= 1 for v in figs.values())  # something was drawn in every figure


def test_harness_sees_javascript_errors(tmp_path):
    """The check is not vacuous: a page whose script throws reports the error."""
    from moesim.report.study import ERROR_HOOK, STATUS_SCRIPT

    page = tmp_path / "bad.html"
    page.write_text(f"<html><head>{ERROR_HOOK}</head><body><script>undefinedFunction();</script>{STATUS_SCRIPT}"
                    "</body></html>")
    status = render_status(page, tmp_path)
    assert status["figures"] == {} and status["plotly"] is None
    assert any("undefinedFunction" in e for e in status["errors"])
