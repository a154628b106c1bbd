"""``moesim simulate --dispatch-dedup`` reaches SimOptions; unset keeps per-(token, expert) copies."""

import json

import pytest

from moesim.cli import main


def _summary(path):
    return json.loads((path / "summary.json").read_text())


def test_dedup_flag_reaches_the_simulation_and_cuts_scale_out_bytes(tmp_path):
    runs = {}
    for mode in (None, "gpu", "node"):
        out = tmp_path / str(mode)
        flags = [] if mode is None else ["--dispatch-dedup", mode]
        assert main(["simulate", "--system", "hgx-h800", "--nodes", "2", *flags, "--out", str(out)]) == 0
        runs[mode] = _summary(out)
    assert "dispatch_dedup" not in runs[None]  # default: the summary (and tests/golden/demo.json) unchanged
    assert runs["gpu"]["dispatch_dedup"] == "gpu" and runs["node"]["dispatch_dedup"] == "node"
    kinds = {m: s["bytes_by_link_kind"] for m, s in runs.items()}
    out_kind = next(k for k in kinds[None] if "nvlink" not in k.lower())  # the scale-out link kind
    assert kinds["node"][out_kind] < kinds["gpu"][out_kind] < kinds[None][out_kind]
    assert runs["node"]["total_time_s"] < runs[None]["total_time_s"]


def test_bad_dedup_mode_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--dispatch-dedup", "rack", "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "--dispatch-dedup" in err[0] and "'rack'" in err[0]
