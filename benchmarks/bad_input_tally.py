"""Run every bad-input case of issue 11 (part B) against the ``moesim`` command line and print the tally:
per case class, how many cases got a clear one-line error (or the warning they call for), a traceback or
crash, a silent wrong result, a hang.

    .venv/bin/python -m benchmarks.bad_input_tally [--code DIR] [--only CLASS] [--show]

``--code DIR`` runs the cases against another checkout (e.g. ``git archive HEAD`` unpacked into DIR) to
compare before and after a change. Each case is one ``python -m moesim`` process with a 60 s timeout
and an 8 GiB address-space limit (so a huge allocation fails fast instead of swapping). The bad files
are written with pyarrow directly, so they read the same to any version. Not a test: it runs ~90
processes (a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from moebase.units import GiB

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 60
MEMORY_LIMIT_BYTES = 8 * GiB
META_KEY = b"moesim.trace"
PAYLOAD = "<script>document.title='x'</script><img src=x onerror=alert(1)>"
COLUMNS = ("cases", "clear", "traceback/crash", "silent wrong", "hang", "other")


@dataclass
class Case:
    """One bad input. ``argv`` runs (after ``setup``); the case is clear when the outcome matches ``expect``:
    a regex the error line (rc != 0) must match, or ``warn:<regex>`` for stdout/stderr of a run that
    succeeds; ``check(workdir, proc) -> bool`` decides cases about what a user sees."""

    cls: str
    name: str
    argv: list[str]
    expect: str = ""
    check: Callable | None = None
    setup: list[list[str]] = field(default_factory=list)
    max_wall_s: float | None = None  # an error after this long came too late (after the work, not before)


# ----------------------------------------------------------------------------- bad files


def _default_table():
    import pyarrow.parquet as pq

    return pq.read_table(REPO / "workloads" / "data" / "flame_moe_290m.parquet")


def _write(table, header: dict, path: Path) -> str:
    import pyarrow.parquet as pq

    pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(header).encode()}), path)
    return str(path)


def make_files(d: Path) -> dict[str, str]:
    """The bad traces, specs and placements (paths by name)."""
    import numpy as np
    import pyarrow as pa

    t = _default_table()
    head = json.loads(t.schema.metadata[META_KEY])
    plain = {k: v for k, v in head.items() if k != "columns_sha256"}
    col = {n: t.column(n).to_numpy() for n in t.column_names}

    def with_col(name, values):
        return t.set_column(t.column_names.index(name), name, pa.array(values))

    f = {}
    e = col["expert"].astype(float)
    e[7] = 5.7
    f["float_ids"] = _write(with_col("expert", e), plain, d / "float_ids.parquet")
    e = col["expert"].astype(np.int64)
    e[7] = 2**32 + 1
    f["wide_ids"] = _write(with_col("expert", e), plain, d / "wide_ids.parquet")
    f["float_meta"] = _write(t, {**plain, "num_experts": 64.9}, d / "float_meta.parquet")
    f["missing_layer"] = _write(t.filter(pa.array(col["layer"] != 3)), plain, d / "missing_layer.parquet")
    e = col["expert"].copy()
    e[:86] = (e[:86] + 32) % 64  # a damaged body that still decodes: 86 expert ids changed
    damaged = with_col("expert", e)
    f["bitflip"] = _write(damaged, head if "columns_sha256" in head else plain, d / "bitflip.parquet")
    f["newer"] = _write(t, {**plain, "format_version": 2}, d / "newer.parquet")
    f["huge_experts"] = _write(t, {**plain, "num_experts": 10**9}, d / "huge_experts.parquet")
    tok = col["token"].copy()
    tok[tok == tok.max()] = 10**12
    f["huge_token"] = _write(with_col("token", tok), plain, d / "huge_token.parquet")
    f["evil_source"] = _write(t, {**plain, "source": PAYLOAD}, d / "evil_source.parquet")
    f.update(_switch_traces(d))
    f.update(_specs(d))
    f.update(_placements(d))
    return f


def _switch_traces(d: Path) -> dict[str, str]:
    """8-expert traces of switch-base-8 (6 MoE layers): all layers, and 3 of them."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(0)
    out = {}
    for name, layers in (("switch6", 6), ("switch3", 3)):
        tokens = 64
        tab = pa.table({"step": np.zeros(tokens * layers, np.int32),
                        "layer": np.repeat(np.arange(layers, dtype=np.int32), tokens),
                        "token": np.tile(np.arange(tokens, dtype=np.int64), layers),
                        "rank": np.zeros(tokens * layers, np.int16),
                        "expert": rng.integers(0, 8, tokens * layers).astype(np.int32),
                        "weight": np.ones(tokens * layers, np.float32)})
        meta = {"format_version": 1, "model": "switch-base-8", "num_experts": 8, "top_k": 1, "num_layers": layers,
                "source": "bad_input_tally", "extra": {}}
        out[name] = _write(tab, meta, d / f"{name}.parquet")
    return out


