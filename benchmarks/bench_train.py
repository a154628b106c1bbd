"""Training-step engine: validation against published throughputs, and its own speed.

Validation (``--validate``): each case is a published training run whose figure, configuration and source
are written below; moesim predicts it from the shipped model config and system spec and the table gives
the signed error ((predicted - published) / published). Settings the sources do not publish are listed
per case with the value assumed.

Speed (``--speed``): wall seconds of :func:`moesim.train.step.simulate_step` for a DeepSeek-V3-size step
as GPUs, layers and micro-batches grow (one run each, on this machine).

    .venv/bin/python -m benchmarks.bench_train [--validate] [--speed]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import md_table, write_result
from moebase.units import GB, TFLOPS

TRILLION_TOKENS = 10**12
HOUR_S = 3600.0

DS_V3 = "DeepSeek-V3 technical report, arXiv:2412.19437"
QWEN_ZOO = ("Megatron-MoE-ModelZoo best_practice/Qwen3/readme.md @c1ad0b5c "
            "(github.com/yanring/Megatron-MoE-ModelZoo), 256 H100, BF16, seq 4096")
NEMO_H100 = ("Megatron-Bridge docs/performance-summary.md @00b7660b (github.com/NVIDIA-NeMo/Megatron-Bridge), "
             "NeMo 25.11, DGX-H100 table; MoE runs force-balance tokens over experts")
LLAMA3 = ("The Llama 3 Herd of Models, arXiv:2407.21783, Table 4 (405B pre-training, BF16, H100); sec. 3.3.2: one "
          "block fewer on the first and the last pipeline stage")
LLAMA3_ASSUMED = ("schedule (1F1B; Meta used a modified interleaved one, whose interleaved form does not fit 80 GB "
                  "here), micro-batch size (1), recomputation (selective), FLOP-counting convention")


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    system: str
    nodes: int
    layout: dict
    spec: dict
    metric: str  # "tokens_per_s_per_device" | "step_time_s" | "tflops_per_device"
    published: float
    source: str
    unpublished: str
    fit_as: str | None = None  # GPU fit to use if the device spec names none (the shipped H100/H800 specs name one)
    comm_sms: int = 0


CASES = [
    Case("DeepSeek-V3 pre-training, 2048 H800", "deepseek-v3", "hgx-h800", 256,
         dict(tp=1, pp=16, dp=128, ep=64, zero=1),
         dict(seq_len=4096, micro_batch_size=1, global_batch_size=15360, schedule="dualpipe", recompute="selective",
              dtype="fp8", fp8_recipe="blockwise"),
         "tokens_per_s_per_device", TRILLION_TOKENS / (180e3 * HOUR_S),
         f"{DS_V3}, sec. 1: 180K H800 GPU hours per trillion tokens (= 1,543 tokens/s per GPU, wall clock incl. "
         "everything); sec. 3.2: PP16, EP64 over 8 nodes, ZeRO-1, DualPipe, 20 SMs for communication; sec. 4.2: "
         "seq 4096, batch 15,360 sequences (final)",
         "micro-batch size (1), stage layout (even split), routing (balanced and node-limited: each token's experts "
         "on at most 4 of the 8 nodes; dispatch one copy per (token, node) over IB as DeepEP; the MTP module not "
         "modelled), downtime", comm_sms=20),
    Case("Qwen3-235B-A22B, TP2 EP32 PP8 VPP4", "qwen3-235b-a22b", "dgx-h100", 32,
         dict(tp=2, pp=8, dp=16, ep=32, zero=1, virtual_stages=4),
         dict(seq_len=4096, micro_batch_size=1, global_batch_size=2048, schedule="interleaved", recompute="selective"),
         "step_time_s", 19.7, f"{QWEN_ZOO}, row 'Cross-node EP', DeepEP, recompute norm+act: 19.7 s/step",
         "stage layout (even split), ZeRO stage (1), routing balance (balanced)", fit_as="h100-vidur"),
    Case("Qwen3-235B-A22B, TP4 EP8 PP8 VPP4", "qwen3-235b-a22b", "dgx-h100", 32,
         dict(tp=4, pp=8, dp=8, ep=8, zero=1, virtual_stages=4),
         dict(seq_len=4096, micro_batch_size=1, global_batch_size=2048, schedule="interleaved", recompute="none"),
         "step_time_s", 29.0, f"{QWEN_ZOO}, row 'Intra-node EP' TP4: 29.0 s/step",
         "stage layout (even split), ZeRO stage (1), routing balance (balanced)", fit_as="h100-vidur"),
    Case("Qwen3-235B-A22B, TP4 EP8 PP8 VPP4, seq 16384", "qwen3-235b-a22b", "dgx-h100", 32,
         dict(tp=4, pp=8, dp=8, ep=8, zero=1, virtual_stages=4),
         dict(seq_len=16384, micro_batch_size=1, global_batch_size=256, schedule="interleaved", recompute="selective"),
         "tflops_per_device", 295.0, f"{QWEN_ZOO.replace(', seq 4096', '')}, section 'Long Context' (DeepEP, BF16, "
         "command PP=8 VPP=4 EP=8, recompute layernorm + moe): H100, seq 16384, 32 nodes, TP4 CP1, GBS 256: 295 "
         "TFLOPS (forced balance)",
         "micro-batch size (1), ZeRO stage (1); recomputation of the MoE block is not a moesim mode (selective "
         "recomputes norms and the attention core; 'recompute full' bounds it from the other side)",
         fit_as="h100-vidur"),
    Case("Qwen3-235B-A22B, FSDP TP2 EP8", "qwen3-235b-a22b", "dgx-h100", 32,
         dict(tp=2, pp=1, dp=128, ep=8, zero=3),
         dict(seq_len=4096, micro_batch_size=4, global_batch_size=2048, recompute="full"),
         "step_time_s", 17.6, f"{QWEN_ZOO}, row 'Intra-node EP' FSDP, full recompute: 17.6 s/step",
         "how far FSDP's gathers overlap compute (modelled: each layer's gather overlaps that layer's compute), "
         "routing balance (balanced)",
         fit_as="h100-vidur"),
    Case("Llama 3 70B, 64 H100, FP8", "llama-3.1-70b", "dgx-h100", 8,
         dict(tp=4, pp=8, dp=2, zero=1, virtual_stages=5),
         dict(seq_len=8192, micro_batch_size=1, global_batch_size=128, schedule="interleaved", recompute="none",
              dtype="fp8", fp8_recipe="tensorwise"),
         "tokens_per_s_per_device", 1602.0, f"{NEMO_H100}: LLAMA3_70B, 64 GPUs, FP8-CS, GBS 128, MBS 1, seq 8192, "
         "TP4 PP8 VP5, DDP: 1,602 tokens/s/GPU (719 model TFLOP/s/GPU)",
         "recomputation (none), ZeRO stage (1, distributed optimizer), stage layout (even); the Llama 3.1 config "
         "stands in for Llama 3 (same shapes)", fit_as="h100-vidur"),
    Case("Llama 3 8B, 8 H100, FP8, FSDP", "llama-3.1-8b", "dgx-h100", 1,
         dict(tp=1, pp=1, dp=8, zero=3),
         dict(seq_len=8192, micro_batch_size=1, global_batch_size=128, recompute="none", dtype="fp8",
              fp8_recipe="tensorwise"),
         "tokens_per_s_per_device", 14451.0, f"{NEMO_H100}: LLAMA3_8B, 8 GPUs, FP8-CS, GBS 128, MBS 1, seq 8192, "
         "FSDP: 14,451 tokens/s/GPU (744 model TFLOP/s/GPU)",
         "recomputation (none); the Llama 3.1 config stands in for Llama 3 (same shapes)", fit_as="h100-vidur"),
    Case("Qwen3-30B-A3B, 16 H100, FP8", "qwen3-30b-a3b", "dgx-h100", 2,
         dict(tp=1, pp=2, dp=8, ep=8, zero=1, virtual_stages=24),
         dict(seq_len=4096, micro_batch_size=2, global_batch_size=512, schedule="interleaved", recompute="none",
              dtype="fp8", fp8_recipe="tensorwise"),
         "tokens_per_s_per_device", 5275.0, f"{NEMO_H100}: Qwen3_30B_a3B, 16 GPUs, FP8-CS, GBS 512, MBS 2, seq 4096, "
         "PP2 VP24 EP8: 5,275 tokens/s/GPU (121 model TFLOP/s/GPU)",
         "recomputation (none), ZeRO stage (1)", fit_as="h100-vidur"),
    Case("Llama 3.1 405B, 8192 H100", "llama-3.1-405b", "dgx-h100", 1024,
         dict(tp=8, pp=16, dp=64, zero=1, first_stage_layers=7, last_stage_layers=7),
         dict(seq_len=8192, micro_batch_size=1, global_batch_size=2048, schedule="1f1b", recompute="selective"),
         "tflops_per_device", 430.0, f"{LLAMA3}: 8,192 GPUs, TP8 CP1 PP16 DP64, seq 8192, 16M tokens/batch: "
         "430 TFLOPs/GPU (43 % BF16 MFU)",
         LLAMA3_ASSUMED, fit_as="h100-vidur"),
    Case("Llama 3.1 405B, 16384 H100", "llama-3.1-405b", "dgx-h100", 2048,
         dict(tp=8, pp=16, dp=128, zero=1, first_stage_layers=7, last_stage_layers=7),
         dict(seq_len=8192, micro_batch_size=1, global_batch_size=2048, schedule="1f1b", recompute="selective"),
         "tflops_per_device", 400.0, f"{LLAMA3}: 16,384 GPUs, TP8 CP1 PP16 DP128, seq 8192, 16M tokens/batch: "
         "400 TFLOPs/GPU (41 % BF16 MFU)",
         LLAMA3_ASSUMED, fit_as="h100-vidur"),
]


def predict(case: Case, cost_name: str) -> tuple[float, dict]:
    """Predicted metric of ``case`` with cost model ``cost_name`` (``default`` or ``roofline``)."""
    from hwmodels.cost import COST_MODELS
    from hwmodels.specs import load_system
    from moesim.train.ops import default_cost
    from moesim.train.spec import Parallel, TrainSpec
    from moesim.train.step import simulate_step
    from workloads.hf_config import load_config

    system = load_system(case.system).with_nodes(case.nodes)
    if case.fit_as and not system.device.gpu_fit and cost_name == "default":
        system = dataclasses.replace(system, device=dataclasses.replace(system.device, gpu_fit=case.fit_as))
    cost = default_cost(system.device) if cost_name == "default" else COST_MODELS[cost_name]()
    if case.comm_sms and hasattr(cost, "overlap_sms"):
        cost = dataclasses.replace(cost, overlap_sms=case.comm_sms)
    spec = TrainSpec(parallel=Parallel(**case.layout), **case.spec)
    r = simulate_step(load_config(case.model), system, spec, cost, check_memory=False)
    peak = system.device.peak("bf16")
    value = {"tokens_per_s_per_device": r.tokens_per_s_per_device, "step_time_s": r.step_time_s,
             "tflops_per_device": r.mfu * system.device.peak(spec.dtype) / TFLOPS}[case.metric]
    return value, {"bubble": r.breakdown["bubble_fraction"], "mfu_bf16": r.mfu * system.device.peak(spec.dtype) / peak,
                   "cost": getattr(cost, "name", type(cost).__name__), "memory_gb": r.memory_bytes["total"]["hbm"] / GB,
                   "fits": r.memory_bytes["total"]["hbm"] <= r.memory_bytes["capacity"]["hbm"]}


#: unpublished (or assumed) settings of each case, varied one at a time: (label, layout changes, spec changes)
VARIANTS = {
    "DeepSeek-V3 pre-training, 2048 H800": [("micro-batch size 2", {}, {"micro_batch_size": 2}),
                                            ("recompute none", {}, {"recompute": "none"}),
                                            ("schedule 1f1b (no F/B overlap)", {}, {"schedule": "1f1b"})],
    "Qwen3-235B-A22B, TP2 EP32 PP8 VPP4": [("ZeRO 0", {"zero": 0}, {}), ("recompute none", {}, {"recompute": "none"})],
    "Qwen3-235B-A22B, TP4 EP8 PP8 VPP4": [("ZeRO 0", {"zero": 0}, {}),
                                          ("recompute selective", {}, {"recompute": "selective"})],
    "Qwen3-235B-A22B, TP4 EP8 PP8 VPP4, seq 16384": [("recompute full", {}, {"recompute": "full"})],
    "Qwen3-235B-A22B, FSDP TP2 EP8": [("recompute selective", {}, {"recompute": "selective"})],
    "Llama 3 70B, 64 H100, FP8": [("recompute selective", {}, {"recompute": "selective"}),
                                  ("dtype bf16", {}, {"dtype": "bf16"})],
    "Llama 3 8B, 8 H100, FP8, FSDP": [("dtype bf16", {}, {"dtype": "bf16"})],
    "Qwen3-30B-A3B, 16 H100, FP8": [("dtype bf16", {}, {"dtype": "bf16"})],
    "Llama 3.1 405B, 8192 H100": [("interleaved, 2 virtual stages", {"virtual_stages": 2, "first_stage_layers": 0,
                                   "last_stage_layers": 0}, {"schedule": "interleaved"}),
                                  ("recompute none", {}, {"recompute": "none"}),
                                  ("even stage layout", {"first_stage_layers": 0, "last_stage_layers": 0}, {})],
    "Llama 3.1 405B, 16384 H100": [("interleaved, 2 virtual stages", {"virtual_stages": 2, "first_stage_layers": 0,
                                    "last_stage_layers": 0}, {"schedule": "interleaved"})],
}


def sensitivity() -> list[dict]:
    """How each prediction (default cost model) moves with the settings its source does not publish."""
    rows = []
    for case in CASES:
        for label, layout, spec in VARIANTS.get(case.name, []):
            varied = dataclasses.replace(case, layout={**case.layout, **layout}, spec={**case.spec, **spec})
            value, extra = predict(varied, "default")
            rows.append({"case": case.name, "variant": label, "metric": case.metric, "predicted": value,
                         "err_pct": (value - case.published) / case.published * 100,
                         "fits_80GB": "yes" if extra["fits"] else f"no ({extra['memory_gb']:.0f} GB)"})
    return rows


#: the terms of moesim.train.fp8 (FP8 casts), moesim.train.host (host overhead) and moesim.train.moe (token
#: permute/unpermute kernels), each switched off alone
TERMS = {"fp8_casts": {"fp8_recipe": "none"}, "host": {"host_overhead": "none"}, "permute": {"moe_permute": False}}


def term_effects() -> list[dict]:
    """Per case (default cost model): the prediction with every term, with each term of :data:`TERMS` off, and the
    points of error each term adds ((with - without) / published x 100), all computed in the same tree."""
    rows = []
    for case in CASES:
        full, _ = predict(case, "default")
        row = {"case": case.name, "metric": case.metric, "published": case.published, "predicted": full,
               "err_pct": (full - case.published) / case.published * 100}
        for term, off in TERMS.items():
            value, _ = predict(dataclasses.replace(case, spec={**case.spec, **off}), "default")
            row[f"without_{term}"] = value
            row[f"{term}_pts"] = (full - value) / case.published * 100
        rows.append(row)
    return rows


#: the overlap options of moesim.train.overlap, off in every case (Megatron's defaults; unpublished per case)
OVERLAPS = {"grad_reduce": {"overlap_grad_reduce": True},
            "grad_reduce_param_gather": {"overlap_grad_reduce": True, "overlap_param_gather": True},
            "tp_comm": {"tp_comm_overlap": True},
            "all_three": {"overlap_grad_reduce": True, "overlap_param_gather": True, "tp_comm_overlap": True}}


def overlap_effects() -> list[dict]:
    """Per case (default cost model): the error with the overlap options off (as the cases run) and with each
    variant of :data:`OVERLAPS` on, all computed in the same tree."""
    rows = []
    for case in CASES:
        off, _ = predict(case, "default")
        row = {"case": case.name, "metric": case.metric, "published": case.published,
               "off_err_pct": (off - case.published) / case.published * 100}
        for name, on in OVERLAPS.items():
            value, _ = predict(dataclasses.replace(case, spec={**case.spec, **on}), "default")
            row[f"{name}_err_pct"] = (value - case.published) / case.published * 100
        rows.append(row)
    return rows


def validate() -> list[dict]:
    rows = []
    for case in CASES:
        row = {"case": case.name, "metric": case.metric, "published": case.published}
        for cost_name in ("default", "roofline"):
            value, extra = predict(case, cost_name)
            row[f"{cost_name}_pred"] = value
            row[f"{cost_name}_err_pct"] = (value - case.published) / case.published * 100
            if cost_name == "default":
                row.update(cost=extra["cost"], bubble=extra["bubble"], memory_gb=extra["memory_gb"])
        rows.append(row)
    return rows


def speed() -> list[dict]:
    """Wall seconds of one DeepSeek-V3 step as GPUs, layers and micro-batches grow (balanced routing), with
    routing replayed from SGLang's DeepSeek-V3 expert-load table or drawn from the generator fitted to the
    embedded FLAME-MoE trace (reading and expanding the table, or fitting and generating, timed apart as
    ``trace_load_s``), and with the bidirectional DualPipe schedule."""
    from hwmodels.specs import load_system
    from moesim.train.ops import default_cost
    from moesim.train.routing import synthetic_trace
    from moesim.train.spec import Parallel, TrainSpec
    from moesim.train.step import simulate_step
    from workloads.hf_config import load_config
    from workloads.importers import find_shared_traces, load_trace
    from workloads.load_table import shipped_table_path

    rows = []
    cfg = load_config("deepseek-v3")
    shared = find_shared_traces()
    runs = [(32, 61, 1920, None, "dualpipe"), (128, 61, 7680, None, "dualpipe"), (256, 61, 15360, None, "dualpipe"),
            (256, 31, 15360, None, "dualpipe"), (256, 61, 7680, None, "dualpipe"),
            (256, 61, 15360, None, "dualpipe-bidir"), (256, 61, 15360, "synthetic", "dualpipe")]
    if shared is not None:
        runs.append((256, 61, 15360, f"{shipped_table_path('prefill_in4096', shared)}:tokens=8192,steps=2", "dualpipe"))
    labels = {None: "balanced", "synthetic": "synthetic (fitted to FLAME-MoE-290M), 4 x 8192 tokens"}
    for nodes, layers, gbs, routing, schedule in runs:
        system = load_system("hgx-h800").with_nodes(nodes)
        dp = nodes * 8 // 16
        spec = TrainSpec(Parallel(pp=16, dp=dp, ep=min(64, dp), zero=1), seq_len=4096, micro_batch_size=1,
                         global_batch_size=gbs, schedule=schedule, recompute="selective", dtype="fp8",
                         routing="balanced" if routing is None else "synthetic" if routing == "synthetic" else "trace")
        t0 = time.perf_counter()
        trace = None if routing is None else synthetic_trace(cfg, spec, load_trace("default")) \
            if routing == "synthetic" else load_trace(routing)
        load_s = time.perf_counter() - t0 if routing else 0.0
        t0 = time.perf_counter()
        simulate_step(cfg.with_layers(layers), system, spec, default_cost(system.device), trace=trace,
                      check_memory=False)
        wall_s = time.perf_counter() - t0
        rows.append({"gpus": nodes * 8, "layers": layers, "micro_batches": spec.num_micro_batches, "schedule": schedule,
                     "routing": labels.get(routing, "prefill_in4096 table, 2 x 8192 tokens, 4 samples"),
                     "trace_load_s": load_s, "wall_s": wall_s, "total_s": load_s + wall_s})
    return rows


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--validate", action="store_true")
    p.add_argument("--speed", action="store_true")
    args = p.parse_args(argv)
    do_val, do_speed = (args.validate or not args.speed), (args.speed or not args.validate)
    lines = ["## Training step (bench_train)", ""]
    if do_val:
        lines += ["Validation: `.venv/bin/python -m benchmarks.bench_train --validate`; error = (predicted - "
                  "published) / published. `default` = the device's default cost model (gpu-fitted: the `h100-vidur` "
                  "fit, which the h800-sxm and h100-sxm specs name), `roofline` = spec peaks.",
                  ""] + md_table(validate(), "{:,.4g}").split("\n") + [""]
        lines += ["Sources and unpublished settings:", ""] + [f"- {c.name}: {c.source}. Unpublished, assumed: "
                                                                f"{c.unpublished}." for c in CASES] + [""]
        lines += ["How the predictions move with unpublished settings (one change each, default cost model; memory "
                  "is not enforced here, `fits_80GB` says whether the variant fits):", ""]
        lines += md_table(sensitivity(), "{:,.4g}").split("\n") + [""]
        lines += ["What the FP8 quantization kernels (`fp8_casts`: the case's `fp8_recipe` against `none`, "
                  "moesim/train/fp8.py), the host launch time after each MoE dispatch sync (`host`: `eager` against "
                  "`none`, moesim/train/host.py; whether the runs used CUDA graphs is unpublished, `eager`, Megatron's "
                  "default, is assumed) and the MoE token permute/unpermute kernels (`permute`: on against off, "
                  "moesim/train/moe.py) add, each switched off alone (default cost model; `_pts`: points of error):", ""] + md_table(term_effects(), "{:,.4g}").split("\n") + [""]
        lines += ["Error with the overlap options of moesim/train/overlap.py on (`--overlap-grad-reduce`, "
                  "`--overlap-param-gather`, `--tp-comm-overlap`; off in every case above, Megatron's defaults; whether "
                  "the published runs had them on is unpublished), default cost model:", ""]
        lines += md_table(overlap_effects(), "{:,.4g}").split("\n") + [""]
    kept_val, kept_speed = _kept_sections()  # a run of one part keeps the other part of the last results file
    if not do_val:
        lines += kept_val
    if do_speed:
        lines += ["Speed: `.venv/bin/python -m benchmarks.bench_train --speed` (wall seconds of one simulated "
                  "DeepSeek-V3 step, PP16 EP64 on hgx-h800 nodes, one run each; trace_load_s: reading and "
                  "expanding the trace, or fitting the generator and drawing the routing, apart; total_s: both)",
                  ""] + md_table(speed(), "{:,.4g}").split("\n") + [""]
    else:
        lines += kept_speed
    return write_result("train", lines)


def _kept_sections() -> tuple[list[str], list[str]]:
    """The validation and the speed part (lines) of the current ``benchmarks/results/train.md``, if any."""
    from benchmarks import RESULTS

    path = RESULTS / "train.md"
    if not path.is_file():
        return [], []
    body = path.read_text().split("\n")[2:]  # after the heading and its blank line
    cut = next((i for i, line in enumerate(body) if line.startswith("Speed: `")), len(body))
    def part(lines: list[str]) -> list[str]:  # without its trailing blank lines, then one
        while lines and lines[-1] == "":
            lines = lines[:-1]
        return lines + [""] if lines else []

    return part(body[:cut]), part(body[cut:])


if __name__ == "__main__":
    main()
