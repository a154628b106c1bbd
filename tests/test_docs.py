"""Every ```python run``` block in docs/*.md and studies/*/README.md is executed (docs stay true)."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"```python run\n(.*?)```", re.S)
DOCS = sorted([*REPO.glob("docs/*.md"), *REPO.glob("studies/*/README.md")])
CASES = [(p, i, code) for p in DOCS for i, code in enumerate(BLOCK.findall(p.read_text()))]


def test_there_are_executable_doc_examples():
    assert CASES, "no ```python run``` blocks found in docs/"


@pytest.mark.parametrize("path, index, code", CASES, ids=[f"{p.relative_to(REPO)}#{i}" for p, i, _ in CASES])
def test_doc_example_runs(path, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{path}#{index}", "exec"), {"__name__": "__doc_example__"})