def _specs(d: Path) -> dict[str, str]:
    specs = CODE / "hwmodels" / "specs"  # the checkout's own specs (their keys differ between versions)
    system = (specs / "dgx-h100.toml").read_text()
    device = (specs / "h100-sxm.toml").read_text()
    (d / "gpu.toml").write_text(device)
    (d / "evil-gpu.toml").write_text(re.sub(r'(?m)^name = "[^"]*"', f"name = '''{PAYLOAD}'''", device, count=1))
    system = system.replace('device = "h100-sxm"', 'device = "gpu.toml"')
    out = {}
    for name, (old, new) in {"tiny_bw": ('value = "450 GB/s"', "value = 1e-300"),
                             "huge_bw": ('value = "450 GB/s"', "value = 1e30"),
                             "many_nodes": ("num_nodes = 1", "num_nodes = 100000"),
                             "evil_system": ('name = "dgx-h100"', f"name = '''{PAYLOAD}'''"),
                             "evil_device": ('device = "gpu.toml"', 'device = "evil-gpu.toml"')}.items():
        (d / f"{name}.toml").write_text(system.replace(old, new))
        out[name] = str(d / f"{name}.toml")
    (d / "dir.toml").mkdir()
    out["dir_toml"] = str(d / "dir.toml")
    (d / "garbage.toml").write_bytes(b"\xff\xfe\x00 not toml")
    out["garbage_toml"] = str(d / "garbage.toml")
    return out


def _placements(d: Path) -> dict[str, str]:
    ok = {"format": "moesim.placement/1", "name": "p", "num_experts": 64, "slots_per_device": 8,
          "num_devices": 8, "slot_to_expert": [list(range(64))] * 8}
    docs = {"placement_list": [1, 2, 3], "placement_nulls": {**ok, "slot_to_expert": [[None] * 64] * 8},
            "placement_zero_slots": {**ok, "slots_per_device": 0},
            "placement_huge": {**ok, "num_experts": 10**9}}
    out = {}
    for name, doc in docs.items():
        (d / f"{name}.json").write_text(json.dumps(doc))
        out[name] = str(d / f"{name}.json")
    (d / "a_file").write_text("x")
    out["a_file"] = str(d / "a_file")
    return out


# ----------------------------------------------------------------------------- checks of what a user sees


def _page(workdir: Path, run: str = "run-report") -> str:
    p = workdir / run / "report.html"
    return p.read_text() if p.exists() else ""


def _visible_text(page: str) -> str:
    page = re.sub(r"<script.*?</script>", " ", page, flags=re.S)
    return re.sub(r"<[^>]+>", " ", page)


def _escaped(run: str) -> Callable:
    def check(workdir, proc):
        page = _page(workdir, run)
        return bool(page) and PAYLOAD not in page and "&lt;script&gt;" in page
    return check


def _report_has(pattern: str, run: str = "run-report") -> Callable:
    return lambda workdir, proc: bool(re.search(pattern, _visible_text(_page(workdir, run)), re.S))


def _report_lacks(pattern: str) -> Callable:
    def check(workdir, proc):
        page = _visible_text(_page(workdir))
        return bool(page) and not re.search(pattern, page)
    return check


def _heatmap_once(workdir, proc) -> bool:
    return len(re.findall(r"<h2>[^<]*Expert load[^<]*</h2>", _page(workdir))) == 1


def _next_runs(workdir, proc) -> bool:
    import shlex

    m = re.search(r"next: (moesim simulate [^)]*)\)", proc.stdout)
    if not m:
        return False
    argv = shlex.split(m.group(1))[1:] + ["--out", str(workdir / "run-next")]
    return run_cli(argv, workdir, CODE).returncode == 0


