"""``moesim train`` end to end: JSON fields, HTML report escaping, one-line errors."""

from __future__ import annotations

import json

from moebase.units import GB
from moesim.cli import main
from tests.moesim.train.conftest import DENSE


def test_train_cli_writes_json_and_report(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--model", "mixtral-8x7b", "--nodes", "2", "--tp", "2", "--pp", "2", "--ep", "8",
               "--global-batch-size", "32", "--seq-len", "1024", "--layers", "4", "--cost", "roofline",
               "--out", str(out), "--json", str(tmp_path / "r.json")])
    assert rc == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    for key in ("step_time_s", "tokens_per_s", "tokens_per_s_per_device", "mfu", "memory_bytes", "phases"):
        assert key in doc
    assert doc["meta"]["layers"] == 4 and doc["meta"]["dp"] == 4
    assert doc["tokens_per_s"] == doc["tokens_per_s_per_device"] * 16
    assert doc["memory_bytes"]["activations"]["hbm"] > 0
    assert {p["layer"] for p in doc["phases"] if p["layer"] is not None} == {-1, 0, 1, 2, 3, 4}
    assert (out / "report.html").stat().st_size > 0
    assert "tokens/s per device" in capsys.readouterr().out


def test_report_escapes_the_model_name(tmp_path):
    cfg = tmp_path / "<img src=x onerror=alert(1)>.json"
    cfg.write_text(json.dumps(DENSE))
    assert main(["train", "--model", str(cfg), "--system", "dgx-h100", "--tp", "8", "--seq-len", "64",
                 "--cost", "roofline", "--out", str(tmp_path / "o")]) == 0
    html = (tmp_path / "o" / "report.html").read_text()
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html


def test_unknown_fields_warn_and_bad_layouts_fail_in_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({**DENSE, "mystery_knob": 3}))
    assert main(["train", "--model", str(cfg), "--dp", "8", "--seq-len", "64", "--cost", "roofline",
                 "--out", str(tmp_path / "o")]) == 0
    assert "mystery_knob" in capsys.readouterr().out
    assert main(["train", "--model", str(cfg), "--tp", "3", "--dp", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_what_if_rows_change_one_thing_each(tmp_path):
    assert main(["train", "--model", "mixtral-8x7b", "--tp", "2", "--pp", "2", "--ep", "2", "--layers", "4",
                 "--seq-len", "1024", "--global-batch-size", "8", "--cost", "roofline", "--what-if",
                 "--out", str(tmp_path / "o")]) == 0
    doc = json.loads((tmp_path / "o" / "result.json").read_text())
    rows = {r["change"]: r for r in doc["what_if"]}
    assert {"recompute selective", "recompute full", "schedule dualpipe", "zero 0", "zero 3"} <= set(rows)
    assert rows["recompute full"]["step_time_s"] > doc["step_time_s"]
    assert rows["recompute full"]["memory_gb"] * GB < doc["memory_bytes"]["total"]["hbm"]
    assert rows["schedule interleaved"]["fits"] in ("yes", "no") or rows["schedule interleaved"]["fits"].startswith("n/a")
    assert "What if" in (tmp_path / "o" / "report.html").read_text()
    assert rows["expert mode fssdp"]["step_time_s"] > doc["step_time_s"]  # balanced routing: FSSDP only adds gathers
    assert rows["offload optimizer"]["memory_gb"] * GB < doc["memory_bytes"]["total"]["hbm"]


def test_placement_file_is_used_for_trace_routing_and_checked(tmp_path, capsys):
    from moesim.io import save_placement
    from moesim.placement import contiguous

    cfg = tmp_path / "flame.json"
    from tests.moesim.train.conftest import FLAME
    cfg.write_text(json.dumps(FLAME))
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    save_placement(contiguous(8, 64, 8), good)
    save_placement(contiguous(8, 64, 4), bad)
    base = ["train", "--model", str(cfg), "--ep", "8", "--seq-len", "256", "--global-batch-size", "8",
            "--trace", "default", "--cost", "roofline", "--out", str(tmp_path / "o")]
    assert main(base + ["--placement", str(good)]) == 0
    capsys.readouterr()
    assert main(base + ["--placement", str(bad)]) == 2
    assert "placement spans 4 devices" in capsys.readouterr().err


def test_train_cli_fssdp_prints_its_gathers_and_which_collectives(tmp_path, capsys):
    rc = main(["train", "--model", "mixtral-8x7b", "--nodes", "2", "--pp", "2", "--ep", "8", "--expert-mode", "fssdp",
               "--global-batch-size", "32", "--seq-len", "1024", "--layers", "2", "--out", str(tmp_path / "run"),
               "--json", str(tmp_path / "r.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "FSSDP gather/scatter" in out and "collectives: NCCL-fitted inside a node" in out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["meta"]["expert_mode"] == "fssdp" and doc["breakdown"]["fssdp_bytes_per_step"] > 0
    assert main(["train", "--model", "mixtral-8x7b", "--expert-mode", "zero", "--out", str(tmp_path / "x")]) == 2
    assert "--expert-mode must be one of ep, fssdp" in capsys.readouterr().err
