"""Every user string in a run report is escaped: a trace whose ``source`` and a spec whose system and
device names carry script and ``onerror`` payloads render as text, and headless Chromium executes none
of them (each payload would change the page's title or mark the body)."""

import dataclasses
import html
import re
import subprocess
from pathlib import Path

from moesim.cli import main
from workloads.importers import DEFAULT_TRACE_PATH
from workloads.trace import read_parquet, write_parquet

from tests.moesim.report.test_browser_report import FLAGS, chromium

SPECS = Path(__file__).resolve().parents[3] / "hwmodels" / "specs"
SCRIPT = "<script>document.title='PWNED-script';document.body.dataset.pwned='script'</script>"
IMG = "<img src=x onerror=\"document.title='PWNED-img';document.body.dataset.pwned='img'\">"
BREAKOUT = "</p></b><svg onload=\"document.title='PWNED-svg'\">"


def _payload_inputs(tmp_path: Path) -> tuple[Path, Path]:
    trace = read_parquet(DEFAULT_TRACE_PATH)
    trace = dataclasses.replace(trace, meta=dataclasses.replace(trace.meta, source=f"src {SCRIPT} {BREAKOUT}"))
    trace_path = write_parquet(trace, tmp_path / "evil.parquet")
    device = (SPECS / "h100-sxm.toml").read_text()
    device = re.sub(r'(?m)^name = "[^"]*"', f"name = '''gpu {IMG}'''", device, count=1)
    (tmp_path / "evil-gpu.toml").write_text(device)
    system = (SPECS / "dgx-h100.toml").read_text()
    system = system.replace('name = "dgx-h100"', f"name = '''sys {SCRIPT}'''").replace(
        'device = "h100-sxm"', 'device = "evil-gpu.toml"')
    (tmp_path / "evil-system.toml").write_text(system)
    return trace_path, tmp_path / "evil-system.toml"


def test_run_report_escapes_payloads_and_the_browser_runs_none(tmp_path):
    trace_path, spec = _payload_inputs(tmp_path)
    run = tmp_path / "run"
    assert main(["simulate", "--system", str(spec), "--trace", str(trace_path), "--out", str(run)]) == 0
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    body = page.split("</head>", 1)[1]
    for payload in (SCRIPT, IMG, BREAKOUT):
        assert payload not in page  # never inserted raw
    assert html.escape(SCRIPT) in body and html.escape(IMG) in body  # shown as text
    proc = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", (run / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    title = re.search(r"<title>(.*?)</title>", dom, re.S)
    assert title, f"no DOM dumped (rc {proc.returncode}): {proc.stderr[-1500:]}"
    assert title.group(1).startswith("moesim run:")  # a payload would have replaced it with 'PWNED-...'

    assert "data-pwned" not in dom
    assert "plotly-graph-div" in dom  # the page did load and render its figures


def test_the_check_is_not_vacuous(tmp_path):
    """The same payloads inserted raw do run in this browser (so the assertions above can fail)."""
    page = tmp_path / "raw.html"
    page.write_text(f"<html><head><title>t</title></head><body><p>{IMG}</p></body></html>")
    proc = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", page.as_uri()],
                          capture_output=True, text=True, timeout=60)
    assert re.search(r"<title>(.*?)</title>", proc.stdout, re.S).group(1) == "PWNED-img"
    assert 'data-pwned="img"' in proc.stdout