def _compare_wrote_placement(workdir, proc) -> bool:
    try:
        doc = json.loads((workdir / "cmp.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == "moesim.placement/1"


def _report_unchanged(workdir, proc) -> bool:
    """The report after the trace file changed equals the one before (it reads the run's own copy)."""
    before, after = workdir / "stale-before.html", workdir / "run-stale" / "report.html"
    if not (before.exists() and after.exists()):
        return False
    strip = re.compile(r"timeline\.perfetto[^\"<]*")
    return strip.sub("", before.read_text()) == strip.sub("", after.read_text())


HELP_PROBE = ("import argparse;from moesim.cli import build_parser\n"
              "def walk(p):\n"
              " for a in p._actions:\n"
              "  if isinstance(a, argparse._SubParsersAction):\n"
              "   for s in a.choices.values(): yield from walk(s)\n"
              "  elif not isinstance(a, argparse._HelpAction): yield a\n"
              "bad=[a.option_strings for a in walk(build_parser()) if not a.help or a.type in (int, float)]\n"
              "print(len(bad), bad)\nraise SystemExit(1 if bad else 0)")


# ----------------------------------------------------------------------------- the cases


SIM = ["simulate", "--out", "{out}"]
PLACE = ["place", "--time-limit", "1s", "--out", "p.json"]


def cases(f: dict[str, str]) -> list[Case]:
    """Every case, class by class (``{out}`` in argv becomes a fresh run directory)."""
    return [*_silent_cases(f), *_numeric_cases(f), *_resource_cases(f), *_security_cases(f),
            *_traceback_cases(f), *_report_cases(f)]


def _silent_cases(f: dict[str, str]) -> list[Case]:
    sim = SIM
    return [
        Case("silent wrong results", "float expert id 5.7", [*sim, "--trace", f["float_ids"]], r"row 7: 5\.7"),
        Case("silent wrong results", "int64 expert id beyond int32", [*sim, "--trace", f["wide_ids"]], r"does not fit int32"),
        Case("silent wrong results", "num_experts = 64.9", [*sim, "--trace", f["float_meta"]], r"num_experts.*64\.9"),
        Case("silent wrong results", "a whole layer missing", [*sim, "--trace", f["missing_layer"]], r"layer\(s\) 3"),
        Case("silent wrong results", "86 expert ids changed in the body", [*sim, "--trace", f["bitflip"]], "checksum"),
        Case("silent wrong results", "format_version 2", [*sim, "--trace", f["newer"]], "newer"),
        Case("silent wrong results", "8 experts on 16 GPUs", [*sim, "--trace", f["switch6"], "--nodes", "2"],
             "warn:hold no expert"),
        Case("silent wrong results", "trace covers 3 of 6 layers", [*sim, "--trace", f["switch3"]], "warn:covers 3 of"),
        Case("silent wrong results", "report after the trace file changed", ["report", "run-stale"],
             check=_report_unchanged,
             setup=[["simulate", "--trace", "stale.parquet", "--out", "run-stale"], ["report", "run-stale"],
                    ["!cp", "run-stale/report.html", "stale-before.html"], ["!cp", f["switch6"], "stale.parquet"]]),
    ]


def _numeric_cases(f: dict[str, str]) -> list[Case]:
    sim, place = SIM, PLACE
    return [
        *[Case("numeric flags", " ".join(a), a, flag) for a, flag in [
            (["simulate", "--nodes", "0", "--out", "{out}"], "--nodes"),
            (["simulate", "--nodes", "-1", "--out", "{out}"], "--nodes"),
            (["simulate", "--micro-batches", "0", "--out", "{out}"], "--micro-batches"),
            (["simulate", "--micro-batches", "2.5", "--out", "{out}"], "--micro-batches"),
            (["simulate", "--seed", "-1", "--out", "{out}"], "--seed"),
            ([*place, "--workers", "-3"], "--workers"), ([*place, "--scenarios", "-1"], "--scenarios"),
            ([*place, "--replicas", "-1"], "--replicas"), ([*place, "--tolerance", "-0.5"], "--tolerance"),
            ([*place, "--fit-fraction", "2"], "--fit-fraction"),
            (["study", "report", "studies/none", "--drill", "-1"], "--drill"),
            (["memory", "cache", "--accuracy", "1.5", "--max-tokens", "8"], "--accuracy"),
            (["memory", "cache", "--capacity-experts", "0", "--max-tokens", "8"], "--capacity-experts"),
            (["coe", "--rate", "-1", "--requests", "5"], "--rate"),
            (["coe", "--experts", "0", "--requests", "5"], "--experts"),
            (["validate", "--holdout", "1.5"], "--holdout"),
            (["synth", "--tokens", "0"], "--tokens"),
            (["capture-demo", "--seconds", "-5", "--out", "cap"], "--seconds"),
        ]],
        Case("numeric flags", "spec bandwidth 1e-300", [*sim, "--system", f["tiny_bw"]], "bandwidth_bytes_per_s"),
        Case("numeric flags", "spec bandwidth 1e30", [*sim, "--system", f["huge_bw"]], "bandwidth_bytes_per_s"),
    ]


def _resource_cases(f: dict[str, str]) -> list[Case]:
    sim = SIM
    return [
        Case("resource exhaustion", "metadata num_experts = 10**9", [*sim, "--trace", f["huge_experts"]], "1000000000"),
        Case("resource exhaustion", "one token id of 10**12", [*sim, "--trace", f["huge_token"]], "would need"),
        Case("resource exhaustion", "--micro-batches 1000000", ["simulate", "--micro-batches", "1000000", "--out", "{out}"],
             "--micro-batches"),
        Case("resource exhaustion", "--nodes 1000000", ["simulate", "--nodes", "1000000", "--out", "{out}"], "--nodes"),
        Case("resource exhaustion", "spec with 100,000 nodes", [*sim, "--system", f["many_nodes"]], "would need"),
        Case("resource exhaustion", "placement num_experts = 10**9", [*sim, "--placement", f["placement_huge"]],
             "num_experts|would need|experts"),
    ]


def _security_cases(f: dict[str, str]) -> list[Case]:
    return [
        Case("security", "trace source with script/onerror", ["report", "run-evil1"], check=_escaped("run-evil1"),
             setup=[["simulate", "--trace", f["evil_source"], "--out", "run-evil1"]]),
        Case("security", "system name with script/onerror", ["report", "run-evil2"], check=_escaped("run-evil2"),
             setup=[["simulate", "--system", f["evil_system"], "--out", "run-evil2"]]),
        Case("security", "device name with script/onerror", ["report", "run-evil3"], check=_escaped("run-evil3"),
             setup=[["simulate", "--system", f["evil_device"], "--out", "run-evil3"]]),
    ]


def _traceback_cases(f: dict[str, str]) -> list[Case]:
    sim, place = SIM, PLACE
    return [
        Case("tracebacks", "simulate --out an existing file", ["simulate", "--out", f["a_file"]], "a_file"),
        Case("tracebacks", "simulate --out a read-only place", ["simulate", "--out", "/proc/moesim-run"], "/proc"),
        Case("tracebacks", "report --out a read-only place", ["report", "run-ok", "--out", "/proc/r.html"], "/proc",
             setup=[["simulate", "--out", "run-ok"]]),
        Case("tracebacks", "place --out a read-only place, before the solve",
             ["place", "--time-limit", "30s", "--out", "/proc/p.json"], "/proc", max_wall_s=20.0),
        Case("tracebacks", "a directory named *.toml as --system", [*sim, "--system", f["dir_toml"]], "directory"),
        Case("tracebacks", "a binary file as --system", [*sim, "--system", f["garbage_toml"]], "garbage.toml"),
        Case("tracebacks", "placement JSON that is a list", [*sim, "--placement", f["placement_list"]], "placement_list"),
        Case("tracebacks", "placement JSON with nulls", [*sim, "--placement", f["placement_nulls"]], "None|null"),
        Case("tracebacks", "placement slots_per_device = 0", [*sim, "--placement", f["placement_zero_slots"]],
             "slots_per_device"),
        Case("tracebacks", "report on a file", ["report", f["a_file"]], "a_file"),
        Case("tracebacks", "report on a truncated summary.json", ["report", "run-trunc"], "summary.json",
             setup=[["simulate", "--out", "run-trunc"], ["!truncate", "run-trunc/summary.json"]]),
        Case("tracebacks", "unknown system sn40l", [*sim, "--system", "sn40l"], "did you mean 'sn40l-node'"),
        Case("tracebacks", "unknown model mixtral", [*sim, "--model", "mixtral"], "did you mean 'mixtral-8x7b'"),
        Case("tracebacks", "unknown trace defualt", [*sim, "--trace", "defualt"], "did you mean 'default'"),
        Case("tracebacks", "unknown cache policy lfuu", ["memory", "cache", "--policies", "lru,lfuu"], "did you mean 'lfu'"),
        Case("tracebacks", "unknown cost model rooflin", [*sim, "--cost", "rooflin"], "did you mean 'roofline'"),
    ]


def _report_cases(f: dict[str, str]) -> list[Case]:
    place = PLACE
    return [
        Case("report", "leads with where the time went", ["report", "run-report"],
             check=_report_has(r"Where the time went.*router.*expert FFN.*idle.*100\.0 %"),
             setup=[["simulate", "--micro-batches", "2", "--out", "run-report"]]),
        Case("report", "says why 2 micro-batches are slower", ["report", "run-report"],
             check=_report_has(r"Why 2 micro-batches")),
        Case("report", "achieved FLOP/s against the peak", ["report", "run-report"], check=_report_has(r"% of peak")),
        Case("report", "imbalance is defined", ["report", "run-report"], check=_report_has(r"imbalance\s+max over devices")),
        Case("report", "no exponent notation in tables", ["report", "run-report"], check=_report_lacks(r"\de\+0\d")),
        Case("report", "expert-load heatmap appears once", ["report", "run-report"], check=_heatmap_once),
        Case("report", "place 'next:' command runs as printed", [*place[:-2], "--nodes", "2", "--objective", "balance",
                                                                 "--scenarios", "0", "--out", "p2.json"],
             check=_next_runs),
        Case("report", "place --compare --out writes a placement",
             ["place", "--compare", "--methods", "contiguous,round-robin", "--out", "cmp.json"],
             check=_compare_wrote_placement),
        Case("report", "every option has help and a range", ["!probe"], check=lambda w, p: p.returncode == 0),
    ]


# ----------------------------------------------------------------------------- running

CODE: Path = REPO


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))


