"""`make test` does its own set-up (issue 11): tools/ensure-chromium.sh installs Debian's chromium when
it is missing and the user can, else stops with one line; .ci/run does nothing `make test` does not;
`make demo` can run again over its own output. The script runs here with a PATH of fakes (`id`,
`apt-get`, `sudo`), so no package is installed by the test."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "ensure-chromium.sh"
BASH = shutil.which("bash") or "/bin/bash"


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!{BASH}\n{body}\n")
    path.chmod(0o755)


def _run(bin_dir: Path):
    return subprocess.run([BASH, str(SCRIPT)], env={"PATH": str(bin_dir)}, capture_output=True, text=True, timeout=60)


@pytest.fixture
def fakes(tmp_path):
    b = tmp_path / "bin"
    b.mkdir()
    log = tmp_path / "apt.log"
    # apt-get logs its arguments; `install` puts a chromium on PATH, as the Debian package does
    chmod = shutil.which("chmod") or "/bin/chmod"
    _fake(b, "apt-get", f'echo "$*" >> {log}\nif [ "$1" = install ]; then printf "#!{BASH}\\n" > {b}/chromium; '
                        f'{chmod} +x {b}/chromium; fi')
    return b, log


def test_browser_present_does_nothing(fakes):
    b, log = fakes
    _fake(b, "chromium", "exit 0")
    proc = _run(b)
    assert proc.returncode == 0 and not log.exists() and proc.stdout == proc.stderr == ""


@pytest.mark.parametrize("how", ["root", "sudo"])
def test_missing_browser_is_installed_when_the_user_can(fakes, how):
    b, log = fakes
    _fake(b, "id", "echo 0" if how == "root" else "echo 1000")
    if how == "sudo":  # passwordless sudo: `sudo -n true` works, `sudo -n env VAR=x cmd` runs cmd
        _fake(b, "sudo", 'shift; [ "$1" = true ] && exit 0; shift; shift; exec "$@"')
        _fake(b, "env", 'shift; exec "$@"')
    proc = _run(b)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines() == ["update", "install -y chromium"]
    assert "installing the Debian package chromium" in proc.stdout and (b / "chromium").exists()


@pytest.mark.parametrize("setup,why", [
    ({"id": "echo 1000"}, "not root and no passwordless sudo"),
    ({"id": "echo 1000", "sudo": "exit 1"}, "not root and no passwordless sudo"),
    ({"id": "echo 0", "apt-get": "exit 100"}, "'apt-get update' failed"),
    ({"id": "echo 0", "apt-get": "rm -f $0"}, "no apt-get here"),
])
def test_missing_browser_that_cannot_be_installed_is_one_line(fakes, setup, why):
    b, log = fakes
    for name, body in setup.items():
        _fake(b, name, body)
    if "rm -f" in setup.get("apt-get", ""):
        (b / "apt-get").unlink()
    proc = _run(b)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("make test: the browser tests need Chromium: install the Debian "
                                                   "package 'chromium' (apt-get install chromium)")
    assert f"({why}" in lines[0] and not (b / "chromium").exists()


def test_make_test_runs_the_set_up_and_ci_runs_only_make_test():
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make")
    dry = subprocess.run([make, "-n", "-C", str(REPO), "test"], capture_output=True, text=True, timeout=60).stdout
    lines = dry.splitlines()
    setup = next(i for i, ln in enumerate(lines) if "tools/ensure-chromium.sh" in ln)
    tests = next(i for i, ln in enumerate(lines) if "pytest" in ln)
    assert setup < tests
    ci = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert ci == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', "exec make test"]


def test_make_demo_writes_its_run_fresh():
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make")
    dry = subprocess.run([make, "-n", "-C", str(REPO), "demo"], capture_output=True, text=True, timeout=60).stdout
    lines = dry.splitlines()
    wipe = next(i for i, ln in enumerate(lines) if ln.strip() == "rm -rf run/demo")
    sim = next(i for i, ln in enumerate(lines) if "moesim simulate" in ln and "--out run/demo" in ln)
    assert wipe < sim
