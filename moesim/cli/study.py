"""``moesim study run|report``: design-space studies (a folder with a ``study.toml``)."""

from __future__ import annotations

import argparse

from moesim.cli._common import float_in, int_in


def register(sub) -> None:
    p = sub.add_parser("study", help="run or report a design-space study (studies/<name>/study.toml)")
    ssub = p.add_subparsers(dest="study_command", metavar="STUDY_COMMAND")
    r = ssub.add_parser("run", help="evaluate every configuration (resumable) into <study>/results.parquet",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("study", help="study folder (holds study.toml)")
    r.add_argument("--workers", type=int_in(1, 1024), default=None, help="local processes or Dask LocalCluster workers "
                   "(default: CPU count, at most 8)")
    r.add_argument("--serial", action="store_true", help="evaluate in this process (no pool)")
    r.add_argument("--dask", default=None, metavar="ADDRESS", help="run on Dask: 'tcp://host:8786' or 'local'")
    r.add_argument("--fallback-local", action="store_true", help="if the Dask scheduler is unreachable, run "
                   "on a local cluster instead of failing")
    r.add_argument("--dask-timeout", type=float_in(0, 86400, open_lo=True), default=10.0, metavar="SECONDS",
                   help="bound on each remote step "
                   "of Dask (connect, handshake, fetching a result); a lost scheduler stops the run after it")
    r.add_argument("--limit", type=int_in(1, None), default=None, help="evaluate at most this many new configurations")
    r.add_argument("--prune", action="store_true", help="delete the rows of configurations no longer in study.toml "
                   "(default: keep them in <study>/results.retired.parquet)")
    r.add_argument("--wait", action="store_true", help="if another 'study run' is working on this folder, wait for "
                   "it to finish (default: refuse)")
    r.set_defaults(func=run)
    rep = ssub.add_parser("report", help="write <study>/report.html from results.parquet")
    rep.add_argument("study", help="study folder")
    rep.add_argument("--out", default=None, help="output HTML (default: <study>/report.html)")
    rep.add_argument("--png", default=None, metavar="DIR", help="also export static PNGs (needs kaleido + a browser)")
    rep.add_argument("--drill", type=int_in(1, 1000), default=24, help="configurations offered in the drill-down")
    rep.set_defaults(func=report)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run(args) -> int:
    import logging
    import sys
    import time
    import warnings

    from moesim.cli._common import progress_bar
    from moesim.study.runner import run_study
    from moesim.study.spec import load_study

    study = load_study(args.study)
    executor = "serial" if args.serial else ("dask" if args.dask else "process")
    if not getattr(args, "debug", False):  # distributed logs tracebacks of lost connections; our error says it
        logging.getLogger("distributed").setLevel(logging.CRITICAL)

    def note(msg: str) -> None:
        print(f"moesim study: note: {msg}", file=sys.stderr)

    t0 = time.perf_counter()
    with progress_bar(f"study {study.name}", total=len(study.configs), unit="config") as update, \
            warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *rest, **kw: note(str(message))
        rows = run_study(study, executor=executor, workers=args.workers, dask=args.dask,
                         fallback_local=args.fallback_local, limit=args.limit, progress=update, prune=args.prune,
                         wait=args.wait, dask_timeout_s=args.dask_timeout, note=note)
    failed = rows[rows["status"] != "ok"] if len(rows) else rows
    print(f"study {study.name}: {len(rows) - len(failed)} of {len(study.configs)} configurations done, "
          f"{len(failed)} failed ({study.engine} engine, {executor}) in {time.perf_counter() - t0:.1f} s wall")
    outside = rows.attrs.get("outside", 0)
    if outside and args.prune:
        print(f"  deleted {outside} rows of configurations no longer in study.toml (--prune)")
    elif outside:
        print(f"  kept {outside} rows of configurations no longer in study.toml in "
              f"{study.path / 'results.retired.parquet'} (--prune deletes them)")
    print(f"  wrote {study.results_path} (next: moesim study report {study.path})")
    if len(failed):
        first = failed.iloc[0]
        label = ", ".join(f"{k}={first[k]}" for k in study.varied) or first["config_id"]
        print(f"moesim study: error: {len(failed)} configurations failed (first: {label}: {first['error']}); "
              f"their rows have status 'failed' in {study.results_path}; running again retries them",
              file=sys.stderr)
        return 1
    return 0


def report(args) -> int:
    from moesim.report.study import write_study_report
    from moesim.study.spec import load_study

    from moesim.cli._common import check_writable

    study = load_study(args.study)
    check_writable(args.out or study.path / "report.html")
    if args.png:
        check_writable(args.png, flag="--png", directory=True)
    out = write_study_report(study, args.out, drill=args.drill, png_dir=args.png)
    print(f"wrote {out}")
    return 0
