"""The package order of docs/architecture.md, enforced by import-linter's contracts in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _lint_imports() -> str:
    exe = Path(sys.executable).with_name("lint-imports")
    return str(exe) if exe.exists() else shutil.which("lint-imports")


def test_import_contracts_kept():
    exe = _lint_imports()
    assert exe, "lint-imports (import-linter) is not installed: it is in the dev extra"
    proc = subprocess.run([exe, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def _lint_edited_config(tmp_path, old: str, new: str) -> subprocess.CompletedProcess:
    """Run lint-imports on a copy of pyproject.toml with ``old`` replaced by ``new`` (which must occur)."""
    cfg = (REPO / "pyproject.toml").read_text()
    bad = cfg.replace(old, new)
    assert bad != cfg
    (tmp_path / "pyproject.toml").write_text(bad)
    return subprocess.run([_lint_imports(), "--no-cache", "--config", str(tmp_path / "pyproject.toml")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_contract_catches_an_upward_import(tmp_path):
    """The layers contract is not vacuous: a copy of the config with moebase placed above hwmodels fails."""
    proc = _lint_edited_config(tmp_path, '    "hwmodels | workloads",\n    "moebase",\n',
                               '    "moebase",\n    "hwmodels | workloads",\n')
    assert proc.returncode != 0
    assert "BROKEN" in proc.stdout


def test_io_contract_catches_a_file_module_in_the_core(tmp_path):
    """The core's I/O contract is not vacuous: with the app layer's moesim.io as a source it fails."""
    proc = _lint_edited_config(tmp_path, 'source_modules = ["moesim.sim",', 'source_modules = ["moesim.io", "moesim.sim",')
    assert proc.returncode != 0
    assert "moesim.io is not allowed to import" in proc.stdout
