"""``moesim study run|report``: design-space studies (a folder with a ``study.toml``)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("study", help="run or report a design-space study (studies/<name>/study.toml)")
    ssub = p.add_subparsers(dest="study_command", metavar="STUDY_COMMAND")
    r = ssub.add_parser("run", help="evaluate every configuration (resumable) into <study>/results.parquet",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("study", help="study folder (holds study.toml)")
    r.add_argument("--workers", type=int, default=None, help="local processes or Dask LocalCluster workers "
                   "(default: CPU count, at most 8)")
    r.add_argument("--serial", action="store_true", help="evaluate in this process (no pool)")
    r.add_argument("--dask", default=None, metavar="ADDRESS", help="run on Dask: 'tcp://host:8786' or 'local'")
    r.add_argument("--fallback-local", action="store_true", help="if the Dask scheduler is unreachable, run "
                   "on a local cluster instead of failing")
    r.add_argument("--limit", type=int, default=None, help="evaluate at most this many new configurations")
    r.set_defaults(func=run)
    rep = ssub.add_parser("report", help="write <study>/report.html from results.parquet")
    rep.add_argument("study", help="study folder")
    rep.add_argument("--out", default=None, help="output HTML (default: <study>/report.html)")
    rep.add_argument("--png", default=None, metavar="DIR", help="also export static PNGs (needs kaleido + a browser)")
    rep.add_argument("--drill", type=int, default=24, help="configurations offered in the drill-down")
    rep.set_defaults(func=report)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run(args) -> int:
    import time

    from moesim.cli._common import progress_bar
    from moesim.study.runner import run_study
    from moesim.study.spec import load_study

    study = load_study(args.study)
    executor = "serial" if args.serial else ("dask" if args.dask else "process")
    t0 = time.perf_counter()
    with progress_bar(f"study {study.name}", total=len(study.configs), unit="config") as update:
        rows = run_study(study, executor=executor, workers=args.workers, dask=args.dask,
                         fallback_local=args.fallback_local, limit=args.limit, progress=update)
    print(f"study {study.name}: {len(rows)} of {len(study.configs)} configurations done ({study.engine} engine, "
          f"{executor}) in {time.perf_counter() - t0:.1f} s wall")
    print(f"  wrote {study.results_path} (next: moesim study report {study.path})")
    return 0


def report(args) -> int:
    from moesim.report.study import write_study_report
    from moesim.study.spec import load_study

    study = load_study(args.study)
    out = write_study_report(study, args.out, drill=args.drill, png_dir=args.png)
    print(f"wrote {out}")
    return 0
