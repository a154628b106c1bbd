"""`moesim simulate --out DIR` never overwrites an earlier run silently (issue 11, data loss)."""

import json

from moesim.cli import main


def test_existing_run_is_refused_unless_force(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["simulate", "--out", str(out)]) == 0
    first = (out / "summary.json").read_text()
    capsys.readouterr()
    assert main(["simulate", "--micro-batches", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"moesim simulate: error: --out {out} already holds a moesim run; pass --force to "
                           f"overwrite it, or choose a new --out")
    assert (out / "summary.json").read_text() == first  # untouched
    assert main(["simulate", "--micro-batches", "2", "--out", str(out), "--force"]) == 0
    assert json.loads((out / "summary.json").read_text())["micro_batches"] == 2


def test_directory_with_other_files_is_refused_and_empty_one_is_used(tmp_path, capsys):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    assert main(["simulate", "--out", str(other)]) == 2
    assert f"--out {other} already holds files; pass --force" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["todo.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["simulate", "--out", str(empty)]) == 0 and (empty / "summary.json").exists()
