"""``moesim calibrate`` (time the MoE operators on this machine into a profile) and ``moesim validate``
(held-out error of the calibrated cost model, and published kernel figures as checks)."""

from __future__ import annotations

import argparse
from pathlib import Path

from moebase.units import MS
from moesim.cli._common import float_in, int_in


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="micro-benchmark the MoE operators on this machine into a profile",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to time kernels: cpu or cuda")
    p.add_argument("--out", required=True, help="profile to write (profiles/<name>.parquet); a device and a "
                   "single-device system spec fitted from it are written beside it (<name>.device.toml, "
                   "<name>.system.toml)")
    p.add_argument("--grid", default="default", help="shape grid: tiny | small | default | full")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: fp32 on cpu, bf16 on cuda)")
    p.add_argument("--repeats", type=int_in(1, 10000), default=15, help="timed samples per shape (median kept)")
    p.add_argument("--warmup", type=int_in(0, 10000), default=3, help="untimed runs before the timed ones")
    p.add_argument("--threads", type=int_in(1, 1024), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--triton", action="store_true", help="on cuda, time with triton.testing.do_bench if installed")
    p.add_argument("--seed", type=int_in(0, None), default=0, help="seed of the random generators (reproducible runs)")
    p.add_argument("--from-torch-profile", default=None, metavar="FILE.json",
                   help="instead of timing here, read a torch.profiler (Kineto) Chrome-trace JSON, map its kernels "
                   "to moesim's ops and write the profile from them (unmapped kernels are listed)")
    p.add_argument("--shapes", default=None, metavar="CONFIG.json", help="with --from-torch-profile: a Hugging Face "
                   "model config giving GEMM shapes where the trace has none (dense layer: qkv, o, gate+up, down)")
    p.add_argument("--tokens", type=int_in(1, 1 << 24), default=None,
                   help="with --shapes: rows per GEMM (tokens on one GPU)")
    p.add_argument("--tp", type=int_in(1, 1024), default=1, help="with --shapes: tensor-parallel degree")
    p.add_argument("--device-name", default=None, help="with --from-torch-profile: device name for the profile "
                   "(default: the trace's deviceProperties, else 'cpu (torch.profiler trace)')")
    p.set_defaults(func=run_calibrate)

    v = sub.add_parser("validate", help="held-out error of the calibrated cost model; --published checks",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    v.add_argument("profile", nargs="?", default=None, help="a profile written by 'moesim calibrate'")
    v.add_argument("--holdout", type=float_in(0, 1, open_lo=True, open_hi=True), default=0.3,
                   help="fraction of each op's shapes held out")
    v.add_argument("--seed", type=int_in(0, None), default=0, help="seed of the random generators (reproducible runs)")
    v.add_argument("--published", action="store_true", help="also check the spec roofline against published "
                   "DeepGEMM / DeepEP figures (hwmodels/published/kernels.toml)")
    v.add_argument("--e2e", action="store_true", help="also time a Mixtral-style MoE layer stack on this CPU "
                   "(replaying FLAME routing) and compare each layer with the simulator (needs torch, a CPU profile)")
    v.add_argument("--e2e-tokens", type=int_in(1, 1 << 20), default=1024, help="--e2e: tokens per layer")
    v.add_argument("--e2e-layers", type=int_in(1, 256), default=8, help="--e2e: MoE layers in the stack")
    v.add_argument("--stat", choices=["median", "min"], default="median",
                   help="per-shape time the model is fitted to (min: free of interference from other processes)")
    v.add_argument("--gpu-data", default=None, metavar="DIR", help="also validate the fitted GPU cost models on the "
                   "public GPU timings in DIR (../shared/data/gpu-timings): tables and predicted-vs-measured plots "
                   "in gpu_fidelity.html")
    v.add_argument("--out", default=None, help="output directory (default: <profile>-validation or validation)")
    v.set_defaults(func=run_validate)


def write_fitted_specs(cost, profile_path: Path, kind: str) -> tuple[Path, Path]:
    """``<stem>.device.toml`` and ``<stem>.system.toml`` beside the profile: a one-device system whose
    peak, bandwidth and launch latency are the fitted ones (every number says so in its source)."""
    dev = cost.fitted_device(kind)
    tier = dev.main_memory
    stem = profile_path.with_suffix("")
    src = f"fitted by moesim calibrate from {profile_path.name}"
    dtype = next(iter(dev.peak_flops_per_s))
    name = dev.name.replace('"', "'")
    device_text = (
        f"# Written by 'moesim calibrate': numbers fitted from {profile_path.name} on this machine.\n[device]\n"
        f'name = "{name}"\nkind = "{kind}"\n'
        f'peak_{dtype}_flops_per_s = {{ value = {dev.peak(dtype)!r}, source = "{src} (gemm roofline fit)" }}\n'
        f'launch_latency_s = {{ value = {dev.launch_latency_s!r}, source = "{src} (gemm roofline fit)" }}\n\n'
        f'[[device.memory]]\nname = "main"\n'
        f'capacity_bytes = {{ value = "1 TiB", source = "placeholder, not measured" }}\n'
        f'bandwidth_bytes_per_s = {{ value = {tier.bandwidth_bytes_per_s!r}, source = "{src} (copy bandwidth)" }}\n'
        f'latency_s = {{ value = 0, source = "placeholder, folded into launch latency" }}\n')
    link = ('kind = "{k}"\nbandwidth_bytes_per_s = {{ value = {bw!r}, source = "{s}" }}\n'
            'latency_s = {{ value = 0, source = "placeholder: one device, nothing crosses it" }}\n')
    system_text = (
        f"# Written by 'moesim calibrate': one device fitted from {profile_path.name}.\n[system]\n"
        f'name = "{stem.name}"\ndevice = "{stem.name}.device.toml"\nnum_nodes = 1\ndevices_per_node = 1\n\n'
        "[system.scale_up]\n" + link.format(k="local", bw=tier.bandwidth_bytes_per_s, s=src + " (copy bandwidth)")
        + "\n[system.host_link]\n" + link.format(k="local", bw=tier.bandwidth_bytes_per_s, s=src + " (copy bandwidth)")
        + "\n[system.host_memory]\nname = \"host\"\n"
        'capacity_bytes = { value = "1 TiB", source = "placeholder, not measured" }\n'
        f'bandwidth_bytes_per_s = {{ value = {tier.bandwidth_bytes_per_s!r}, source = "{src} (copy bandwidth)" }}\n'
        'latency_s = { value = 0, source = "placeholder" }\n')
    dpath, spath = Path(f"{stem}.device.toml"), Path(f"{stem}.system.toml")
    dpath.write_text(device_text)
    spath.write_text(system_text)
    return dpath, spath


def run_from_torch_profile(args) -> int:
    """``moesim calibrate --from-torch-profile FILE.json``: a profile from a Kineto trace."""
    from hwmodels.calib_profile import write_profile
    from moesim.calibrate.torch_profile import ShapeHints, load_trace, profile_from_trace

    out = Path(args.out)
    if out.suffix != ".parquet":
        raise ValueError(f"--out {out}: a profile is a .parquet file (e.g. profiles/gpu.parquet)")
    from moesim.cli._common import check_writable

    check_writable(out)
    hints = None
    if args.shapes is not None:
        if args.tokens is None:
            raise ValueError("--shapes needs --tokens N (rows per GEMM on one GPU)")
        hints = ShapeHints.from_config(args.shapes, args.tokens, args.tp)
    trace = load_trace(args.from_torch_profile)
    rows, meta, summary = profile_from_trace(trace, source=str(args.from_torch_profile), hints=hints,
                                             dtype=args.dtype, device_name=args.device_name)
    write_profile(rows, meta, out)
    print(f"read {args.from_torch_profile} ({meta['torch_profile']['timed_units']}) on {meta['device_name']}; wrote "
          f"{len(rows)} shapes ({meta['dtype']}) to {out}")
    for cat, (count, total_s) in sorted(summary.categories.items()):
        print(f"  {cat:20s} {count:6d} x, {total_s / MS:9.3f} ms")
    for why, (count, total_s) in summary.skipped.items():
        print(f"  skipped {count} ({total_s / MS:.3f} ms): {why}")
    top = sorted(summary.unmapped.items(), key=lambda kv: -kv[1][1])
    print(f"  unmapped: {len(top)} kernel/operator names" + (":" if top else ""))
    for name, (count, total_s) in top[:20]:
        print(f"    {count:6d} x {total_s / MS:9.3f} ms  {name[:100]}")
    if len(top) > 20:
        print(f"    ... and {len(top) - 20} more (all listed in the profile header, key torch_profile.unmapped)")
    print(f"  next: moesim validate {out}")
    return 0


def run_calibrate(args) -> int:
    if args.from_torch_profile is not None:
        return run_from_torch_profile(args)
    from hwmodels.calib_profile import read_profile, write_profile
    from hwmodels.calibrated import CalibratedCost
    from moesim.calibrate.bench import run_suite
    from moesim.calibrate.grids import make_grid
    from moesim.cli._common import progress_bar
    from moebase.units import format_quantity

    out = Path(args.out)
    if out.suffix != ".parquet":
        raise ValueError(f"--out {out}: a profile is a .parquet file (e.g. profiles/cpu.parquet)")
    from moesim.cli._common import check_writable

    check_writable(out)  # before minutes of timing, not after
    dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    specs = make_grid(args.grid, on_gpu=args.device == "cuda")
    with progress_bar(f"calibrating {args.device}", total=len(specs), unit="shape") as update:
        rows, meta = run_suite(specs, device=args.device, dtype=dtype, warmup=args.warmup, repeats=args.repeats,
                               threads=args.threads, seed=args.seed, use_triton=args.triton, progress=update)
    meta["grid"] = args.grid
    write_profile(rows, meta, out)
    cost = CalibratedCost.fit(read_profile(out))
    dpath, spath = write_fitted_specs(cost, out, "cpu" if args.device == "cpu" else "gpu")
    print(f"profiled {len(rows)} shapes on {meta['device_name']} ({dtype}, torch {meta['torch_version']}); wrote {out}")
    for f in cost.fits.values():
        peak = format_quantity(f.peak_flops_per_s, "flops_per_s") if f.peak_flops_per_s != float("inf") else "-"
        bw = format_quantity(f.bandwidth_bytes_per_s, "bytes_per_s") if f.bandwidth_bytes_per_s != float("inf") else "-"
        print(f"  {f.op:12s} launch {format_quantity(f.launch_s, 's'):>9s}  peak {peak:>13s}  bandwidth {bw:>11s}  "
              f"fit MAPE {f.train_mape:5.1f}% over {f.rows} shapes")
    for op, why in cost.refused.items():
        print(f"  {op:12s} NOT FITTED: {why}")
    print(f"  fitted specs: {spath} (simulate with --system {spath} --cost calibrated --profile {out} --dtype {dtype})")
    print(f"  next: moesim validate {out}")
    return 0


def run_validate(args) -> int:
    from hwmodels.calib_profile import read_profile
    from hwmodels.specs import PUBLISHED_KERNELS_PATH
    from moesim.calibrate.validate import holdout, mape_table, published_checks
    from moesim.report.validation import write_validation_report

    if args.profile is None and not args.published and args.gpu_data is None:
        raise ValueError("give a profile to validate (moesim validate profiles/<name>.parquet), --published "
                         "and/or --gpu-data DIR")
    out = Path(args.out) if args.out else (Path(args.profile).with_suffix("").with_name(
        Path(args.profile).stem + "-validation") if args.profile else Path("validation"))
    from moesim.cli._common import check_writable

    check_writable(out, directory=True)
    out.mkdir(parents=True, exist_ok=True)
    pred = mape = pub = prof = None
    if args.profile is not None:
        prof = read_profile(args.profile)
        pred = holdout(prof, args.holdout, args.seed, stat=args.stat)
        if pred.empty:
            raise ValueError(f"{args.profile}: too few shapes per op to hold any out (need >= 3 interior shapes)")
        mape = mape_table(pred)
        pred.to_csv(out / "heldout.csv", index=False)
        mape.to_csv(out / "mape.csv", index=False)
        print(f"held-out error on {prof.device_name} ({prof.dtype}); {len(pred)} of {len(prof.rows)} shapes held out")
        print(f"  {'op':12s} {'held out':>8s} {'roofline MAPE':>14s} {'table MAPE':>11s} {'worst':>7s}")
        for r in mape.to_dict("records"):
            print(f"  {r['op']:12s} {r['held_out']:8d} {r['roofline_mape_pct']:13.1f}% {r['table_mape_pct']:10.1f}% "
                  f"{r['table_worst_pct']:6.1f}%")
    if args.published:
        pub = published_checks(PUBLISHED_KERNELS_PATH)
        pub.to_csv(out / "published.csv", index=False)
        print("published kernel figures vs the spec roofline:")
        for r in pub.to_dict("records"):
            print(f"  {r['check']:48s} published {r['published']:8.1f} {r['unit']:6s} predicted {r['predicted']:8.1f} "
                  f"error {r['error_pct']:+6.1f}%")
    e2e = None
    if args.e2e:
        if args.profile is None:
            raise ValueError("--e2e needs a CPU profile")
        from moesim.calibrate.e2e import e2e_check

        e2e = e2e_check(args.profile, tokens=args.e2e_tokens, num_layers=args.e2e_layers, stat=args.stat)
        e2e.to_csv(out / "e2e.csv", index=False)
        print(f"end to end ({args.e2e_tokens} FLAME tokens, {args.stat} of 5 passes): measured vs simulated per layer")
        for r in e2e.to_dict("records"):
            print(f"  layer {r['layer']}: measured {r['measured_s'] / MS:8.2f} ms  simulated "
                  f"{r['predicted_s'] / MS:8.2f} ms  error {r['error_pct']:+6.1f}%")
        for w in e2e.attrs.get("warnings", []):
            print(f"  warning: {w}")
    if args.gpu_data is not None:
        validate_gpu_models(args.gpu_data, out)
    if prof is None and pub is None and e2e is None:
        return 0
    path = write_validation_report(out / "validation.html", prof, pred, mape, pub, e2e)
    print(f"  wrote {path} and CSV tables in {out}/")
    return 0


def validate_gpu_models(data_dir: str, out: Path) -> None:
    """``moesim validate --gpu-data DIR``: held-out errors of the fitted GPU models, CSVs and gpu_fidelity.html."""
    from hwmodels.gpu_fit import gpu_fidelity
    from moesim.report.validation import write_gpu_fidelity_report

    if not Path(data_dir).is_dir():
        raise ValueError(f"--gpu-data {data_dir}: not a directory (the public GPU timings, see "
                         "../shared/data/gpu-timings/README.md)")
    res = gpu_fidelity(data_dir)
    for key in ("lomo", "deepgemm", "llmcompass", "collectives", "deepep"):
        res[key].to_csv(out / f"gpu_{key}.csv", index=False)
    print("GPU GEMM model, leave one Vidur model out (held-out MAPE):")
    for r in res["lomo"].to_dict("records"):
        print(f"  {r['gpu']:5s} {r['set']:16s} {r['mape_pct']:6.2f} %  worst {r['worst_pct']:6.1f} %")
    llm = res["llmcompass"]
    for name, err in (("DeepGEMM fp8 (H800)", res["deepgemm"]["error_pct"]),
                      ("DeepEP (H800)", res["deepep"]["error_pct"]),
                      ("LLMCompass A100 (>= 10 GFLOP)", llm.loc[~llm["floor"], "error_pct"])):
        print(f"  {name:30s} MAPE {err.abs().mean():6.2f} %  worst {err.abs().max():6.1f} %")
    print(f"  wrote {write_gpu_fidelity_report(out / 'gpu_fidelity.html', res)}")