def run_cli(argv: list[str], workdir: Path, code: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(code), "MOESIM_SHARED_TRACES": str(REPO.parent / "shared" / "data" / "traces")}
    if argv and argv[0] == "!probe":
        cmd = [sys.executable, "-c", HELP_PROBE]
    else:
        cmd = [sys.executable, "-m", "moesim", *argv]
    try:
        return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
                              preexec_fn=_limit)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(cmd, None, exc.stdout or "", exc.stderr or "")


def _shell(step: list[str], workdir: Path) -> None:
    if step[0] == "!cp":
        (workdir / step[2]).write_bytes((workdir / step[1]).read_bytes() if not Path(step[1]).is_absolute()
                                        else Path(step[1]).read_bytes())
    elif step[0] == "!truncate":
        (workdir / step[1]).write_text('{"system": "dgx')


def classify(case: Case, proc: subprocess.CompletedProcess, workdir: Path, wall_s: float) -> str:
    if proc.returncode is None:
        return "hang"
    if case.max_wall_s is not None and wall_s > case.max_wall_s:
        return "other"
    out = (proc.stdout or "") + (proc.stderr or "")
    if "Traceback (most recent call last)" in out or proc.returncode < 0 or proc.returncode in (137, 139):
        return "traceback/crash"
    if case.check is not None:
        return "clear" if case.check(workdir, proc) else "silent wrong"
    if case.expect.startswith("warn:"):
        if proc.returncode == 0:
            return "clear" if re.search(case.expect[5:], out) else "silent wrong"
        return "other"
    if proc.returncode == 0:
        return "silent wrong"
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith(("usage:", " "))]
    return "clear" if len(lines) == 1 and re.search(case.expect, lines[0]) else "other"


