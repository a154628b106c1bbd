"""Bad flags, files and faults at the command line: one clear line (naming the flag, file or key) and
exit code 2 -- no traceback, no silent wrong result, no huge allocation; warnings where a run is legal
but likely not what was meant."""

import argparse
import json
import shlex
import tempfile
from pathlib import Path

import numpy as np
import pytest

from moesim.cli import build_parser, error_line, main
from workloads.trace import TraceMeta, from_dense, write_parquet

SPECS = Path(__file__).resolve().parents[3] / "hwmodels" / "specs"


def _fails(argv, capsys, out=None) -> str:
    """Run the CLI; assert a clean failure (rc 2, from argparse or the handler); return stderr.
    'simulate' gets a fresh --out (so an existing ./run is never the reason it fails)."""
    if argv[0] == "simulate" and "--out" not in argv:
        argv = [*argv, "--out", str(out or Path(tempfile.mkdtemp(prefix="moesim-test-")) / "run")]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own one-line usage error
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    return err


# ----------------------------------------------------------------------------- numeric flags

@pytest.mark.parametrize("argv, message", [
    (["simulate", "--nodes", "0"], "argument --nodes: must be in [1, 4096], got 0"),
    (["simulate", "--nodes", "1000000"], "argument --nodes: must be in [1, 4096], got 1000000"),
    (["simulate", "--micro-batches", "1000000"], "argument --micro-batches: must be in [1, 4096]"),
    (["simulate", "--micro-batches", "2.5"], "argument --micro-batches: expected an integer, got '2.5'"),
    (["simulate", "--seed", "-1"], "argument --seed: must be in [0, inf], got -1"),
    (["place", "--workers", "-3"], "argument --workers: must be in [1, 1024], got -3"),
    (["place", "--scenarios", "-1"], "argument --scenarios: must be in [0, 100000], got -1"),
    (["place", "--fit-fraction", "0"], "argument --fit-fraction: must be in (0, 1], got 0"),
    (["place", "--tolerance", "nan"], "argument --tolerance: expected a finite number, got 'nan'"),
    (["study", "run", "x", "--workers", "0"], "argument --workers: must be in [1, 1024], got 0"),
    (["memory", "cache", "--accuracy", "1.5"], "argument --accuracy: must be in [0, 1], got 1.5"),
    (["coe", "--rate", "0"], "argument --rate: must be in (0, 1e+06], got 0"),
    (["validate", "--holdout", "1"], "argument --holdout: must be in (0, 1), got 1"),
    (["memory", "sweep", "--backing-gbps", "50,1e-300"], "argument --backing-gbps: '1e-300' in '50,1e-300': must be"),
])
def test_numeric_flags_have_ranges(argv, message, capsys):
    assert message in _fails(argv, capsys)


def _options(parser, path=("moesim",)):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*path, name))
        elif not isinstance(action, argparse._HelpAction):
            yield " ".join(path), action


def test_every_option_has_help_text():
    missing = [f"{cmd} {a.option_strings or a.dest}" for cmd, a in _options(build_parser()) if not a.help]
    assert missing == []


def test_every_numeric_option_has_a_range():
    raw = [f"{cmd} {a.option_strings}" for cmd, a in _options(build_parser()) if a.type in (int, float)]
    assert raw == []


# ----------------------------------------------------------------------------- files, paths, faults

