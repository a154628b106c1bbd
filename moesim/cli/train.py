"""``moesim train``: time and memory of one training step of a whole model on a modelled system."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moesim.cli._common import add_model_system_flags, int_in


def register(sub) -> None:
    p = sub.add_parser("train", help="time one training step of a whole model (any Hugging Face config)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_system_flags(p)
    for flag, helptext in (("--tp", "tensor parallel size"), ("--pp", "pipeline parallel size"),
                           ("--dp", "data parallel size (default: devices / (tp x cp x pp))"),
                           ("--ep", "expert parallel size (ep x etp divides tp x cp x dp)"),
                           ("--cp", "context parallel size: each sequence split over cp ranks, ring attention "
                            "(seq-len a multiple of 2 x cp)"),
                           ("--etp", "expert tensor parallel size: each expert's FFN split over etp ranks (Megatron's "
                            "--expert-tensor-parallel-size; here 1 unless set)")):
        p.add_argument(flag, type=int_in(1, 1_000_000), default=None if flag == "--dp" else 1, help=helptext)
    p.add_argument("--zero", type=int_in(0, 3), default=1, help="ZeRO stage 0-3 of the data-parallel ranks")
    p.add_argument("--seq-len", type=int_in(1, 10_000_000), default=4096, help="tokens per sequence")
    p.add_argument("--micro-batch-size", type=int_in(1, 1_000_000), default=1, help="sequences per micro-batch")
    p.add_argument("--global-batch-size", type=int_in(1, 100_000_000), default=None,
                   help="sequences per step (default: 8 micro-batches x dp)")
    p.add_argument("--schedule", default="1f1b", help="1f1b | interleaved | dualpipe | dualpipe-bidir")
    p.add_argument("--virtual-stages", type=int_in(1, 1024), default=None,
                   help="model chunks per stage (interleaved; default 2)")
    p.add_argument("--first-stage-layers", type=int_in(0, 100000), default=0, help="blocks of the first pipeline chunk (0: even)")
    p.add_argument("--last-stage-layers", type=int_in(0, 100000), default=0, help="blocks of the last pipeline chunk (0: even)")
    p.add_argument("--recompute", default="none", help="none | selective | full")
    p.add_argument("--dtype", default="bf16", help="compute dtype: bf16 | fp16 | fp8 | fp32")
    p.add_argument("--trace", default=None, help="replay this routing trace (name or path, see 'moesim simulate'); "
                   "default: balanced routing")
    p.add_argument("--routing", default=None, help="balanced | trace (replay --trace) | synthetic (per-step routing "
                   "drawn from the generator fitted to --synth-from); default: trace with --trace, else balanced")
    p.add_argument("--synth-from", default="default", help="trace the synthetic generator is fitted to (name or "
                   "path, see 'moesim simulate'; default: the embedded FLAME-MoE trace)")
    p.add_argument("--synth-tokens", type=int_in(1, 10_000_000), default=8192,
                   help="tokens generated per routing sample (--routing synthetic)")
    p.add_argument("--routing-samples", type=int_in(1, 100000), default=4,
                   help="distinct routed micro-batches drawn from the trace")
    p.add_argument("--placement", default=None, help="expert placement JSON from 'moesim place' over the --ep "
                   "devices and the replayed trace layers (e.g. with EPLB-style replicas); default contiguous")
    p.add_argument("--expert-mode", default="ep", help="ep (expert parallel over --ep devices) | fssdp (Hecate's fully "
                   "sharded sparse data parallel over the same devices: experts gathered per step by the routing)")
    _add_overhead_flags(p)
    _add_moe_flags(p)
    _add_overlap_flags(p)
    p.add_argument("--layers", type=int_in(1, 100000), default=None,
                   help="simulate only the first K transformer layers")
    p.add_argument("--cost", default="default",
                   help="cost model: default (the device's) | " "roofline | gpu-fitted | calibrated")
    p.add_argument("--profile", default=None, help="kernel-timing profile for --cost calibrated")
    p.add_argument("--comm-sms", type=int_in(0, 1024), default=0,
                   help="SMs an overlapping communication kernel takes from "
                   "compute (cost models with 'overlap_sms', e.g. gpu-fitted; 20 for DeepSeek-V3's all-to-all)")
    p.add_argument("--seed", type=int_in(0, None), default=0, help="seed of the random generators (reproducible runs)")
    p.add_argument("--out", default="train_run", help="output directory (result.json, report.html)")
    p.add_argument("--json", default=None, help="also write the result JSON to this file")
    p.add_argument("--what-if", action="store_true", help="also simulate one-change variants (recomputation, "
                   "schedule, ZeRO stage) and tabulate them in the JSON and the report")
    p.set_defaults(func=run)


def _add_moe_flags(p) -> None:
    """How the MoE layers move tokens and experts (dispatch copies, FSSDP plan) and what is offloaded."""
    p.add_argument("--dispatch-dedup", default="auto", help="copies the MoE all-to-all sends per token: auto (by "
                   "the comm kernel: node for DeepEP-like kernels, the default), none (one per (token, expert)), gpu "
                   "(one per (token, destination GPU)), node (one per destination node over scale-out, forwarded "
                   "per GPU inside it)")
    p.add_argument("--fssdp-plan", default="oracle", help="loads FSSDP places experts by: oracle (all the step's "
                   "routing samples) | first-sample (the first only; the others are unseen)")
    p.add_argument("--offload", default="none", help="none | optimizer (Adam states in host memory / DDR; the "
                   "gradient and weight transfers and the update there go on the step) | weights (also the weights, "
                   "streamed per layer)")


def _add_overlap_flags(p) -> None:
    """Communication overlapped with compute (moesim.train.overlap)."""
    for flag, helptext in (("--overlap-grad-reduce", "reduce gradients in buckets during the last micro-batch's "
                            "backward (Megatron's --overlap-grad-reduce; off by default, as in Megatron)"),
                           ("--overlap-param-gather", "ZeRO 1/2: all-gather the updated weights during the next "
                            "step's forward (Megatron's --overlap-param-gather; off by default)"),
                           ("--tp-comm-overlap", "overlap the sequence-parallel all-gather / reduce-scatter with "
                            "the adjacent GEMMs (Transformer Engine userbuffers, Megatron's --tp-comm-overlap; "
                            "off by default)")):
        p.add_argument(flag, action=argparse.BooleanOptionalAction, default=False, help=helptext)


def _add_overhead_flags(p) -> None:
    """The FP8 cast kernels and host overhead of the step (moesim.train.fp8, moesim.train.host)."""
    p.add_argument("--fp8-recipe", default="delayed", help="FP8 quantization kernels of --dtype fp8 (Megatron's "
                   "--fp8-recipe): delayed | tensorwise (current scaling) | blockwise (DeepSeek-V3's 1x128 / 128x128) | "
                   "none (not modelled)")
    p.add_argument("--host-overhead", default="eager", help="host launch time the GPU waits for after each MoE "
                   "dispatch's host sync: eager (every kernel launched, Megatron's default) | cuda-graphs (attention "
                   "side and router as graphs, experts eager) | none")


def _spec(args, num_devices: int):
    from moesim.train.spec import TrainError, spec_from_options

    model_parallel = args.tp * args.cp * args.pp
    dp = args.dp if args.dp is not None else num_devices // model_parallel
    if dp < 1:
        raise TrainError(f"--tp x --cp x --pp = {model_parallel} exceeds the {num_devices} devices")
    v = args.virtual_stages if args.virtual_stages is not None else (2 if args.schedule == "interleaved" else 1)
    gbs = args.global_batch_size if args.global_batch_size is not None else 8 * args.micro_batch_size * dp
    return spec_from_options({**vars(args), "virtual_stages": v, "global_batch_size": gbs}, dp, _routing(args))


def _routing(args) -> str:
    from moesim.train.spec import ROUTING, TrainError

    routing = args.routing or ("trace" if args.trace else "balanced")
    if routing not in ROUTING:
        raise TrainError(f"--routing must be one of {', '.join(ROUTING)}, got {routing!r}")
    if (routing == "trace") != bool(args.trace):
        raise TrainError("--routing trace needs --trace" if routing == "trace" else
                         f"--trace replays a trace: it needs --routing trace, not {routing!r} (the synthetic "
                         "generator's source is --synth-from)")
    return routing


def _routing_trace(args, cfg, spec):
    """The trace the step replays: --trace, one drawn from the generator fitted to --synth-from, or None."""
    from workloads.importers import load_trace

    if spec.routing == "trace":
        return load_trace(args.trace)
    if spec.routing == "synthetic":
        from moesim.train.routing import synthetic_trace
        return synthetic_trace(cfg, spec, load_trace(args.synth_from), seed=args.seed,
                               tokens_per_sample=args.synth_tokens)
    return None


def _cost(args, device):
    from moesim.cli.simulate import resolve_cost
    from moesim.train.ops import default_cost

    import dataclasses

    cost = default_cost(device) if args.cost == "default" else resolve_cost(args.cost, args.profile, device)
    if args.comm_sms:
        if not hasattr(cost, "overlap_sms"):
            raise ValueError(f"--comm-sms needs a cost model with 'overlap_sms' (gpu-fitted); "
                             f"{getattr(cost, 'name', type(cost).__name__)} has none")
        cost = dataclasses.replace(cost, overlap_sms=args.comm_sms)
    return cost


def run(args) -> int:
    from moesim.cli._common import check_writable, load_model_config, load_system_nodes
    from moesim.report.train import write_report
    from moesim.train.step import simulate_step

    check_writable(args.out, directory=True)
    if args.json:
        check_writable(args.json, flag="--json")
    cfg = load_model_config(args.model, "moesim train")
    if args.layers is not None:
        cfg = cfg.with_layers(args.layers)
    system = load_system_nodes(args.system, args.nodes)
    spec = _spec(args, system.num_devices)
    trace = _routing_trace(args, cfg, spec)
    cost = _cost(args, system.device)
    placement = None
    if args.placement:
        from moesim.io import load_placement
        placement = load_placement(args.placement)
    result = simulate_step(cfg, system, spec, cost, trace=trace, seed=args.seed, placement=placement)
    what_if = _what_if(cfg, system, spec, cost, trace, args.seed, placement) if args.what_if else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {**result.to_json(), "what_if": what_if}
    text = json.dumps(doc, indent=1, default=float)
    (out / "result.json").write_text(text)
    if args.json:
        Path(args.json).write_text(text)
    write_report(result, out / "report.html", what_if)
    _print_summary(result, out)
    return 0


def _variants(spec) -> list[tuple[str, object]]:
    """One-change variants of ``spec``: other recomputation, schedule, ZeRO stage, expert mode (ep > 1) and
    optimizer offload."""
    import dataclasses

    from moesim.train.spec import EXPERT_MODES, OFFLOAD, RECOMPUTE

    par = spec.parallel
    out = [(f"recompute {r}", dataclasses.replace(spec, recompute=r)) for r in RECOMPUTE if r != spec.recompute]
    for sched, v in (("1f1b", 1), ("interleaved", 2), ("dualpipe", 1)):
        if sched != spec.schedule and par.pp > 1:
            out.append((f"schedule {sched}", (sched, v)))
    out += [(f"zero {z}", ("zero", z)) for z in range(4) if z != par.zero]
    if par.ep > 1:
        out += [(f"expert mode {m}", dataclasses.replace(spec, expert_mode=m)) for m in EXPERT_MODES
                if m != spec.expert_mode]
    out += [(f"offload {o}", dataclasses.replace(spec, offload=o)) for o in OFFLOAD if o != spec.offload]
    return out


def _what_if(cfg, system, spec, cost, trace, seed, placement) -> list[dict]:
    import dataclasses

    from moebase.units import GB
    from moesim.train.spec import TrainError
    from moesim.train.step import simulate_step

    rows = []
    for label, change in _variants(spec):
        try:
            if isinstance(change, tuple) and change[0] == "zero":
                s = dataclasses.replace(spec, parallel=dataclasses.replace(spec.parallel, zero=change[1]))
            elif isinstance(change, tuple):
                s = dataclasses.replace(spec, schedule=change[0],
                                        parallel=dataclasses.replace(spec.parallel, virtual_stages=change[1]))
            else:
                s = change
            r = simulate_step(cfg, system, s, cost, trace=trace, seed=seed, check_memory=False, placement=placement)
        except TrainError as exc:
            rows.append({"change": label, "step_time_s": None, "tokens_per_s_per_device": None, "mfu": None,
                         "memory_gb": None, "fits": f"n/a: {exc}"})
            continue
        mem = r.memory_bytes
        rows.append({"change": label, "step_time_s": r.step_time_s, "tokens_per_s_per_device": r.tokens_per_s_per_device,
                     "mfu": r.mfu, "memory_gb": mem["total"]["hbm"] / GB,
                     "fits": "yes" if mem["total"]["hbm"] <= mem["capacity"]["hbm"] else "no"})
    return rows


def _print_summary(r, out: Path) -> None:
    from moebase.units import GB

    m, b = r.meta, r.breakdown
    extra = "".join(f" {k} {m[k]}" for k in ("cp", "etp") if m.get(k, 1) > 1)  # shown when used
    print(f"{m['model']} on {m['system']} ({m['num_devices']} x {m['device']}), tp {m['tp']} pp {m['pp']} dp {m['dp']} "
          f"ep {m['ep']}{extra} zero {m['zero']}, {m['schedule']}, recompute {m['recompute']}, cost {m['cost_model']}")
    print(f"  {m['collectives']}")
    print(f"  step {r.step_time_s:.3f} s: pipeline {b['pipeline_s']:.3f} s (bubble {b['bubble_fraction'] * 100:.1f} %), "
          f"grad sync {b['grad_sync_s']:.3f} s, optimizer {b['optimizer_s']:.3f} s"
          + (f", FSSDP gather/scatter {b['fssdp_comm_s']:.3f} s ({b['fssdp_bytes_per_step'] / GB:.1f} GB per expert "
             "group)" if m.get("expert_mode") == "fssdp" else "")
          + (f", FP8 weight casts {b['fp8_weight_cast_s']:.3f} s" if b.get("fp8_weight_cast_s") else ""))
    print(f"  {r.tokens_per_s:,.0f} tokens/s, {r.tokens_per_s_per_device:,.0f} tokens/s per device, MFU {r.mfu * 100:.1f} %")
    mem = r.memory_bytes
    cats = ", ".join(f"{k} {v / GB:.1f}" + ("" if tier == "hbm" else f" in {tier}")
                     for k in ("weights", "gradients", "optimizer", "activations", "comm_buffers", "fssdp_buffers",
                               "weight_buffers")
                     if k in mem
                     for tier, v in mem[k].items())
    print(f"  memory per device (stage {mem['stage']}): {mem['total']['hbm'] / GB:.1f} GB of "
          f"{mem['capacity']['hbm'] / GB:.0f} GB ({cats} GB)")
    print(f"  wrote {out}/result.json and {out}/report.html")