def main(argv: list[str] | None = None) -> int:
    global CODE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", default=str(REPO), help="checkout whose moesim is run (default: this one)")
    ap.add_argument("--only", default=None, help="run only this case class")
    ap.add_argument("--show", action="store_true", help="print each case's outcome and error line")
    args = ap.parse_args(argv)
    CODE = Path(args.code).resolve()  # set before make_files: the specs are copied from it
    workdir = Path(tempfile.mkdtemp(prefix="moesim-bad-input-"))
    (workdir / "stale.parquet").write_bytes((REPO / "workloads" / "data" / "flame_moe_290m.parquet").read_bytes())
    files = make_files(workdir)
    tally: dict[str, dict[str, int]] = {}
    for i, case in enumerate(cases(files)):
        if args.only and case.cls != args.only:
            continue
        case.argv = [f"run-{i}" if a == "{out}" else a for a in case.argv]  # a fresh run directory per case
        for step in case.setup:
            _shell(step, workdir) if step[0].startswith("!") else run_cli(step, workdir, CODE)
        t0 = time.perf_counter()
        proc = run_cli(case.argv, workdir, CODE)
        outcome = classify(case, proc, workdir, time.perf_counter() - t0)
        row = tally.setdefault(case.cls, dict.fromkeys(COLUMNS, 0))
        row["cases"] += 1
        row[outcome] += 1
        if args.show:
            last = (proc.stderr or "").strip().splitlines()[-1:] or [""]
            print(f"  [{outcome:15s}] {case.cls}: {case.name}: {last[0][:160]}", flush=True)
    print(f"bad-input tally of {CODE} (workdir {workdir})")
    print("| case class | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    total = dict.fromkeys(COLUMNS, 0)
    for cls, row in tally.items():
        print(f"| {cls} | " + " | ".join(str(row[k]) for k in COLUMNS) + " |")
        total = {k: total[k] + row[k] for k in COLUMNS}
    print("| all | " + " | ".join(str(total[k]) for k in COLUMNS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