def test_out_that_is_a_file_or_unwritable(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert "--out " + str(f) + ": exists and is not a directory" in _fails(["simulate", "--out", str(f)], capsys)
    assert "cannot write in /proc" in _fails(["simulate", "--out", "/proc/moesim-run"], capsys)


def test_place_checks_its_output_before_the_solve(capsys):
    err = _fails(["place", "--out", "/proc/placement.json", "--time-limit", "60s"], capsys)
    assert "--out /proc/placement.json: cannot write in /proc" in err


def test_spec_path_that_is_a_directory(tmp_path, capsys):
    d = tmp_path / "x.toml"
    d.mkdir()
    assert f"{d}: is a directory, not a TOML spec file" in _fails(["simulate", "--system", str(d)], capsys)


def _spec(tmp_path, **replace) -> Path:
    text = (SPECS / "dgx-h100.toml").read_text().replace('device = "h100-sxm"', f'device = "{SPECS / "h100-sxm.toml"}"')
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


def test_tiny_bandwidth_in_a_spec_is_refused(tmp_path, capsys):
    spec = _spec(tmp_path, **{'value = "450 GB/s"': "value = 1e-300"})
    err = _fails(["simulate", "--system", str(spec)], capsys)
    assert "key 'system.scale_up.bandwidth_bytes_per_s': implausible value 1e-300" in err


def test_spec_with_100000_nodes_is_refused_with_the_size(tmp_path, capsys):
    spec = _spec(tmp_path, **{"num_nodes = 1": "num_nodes = 100000"})
    err = _fails(["simulate", "--system", str(spec)], capsys)
    assert "would need an array of" in err and "GB (limit" in err


@pytest.mark.parametrize("doc, message", [
    ([1, 2], "a placement JSON is an object, got a list"),
    ({"format": "moesim.placement/1", "num_experts": 64, "slots_per_device": 8, "slot_to_expert": [[None] * 64] * 8},
     "key 'slot_to_expert' layer 0 holds None"),
    ({"format": "moesim.placement/1", "num_experts": 64, "slots_per_device": 0, "slot_to_expert": [[0] * 64] * 8},
     "key 'slots_per_device' must be a positive integer, got 0"),
    ({"format": "moesim.placement/1", "num_experts": 64, "slots_per_device": 8, "slot_to_expert": [[2**32 + 1] * 64]},
     "holds 4294967297; a slot holds an expert id 0..63 or -1"),
])
def test_bad_placement_files(tmp_path, capsys, doc, message):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    assert message in _fails(["simulate", "--placement", str(path), "--out", str(tmp_path / "r")], capsys)


def test_report_on_a_file_and_a_damaged_run(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("x")
    assert "is a file; give the run directory" in _fails(["report", str(f)], capsys)
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{trunc")
    assert "summary.json: damaged or unreadable (JSONDecodeError" in _fails(["report", str(run)], capsys)


def test_unknown_names_get_a_did_you_mean(capsys):
    assert "unknown system 'sn40l'; did you mean 'sn40l-node'?" in _fails(["simulate", "--system", "sn40l"], capsys)
    assert "did you mean 'mixtral-8x7b'?" in _fails(["simulate", "--model", "mixtral"], capsys)
    assert "did you mean 'default'?" in _fails(["simulate", "--trace", "defualt"], capsys)
    assert "did you mean 'lfu'?" in _fails(["memory", "cache", "--policies", "lru,lfuu"], capsys)


@pytest.mark.parametrize("exc, line", [
    (PermissionError(13, "Permission denied", "/x/y"), "Permission denied: /x/y"),
    (IsADirectoryError(21, "Is a directory", "/tmp"), "Is a directory: /tmp"),
    (MemoryError(), "out of memory"),
    (ZeroDivisionError("division by zero"), "internal error ZeroDivisionError: division by zero"),
])
def test_every_exception_becomes_one_line(exc, line, monkeypatch, capsys):
    import moesim.cli.systems as systems

    def boom(args):
        raise exc

    monkeypatch.setattr(systems, "_systems", boom)
    assert line in error_line(exc)
    err = _fails(["systems"], capsys)
    assert err.count("\n") == 1 and line in err
    with pytest.raises(type(exc)):
        main(["--debug", "systems"])


# ----------------------------------------------------------------------------- legal but suspicious runs

def _switch_like(tmp_path, layers: int, missing_layer: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 8, size=(64, layers, 1))
    meta = TraceMeta(model="switch-base-8", num_experts=8, top_k=1, num_layers=layers, source="test")
    t = from_dense(ids, None, meta)
    if missing_layer is not None:
        t = t.select(t.columns["layer"] != missing_layer)
    return write_parquet(t, tmp_path / f"switch-{layers}-{missing_layer}.parquet")


def test_experts_that_cannot_fill_the_devices_and_partial_layers_are_warned(tmp_path, capsys):
    trace = _switch_like(tmp_path, layers=3)
    run = tmp_path / "run"
    assert main(["simulate", "--trace", str(trace), "--nodes", "2", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "WARNING: 8 of 16 devices hold no expert in any layer" in out
    assert "WARNING: the trace covers 3 of switch-base-8's 6 MoE layers" in out
    assert len(json.loads((run / "summary.json").read_text())["warnings"]) == 2


def test_a_missing_layer_needs_the_flag_and_is_then_loud(tmp_path, capsys):
    trace = _switch_like(tmp_path, layers=6, missing_layer=2)
    err = _fails(["simulate", "--trace", str(trace), "--out", str(tmp_path / "a")], capsys)
    assert "no rows for layer(s) 2 of num_layers=6" in err
    assert main(["simulate", "--trace", str(trace), "--allow-partial-trace", "--out", str(tmp_path / "b")]) == 0
    assert "WARNING: PARTIAL TRACE" in capsys.readouterr().out


def test_sparse_token_ids_are_refused_with_the_size(tmp_path, capsys):
    rng = np.random.default_rng(0)
    meta = TraceMeta(model="switch-base-8", num_experts=8, top_k=1, num_layers=6, source="test")
    t = from_dense(rng.integers(0, 8, size=(4, 6, 1)), None, meta, token=np.array([0, 1, 2, 10**12]))
    path = write_parquet(t, tmp_path / "sparse.parquet")
    err = _fails(["simulate", "--trace", str(path), "--out", str(tmp_path / "r")], capsys)
    assert "per-token routing arrays" in err and "would need" in err and "renumber" in err


def test_report_uses_the_runs_own_trace_copy(tmp_path, capsys):
    trace = _switch_like(tmp_path, layers=6)
    run = tmp_path / "run"
    assert main(["simulate", "--trace", str(trace), "--out", str(run)]) == 0
    _switch_like(tmp_path, layers=6, missing_layer=None)  # same path rewritten...
    trace.write_bytes(b"not a trace any more")  # ...then destroyed: the report does not read it
    assert main(["report", str(run)]) == 0
    assert "Trace statistics: Co-activation" in (run / "report.html").read_text()
    from moesim.io import RUN_TRACE
    from workloads.trace import read_parquet

    copy = read_parquet(run / RUN_TRACE)
    summary = json.loads((run / "summary.json").read_text())
    summary["trace_sha256"] = "0" * 64  # the copy no longer matches the run
    (run / "summary.json").write_text(json.dumps(summary))
    assert "does not match the checksum in summary.json" in _fails(["report", str(run)], capsys)
    assert len(copy) == 64 * 6


# ----------------------------------------------------------------------------- place: outputs that run

def test_place_next_command_runs_as_printed(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["place", "--objective", "balance", "--time-limit", "0.5s", "--workers", "1", "--scenarios", "0",
                 "--nodes", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    cmd = printed.split("(next: ", 1)[1].rsplit(")", 1)[0]
    argv = shlex.split(cmd)
    assert argv[:2] == ["moesim", "simulate"] and "--nodes" in argv
    assert main([*argv[1:], "--out", str(tmp_path / "run")]) == 0


def test_place_compare_out_writes_a_placement(tmp_path, capsys):
    from moesim.io import load_placement

    out = tmp_path / "best.json"
    assert main(["place", "--compare", "--methods", "contiguous,round-robin", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}:" in printed and "fastest on held-out tokens" in printed
    assert load_placement(out).num_experts == 64
    assert (tmp_path / "best-compare.html").exists() and (tmp_path / "best-compare.json").exists()


def test_report_of_an_older_run_without_a_trace_copy_says_so(tmp_path):
    from moesim.io import RUN_TRACE

    run = tmp_path / "run"
    assert main(["simulate", "--trace", str(_switch_like(tmp_path, layers=6)), "--out", str(run)]) == 0
    (run / RUN_TRACE).unlink()
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "has no copy of its trace" in page and "Trace statistics: Co-activation" not in page
