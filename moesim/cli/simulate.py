"""``moesim simulate``: replay a routing trace on a modelled system and write a run directory."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from moesim.cli._common import int_in

MAX_NODES = 4096  # --nodes range; larger systems are also refused by the all-to-all size check
MAX_MICRO_BATCHES = 4096


class _LazyChoices:
    """argparse ``choices`` read from their one home only when argparse checks or prints them (the modules that
    hold them are slow to import, and every ``moesim`` command builds this parser)."""

    def __init__(self, load):
        self._load = load

    def __contains__(self, value) -> bool:
        return value in self._load()

    def __iter__(self):
        return iter(self._load())


def _dtypes() -> list[str]:
    from hwmodels.roofline import DTYPE_BYTES

    return sorted(DTYPE_BYTES)


def _comm_kernels() -> list[str]:
    from hwmodels.collectives import COMM_KERNEL_SMS

    return ["none", *COMM_KERNEL_SMS]


def _dedup_modes() -> list[str]:
    from moesim.sim import DISPATCH_DEDUP

    return list(DISPATCH_DEDUP)


def register(sub) -> None:
    p = sub.add_parser("simulate", help="replay a routing trace on a modelled system",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--system", default="dgx-h100", help="system spec name (see 'moesim systems') or a .toml path")
    p.add_argument("--nodes", type=int_in(1, MAX_NODES), default=None, help="scale the system to this many nodes")
    p.add_argument("--model", default=None, help="model catalog name (default: the trace's model)")
    p.add_argument("--trace", default="default", help="'default' (embedded FLAME-MoE-290M), 'flame', 'switch', "
                   "a .parquet trace, a capture directory, a FLAME .npz or a switch .json")
    p.add_argument("--placement", default="contiguous", help="'contiguous' or a placement JSON from 'moesim place'")
    p.add_argument("--micro-batches", type=int_in(1, MAX_MICRO_BATCHES), default=1,
                   help="parts each device's tokens of a step are cut into; they run concurrently and overlap")
    p.add_argument("--dtype", default="bf16", help="compute and activation dtype: bf16 | fp16 | fp8 | fp32")
    p.add_argument("--dispatch-dtype", default=argparse.SUPPRESS, choices=_LazyChoices(_dtypes), metavar="DTYPE",
                   help="dtype of the activations sent in the all-to-all dispatch, one of: %(choices)s "
                   "(unset: --dtype; DeepEP sends fp8 with per-128-value scales)")
    p.add_argument("--combine-dtype", default=argparse.SUPPRESS, choices=_LazyChoices(_dtypes), metavar="DTYPE",
                   help="dtype of the expert outputs sent back in the all-to-all combine, one of: %(choices)s "
                   "(unset: --dtype; DeepEP combines in bf16)")
    p.add_argument("--comm-kernel", default=argparse.SUPPRESS, choices=_LazyChoices(_comm_kernels), metavar="KERNEL",
                   help="communication kernel family whose SMs an overlapping all-to-all takes from compute, one of: "
                   "%(choices)s ('none': no SMs; unset: the simulator's default family)")
    p.add_argument("--dispatch-dedup", default=argparse.SUPPRESS, choices=_LazyChoices(_dedup_modes),
                   metavar="MODE", help="copies the all-to-all dispatch sends per token, one of %(choices)s: none (one per (token, expert) choice; "
                   "default), gpu (one per (token, destination GPU)), node (one per (token, destination node) over "
                   "scale-out, forwarded per destination GPU inside the node, as DeepEP's normal kernels)")
    p.add_argument("--cost", default="default", help="cost model: default (the fitted GPU model where the device "
                   "spec ships fitted parameters, else roofline) | roofline | gpu-fitted | calibrated")
    p.add_argument("--profile", default=None, help="kernel-timing profile (.parquet) for --cost calibrated")
    p.add_argument("--seed", type=int_in(0, None), default=0, help="seed of the replica-routing RNG")
    p.add_argument("--allow-partial-trace", action="store_true",
                   help="accept a trace whose steps lack some MoE layers (simulated as free; warned about)")
    p.add_argument("--out", default="run", help="output run directory (refused if it already holds files, "
                   "unless --force)")
    p.add_argument("--force", action="store_true", help="overwrite the run in --out")
    p.set_defaults(func=run)


def resolve_cost(name: str, profile: str | None, device):
    from hwmodels import cost as cost_mod

    if name in ("default", "auto"):
        return cost_mod.default_cost_model(device)
    if name not in cost_mod.COST_MODELS:
        from moebase.names import unknown_name
        raise ValueError(unknown_name("cost model", name, cost_mod.COST_MODELS))
    factory = cost_mod.COST_MODELS[name]
    if name in ("roofline", "gpu-fitted"):
        return factory()
    if profile is None:  # the cost model words its errors without flags; the flags are named here
        raise ValueError(f"--cost {name} needs --profile PATH: a profile written by 'moesim calibrate "
                         "--out profiles/<name>.parquet' on the device you simulate")
    return factory.from_profile(profile, device)


def resolve_placement(spec: str, num_layers: int, num_experts: int, num_devices: int):
    from moesim.io import load_placement
    from moesim.placement import contiguous

    if spec == "contiguous":
        return contiguous(num_layers, num_experts, num_devices)
    if not Path(spec).exists():
        from moesim.place import ALIASES, METHODS  # the one registry of placement method names

        if spec in METHODS or spec in ALIASES:
            raise ValueError(f"--placement {spec!r} names a placement method, not a placement: write one with "
                             f"'moesim place' and pass its JSON")
        raise ValueError(f"placement {spec!r} is neither 'contiguous' nor an existing placement file")
    return load_placement(spec)


def refuse_existing_run(out: str, force: bool) -> None:
    """A ValueError if ``out`` is a directory that already holds files (a previous run), unless ``force``."""
    path = Path(out)
    if force or not path.is_dir() or not any(path.iterdir()):
        return
    what = "a moesim run" if (path / "summary.json").exists() else "files"
    raise ValueError(f"--out {out} already holds {what}; pass --force to overwrite it, or choose a new --out")


def run(args) -> int:
    from hwmodels.cost import describe_cost
    from moesim.cli._common import check_writable, load_system_nodes, progress_bar
    from moesim.io import RUN_TRACE, write_run
    from moesim.sim import SimOptions, check_trace_fits_model, simulate
    from workloads.catalog import get_model
    from moesim.stream import replay_steps
    from workloads.importers import load_trace
    from workloads.trace_stream import open_if_large

    check_writable(args.out, directory=True)
    refuse_existing_run(args.out, args.force)
    system = load_system_nodes(args.system, args.nodes)
    stream = open_if_large(args.trace, allow_partial=args.allow_partial_trace)  # big .parquet: step by step
    trace = stream or load_trace(args.trace, allow_partial=args.allow_partial_trace)
    model = get_model(args.model or trace.meta.model)
    check_trace_fits_model(trace, model)  # before anything is sized by the trace's metadata
    placement = resolve_placement(args.placement, trace.meta.num_layers, trace.meta.num_experts, system.num_devices)
    cost = resolve_cost(args.cost, args.profile, system.device)
    if getattr(cost, "dtype", args.dtype) != args.dtype:
        raise ValueError(f"--profile {args.profile} was measured in {cost.dtype}, not {args.dtype}; simulate with "
                         f"--dtype {cost.dtype} or calibrate with --dtype {args.dtype}")
    comm = {key: getattr(args, key) for key in ("dispatch_dtype", "combine_dtype", "comm_kernel", "dispatch_dedup")
            if getattr(args, key, None) is not None}  # unset flags keep SimOptions' defaults
    options = SimOptions(micro_batches=args.micro_batches, dtype=args.dtype, **comm)
    t0 = time.perf_counter()
    with progress_bar("simulating", unit="layer") as update:
        if stream is not None:
            result = replay_steps(system, model, placement, stream.steps(), cost=cost, options=options,
                                  seed=args.seed, progress=update, expected_steps=stream.expected_steps)
        else:
            result = simulate(system, model, placement, trace, cost=cost, options=options, seed=args.seed,
                              progress=update)
    wall_s = time.perf_counter() - t0
    if not 0 <= result.total_time_s < float("inf"):
        raise ValueError(f"the simulated time is {result.total_time_s} s: a bandwidth or peak in {args.system!r} "
                         "is implausibly small")
    warnings = run_warnings(trace, model, placement, system.num_devices, args.micro_batches)
    spec = args.trace if not Path(args.trace).exists() else str(Path(args.trace).resolve())
    cost_desc = describe_cost(cost, system.device, args.dtype, system=system)
    peaks = {"device_peak_flops_per_s": system.device.peak(args.dtype),
             "device_memory_bandwidth_bytes_per_s": system.device.main_memory.bandwidth_bytes_per_s,
             "scale_up_bandwidth_bytes_per_s": system.scale_up.bandwidth_bytes_per_s,
             "device_launch_latency_s": system.device.launch_latency_s}
    out = write_run(result, args.out, trace.expert_load(), extra={"trace_spec": spec, "warnings": warnings,
                                                                   "cost_model_provenance": cost_desc, **peaks,
                                                                   **(stream.copy_to(Path(args.out) / RUN_TRACE) if stream else {})},
                    trace=None if stream else trace)
    imb = result.imbalance
    print(f"simulated {trace.num_tokens} tokens x {trace.meta.num_layers} MoE layers of {model.name} on {system.name} "
          f"({system.num_devices} x {system.device.name}) in {wall_s:.2f} s wall")
    per_layer_s = result.total_time_s / max(trace.meta.num_layers * trace.num_steps, 1)
    print(f"  simulated time {time_text(result.total_time_s)} ({time_text(per_layer_s)} per MoE layer and step); "
          f"load imbalance max/mean {imb.mean():.3f} (worst {imb.max():.3f})")
    for w in warnings:
        print(f"  WARNING: {w}")
    print(f"  cost model: {cost_desc}")
    print(f"  wrote {out}/ (next: moesim report {out})")
    return 0


def time_text(seconds: float) -> str:
    """A time in the unit that fits: 638.4 us, 77.90 ms, 3.21 s (never 77900.0 us)."""
    from moebase.units import MS, US

    if seconds < 10 * MS:
        return f"{seconds / US:.1f} us"
    return f"{seconds / MS:.2f} ms" if seconds < 10.0 else f"{seconds:.2f} s"


def run_warnings(trace, model, placement, num_devices: int, micro_batches: int) -> list[str]:
    """What a user must hear about a run that is legal but likely not what they meant: trace notes
    (no checksum, missing layers), devices without experts, a trace covering some of the model's
    layers, micro-batches with no tokens."""
    import numpy as np

    out = list(trace.notes)
    per_device = placement.slot_to_expert.reshape(placement.num_layers, num_devices, -1)
    idle = int((per_device < 0).all(axis=2).all(axis=0).sum())
    if idle:
        out.append(f"{idle} of {num_devices} devices hold no expert in any layer (the trace has "
                   f"{trace.meta.num_experts} experts per layer, placement {placement.name!r}): they only route")
    if trace.meta.num_layers < model.num_moe_layers:
        out.append(f"the trace covers {trace.meta.num_layers} of {model.name}'s {model.num_moe_layers} MoE layers; "
                   "the simulated time is for those layers only")
    tokens = np.array(list(trace.tokens_per_step().values()))
    fewest = int(tokens.min()) // num_devices
    if micro_batches > max(fewest, 1):
        out.append(f"--micro-batches {micro_batches} exceeds the {fewest} tokens per device of the smallest step: "
                   "some micro-batches are empty")
    return out
