"""Calibration benchmark: profile this CPU on a grid, report held-out MAPE per op, the published checks,
and the end-to-end per-layer error of the simulator against a real PyTorch MoE layer stack.

Run: ``python -m benchmarks.bench_calibration [--grid default] [--threads 1] [--tokens 1024]``.
Writes ``benchmarks/results/calibration.md``; the profile and the HTML report go to ``run/calibration/``
(not committed: a CPU profile describes one machine).
Timings on a shared machine are noisy; the numbers are one run's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks import md_table as _md

RESULTS = Path(__file__).parent / "results"
ARTIFACTS = Path(__file__).resolve().parent.parent / "run" / "calibration"


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--grid", default="default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default=str(RESULTS), help="where calibration.md goes")
    ap.add_argument("--artifacts", default=str(ARTIFACTS), help="where the profile and HTML report go")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = _args(argv)
    from hwmodels.calib_profile import read_profile, write_profile
    from moesim.calibrate.bench import run_suite
    from moesim.calibrate.e2e import e2e_check
    from moesim.calibrate.grids import make_grid
    from moesim.calibrate.validate import holdout, mape_table, published_checks
    from moesim.cli._common import progress_bar
    from moesim.report.validation import write_validation_report

    out, art = Path(args.out), Path(args.artifacts)
    out.mkdir(parents=True, exist_ok=True)
    art.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    specs = make_grid(args.grid)
    with progress_bar("calibrating", total=len(specs), unit="shape") as update:
        rows, meta = run_suite(specs, threads=args.threads, repeats=args.repeats, progress=update)
    prof_path = write_profile(rows, meta, art / f"cpu-{args.grid}.parquet")
    t_cal = time.perf_counter() - t0
    prof = read_profile(prof_path)
    pred = holdout(prof)
    mape = mape_table(pred)
    mape_min = mape_table(holdout(prof, stat="min"))
    pub = published_checks()
    t1 = time.perf_counter()
    e2e = e2e_check(str(prof_path), tokens=args.tokens, num_layers=args.layers, repeats=5)
    e2e_min = e2e_check(str(prof_path), tokens=args.tokens, num_layers=args.layers, repeats=5, stat="min")
    t_e2e = time.perf_counter() - t1
    write_validation_report(art / "calibration.html", prof, pred, mape, pub, e2e)
    cmd = (f"python -m benchmarks.bench_calibration --grid {args.grid} --threads {args.threads} "
           f"--repeats {args.repeats} --tokens {args.tokens} --layers {args.layers}")
    text = [f"# Calibration benchmark ({meta['device_name']}, {meta['dtype']}, torch {meta['torch_version']})", "",
            f"Command: `{cmd}` ({meta['created_at']}); calibration {t_cal:.0f} s over {len(rows)} shapes, "
            f"end-to-end {t_e2e:.0f} s. Shared 2-core machine: timings are noisy, one run.", "",
            "## Held-out MAPE per operator (30% of interior shapes held out, seed 0)", "",
            "Fitted to each shape's median time (the default):", "", _md(mape), "",
            "Fitted to each shape's minimum time (interference from other processes only ever adds time):", "",
            _md(mape_min), "",
            f"## End to end: {args.tokens} FLAME tokens x {args.layers} Mixtral-style MoE layers "
            "(FLAME-MoE-290M routed-expert shapes, real routing replayed)", "", _md(e2e), "",
            f"Median of 5 passes vs model fitted to medians: mean |error| {e2e['error_pct'].abs().mean():.1f}%, "
            f"worst {e2e['error_pct'].abs().max():.1f}%.", "",
            "Minimum of 5 passes vs model fitted to minima (a second, separate set of 5 passes):", "", _md(e2e_min), "",
            f"Mean |error| {e2e_min['error_pct'].abs().mean():.1f}%, worst {e2e_min['error_pct'].abs().max():.1f}%.", ""]
    if e2e.attrs.get("warnings"):
        text += ["Warnings raised by the calibrated model during the simulation:", ""]
        text += [f"- {w}" for w in e2e.attrs["warnings"]] + [""]
    text += ["## Published kernel figures vs the spec roofline", "",
             _md(pub[["check", "unit", "published", "predicted", "error_pct", "model"]]), ""]
    (out / "calibration.md").write_text("\n".join(text))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
